"""Dense masks and masked softmax attention for references (small N only: these DO form N×N tensors)."""

from __future__ import annotations

import math
from typing import Callable

import torch

def positions(n: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key index grids for building dense masks: i (N, 1), j (1, N)."""
    idx = torch.arange(n, device=device)
    return idx[:, None], idx[None, :]


def mask_from_mod(mask_mod: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n_q: int, n_k: int | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Dense (Nq, Nk) boolean mask from ``mask_mod(q_idx, kv_idx)`` (attention-gym style, no batch/head args)."""
    n_k = n_q if n_k is None else n_k
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return mask_mod(i, j).expand(n_q, n_k)


def masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                             scale: float | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ·scale + bias, masked) v, the obvious O(N²) way; fully masked rows give 0, never NaN.

    q (..., Nq, D), k and v (..., Nk, D); mask broadcastable to (..., Nq, Nk), True = visible.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (..., Nq, Nk)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)  # (..., Nq, 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)  # (..., Nq, Nk); exp(-inf) = 0 on masked entries
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(p, v)  # (..., Nq, D)


def causal_mask(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(N, N) boolean mask j <= i (top-left aligned)."""
    i, j = positions(n, device)
    return j <= i
