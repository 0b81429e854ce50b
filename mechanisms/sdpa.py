"""PyTorch's fused scaled_dot_product_attention (exact attention, fused kernel)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import register
from .dense import DenseAttention


@register(name="sdpa", family="exact", complexity="O(N²·D)", memory="O(N) (flash kernels)")
class SDPAAttention(DenseAttention):
    """torch.nn.functional.scaled_dot_product_attention(Q, K, V, is_causal=causal).

    Same mathematics as `dense` (and the same reference and FLOP count), computed by a
    fused kernel (flash attention on the CPU and on recent GPUs) that streams over key
    blocks with an online softmax, so the N×N scores never exist: FLOPs stay
    4·B·H·N²·D, memory is O(B·H·N·D). Causal goes through ``is_causal`` (top-left
    aligned), never a mask tensor.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, N, D)
