"""Longformer attention: a sliding window plus a few global positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._banded import (
    Band,
    Extra,
    Layout,
    band_attention,
    band_plan,
    band_sdpa,
    pick_chunk,
)
from ._decode import RingKV, StaticKV, attend_parts
from ._flex import PatternAttention, count_tiles, flex_reasons, tile_span_candidates
from .base import KV_HEADS, Fidelity, Knob, decreasing, equals_dense_at, register
from .local import local_offsets


def longformer_pattern(window: int, globals_: int, causal: bool):
    near = local_offsets(window, causal)
    if causal:
        return lambda i, j: (j <= i) & (near(i - j) | (j < globals_))
    return lambda i, j: near(i - j) | (i < globals_) | (j < globals_)


@register(
    name="longformer", family="sparse", complexity="O(N·(W+G)·D)", memory="O(N·D) inference, O(N·(W+G)) with grad",
    knobs=[
        Knob("window", default=256, axis="window", minimum=1, small=37, length=True, help="one-sided window w"),
        Knob("globals", default=16, axis="globals", minimum=0, small=5, sweep=(0, 4, 16),
             help="the first g positions are global"),
        Knob("impl", default="eager", type=str, choices=("eager", "flex"),
             help="eager: banded chunks + global rows/columns; flex: compiled FlexAttention"),
        KV_HEADS,
    ],
)
class LongformerAttention(PatternAttention):
    """Longformer: window w plus g global positions (the first g) that attend to all and are attended by all.

    Query i sees S(i) = {j : |i − j| ≤ w} ∪ {j : j < g} ∪ (all j if i < g), each key counted
    once (a global key inside the window is not counted twice); causal: S(i) ∩ {j ≤ i}.
    out_i = Σ_{j ∈ S(i)} softmax_j(q_i·k_j/√D) v_j.

    eager: the g global rows are dense attention over all N keys (causal: their first g, top-left
    aligned), a g×N product (fused SDPA). The other rows are cut into chunks of c ≈ 64 attending to an
    ``unfold`` view of their key span [t·c − w, t·c + c + w) with global keys masked out of the
    span, and to the g global keys (:func:`._banded.band_attention`, the B·H sequences end to end);
    band and global scores are concatenated before one softmax, so each key is counted once.
    Row blocks: as many rows of all B·H sequences as ``temp_budget`` allows at 4·(2·(c + 2w + g) + 2g·D/c)
    bytes per fp32 row (causal c + w for c + 2w: its scores and probabilities, its gathered global keys and
    values), so a call dispatches a constant (~110 ops) plus ~18 per group, B·H·N·row bytes / budget groups.
    With g = 0 this is the local kernel (fused SDPA).
    Cost: 4·B·H·D·(g·N + (N − g)·(c + 2w + g)) FLOPs, plus about 2w/c + 1 chunks per sequence (causal
    w/c + 1) computed twice, once in the gap between two sequences of the flat layout and once with their own
    masks (``analytic_flops`` counts them exactly); memory O(B·H·N·D) inference plus the budget,
    O(B·H·N·(c + 2w + g)) saved for the backward.

    flex: ``flex_attention`` with the same mask on 128×128 tiles (the first tile row and column
    are dense: linear in N for fixed g).

    Decode (causal): the g global positions (a :class:`StaticKV` of g) and a ring of the last w + 1
    others (:class:`RingKV`), constant in N: 2·B·kv_heads·(g + w + 1)·D elements; one softmax over both,
    each key once. A new token past the first g is not global (globals are the first g positions).
    """

    decode_form = "the g global positions + a ring of the last w + 1: 2·B·kv_heads·(g+w+1)·D"

    fidelity = (Fidelity("window", (8, 32, 128, "N-1"), (decreasing(), equals_dense_at("N-1")),
                         why="a wider window sees more keys; w ≥ N − 1 sees them all"),)

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, window: int,
                 globals: int, impl: str = "eager", kv_heads: int = 0):
        super().__init__()
        self.window, self.globals = window, globals
        self._setup(head_dim=head_dim, heads=heads, n=n, causal=causal, impl=impl)

    # -- the pattern ---------------------------------------------------------------------
    def pattern_on(self, device: torch.device | str | None = None):
        return longformer_pattern(self.window, self.globals, self.causal)

    @classmethod
    def _candidates(cls, n: int, tile: int, window: int, globals_: int, causal: bool) -> torch.Tensor:
        cand = tile_span_candidates(n, tile, window, 0 if causal else window)  # (nt, nt) tiles, nt = ⌈N/tile⌉
        nt = cand.shape[0]
        first = torch.arange(nt) * tile < globals_  # (nt,) tiles holding global positions
        cand = cand | first[None, :] | first[:, None]  # (nt, nt)
        if causal:
            cand = cand & torch.ones(nt, nt, dtype=torch.bool).tril()
        return cand

    def flex_candidates(self, n: int, tile: int) -> torch.Tensor:
        return self._candidates(n, tile, self.window, self.globals, self.causal)

    @staticmethod
    def band_for(N: int, window: int, globals_: int, causal: bool) -> Band | None:
        g = min(globals_, N)
        if g >= N:
            return None
        reach = min(window, max(N - 1, 0))
        left, right = reach, 0 if causal else reach
        return Band.make(L=N, q_start=g, q_stop=N, c=pick_chunk(left, right, N - g), left=left, right=right,
                         kv_lo=g, kv_hi=(N,), offset_ok=local_offsets(window, causal))

    # -- eager ---------------------------------------------------------------------------
    @staticmethod
    def extra_for(band: Band, globals_: int) -> Extra:
        """The extra keys of every band chunk: the g global positions, all used."""
        return Extra(torch.arange(globals_).expand(band.nc, globals_), torch.ones(band.nc, globals_, dtype=torch.bool))

    def _make_plan(self, N: int, device: torch.device, dtype: torch.dtype) -> dict:
        band = self.band_for(N, self.window, self.globals, self.causal)
        g = min(self.globals, N)
        plan: dict = {"band": band, "g": g}
        if band is not None and g == 0:
            plan["biases"] = band.biases(device, dtype, float("-inf"))  # SDPA path handles -inf
        elif band is not None:
            plan["kernel"] = band_plan(band, self.extra_for(band, g), device, dtype)
            plan["global_rows"] = torch.arange(g, device=device)  # (g,)
        return plan

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: dict) -> torch.Tensor:
        B, H, N, D = q.shape
        band, g = plan["band"], plan["g"]
        if g > 0:  # 4-D slices so SDPA takes its fused kernel
            qg = q.narrow(2, 0, g)  # (B, H, g, D)
            if self.causal:  # global row i < g sees j <= i: the first g keys, top-left causal
                og = F.scaled_dot_product_attention(qg, k.narrow(2, 0, g), v.narrow(2, 0, g), is_causal=True,
                                                    scale=self.scale)  # (B, H, g, D)
            else:
                og = F.scaled_dot_product_attention(qg, k, v, scale=self.scale)  # (B, H, g, D)
            if band is None:
                return og  # every position is global
        qf, kf, vf = (t.reshape(B * H, N, D) for t in (q, k, v))  # (B·H, N, D)
        if g == 0:
            return band_sdpa(qf, kf, vf, band, plan["biases"], self.scale).unflatten(0, (B, H))  # (B, H, N, D)
        out = band_attention(qf, kf, vf, plan["kernel"], self.scale)  # (B·H, Lp, D), rows g … N − 1 set
        out.index_copy_(1, plan["global_rows"], og.flatten(0, 1))  # the global rows
        return out.narrow(1, 0, N).unflatten(0, (B, H))  # (B, H, N, D)

    # -- decode --------------------------------------------------------------------------
    def decode_init(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> tuple[StaticKV, RingKV]:
        g = self.globals
        first = StaticKV(k[:, :, :g], v[:, :, :g], g)  # (B, Hkv, g, D) twice: the global keys
        ring = RingKV(k[:, :, g:], v[:, :, g:], self.window + 1, start=min(g, k.shape[2]))  # (B, Hkv, w+1, D)
        return first, ring

    def decode_step(self, state: tuple[StaticKV, RingKV], q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> torch.Tensor:
        first, ring = state
        if first.length < first.capacity:  # a position < g: global, sees every j <= i (all among the first g)
            first.append(k, v)
            ring.length += 1
        else:
            ring.append(k, v)  # the ring holds the last w + 1 non-global positions, i − w … i
        gk, gv = first.keys()  # (B, Hkv, min(i+1, g), D)
        return attend_parts(q, [(gk, gv, None), (ring.k, ring.v, ring.visible)], self.scale)  # (B, H, 1, D)

    @classmethod
    def state_bytes(cls, *, batch: int, heads: int, kv_heads: int, head_dim: int, n: int, capacity: int,
                    itemsize: int, window: int, globals: int, impl: str = "eager") -> int:
        return (StaticKV.nbytes(batch=batch, kv_heads=kv_heads, capacity=globals, head_dim=head_dim, itemsize=itemsize)
                + RingKV.nbytes(batch=batch, kv_heads=kv_heads, size=window + 1, head_dim=head_dim, itemsize=itemsize))

    # -- declarations --------------------------------------------------------------------
    @classmethod
    def check(cls, *, n: int, causal: bool, heads: int, head_dim: int, device: str, dtype: str,
              window: int, globals: int, impl: str = "eager", mode: str | None = None, **_) -> list[str]:
        reasons = []
        if window >= n:
            reasons.append(f"window {window} >= n {n}: every query sees every key, this is dense attention")
        if globals >= n:
            reasons.append(f"globals {globals} >= n {n}: every position is global, this is dense attention")
        if impl == "flex":
            reasons += flex_reasons(device, dtype, mode)
        return reasons

    @classmethod
    def analytic_flops(cls, *, batch: int, heads: int, n: int, head_dim: int, causal: bool, window: int,
                       globals: int, impl: str = "eager", kv_heads: int = 0) -> int:
        if impl == "flex":
            pairs = count_tiles(longformer_pattern(window, globals, causal), n,
                                cls._candidates(n, cls.flex_tile, window, globals, causal), cls.flex_tile)
        else:
            g, sb = min(globals, n), batch * heads
            pairs = sb * g * (g if causal else n)
            band = cls.band_for(n, window, globals, causal)
            if band is not None and g == 0:
                pairs += sb * band.scored_keys()
            elif band is not None:
                pairs += Layout.make(band, cls.extra_for(band, g).ok).scored_keys(sb)
            return 4 * head_dim * pairs
        return 4 * batch * heads * head_dim * pairs
