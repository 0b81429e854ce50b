"""Dilated sliding-window attention: each query sees every δ-th key within δ·w positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._banded import Band, band_sdpa, pick_chunk
from ._flex import PatternAttention, count_tiles, flex_reasons, tile_span_candidates
from .base import Fidelity, Knob, decreasing, register
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
    """

    fidelity = (Fidelity("window", (8, 32, 128), (decreasing(),),
                         why="dilated keys never cover every key unless δ = 1: no equality with dense"),)

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, window: int,
                 dilation: int, impl: str = "eager"):
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
                       dilation: int, impl: str = "eager") -> int:
        if impl == "flex":
            reach = window * dilation
            pairs = count_tiles(dilated_pattern(window, dilation, causal), n,
                                tile_span_candidates(n, cls.flex_tile, reach, 0 if causal else reach), cls.flex_tile)
        else:
            pairs = dilation * cls.band_for(n, window, dilation, causal).scored_keys()
        return 4 * batch * heads * head_dim * pairs
