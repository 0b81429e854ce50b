"""Sliding-window (local) attention: each query sees the keys within ``window`` positions."""

from __future__ import annotations

import torch

from ._banded import Band, band_sdpa, pick_chunk
from ._decode import RingKV, attend_one
from ._flex import PatternAttention, count_tiles, flex_reasons, tile_span_candidates
from .base import KV_HEADS, Fidelity, Knob, decreasing, equals_dense_at, register


def local_offsets(window: int, causal: bool):
    """Visibility as a function of the offset d = i - j."""
    if causal:
        return lambda d: (d >= 0) & (d <= window)
    return lambda d: (d <= window) & (d >= -window)


@register(
    name="local", family="sparse", complexity="O(N·W·D)", memory="O(N·D)",
    knobs=[
        Knob("window", default=256, axis="window", minimum=1, small=37, length=True, help="one-sided window w"),
        Knob("impl", default="eager", type=str, choices=("eager", "flex"),
             help="eager: banded chunks through fused SDPA; flex: compiled FlexAttention"),
        KV_HEADS,
    ],
)
class LocalAttention(PatternAttention):
    """Sliding window: query i sees keys |i − j| ≤ w (causal: 0 ≤ i − j ≤ w); w is one-sided.

    out_i = Σ_{j ∈ W(i)} softmax_j(q_i·k_j/√D) v_j with W(i) = {j : |i − j| ≤ w}
    (causal {j : 0 ≤ i − j ≤ w}), 2w+1 keys per row (w+1 causal), fewer at the ends.

    eager: rows are cut into chunks of c = 64 (16–32 for windows under 48); chunk t attends to
    the key span [t·c − w, t·c + c + w) (causal [t·c − w, t·c + c)), an ``unfold`` view of K and V, through
    ``scaled_dot_product_attention`` with one (c, c + 2w) additive band mask shared by all
    chunks; the few chunks at the two ends, whose span leaves [0, N), get their own mask
    (padded keys hidden; padded query rows dropped). Any N, no N×N tensor.
    Cost: 4·B·H·N·(c + 2w)·D FLOPs (causal c + w), memory O(B·H·N·D) (scores never
    materialised; the backward recomputes them chunk by chunk).

    flex: ``flex_attention`` compiled at build time (for batch 1; another batch size compiles
    on its first call) with a BlockMask of 128×128 tiles on the band; about
    4·B·H·N·(2w + 2·128)·D FLOPs (partial tiles computed in full). CPU: forward only.

    Decode (causal): a ring buffer of the last w + 1 positions (:class:`RingKV`), constant in N:
    2·B·kv_heads·(w + 1)·D elements; a step costs 4·B·H·(w + 1)·D FLOPs whatever the context.
    """

    decode_form = "ring buffer of the last w + 1 positions: 2·B·kv_heads·(w+1)·D"

    # Declarations the harness reads (effbench verify, the contract suite):
    fidelity = (Fidelity("window", (8, 32, 128, "N-1"), (decreasing(), equals_dense_at("N-1")),
                         why="a wider window sees more keys; w ≥ N − 1 sees them all"),)

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, window: int,
                 impl: str = "eager", kv_heads: int = 0):
        super().__init__()
        self.window = window
        self._setup(head_dim=head_dim, heads=heads, n=n, causal=causal, impl=impl)

    # -- the pattern ---------------------------------------------------------------------
    def pattern_on(self, device: torch.device | str | None = None):
        ok = local_offsets(self.window, self.causal)
        return lambda i, j: ok(i - j)

    def flex_candidates(self, n: int, tile: int) -> torch.Tensor:
        return tile_span_candidates(n, tile, self.window, 0 if self.causal else self.window)

    @staticmethod
    def band_for(N: int, window: int, causal: bool) -> Band:
        reach = min(window, max(N - 1, 0))
        left, right = reach, 0 if causal else reach
        return Band.make(L=N, q_start=0, q_stop=N, c=pick_chunk(left, right, N), left=left, right=right,
                         kv_lo=0, kv_hi=(N,), offset_ok=local_offsets(window, causal))

    # -- eager ---------------------------------------------------------------------------
    def _make_plan(self, N: int, device: torch.device, dtype: torch.dtype) -> dict:
        band = self.band_for(N, self.window, self.causal)
        return {"band": band, "biases": band.biases(device, dtype, float("-inf"))}

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: dict) -> torch.Tensor:
        B, H, N, D = q.shape
        flat = [t.reshape(B * H, N, D) for t in (q, k, v)]  # (B·H, N, D), views for contiguous inputs
        out = band_sdpa(*flat, plan["band"], plan["biases"], self.scale)  # (B·H, N, D)
        return out.unflatten(0, (B, H))  # (B, H, N, D)

    # -- decode --------------------------------------------------------------------------
    def decode_init(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> RingKV:
        return RingKV(k, v, self.window + 1)  # (B, Hkv, w + 1, D) twice

    def decode_step(self, state: RingKV, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        state.append(k, v)  # the ring now holds positions i − w … i
        return attend_one(q, state.k, state.v, self.scale, state.visible)  # (B, H, 1, D)

    @classmethod
    def state_bytes(cls, *, batch: int, heads: int, kv_heads: int, head_dim: int, n: int, capacity: int,
                    itemsize: int, window: int, impl: str = "eager") -> int:
        return RingKV.nbytes(batch=batch, kv_heads=kv_heads, size=window + 1, head_dim=head_dim, itemsize=itemsize)

    # -- declarations --------------------------------------------------------------------
    @classmethod
    def check(cls, *, n: int, causal: bool, heads: int, head_dim: int, device: str, dtype: str,
              window: int, impl: str = "eager", mode: str | None = None, **_) -> list[str]:
        reasons = []
        if window >= n:
            reasons.append(f"window {window} >= n {n}: every query sees every key, this is dense attention")
        if impl == "flex":
            reasons += flex_reasons(device, dtype, mode)
        return reasons

    @classmethod
    def analytic_flops(cls, *, batch: int, heads: int, n: int, head_dim: int, causal: bool, window: int,
                       impl: str = "eager", kv_heads: int = 0) -> int:
        if impl == "flex":
            ok = local_offsets(window, causal)
            pairs = count_tiles(lambda i, j: ok(i - j), n,
                                tile_span_candidates(n, cls.flex_tile, window, 0 if causal else window), cls.flex_tile)
        else:
            pairs = cls.band_for(n, window, causal).scored_keys()
        return 4 * batch * heads * head_dim * pairs
