"""The contract every registered mechanism meets, generated from the registry (xformers style).

Each test is parametrised over the mechanisms the registry holds (or, with ``--plugin FILE``, over
the mechanisms that plugin files register) and reads only what each mechanism declares: its knobs'
awkward values, causal modes, fidelity sweeps and trends, ``exact_at``, ``linear_at``, its memory
and time complexity, ``data_dependent``. A new mechanism file is tested here with no edit anywhere:

    python -m pytest tests/test_contract.py --plugin my_attn.py

- forward and gradients equal its own ``reference()`` in float32 against float64 (atol 1e-5, scaled
  by max(1, max|ref|)) on B > 1, H > 1 and an N that no window, block, bucket or segment divides;
- the fidelity trends it declares hold;
- linear memory (and work): peak tracked memory and FlopCounterMode FLOPs grow at most ×2.3 per
  doubling of N, forward and forward+backward;
- the fake-tensor prediction equals the tracker's real peak (unless declared data-dependent);
- ``unsupported()`` reasons are non-empty strings, and such a case is refused (a ``skipped`` row);
- two builds with one seed are identical.
"""

from __future__ import annotations

import pytest
import torch

import mechanisms
from effbench.cases import Case
from effbench.status import Status
from effbench.verify import check_fidelity
from effbench.verify.implementation import run_pair
from effbench.verify.settings import BATCH, DEFAULT_N, HEAD_DIM, HEADS, choose_knobs, mode_label
from helpers import assert_linear, growth

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
GROWTH_N = (4096, 8192, 16384)
GROWTH_N_QUADRATIC_WORK = (1024, 2048, 4096)  # linear memory, quadratic work (fused exact attention)
FIDELITY_N = 400


def subjects(config) -> list[str]:
    """The plugin's mechanisms when ``--plugin`` is given, else every registered one."""
    return list(getattr(config, "contract_mechanisms", None) or mechanisms.REGISTRY)


def _modes(spec) -> list[bool]:
    """The causal modes the mechanism supports (the others are the subject of the unsupported test)."""
    return [c for c in spec.causal_modes if (spec.supports_causal if c else spec.supports_bidirectional)]


def pytest_generate_tests(metafunc):
    names = subjects(metafunc.config)
    if "mechanism_mode" in metafunc.fixturenames:
        params = [(n, c) for n in names for c in _modes(mechanisms.get(n))]
        metafunc.parametrize("mechanism_mode", params,
                             ids=[f"{n}-{mode_label(mechanisms.get(n), c).replace(' ', '-')}" for n, c in params])
    elif "mechanism_growth" in metafunc.fixturenames:
        params = [(n, c, m) for n in names for c in _modes(mechanisms.get(n)) for m in ("fwd", "fwd+bwd")
                  if mechanisms.get(n).linear_memory]
        metafunc.parametrize("mechanism_growth", params,
                             ids=[f"{n}-{'causal' if c else 'bidir'}-{m}" for n, c, m in params])
    elif "mechanism" in metafunc.fixturenames:
        metafunc.parametrize("mechanism", names)


def _supported(spec, causal: bool, n: int, knobs: dict, mode: str = "fwd") -> list[str]:
    return spec.unsupported(Case(mechanism=spec.name, n=n, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM,
                                 causal=causal, knobs=tuple(knobs.items()), mode=mode))


# ------------------------------------------------------------------------------ exactness

def test_forward_and_gradients_equal_own_reference(mechanism_mode):
    """float32 forward and every gradient against reference() in float64, at the awkward knob values."""
    name, causal = mechanism_mode
    spec = mechanisms.get(name)
    knobs, reasons = choose_knobs(spec, DEFAULT_N, causal, batch=BATCH, heads=HEADS, mode="fwd+bwd",
                                  dtype="float32", device="cpu", seed=0)
    if knobs is None:
        pytest.skip(f"{name} {mode_label(spec, causal)}: " + "; ".join(reasons))
    pair = run_pair(spec, n=DEFAULT_N, causal=causal, knobs=knobs, dtype="float32", device="cpu", seed=0)
    assert pair.out.shape[0] == BATCH and torch.isfinite(pair.out).all()
    scale = max(1.0, pair.ref.abs().max().item())
    torch.testing.assert_close(pair.out.double(), pair.ref, atol=TOL * scale, rtol=0,
                               msg=lambda m: f"{name} {knobs} forward: {m}")
    assert pair.grad_error is None, f"{name}: {pair.grad_error}"
    labels = pair.names + pair.param_names
    for label, got, want in zip(labels, pair.grads, pair.ref_grads):
        assert (got is None) == (want is None) or (want is not None and not want.abs().max() > 0), \
            f"{name}: gradient of {label} present in only one of forward and reference"
        if got is not None and want is not None:
            gscale = max(1.0, want.abs().max().item())  # global keys collect gradient from every row
            torch.testing.assert_close(got.double(), want, atol=TOL * gscale, rtol=0,
                                       msg=lambda m: f"{name} {knobs} d{label}: {m}")


def test_declared_fidelity_holds(mechanism_mode):
    """The fidelity sweep runs (an exact mechanism equals dense attention) and every declared trend holds."""
    name, causal = mechanism_mode
    spec = mechanisms.get(name)
    if spec.fidelity is None:
        pytest.skip(f"{name}: {spec.no_fidelity_reason}")
    knobs, reasons = choose_knobs(spec, FIDELITY_N, causal, batch=1, heads=2, mode="fwd", dtype="float32",
                                  device="cpu", seed=0)
    if knobs is None:
        pytest.skip("; ".join(reasons))
    rows = check_fidelity(spec, n=FIDELITY_N, causal=causal, base_knobs=knobs, dtype="float32", device="cpu",
                          seed=0, tol=TOL)
    failed = [f"{r.check} {r.trend} {r.knob}={r.knob_value}: {r.detail}" for r in rows if r.passed is False]
    assert not failed, f"{name}: " + " | ".join(failed)
    assert any(r.error_rel is not None for r in rows if r.check == "fidelity"), f"{name}: no fidelity point ran"
    trends = [r for r in rows if r.check == "trend"]
    assert len(trends) == sum(len(f.expect) for f in spec.fidelity), f"{name}: a declared trend was not checked"
    assert all(r.applicable for r in trends), [r.reason for r in trends if not r.applicable]


# ------------------------------------------------------------------------------ cost

def test_memory_and_flops_grow_linearly(mechanism_growth):
    """Peak tracked memory (and, where the declared work is linear, FlopCounterMode FLOPs) ≤ ×2.3 per doubling."""
    name, causal, mode = mechanism_growth
    spec = mechanisms.get(name)
    knobs = spec.linear_at
    ns = GROWTH_N if spec.linear_flops else GROWTH_N_QUADRATIC_WORK
    reasons = _supported(spec, causal, ns[0], {**{k.name: k.default for k in spec.knobs}, **knobs}, mode)
    if reasons:
        pytest.skip("; ".join(reasons))
    rows = growth(name, ns, knobs=knobs, causal=causal, mode=mode)
    assert_linear(rows, max_ratio=2.3, flops=spec.linear_flops)


def test_prediction_equals_tracked_peak(mechanism):
    """The fake-tensor prediction reads the same tracker as the real pass: equal, byte for byte."""
    from effbench.measure.memory import tracked_peak
    from effbench.runner import predict
    from effbench.workload import prepare

    spec = mechanisms.get(mechanism)
    if spec.data_dependent:
        pytest.skip(f"{mechanism} declares data-dependent memory")
    for mode in ("fwd", "fwd+bwd"):
        causal = spec.causal_modes[-1] if spec.supports_causal else False
        case = Case(mechanism=mechanism, n=1031, heads=2, head_dim=32, mode=mode, causal=causal)
        if spec.unsupported(case):
            case = Case(mechanism=mechanism, n=1031, heads=2, head_dim=32, mode=mode, causal=not causal)
        if spec.unsupported(case):
            pytest.skip("; ".join(spec.unsupported(case)))
        w = prepare(case)
        w.call()  # warm: lazily built state is not part of the peak
        measured, _ = tracked_peak(w.call)
        assert predict(case).predicted_bytes == measured, f"{mechanism} {mode}"


# ------------------------------------------------------------------------------ declarations

def test_unsupported_reasons_are_sentences_and_refused(mechanism):
    """Every reason is a non-empty string; a case with reasons is refused as a ``skipped`` row."""
    from effbench.runner import RunOptions, measure_in_process

    spec = mechanisms.get(mechanism)
    below = [k for k in spec.knobs if k.minimum is not None and k.type is int]
    candidates = [(n, c, {}) for n in (1, 2, 7, 64) for c in (False, True)]
    candidates += [(64, False, {k.name: int(k.minimum) - 1}) for k in below]
    refused = 0
    for n, causal, knobs in candidates:
        case = dict(n=n, causal=causal, heads=2, head_dim=16, knobs=tuple(knobs.items()))
        reasons = spec.unsupported(case)
        assert isinstance(reasons, list) and all(isinstance(r, str) and r.strip() for r in reasons), reasons
        if reasons and not knobs:
            row = measure_in_process(Case(mechanism=mechanism, **case), RunOptions(repeats=1, warmup=0))
            assert row.status == Status.SKIPPED and row.error == "; ".join(reasons)
            refused += 1
    if not spec.supports_causal or not spec.supports_bidirectional:
        assert refused, f"{mechanism} declares an unsupported causal mode but no case was refused"


def test_two_builds_with_one_seed_are_identical(mechanism):
    spec = mechanisms.get(mechanism)
    causal = False if spec.supports_bidirectional else True
    kw = dict(head_dim=16, heads=2, n=100, causal=causal, seed=3)
    a, b = spec.build(**kw), spec.build(**kw)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{mechanism}: state differs between two builds"
    inputs = spec.make_inputs(batch=2, heads=2, n=100, head_dim=16, dtype=torch.float32, seed=1)
    with torch.no_grad():
        assert torch.equal(a(*inputs), b(*inputs)), f"{mechanism}: outputs differ between two builds"
