"""Dense softmax attention: the O(N²) baseline with the N×N score matrix materialised."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import causal_mask, masked_softmax_attention, register


@register(name="dense", family="exact", complexity="O(N²·D)", memory="O(N²)")
class DenseAttention(nn.Module):
    """Textbook attention softmax(Q Kᵀ/√D) V, scores materialised as an N×N matrix.

    Causal: scores with j > i are set to -inf before the softmax (top-left aligned).
    Cost: 4·B·H·N²·D FLOPs (two N×N×D products); memory: the N×N scores and
    probabilities, 2·B·H·N² elements, which is what runs out first as N grows.
    """

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int):
        super().__init__()
        self.causal = causal
        self.scale = 1.0 / math.sqrt(head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n_q, n_k = q.shape[-2], k.shape[-2]
        s = torch.matmul(q * self.scale, k.transpose(-1, -2))  # (B, H, N, N)
        if self.causal:
            future = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu_(1)  # (N, N)
            s = s.masked_fill(future, float("-inf"))
        p = torch.softmax(s, dim=-1)  # (B, H, N, N)
        return torch.matmul(p, v)  # (B, H, N, D)

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(QKᵀ/√D + mask)V by the shared masked-softmax helper (the same mathematics as forward)."""
        mask = causal_mask(q.shape[-2], q.device) if self.causal else None
        return masked_softmax_attention(q, k, v, mask)

    @classmethod
    def analytic_flops(cls, *, batch: int, heads: int, n: int, head_dim: int, causal: bool) -> int:
        return 4 * batch * heads * n * n * head_dim
