"""The contract every registered mechanism meets, generated from the registry (xformers style).

Each test is parametrised over the mechanisms the registry holds (or, with ``--plugin FILE``, over
the mechanisms that plugin files register) and reads only what each mechanism declares: its knobs'
awkward values, causal modes, fidelity sweeps and trends, ``exact_at``, ``linear_at``, its memory
and time complexity, ``data_dependent``. A new mechanism file is tested here with no edit anywhere:

    python -m pytest tests/test_contract.py --plugin my_attn.py

- forward and gradients equal its own ``reference()`` in float32 against float64 (atol 1e-5; for a
  gradient scaled by max(1, max|ref|), since global keys collect gradient from every row) on B > 1,
  H > 1 and an N that no window, block, bucket or segment divides;
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
from effbench.measure import memory
from effbench.status import Status
from effbench.verify import check_fidelity
from effbench.verify.implementation import run_pair
from effbench.verify.settings import BATCH, DEFAULT_N, HEAD_DIM, HEADS, choose_knobs, mode_label
from helpers import assert_linear, growth

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
GROWTH_N = (4099, 8198, 16396)  # doublings of a prime: no window, block or segment divides them
GROWTH_N_QUADRATIC_WORK = (1031, 2062, 4124)  # linear memory, quadratic work (fused exact attention)
FIDELITY_N = 400


def subjects(config) -> list[str]:
    """The plugin's mechanisms when ``--plugin`` is given, else every registered one."""
    if config.getoption("--plugin"):
        return list(config.contract_mechanisms)
    return list(mechanisms.REGISTRY)


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
    torch.testing.assert_close(pair.out.double(), pair.ref, atol=TOL, rtol=0,
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
    rows = growth(name, ns, knobs=knobs, causal=causal, mode=mode, batch=2, heads=2)
    assert_linear(rows, max_ratio=2.3, flops=spec.linear_flops)


OPS_N = (4096, 16384)  # B=1, H=8, D=64, fp32, default knobs: the sizes a GPU user runs
MAX_OPS = 200  # ops one call may dispatch at 16,384 (a kernel launch each on a GPU)
MAX_OPS_GROWTH = 1.5  # and at most this many times more from 4,096 to 16,384


def test_ops_per_call_do_not_grow_with_n(mechanism_mode):
    """One forward call on a GPU dispatches a bounded number of aten ops (a kernel launch each), nearly independent
    of N: blocks are sized from a byte budget (``mechanisms._budget``), not a fixed row count, so a GPU run is not
    launch-bound. Counted on fake tensors with the blocks a CUDA device gets (its 1 GiB budget); the CPU's smaller
    budget keeps blocks near the cache and dispatches more, cheaper, ops."""
    from effbench.profile.opstats import count_case_ops

    name, causal = mechanism_mode
    spec = mechanisms.get(name)
    cases = [Case(mechanism=name, n=n, batch=1, heads=8, head_dim=64, causal=causal) for n in OPS_N]
    if spec.unsupported(cases[0]):
        pytest.skip("; ".join(spec.unsupported(cases[0])))
    small, large = (count_case_ops(c, sized_for="cuda") for c in cases)
    assert large <= MAX_OPS, f"{name} {mode_label(spec, causal)}: {large} ops per call at n={OPS_N[1]}"
    assert large <= MAX_OPS_GROWTH * small, f"{name} {mode_label(spec, causal)}: ops {small} -> {large}"


def test_predicted_ops_equal_the_real_calls(mechanism_mode):
    """The ``ops`` an estimate reports (counted on fake tensors) are the ops the real call dispatches, one for one:
    a fake tensor's ``.device`` dispatches a metadata query that a real tensor answers without one."""
    from effbench.runner import predict
    from effbench.workload import prepare

    name, causal = mechanism_mode
    case = Case(mechanism=name, n=1031, batch=2, heads=2, head_dim=32, causal=causal)
    if mechanisms.get(name).unsupported(case):
        pytest.skip("; ".join(mechanisms.get(name).unsupported(case)))
    w = prepare(case)
    w.call()
    real, _ = memory.track(w.call)
    assert predict(case).ops == real.dispatched, f"{name} {mode_label(mechanisms.get(name), causal)}"


def test_prediction_equals_tracked_peak(mechanism, request):
    """A sweep row's fake-tensor prediction equals its measured tracker peak, byte for byte: both are taken in
    one fresh child process, as in every sweep (the prediction first, then the real warm call)."""
    from effbench.runner import RunOptions, run_case

    spec = mechanisms.get(mechanism)
    if spec.data_dependent:
        pytest.skip(f"{mechanism} declares data-dependent memory")
    plugins = tuple(str(p) for p in request.config.getoption("--plugin") or ())
    opts = RunOptions(warmup=1, repeats=1, measure_flops=False, plugins=plugins, threads=1)  # as a sweep: timed calls first
    for causal in _modes(spec):
        for mode in ("fwd", "fwd+bwd"):
            case = Case(mechanism=mechanism, n=1031, batch=2, heads=2, head_dim=32, mode=mode, causal=causal)
            if spec.unsupported(case):
                pytest.skip("; ".join(spec.unsupported(case)))
            row = run_case(case, opts)
            assert row.status == Status.OK, (mechanism, mode, row.status, row.error)
            assert row.predicted_bytes == row.peak_tensor_bytes, f"{mechanism} {mode} causal={causal}"


# ------------------------------------------------------------------------------ declarations

def test_unsupported_reasons_are_sentences_and_refused(mechanism):
    """Every reason is a non-empty string; a case with reasons is refused as a ``skipped`` row."""
    from effbench.runner import RunOptions, measure_in_process

    spec = mechanisms.get(mechanism)
    below = [k for k in spec.knobs if k.minimum is not None and k.type is int]
    causal_ok = _modes(spec)[0]
    candidates = [(n, c, {}) for n in (1, 2, 7, 64) for c in (False, True)]
    candidates += [(64, causal_ok, {k.name: int(k.minimum) - 1}) for k in below]
    candidates += [(64, causal_ok, {"no_such_knob": 1})]  # every mechanism refuses a knob it does not have
    refused = 0
    for n, causal, knobs in candidates:
        case = dict(n=n, causal=causal, heads=2, head_dim=16, knobs=tuple(knobs.items()))
        reasons = spec.unsupported(case)
        assert isinstance(reasons, list) and all(isinstance(r, str) and r.strip() for r in reasons), reasons
        if knobs:
            assert reasons, f"{mechanism} accepted {knobs}"
        if reasons:
            row = measure_in_process(Case(mechanism=mechanism, **case), RunOptions(repeats=1, warmup=0))
            assert row.status == Status.SKIPPED and row.error == "; ".join(reasons), (knobs, row.status, row.error)
            refused += 1
    assert refused >= 1 + len(below)
    if not spec.supports_causal or not spec.supports_bidirectional:
        assert refused > 1 + len(below), f"{mechanism} declares an unsupported causal mode but no case was refused"


def test_two_builds_with_one_seed_are_identical(mechanism_mode):
    """Random state (features, projections, rotations, blocks) is drawn in __init__ from the seed alone."""
    name, causal = mechanism_mode
    spec = mechanisms.get(name)
    knobs, reasons = choose_knobs(spec, DEFAULT_N, causal, batch=BATCH, heads=HEADS, mode="fwd", dtype="float32",
                                  device="cpu", seed=3)
    if knobs is None:
        pytest.skip("; ".join(reasons))
    kw = dict(head_dim=HEAD_DIM, heads=HEADS, n=DEFAULT_N, causal=causal, seed=3, **knobs)
    a, b = spec.build(**kw), spec.build(**kw)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{name}: state differs between two builds"
    inputs = spec.make_inputs(batch=BATCH, heads=HEADS, n=DEFAULT_N, head_dim=HEAD_DIM, dtype=torch.float32, seed=1)
    with torch.no_grad():
        assert torch.equal(a(*inputs), b(*inputs)), f"{name}: outputs differ between two builds"


# ------------------------------------------------------------------------------ grouped-query attention

@pytest.mark.parametrize("kv_heads", [2, 1])
def test_grouped_query_forward_equals_reference(mechanism, kv_heads):
    """With kv_heads < heads (H=4: GQA with 2, MQA with 1), K and V carry kv_heads heads and forward equals
    reference() (which repeats them) in float32 against float64, each causal mode, B=2, N=777."""
    spec = mechanisms.get(mechanism)
    if "kv_heads" not in spec.knob_names:
        pytest.skip(f"{mechanism} takes no kv_heads knob")
    for causal in _modes(spec):
        knobs, reasons = choose_knobs(spec, DEFAULT_N, causal, batch=BATCH, heads=4, mode="fwd", dtype="float32",
                                      device="cpu", seed=0)
        if knobs is None:
            continue
        knobs = {**knobs, "kv_heads": kv_heads}
        module = spec.build(head_dim=HEAD_DIM, heads=4, n=DEFAULT_N, causal=causal, seed=0, **knobs)
        q, k, v = spec.make_inputs(batch=BATCH, heads=4, n=DEFAULT_N, head_dim=HEAD_DIM, dtype=torch.float64,
                                   knobs=knobs)
        assert k.shape[1] == v.shape[1] == kv_heads
        with torch.no_grad():
            ref = module.to(torch.float64).reference(q, k, v)  # (B, 4, N, D)
            out = module.to(torch.float32)(q.float(), k.float(), v.float())
        assert out.shape == ref.shape
        err = float((out.double() - ref).abs().max())
        assert err <= TOL * max(1.0, float(ref.abs().max())), f"{mechanism} causal={causal} kv_heads={kv_heads}: {err:.2e}"


# ------------------------------------------------------------------------------ decode

def test_decode_equals_causal_prefill(mechanism):
    """T single-token steps (9, or the longest window/segment/block + 2) after a context of N0 = 777 equal the float64 causal reference over N0 + T at its
    last T rows (atol 1e-5), B=2, H=4, with kv_heads 4, 2 and 1 where the mechanism takes it; the state's measured
    bytes equal its declared ``state_bytes``. A mechanism with no decode form says why."""
    from effbench.verify.decode import check_decode

    spec = mechanisms.get(mechanism)
    if not spec.decodes:
        assert spec.no_decode_reason.strip()
        pytest.skip(f"{mechanism} has no decode form: {spec.no_decode_reason}")
    rows = check_decode(spec, n=DEFAULT_N, dtype="float32", device="cpu", seed=0, tol=TOL)
    for r in rows:
        print(f"{mechanism} [{r.knobs}] max|decode-prefill|={r.max_abs_err} {r.detail}")
    failed = [f"[{r.knobs}] {r.reason or r.detail}" for r in rows if r.passed is not True]
    assert not failed, f"{mechanism}: " + "; ".join(failed)


def test_decode_row_state_is_measured_predicted_and_declared(mechanism, request):
    """A decode sweep row (fresh child, B=2, kv_heads 1 where the mechanism takes it, N=1031): the state's tracked
    bytes equal its declared formula and its fake-tensor prediction, and one step's predicted peak equals the
    measured one; so `effbench estimate --phase decode` knows both without allocating."""
    from effbench.runner import RunOptions, run_case

    spec = mechanisms.get(mechanism)
    if not spec.decodes:
        pytest.skip(f"{mechanism} has no decode form: {spec.no_decode_reason}")
    plugins = tuple(str(p) for p in request.config.getoption("--plugin") or ())
    opts = RunOptions(repeats=1, plugins=plugins, threads=1)
    knobs = (("kv_heads", 1),) if "kv_heads" in spec.knob_names else ()
    case = Case(mechanism=mechanism, n=1031, batch=2, heads=2, head_dim=32, causal=True, phase="decode",
                decode_steps=3, knobs=knobs)
    if spec.unsupported(case):
        pytest.skip("; ".join(spec.unsupported(case)))
    row = run_case(case, opts)
    assert row.status == Status.OK, (mechanism, row.status, row.error)
    assert row.state_bytes == row.predicted_state_bytes
    assert abs(row.state_bytes - row.state_bytes_analytic) <= 0.01 * row.state_bytes_analytic
    if not spec.data_dependent:
        assert row.predicted_bytes == row.peak_tensor_bytes
    assert row.read_bytes and row.time_ms_per_token is not None and row.flops
