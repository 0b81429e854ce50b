"""PyTorch's fused scaled_dot_product_attention (exact attention, fused kernel)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._decode import StaticKV
from .base import KV_HEADS, register
from .dense import DenseAttention


@register(name="sdpa", family="exact", complexity="O(N²·D)", memory="O(N) (flash kernels)", knobs=[KV_HEADS])
class SDPAAttention(DenseAttention):
    """torch.nn.functional.scaled_dot_product_attention(Q, K, V, is_causal=causal).

    Same mathematics as `dense` (and the same reference and FLOP count), computed by a
    fused kernel (flash attention on the CPU and on recent GPUs) that streams over key
    blocks with an online softmax, so the N×N scores never exist: FLOPs stay
    4·B·H·N²·D, memory is O(B·H·N·D). Causal goes through ``is_causal`` (top-left
    aligned), never a mask tensor. Grouped-query through ``enable_gqa`` (no repeated K/V).

    Decode: dense's KV cache; a step is one SDPA call of one query against the filled cache.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        gqa = k.shape[1] != q.shape[1]
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=gqa)  # (B, H, N, D)

    def decode_step(self, state: StaticKV, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        state.append(k, v)
        keys, values = state.keys()  # (B, Hkv, L, D)
        gqa = keys.shape[1] != q.shape[1]
        return F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)  # (B, H, 1, D)
