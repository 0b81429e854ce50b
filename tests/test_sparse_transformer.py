"""Sparse Transformer (Child et al. 2019): independent oracles, the fixed pattern's contract, and the exponent.

- Oracles: the strided and fixed masks are built here by enumeration from the formulas of the issue (strided:
  the offsets |d| < l and ±l·t; fixed: the diagonal blocks of l and the last c columns of every block), on
  N = 1000 with strides that do not divide it (37, 32 and the default, 32); ``pattern_on`` (the mask
  ``reference()`` uses) must equal them, and forward must equal dense attention under them in float32 (1e-5)
  and float64 (1e-10), causal and bidirectional. A stride one larger in forward and reference alike is
  caught.
- The contract suite runs at the default pattern (strided); here the same checks for ``pattern=fixed``:
  forward and gradients against reference() at N = 777 (B=2, H=3) with awkward knobs, grouped-query K/V,
  decode equal to the causal prefill with state bytes measured = declared, the fake-tensor predictions of a
  prefill and a decode row equal to the tracked peaks, and its fidelity sweep (decreasing in c, dense at c ≥ l).
- The exponent: FlopCounterMode FLOPs and the bytes a forward keeps for the backward fit N^1.5 at the
  default stride (l = √N); at a fixed stride the work is not linear but quadratic (N/l strided keys per row);
  the inference peak grows at most ×2.3 per doubling (scores are chunked).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import mechanisms
from effbench.fits import fit_loglog
from effbench.measure import memory
from effbench.measure.flops import count_flops
from mechanisms import Fidelity, decreasing, equals_dense_at
from mechanisms.sparse_transformer import auto_stride
from helpers import assert_matches_reference, growth

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "sparse-transformer"
B, H, D = 2, 3, 16
N = 1000  # not a multiple of 37 or 32, nor of the 64-row chunks
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def spec():
    return mechanisms.get(NAME)


def qkv(n: int = N, dtype: torch.dtype = torch.float32, seed: int = 0, heads: int = H, kv_heads: int | None = None):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, heads, n, D)] + [(B, kv_heads or heads, n, D)] * 2
    return tuple(torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes)


def build(causal: bool, dtype: torch.dtype = torch.float32, n: int = N, heads: int = H, **knobs):
    m = spec().build(head_dim=D, heads=heads, n=n, causal=causal, seed=0, **knobs)
    return m.double() if dtype == torch.float64 else m


# --------------------------------------------------------------------------- masks by enumeration

def strided_oracle(n: int, l: int, causal: bool) -> torch.Tensor:
    """Offsets d = i − j with |d| < l (the band), and d = ±l·t for t ≥ 1 (the strided keys), set one by one."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    i = torch.arange(n)
    offsets = set(range(-(l - 1), l)) | {s * l * t for t in range(1, n // l + 1) for s in (1, -1)}
    for d in offsets:
        j = i - d
        ok = (j >= 0) & (j < n)
        mask[i[ok], j[ok]] = True
    return mask & torch.ones(n, n, dtype=torch.bool).tril() if causal else mask


def fixed_oracle(n: int, l: int, c: int, causal: bool) -> torch.Tensor:
    """The diagonal blocks [b·l, (b+1)·l)², and the columns b·l + l − c … b·l + l − 1 of every block b."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    for b in range(-(-n // l)):
        mask[b * l:(b + 1) * l, b * l:(b + 1) * l] = True
        for u in range(max(l - c, 0), l):
            if b * l + u < n:
                mask[:, b * l + u] = True
    return mask & torch.ones(n, n, dtype=torch.bool).tril() if causal else mask


def dense_under(q, k, v, visible):
    """float64 softmax(q·kᵀ/√D) v over the visible keys (every row sees at least itself)."""
    s = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)).masked_fill(~visible, -math.inf)
    return torch.softmax(s, dim=-1) @ v.double()


ORACLES = [  # knobs, stride the formula uses (√1000 = 31.6 → 32 for the default), oracle
    ({"pattern": "strided", "stride": 37}, lambda causal: strided_oracle(N, 37, causal)),
    ({"pattern": "strided", "stride": 32}, lambda causal: strided_oracle(N, 32, causal)),
    ({"pattern": "strided"}, lambda causal: strided_oracle(N, 32, causal)),
    ({"pattern": "fixed", "stride": 37, "summary": 5}, lambda causal: fixed_oracle(N, 37, 5, causal)),
    ({"pattern": "fixed", "stride": 32, "summary": 8}, lambda causal: fixed_oracle(N, 32, 8, causal)),
    ({"pattern": "fixed"}, lambda causal: fixed_oracle(N, 32, 8, causal)),
]
ORACLE_CASES = [pytest.param(kn, fn, causal, id="-".join(map(str, kn.values())) + ("-causal" if causal else "-bidir"))
                for kn, fn in ORACLES for causal in (False, True)]


@pytest.mark.parametrize("knobs,oracle,causal", ORACLE_CASES)
def test_pattern_and_forward_match_the_formula(knobs, oracle, causal):
    want = oracle(causal)
    m = build(causal, **knobs)
    got = mechanisms.mask_from_mod(m.pattern_on(), N)
    assert torch.equal(got, want), f"pattern_on differs from the formula at {int((got != want).sum())} pairs"
    for dtype in (torch.float32, torch.float64):
        m = build(causal, dtype, **knobs)
        q, k, v = qkv(dtype=dtype)
        with torch.no_grad():
            out = m(q, k, v)
        assert out.shape == (B, H, N, D) and out.dtype == dtype
        err = float((out.double() - dense_under(q, k, v, want)).abs().max())
        assert err <= ATOL[dtype], f"{knobs} causal={causal} {dtype}: forward differs from the formula by {err:.3g}"


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_stride_one_larger_passes_reference_but_fails_oracle(monkeypatch, pattern):
    """The stride resolved one larger (forward and reference alike): self-consistent, caught by the oracle."""
    import mechanisms.sparse_transformer as st

    resolve = st.resolve_stride
    monkeypatch.setattr(st, "resolve_stride", lambda stride, n: resolve(stride, n) + 1)
    m = build(False, torch.float64, pattern=pattern, stride=37, summary=5)
    assert m.stride == 38
    q, k, v = qkv(dtype=torch.float64)
    with torch.no_grad():
        out = m(q, k, v)
        torch.testing.assert_close(out, m.reference(q, k, v), atol=1e-10, rtol=0)
    want = strided_oracle(N, 37, False) if pattern == "strided" else fixed_oracle(N, 37, 5, False)
    err = float((out - dense_under(q, k, v, want)).abs().max())
    assert err > 1e-3, f"the oracle missed a stride one larger (error {err:.3g})"


# --------------------------------------------------------------------------- stride resolution, declarations

def test_auto_stride_is_sqrt_n_to_the_nearest_power_of_two():
    want = {1: 1, 3: 2, 16: 4, 777: 32, 1000: 32, 1024: 32, 2048: 32, 2304: 32, 2400: 64, 4096: 64, 16384: 128,
            1 << 20: 1024}
    assert {n: auto_stride(n) for n in want} == want
    for n in want:  # nearest: no other power of two is closer to √n
        s = math.sqrt(n)
        assert all(abs(s - auto_stride(n)) <= abs(s - 2 ** e) for e in range(12))
    m = build(False, n=777)
    info = m.build_info()
    assert m.stride == 32 and info["stride"] == 32 and "auto" in info["stride_from"] and "777" in info["stride_from"]
    assert build(False, n=777, stride=38).build_info()["stride_from"] == "knob"


def test_declarations():
    s = spec()
    assert s.family == "sparse" and s.complexity == "O(N·√N·D)"
    assert not s.linear_memory and not s.linear_flops  # the contract's ×2.3-per-doubling test does not apply
    assert s.decodes and "kv_heads" in s.knob_names
    assert s.unsupported({"n": 100, "causal": False, "heads": 2, "head_dim": 16, "knobs": (("stride", 101),)})
    assert not s.unsupported({"n": 100, "causal": True, "heads": 2, "head_dim": 16, "knobs": (("stride", 100),)})
    assert s.unsupported({"n": 100, "causal": False, "heads": 2, "head_dim": 16, "knobs": (("pattern", "banded"),)})


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_stride_n_is_dense(pattern, causal):
    n = 300
    m = build(causal, torch.float64, n=n, pattern=pattern, stride=n)
    q, k, v = qkv(n=n, dtype=torch.float64)
    with torch.no_grad():
        want = mechanisms.masked_softmax_attention(q, k, v, mechanisms.causal_mask(n) if causal else None)
        torch.testing.assert_close(m(q, k, v), want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("n,knobs", [
    (1000, {"pattern": "strided", "stride": 37}), (1000, {"pattern": "strided"}),
    (777, {"pattern": "strided", "stride": 5}),
    (1000, {"pattern": "fixed", "stride": 37, "summary": 5}), (1000, {"pattern": "fixed"}),
    (777, {"pattern": "fixed", "stride": 6, "summary": 4}),
])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_analytic_flops_are_the_counted_ones(n, knobs, causal):
    m = build(causal, n=n, **knobs)
    q, k, v = qkv(n=n)
    with torch.no_grad():
        flops, uncounted = count_flops(lambda: m(q, k, v))
    assert not uncounted
    assert flops == spec().analytic_flops(batch=B, heads=H, n=n, head_dim=D, causal=causal, **knobs)
    assert flops < 4 * B * H * n * n * D


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_strided_forward_and_gradients_when_the_stride_divides_n(causal):
    """l | N: the residue classes' outputs are merged as a (BH, P, l, ·) view of the local part's rows, in place."""
    n = 1024  # l = 32, P = 32, windows of 64 rows: nothing padded
    m32, m64 = build(causal, n=n), build(causal, torch.float64, n=n)
    q, k, v = (t.requires_grad_() for t in qkv(n=n))
    assert_matches_reference(m32, m64, q, k, v)


@pytest.mark.parametrize("knobs", [{"pattern": "strided", "stride": 37}, {"pattern": "strided"},
                                   {"pattern": "fixed", "stride": 37, "summary": 5}], ids=lambda k: "-".join(map(str, k.values())))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_blocks_give_the_same_result(knobs, causal):
    """Tiny byte budgets (one window, residue class or row a block; then three windows a block, so that some blocks
    hold no window at a sequence's ends and skip that mask) give the one-block result, forward and gradients."""
    m = build(causal, **knobs)
    q, k, v = (t.requires_grad_() for t in qkv())
    g = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(3))
    whole = m(q, k, v)
    want = torch.autograd.grad(whole, (q, k, v), g)
    span = m.geometry(N).span
    for budget in (1, 3 * 64 * span * 4):
        m.temp_bytes = budget  # instance attribute overrides the device budget
        out = m(q, k, v)
        torch.testing.assert_close(out, whole, atol=1e-6, rtol=0)
        for got, ref in zip(torch.autograd.grad(out, (q, k, v), g), want):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        with torch.no_grad():  # inference: the blocks share one score buffer
            torch.testing.assert_close(m(q, k, v), whole, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- the fixed pattern's contract

FIXED = {"pattern": "fixed", "stride": 38, "summary": 5}  # 777 = 3·7·37: the contract's awkward stride is 38


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_fixed_forward_and_gradients_equal_reference(causal):
    n = 777
    m32, m64 = build(causal, n=n, **FIXED), build(causal, torch.float64, n=n, **FIXED)
    q, k, v = (t.requires_grad_() for t in qkv(n=n))
    assert_matches_reference(m32, m64, q, k, v)


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_fixed_grouped_query_equals_reference(causal, kv_heads):
    n = 777
    m = build(causal, n=n, heads=4, kv_heads=kv_heads, **FIXED)
    q, k, v = qkv(n=n, dtype=torch.float64, heads=4, kv_heads=kv_heads)
    with torch.no_grad():
        ref = m.double().reference(q, k, v)
        out = m.float()(q.float(), k.float(), v.float())
    assert float((out.double() - ref).abs().max()) <= 1e-5


def test_fixed_decode_equals_causal_prefill():
    from effbench.verify.decode import kv_variants, run_decode, steps_for

    s = spec()
    steps = steps_for(s, FIXED)
    assert steps == 40  # crosses a block boundary after N0 = 777
    for kv in kv_variants(s):
        o = run_decode(s, n0=777, steps=steps, knobs=FIXED, kv_heads=kv)
        print(f"fixed decode kv_heads={kv}: max|decode-prefill|={o.max_abs_err:.2e}, state {o.state_bytes} B "
              f"measured, {o.state_bytes_analytic} B declared")
        assert o.max_abs_err <= 1e-5 * o.scale
        assert o.state_bytes == o.state_bytes_analytic


def test_fixed_predictions_equal_tracked_peaks():
    """As the contract does for the default pattern: a prefill row's fake-tensor prediction equals its tracked peak
    (both modes, both causal settings), and a decode row's state is measured = predicted = declared."""
    from effbench.cases import Case
    from effbench.runner import RunOptions, run_case
    from effbench.status import Status

    knobs = (("pattern", "fixed"),)
    opts = RunOptions(warmup=1, repeats=1, measure_flops=False, threads=1)
    for causal in (False, True):
        for mode in ("fwd", "fwd+bwd"):
            row = run_case(Case(mechanism=NAME, n=1031, batch=2, heads=2, head_dim=32, mode=mode, causal=causal,
                                knobs=knobs), opts)
            assert row.status == Status.OK, (mode, row.status, row.error)
            assert row.predicted_bytes == row.peak_tensor_bytes, (mode, causal)
    row = run_case(Case(mechanism=NAME, n=1031, batch=2, heads=2, head_dim=32, causal=True, phase="decode",
                        decode_steps=3, knobs=knobs + (("kv_heads", 1),)), RunOptions(repeats=1, threads=1))
    assert row.status == Status.OK, (row.status, row.error)
    assert row.state_bytes == row.predicted_state_bytes == row.state_bytes_analytic
    assert row.predicted_bytes == row.peak_tensor_bytes
    assert row.read_bytes and row.flops


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_fixed_fidelity(causal):
    """The declared stride sweep (dense at l = N) and the summary sweep: more summary columns are a superset of
    keys, so the error decreases in c, and c ≥ l makes every column a summary column (dense)."""
    from effbench.verify import check_fidelity

    base = spec()

    class Fixed(base.cls):
        fidelity = base.cls.fidelity + (Fidelity("summary", (1, 4, 16, "N"), (decreasing(), equals_dense_at("N")),
                                                 why="c more summary columns per block: a superset"),)

    variant = dataclasses.replace(base, cls=Fixed)
    rows = check_fidelity(variant, n=400, causal=causal, base_knobs={"pattern": "fixed", "stride": 37, "summary": 5},
                          dtype="float32", device="cpu", seed=0, tol=1e-5)
    for r in rows:
        print(f"fixed {r.check} {r.knob}={r.knob_value} {r.trend or ''} err={r.error_rel} {r.detail}")
    assert not [r for r in rows if r.passed is False]
    trends = [r for r in rows if r.check == "trend"]
    assert len(trends) == 3 and all(r.applicable and r.passed for r in trends)


# --------------------------------------------------------------------------- the exponent

def _held_after_forward(pattern: str, n: int, **knobs) -> int:
    """Bytes a forward with grad allocates and keeps (the output and what autograd saves for the backward)."""
    m = spec().build(head_dim=16, heads=1, n=n, causal=False, seed=0, pattern=pattern, **knobs)
    q, k, v = spec().make_inputs(batch=1, heads=1, n=n, head_dim=16, dtype=torch.float32, requires_grad=True)
    tracker, out = memory.track(lambda: m(q, k, v))
    held = tracker.current  # read while the output (and its graph) is alive: the tracker follows frees
    del out
    return held


def _exponent(ns, ys) -> float:
    return fit_loglog(list(ns), list(ys)).slope


# strided: below l = 64 (N < 4096) the chunk is 64 rows, not l, so its c + 2l + N/l per row reaches the 4√N form
# from N = 4096; fixed: the N·c/l = 8√N summary keys per row dominate from N = 1024
EXPONENT_N = {"strided": (4096, 16384, 65536), "fixed": (1024, 4096, 16384)}


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_work_and_kept_memory_grow_as_n_to_the_1_5_at_the_default_stride(pattern):
    ns = EXPONENT_N[pattern]
    assert [auto_stride(n) for n in ns] == [math.isqrt(n) for n in ns]  # powers of four: l = √N exactly
    rows = growth(NAME, ns, knobs={"pattern": pattern}, mode="fwd", batch=1, heads=1, head_dim=16)
    flops = [f for _, _, f in rows]
    held = [_held_after_forward(pattern, n) for n in ns]
    ef, em = _exponent(ns, flops), _exponent(ns, held)
    print(f"{pattern} default stride, N={ns}: FLOPs {flops} exponent {ef:.3f}; kept for backward {held} B "
          f"exponent {em:.3f}")
    assert 1.35 <= ef <= 1.65, f"FLOPs exponent {ef:.3f}"
    assert 1.35 <= em <= 1.65, f"memory exponent {em:.3f}"


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_work_is_quadratic_at_a_fixed_stride(pattern):
    """l + N/l ≥ 2√N: at a fixed l the N/l strided (N·c/l summary) keys per row make the work grow towards N²,
    never linearly: the fitted exponent is well above 1.5 and the last doubling more than ×2.3."""
    ns = (2048, 4096, 8192, 16384)
    rows = growth(NAME, ns, knobs={"pattern": pattern, "stride": 16}, mode="fwd", batch=1, heads=1, head_dim=16)
    flops = [f for _, _, f in rows]
    e = _exponent(ns, flops)
    print(f"{pattern} stride 16, N={ns}: FLOPs {flops} exponent {e:.3f}, last doubling ×{flops[-1] / flops[-2]:.2f}")
    assert e >= 1.65 and flops[-1] / flops[-2] > 2.3


def test_inference_peak_grows_linearly():
    """Inference (no grad): the scores are chunked (≤ 2²² elements live per group), so past that budget the
    peak grows with the O(N·D) inputs and outputs only: at most ×2.3 per doubling (default stride)."""
    ns = (16384, 32768, 65536)
    rows = growth(NAME, ns, mode="fwd", batch=1, heads=1, head_dim=16)
    ratios = [b[1] / a[1] for a, b in zip(rows, rows[1:])]
    print(f"strided default stride, fwd peak {[m for _, m, _ in rows]} B, per doubling {ratios}")
    assert all(r <= 2.3 for r in ratios)
