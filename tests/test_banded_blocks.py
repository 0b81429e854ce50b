"""The flat, byte-budgeted band kernel (``mechanisms._banded.band_attention``) on its own.

- equals dense attention on the union of band and extra keys (each key once), for lengths the chunk does
  not divide, several sequences, missing extra slots, rows that see no key, and any group size;
- ``Layout.scored_keys`` is what FlopCounterMode counts;
- live temporaries stay within the budget it is given (the output aside), and the number of ops per call
  depends on N only through the number of groups: a constant when one group holds everything.
"""

from __future__ import annotations

import pytest
import torch

from effbench.measure.flops import count_flops
from effbench.measure.memory import tracked_peak
from effbench.profile.opstats import count_ops
from mechanisms._banded import Band, Extra, Layout, band_attention, band_plan

pytestmark = pytest.mark.usefixtures("one_thread")


def _case(L: int, *, c: int = 8, left: int = 5, right: int = 3, q_start: int = 3, kv_lo: int = 3,
          q_stop: int | None = None, kv_hi: int | None = None, X: int = 4, seed: int = 0):
    """A band (|offset| window, globals 0..kv_lo masked out of the span) with X extra keys per chunk:
    the first kv_lo positions when X = kv_lo, else random positions outside each chunk's span."""
    q_stop = L if q_stop is None else q_stop
    kv_hi = L if kv_hi is None else kv_hi
    band = Band.make(L=L, q_start=q_start, q_stop=q_stop, c=c, left=left, right=right, kv_lo=kv_lo,
                     kv_hi=(kv_hi,), offset_ok=lambda d: (d <= left) & (d >= -right))
    if X == 0:
        return band, None
    g = torch.Generator().manual_seed(seed)
    pos = torch.empty(band.nc, X, dtype=torch.long)
    avail = torch.ones(band.nc, X, dtype=torch.bool)
    for t in range(band.nc):  # keys outside the chunk's band: globals, or anything before/after its span
        lo = band.q_start + t * c - left
        outside = [j for j in range(L) if j < kv_lo or not (lo <= j < lo + band.span) or j >= kv_hi]
        pick = torch.randperm(len(outside), generator=g)[:X]
        pos[t] = torch.cat([torch.tensor(outside, dtype=torch.long)[pick], torch.zeros(X - len(pick), dtype=torch.long)])
        avail[t, len(pick):] = False  # too few keys outside the span: those slots are unused
    ok = (torch.rand(band.nc, X, generator=g) > 0.2) & avail  # some slots unused: many boundary chunks
    return band, Extra(pos, ok)


def _reference(q, k, v, band: Band, extra: Extra | None, scale: float) -> torch.Tensor:
    """Dense masked softmax over band ∪ extra keys, float64: (SB, rows, D); rows that see nothing give 0."""
    L = q.shape[1]
    i = torch.arange(band.q_start, band.q_stop)[:, None]
    j = torch.arange(L)[None, :]
    vis = band.offset_ok(i - j) & (j >= band.kv_lo) & (j < band.kv_hi[0])  # (rows, L)
    if extra is not None:
        t = (i[:, 0] - band.q_start) // band.c
        for s in range(extra.pos.shape[1]):
            vis[torch.arange(len(t)), extra.pos[t, s]] |= extra.ok[t, s]
    s = (q[:, band.q_start:band.q_stop] @ k.mT) * scale
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    return p @ v


@pytest.mark.parametrize("L,kw", [
    (64, {}),  # c divides L: flat views, no copy
    (61, {}),  # padded layout
    (70, {"q_start": 0, "kv_lo": 0, "X": 0}),  # no extra keys
    (53, {"q_stop": 45, "kv_hi": 45, "right": 0}),  # rows and keys stop early, causal-like offsets
    (50, {"q_start": 0, "kv_lo": 20, "X": 0, "c": 16, "left": 3, "right": 3}),  # rows 0..16 see no key
    (9, {"c": 4, "left": 2, "right": 2}),  # every chunk is a boundary chunk
])
@pytest.mark.parametrize("budget", [1, None], ids=["one-chunk-groups", "default-budget"])
def test_equals_dense_reference_forward_and_gradients(L, kw, budget):
    band, extra = _case(L, **kw)
    sb, d, scale = 3, 8, 0.4
    q, k, v = (torch.randn(sb, L, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    plan = band_plan(band, extra, "cpu", torch.float64)
    out = band_attention(q, k, v, plan, scale, budget=budget)[:, band.q_start:band.q_stop]
    ref = _reference(q, k, v, band, extra, scale)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    up = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), up)
    want = torch.autograd.grad(ref, (q, k, v), up)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("L", [64, 61])
def test_scored_keys_are_what_flop_counter_mode_counts(L):
    band, extra = _case(L)
    sb, d = 3, 8
    q, k, v = (torch.randn(sb, L, d) for _ in range(3))
    plan = band_plan(band, extra, "cpu", torch.float32)
    for budget in (1, None):
        flops, uncounted = count_flops(lambda b=budget: band_attention(q, k, v, plan, 0.5, budget=b))
        assert not uncounted
        assert flops == 4 * d * Layout.make(band, extra.ok).scored_keys(sb)


def test_live_temporaries_stay_within_the_budget():
    # B·H = 4 sequences of 4096 rows, a 1 MiB budget: many groups (and, with random slot masks, many boundary
    # chunks). Live at once: the groups' pieces so far plus one group's temporaries (≤ the budget), then the
    # pieces and the output they are concatenated into (2 × the output), plus the extra-key index.
    L, sb, d = 4096, 4, 32
    band, extra = _case(L, c=32, left=64, right=64, q_start=8, kv_lo=8, X=8)
    q, k, v = (torch.randn(sb, L, d) for _ in range(3))
    plan = band_plan(band, extra, "cpu", torch.float32)
    budget = 1 << 20
    with torch.no_grad():
        peak, out = tracked_peak(lambda: band_attention(q, k, v, plan, 0.5, budget=budget))
    output = out.numel() * out.element_size()
    index = sb * plan.layout.M * plan.layout.X * 8  # the extra-key index, built once per call
    assert peak <= 2 * output + index + budget, (peak, output, budget)


def test_ops_per_call_depend_on_n_only_through_groups():
    def ops(L: int, budget: int) -> int:
        band, extra = _case(L, c=16, left=32, right=32, q_start=4, kv_lo=4, X=4)
        q, k, v = (torch.randn(2, L, 16) for _ in range(3))
        plan = band_plan(band, extra, "cpu", torch.float32)
        with torch.no_grad():
            return count_ops(lambda: band_attention(q, k, v, plan, 0.5, budget=budget)).total

    big = 1 << 30  # one group at every N
    assert ops(1024, big) == ops(4096, big)
    assert ops(4096, 1 << 16) > ops(4096, big)  # a small budget: more groups, more ops
