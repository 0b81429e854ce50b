"""PyTorch's fused scaled_dot_product_attention (exact attention, fused kernel)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import causal_mask, masked_softmax_attention, register


@register(name="sdpa", family="exact", complexity="O(N²·D)", memory="O(N) (flash kernels)")
class SDPAAttention(nn.Module):
    """torch.nn.functional.scaled_dot_product_attention(Q, K, V, is_causal=causal).

    Same result as dense softmax(Q Kᵀ/√D) V, computed by a fused kernel (flash
    attention on the CPU and on recent GPUs) that streams over key blocks with an
    online softmax, so the N×N scores never exist: FLOPs stay 4·B·H·N²·D, memory is
    O(B·H·N·D). Causal goes through ``is_causal`` (top-left aligned), never a mask tensor.
    """

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int):
        super().__init__()
        self.causal = causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, N, D)

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mask = causal_mask(q.shape[-2], q.device) if self.causal else None
        return masked_softmax_attention(q, k, v, mask)

    @classmethod
    def analytic_flops(cls, *, batch: int, heads: int, n: int, head_dim: int, causal: bool) -> int:
        return 4 * batch * heads * n * n * head_dim
