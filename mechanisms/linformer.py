"""Linformer (Wang et al. 2020): keys and values projected along the sequence to k rows, then softmax attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Fidelity, Knob, masked_softmax_attention, register


@register(name="linformer", family="low-rank", complexity="O(N·k·D)", memory="O(N·D + k·N)",
          knobs=[Knob("rank", default=256, axis="rank", minimum=1, small=48,
                      help="k, the projected sequence length")])
class LinformerAttention(nn.Module):
    """Linformer: softmax(Q (E K)ᵀ/√D) (F V) with learned E, F ∈ ℝ^{k×N}; k = `rank`.

    E and F project keys and values along the sequence, from N rows to k rows, and are
    shared by all heads (lucidrains' default; the paper's "headwise sharing"). They are
    parameters initialised from `seed` as N(0, 1/k) (a Johnson–Lindenstrauss projection),
    so N is fixed when the module is built: forward raises ValueError for another N.
    Bidirectional only: each projected row mixes all positions, future ones included.

    Cost: 4·B·H·k·N·D FLOPs for the projections E K and F V plus 4·B·H·N·k·D for the
    attention over k projected keys (scaled_dot_product_attention, which streams over
    them without materialising the N×k scores). Memory O(B·H·(N·D + k·D)) beyond the
    2·k·N parameters; no N×N tensor is ever formed.
    """

    fidelity = (Fidelity("rank", (16, 64, 256), (), why="a learned projection: never equal to dense, no promise"),)

    supports_causal = False
    no_decode_reason = ("no causal form: the projection E K mixes every position of the sequence, so there is no "
                        "prefix state a new token could extend")
    causal_reason = ("the projection E K mixes every position of the sequence, so each projected key "
                     "already contains future positions; there is no causal mask to apply")

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, rank: int = 256):
        super().__init__()
        if causal:
            raise ValueError(f"linformer is not causal: {self.causal_reason}")
        self.n = int(n)
        self.rank = int(rank)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        std = 1.0 / math.sqrt(self.n)
        self.proj_k = nn.Parameter(torch.randn(self.rank, self.n, generator=gen) * std)  # E (k, N)
        self.proj_v = nn.Parameter(torch.randn(self.rank, self.n, generator=gen) * std)  # F (k, N)

    @classmethod
    def check(cls, *, n: int, causal: bool, heads: int, head_dim: int, device: str, dtype: str, rank: int) -> list[str]:
        """Nothing to refuse: any N can be built (E, F are made for it) and any k >= 1 works, even
        k >= N (then it is no longer low-rank, only slower). Causal is refused by supports_causal."""
        return []

    def _check_length(self, n: int) -> None:
        if n != self.n:
            raise ValueError(f"linformer was built for sequences of N={self.n} (its projections E, F are "
                             f"{self.rank}×{self.n}); got N={n}. Build it again with n={n}.")

    def project(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E K and F V: (B, H, N, D) -> (B, H, k, D) each."""
        return torch.matmul(self.proj_k, k), torch.matmul(self.proj_v, v)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._check_length(k.shape[-2])
        kp, vp = self.project(k, v)  # (B, H, k, D)
        return F.scaled_dot_product_attention(q, kp, vp)  # (B, H, N, D)

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The same small product written plainly: P = softmax(Q (E K)ᵀ/√D) (N×k), out = P (F V)."""
        self._check_length(k.shape[-2])
        kp = torch.einsum("rn,bhnd->bhrd", self.proj_k, k)  # (B, H, k, D)
        vp = torch.einsum("rn,bhnd->bhrd", self.proj_v, v)  # (B, H, k, D)
        return masked_softmax_attention(q, kp, vp)  # (B, H, N, D)

    @classmethod
    def analytic_flops(cls, *, batch: int, heads: int, n: int, head_dim: int, causal: bool, rank: int = 256) -> int:
        return 8 * batch * heads * n * rank * head_dim
