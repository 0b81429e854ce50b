"""Dense softmax attention: the O(N²) baseline with the N×N score matrix materialised."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._decode import StaticKV, attend_one
from .base import KV_HEADS, causal_mask, masked_softmax_attention, register, repeat_kv


@register(name="dense", family="exact", complexity="O(N²·D)", memory="O(N²)", knobs=[KV_HEADS])
class DenseAttention(nn.Module):
    """Textbook attention softmax(Q Kᵀ/√D) V, scores materialised as an N×N matrix.

    Causal: scores with j > i are set to -inf before the softmax (top-left aligned).
    Cost: 4·B·H·N²·D FLOPs (two N×N×D products); memory: the N×N scores and
    probabilities, 2·B·H·N² elements, which is what runs out first as N grows.
    Grouped-query (``kv_heads`` < H): K and V carry kv_heads heads, each serving H/kv_heads query heads.

    Decode: a KV cache of every position (:class:`StaticKV`, allocated for the whole generation):
    2·B·kv_heads·N·D elements, growing with N; a step reads all of it, 4·B·H·N·D FLOPs.
    """

    decode_form = "KV cache of every position: 2·B·kv_heads·N·D"

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, kv_heads: int = 0):
        super().__init__()
        self.causal = causal
        self.heads = heads
        self.kv_heads = kv_heads or heads
        self.scale = 1.0 / math.sqrt(head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # (B, H, N, D)
        n_q, n_k = q.shape[-2], k.shape[-2]
        s = torch.matmul(q * self.scale, k.transpose(-1, -2))  # (B, H, N, N)
        if self.causal:
            future = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu_(1)  # (N, N)
            s = s.masked_fill(future, float("-inf"))
        p = torch.softmax(s, dim=-1)  # (B, H, N, N)
        return torch.matmul(p, v)  # (B, H, N, D)

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(QKᵀ/√D + mask)V by the shared masked-softmax helper (the same mathematics as forward)."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # (B, H, N, D)
        mask = causal_mask(q.shape[-2], q.device) if self.causal else None
        return masked_softmax_attention(q, k, v, mask)

    # -- decode ------------------------------------------------------------------------------
    def decode_init(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> StaticKV:
        return StaticKV(k, v, capacity)  # (B, Hkv, capacity, D) twice

    def decode_step(self, state: StaticKV, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        state.append(k, v)
        keys, values = state.keys()  # (B, Hkv, L, D)
        return attend_one(q, keys, values, self.scale)  # (B, H, 1, D)

    @classmethod
    def state_bytes(cls, *, batch: int, heads: int, kv_heads: int, head_dim: int, n: int, capacity: int,
                    itemsize: int) -> int:
        return StaticKV.nbytes(batch=batch, kv_heads=kv_heads, capacity=capacity, head_dim=head_dim, itemsize=itemsize)

    @classmethod
    def decode_read_bytes(cls, *, batch: int, heads: int, kv_heads: int, head_dim: int, n: int, capacity: int,
                          itemsize: int) -> int:
        """A step reads the filled part of the cache, not the room left for later tokens."""
        return StaticKV.nbytes(batch=batch, kv_heads=kv_heads, capacity=n, head_dim=head_dim, itemsize=itemsize)

    @classmethod
    def analytic_flops(cls, *, batch: int, heads: int, n: int, head_dim: int, causal: bool, kv_heads: int = 0) -> int:
        return 4 * batch * heads * n * n * head_dim
