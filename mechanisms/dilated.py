"""Dilated sliding-window attention: each query sees every δ-th key within δ·w positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._banded import Band, band_sdpa, pick_chunk
from ._decode import RingKV, attend_one
from ._flex import PatternAttention, count_tiles, flex_reasons, tile_span_candidates
from .base import KV_HEADS, Fidelity, Knob, decreasing, register
from .local import local_offsets


def dilated_pattern(window: int, dilation: int, causal: bool):
    near = local_offsets(window * dilation, causal)
    return lambda i, j: ((i - j) % dilation == 0) & near(i - j)


@register(
    name="dilated", family="sparse", complexity="O(N·W·D)", memory="O(N·D)",
    knobs=[
        Knob("window", default=256, axis="window", minimum=1, small=37, length=True, 
             help="one-sided window w, in dilated steps"),
        Knob("dilation", default=2, axis="dilation", minimum=1, small=3, sweep=(1, 2, 4),
             help="stride δ between visible keys"),
        Knob("impl", default="eager", type=str, choices=("eager", "flex"),
             help="eager: δ interleaved sub-sequences through banded SDPA; flex: compiled FlexAttention"),
        KV_HEADS,
    ],
)
class DilatedAttention(PatternAttention):
    """Dilated window: query i sees keys j = i + δ·t with |t| ≤ w (causal −w ≤ t ≤ 0).

    out_i = Σ_{t} softmax_t(q_i·k_{i+δt}/√D) v_{i+δt}: 2w+1 keys per row (w+1 causal) spread
    over 2δw+1 positions; δ = 1 is the local window.

    eager: positions with the same residue i mod δ form δ interleaved sub-sequences of
    length ⌈N/δ⌉; a dilated window on the sequence is a plain window w on each sub-sequence.
    Q, K, V are padded to a multiple of δ and regrouped (B·H·δ, N/δ, D) (one copy each), the
    banded SDPA kernel of ``local`` runs on them (per-sub-sequence key padding masked), and
    the output is interleaved back. Cost: 4·B·H·N·(c + 2w)·D FLOPs (c ≈ 64 the chunk), memory
    O(B·H·N·D) — independent of δ.

    flex: ``flex_attention`` with mask ((i − j) mod δ = 0) ∧ |i − j| ≤ δw on 128×128 tiles; a
    tile is skipped only if it holds no visible pair, so FlexAttention computes about
    4·B·H·N·(2δw + 256)·D FLOPs — δ times the eager work.

    Decode (causal): a ring buffer of the last w·δ + 1 positions (:class:`RingKV`), constant in N:
    2·B·kv_heads·(w·δ + 1)·D elements + (w·δ + 1) int64 positions. A step writes the new token i, then
    gathers (``index_select``) only the w + 1 slots of its keys i − δt, t = 0 … w (slot (i − δt) mod
    (w·δ + 1)), so it reads 2·B·kv_heads·(w + 1)·D elements and costs 4·B·H·(w + 1)·D FLOPs, whatever N and δ.
    Why not a cache of w + 1: one query reaches only w + 1 positions, but the next δ − 1 queries reach the
    other residue classes, and every one of the last w·δ positions p is still read by a future query
    (p + w·δ at the latest), so w·δ (+ the slot the new token is written into) is the least any exact
    streaming cache holds. The strided alternative, δ rings of w + 1 (one per residue class, i.e. one ring of
    δ·(w + 1) slots read as a stride-δ view, no gather), holds δ·(w + 1) = w·δ + δ slots: δ − 1 more than
    the ring here (equal at δ = 1), for the same w + 1 read per step; so the plain ring is kept.
    """

    decode_form = "ring buffer of the last w·δ + 1 positions, w + 1 read per step: 2·B·kv_heads·(w·δ+1)·D"

    fidelity = (Fidelity("window", (8, 32, 128), (decreasing(),),
                         why="dilated keys never cover every key unless δ = 1: no equality with dense"),)

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, window: int,
                 dilation: int, impl: str = "eager", kv_heads: int = 0):
        super().__init__()
        self.window, self.dilation = window, dilation
        self._setup(head_dim=head_dim, heads=heads, n=n, causal=causal, impl=impl)

    # -- the pattern ---------------------------------------------------------------------
    def pattern_on(self, device: torch.device | str | None = None):
        return dilated_pattern(self.window, self.dilation, self.causal)

    def flex_candidates(self, n: int, tile: int) -> torch.Tensor:
        reach = self.window * self.dilation
        return tile_span_candidates(n, tile, reach, 0 if self.causal else reach)

    @staticmethod
    def band_for(N: int, window: int, dilation: int, causal: bool) -> Band:
        L = -(-N // dilation)  # sub-sequence length (padded)
        real = [max(0, -(-(N - r) // dilation)) for r in range(dilation)]  # real length of sub-sequence r
        reach = min(window, max(L - 1, 0))
        left, right = reach, 0 if causal else reach
        return Band.make(L=L, q_start=0, q_stop=L, c=pick_chunk(left, right, L), left=left, right=right,
                         kv_lo=0, kv_hi=real, offset_ok=local_offsets(window, causal))

    # -- eager ---------------------------------------------------------------------------
    def _make_plan(self, N: int, device: torch.device, dtype: torch.dtype) -> dict:
        band = self.band_for(N, self.window, self.dilation, self.causal)
        return {"band": band, "biases": band.biases(device, dtype, float("-inf"))}

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: dict) -> torch.Tensor:
        B, H, N, D = q.shape
        band, delta = plan["band"], self.dilation
        L = band.L

        def split(x: torch.Tensor) -> torch.Tensor:
            x = F.pad(x.reshape(B * H, N, D), (0, 0, 0, L * delta - N))  # (B·H, L·δ, D)
            return x.view(B * H, L, delta, D).transpose(1, 2).reshape(B * H * delta, L, D)  # (B·H·δ, L, D)

        out = band_sdpa(split(q), split(k), split(v), band, plan["biases"], self.scale)  # (B·H·δ, L, D)
        out = out.reshape(B * H, delta, L, D).transpose(1, 2).reshape(B * H, L * delta, D)  # (B·H, L·δ, D)
        return out[:, :N].unflatten(0, (B, H))  # (B, H, N, D)

    # -- decode --------------------------------------------------------------------------
    def decode_init(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> RingKV:
        return RingKV(k, v, self.window * self.dilation + 1)  # (B, Hkv, w·δ + 1, D) twice

    def decode_step(self, state: RingKV, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        state.append(k, v)  # the ring now holds positions i − w·δ … i
        i, delta = state.length - 1, self.dilation
        t = torch.arange(min(self.window, i // delta) + 1, device=state.k.device)  # (≤ w+1,) steps back, j ≥ 0
        slots = (i - delta * t) % state.size  # (≤ w+1,) slot of key j = i − δt (all within the ring's span)
        keys = state.k.index_select(2, slots)  # (B, Hkv, ≤ w+1, D)
        values = state.v.index_select(2, slots)  # (B, Hkv, ≤ w+1, D)
        return attend_one(q, keys, values, self.scale)  # (B, H, 1, D)

    @classmethod
    def state_bytes(cls, *, batch: int, heads: int, kv_heads: int, head_dim: int, n: int, capacity: int,
                    itemsize: int, window: int, dilation: int, impl: str = "eager") -> int:
        return RingKV.nbytes(batch=batch, kv_heads=kv_heads, size=window * dilation + 1, head_dim=head_dim,
                             itemsize=itemsize)

    @classmethod
    def decode_read_bytes(cls, *, batch: int, heads: int, kv_heads: int, head_dim: int, n: int, capacity: int,
                          itemsize: int, window: int, dilation: int, impl: str = "eager") -> int:
        """A step gathers the w + 1 keys and values it sees (fewer while i < w·δ), not the whole ring; slots are
        computed from i, the ring's positions are not read."""
        seen = min(window, n // dilation) + 1
        return 2 * batch * kv_heads * seen * head_dim * itemsize

    # -- declarations --------------------------------------------------------------------
    @classmethod
    def check(cls, *, n: int, causal: bool, heads: int, head_dim: int, device: str, dtype: str,
              window: int, dilation: int, impl: str = "eager", mode: str | None = None, **_) -> list[str]:
        reasons = []
        if window * dilation >= n:
            reasons.append(f"window·dilation {window * dilation} >= n {n}: each query sees its whole residue "
                           f"class, nothing is local")
        if impl == "flex":
            reasons += flex_reasons(device, dtype, mode)
        return reasons

    @classmethod
    def analytic_flops(cls, *, batch: int, heads: int, n: int, head_dim: int, causal: bool, window: int,
                       dilation: int, impl: str = "eager", kv_heads: int = 0) -> int:
        if impl == "flex":
            reach = window * dilation
            pairs = count_tiles(dilated_pattern(window, dilation, causal), n,
                                tile_span_candidates(n, cls.flex_tile, reach, 0 if causal else reach), cls.flex_tile)
        else:
            pairs = dilation * cls.band_for(n, window, dilation, causal).scored_keys()
        return 4 * batch * heads * head_dim * pairs
