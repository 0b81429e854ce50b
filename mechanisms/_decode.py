"""Decode-time state shared by the mechanisms: a static KV cache, a ring buffer, and one query against them.

A decode step takes one new token, q (B, H, 1, D) and k, v (B, Hkv, 1, D), and attends over what the
mechanism kept of the past. The caches here are allocated once, when the context is filled, and written in
place afterwards (HuggingFace's ``StaticCache`` works the same way), so a step allocates only its scores and
output and the cache never reallocates mid-generation.

- :class:`StaticKV`: every position, capacity fixed up front: 2·B·Hkv·capacity·D elements (dense, sdpa, and
  BigBird, whose random blocks may point anywhere in the past).
- :class:`RingKV`: the last ``size`` positions (slot = position mod size), with each slot's position so a
  mechanism can mask by offset: 2·B·Hkv·size·D elements plus ``size`` int64 positions (local, sinks, dilated).
- :func:`attend_one`: softmax(q·kᵀ·scale) v of one query per head against L cached keys, grouped-query aware:
  query head h reads kv head h // (H / Hkv), without repeating the cache. Cost 4·B·H·L·D FLOPs, memory
  B·H·L scores.

Softmax is invariant to the order of the keys, so a ring buffer's slot order never matters.
"""

from __future__ import annotations

import math

import torch


def grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, 1, D) -> (B, Hkv, G, D), G = H / Hkv query heads per kv head."""
    B, H, one, D = q.shape
    return q.reshape(B, kv_heads, (H // kv_heads) * one, D)  # (B, Hkv, G, D)


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
               visible: torch.Tensor | None = None) -> torch.Tensor:
    """One query per head against L keys: q (B, H, 1, D), k and v (B, Hkv, L, D) -> (B, H, 1, D).

    ``visible`` (L,) or broadcastable to (B, Hkv, G, L), True = the key counts. A row that sees nothing gives 0.
    """
    return attend_parts(q, [(k, v, visible)], scale)


def attend_parts(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                 scale: float | None = None) -> torch.Tensor:
    """One query per head against several key sets at once (one softmax over all of them, each key counted
    once): ``parts`` are (k, v, visible) with k, v (B, Hkv, Lp, D) and ``visible`` as in :func:`attend_one`.
    Only the scores (B, H, ΣLp) are concatenated, never the keys."""
    B, H, _, D = q.shape
    Hkv = parts[0][0].shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = grouped(q, Hkv)  # (B, Hkv, G, D)
    scores = []
    for k, _, visible in parts:
        s = torch.matmul(qg, k.transpose(-1, -2)) * scale  # (B, Hkv, G, Lp)
        if visible is not None:
            s = s.masked_fill(~visible, float("-inf"))
        scores.append(s)
    s = torch.cat(scores, dim=-1) if len(scores) > 1 else scores[0]  # (B, Hkv, G, L)
    m = s.amax(dim=-1, keepdim=True)  # (B, Hkv, G, 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)  # (B, Hkv, G, L)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = None
    start = 0
    for k, v, _ in parts:
        stop = start + k.shape[2]
        o = torch.matmul(p[..., start:stop], v)  # (B, Hkv, G, D)
        out = o if out is None else out + o
        start = stop
    return out.reshape(B, H, 1, D)  # (B, H, 1, D)


class StaticKV:
    """Keys and values of every position so far, in buffers of ``capacity`` positions allocated once.

    k, v: (B, Hkv, capacity, D); ``length`` positions are filled. Bytes: 2·B·Hkv·capacity·D·itemsize.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, capacity: int):
        B, Hkv, N0, D = k.shape
        if capacity < N0:
            raise ValueError(f"cache capacity {capacity} < context length {N0}")
        self.k = k.new_zeros(B, Hkv, capacity, D)  # (B, Hkv, C, D)
        self.v = v.new_zeros(B, Hkv, capacity, D)  # (B, Hkv, C, D)
        self.k[:, :, :N0].copy_(k)
        self.v[:, :, :N0].copy_(v)
        self.length = N0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one position, k and v (B, Hkv, 1, D)."""
        if self.length >= self.capacity:
            raise ValueError(f"KV cache full: capacity {self.capacity} positions")
        self.k[:, :, self.length:self.length + 1].copy_(k)
        self.v[:, :, self.length:self.length + 1].copy_(v)
        self.length += 1

    def keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part, views: (B, Hkv, length, D) each."""
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    @staticmethod
    def nbytes(*, batch: int, kv_heads: int, capacity: int, head_dim: int, itemsize: int) -> int:
        return 2 * batch * kv_heads * capacity * head_dim * itemsize


class RingKV:
    """The last ``size`` positions in a ring: slot s holds position p with p ≡ s (mod size).

    k, v: (B, Hkv, size, D); ``pos`` (size,) int64, the position in each slot (−1: empty). Bytes:
    2·B·Hkv·size·D·itemsize + 8·size. ``length`` is the next position to be written.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, size: int, start: int = 0):
        """Keep the last ``size`` of the context k, v (B, Hkv, N0, D), whose first position is ``start``."""
        B, Hkv, N0, D = k.shape
        self.size = size
        self.k = k.new_zeros(B, Hkv, size, D)  # (B, Hkv, S, D)
        self.v = v.new_zeros(B, Hkv, size, D)  # (B, Hkv, S, D)
        self.pos = torch.full((size,), -1, dtype=torch.long, device=k.device)  # (S,)
        keep = min(size, N0)
        last = torch.arange(start + N0 - keep, start + N0, device=k.device)  # (keep,) the positions kept
        slots = last % size  # (keep,)
        self.k[:, :, slots] = k[:, :, N0 - keep:]
        self.v[:, :, slots] = v[:, :, N0 - keep:]
        self.pos[slots] = last
        self.length = start + N0

    @property
    def visible(self) -> torch.Tensor:
        """(size,) the slots holding a position."""
        return self.pos >= 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write position ``length`` over the oldest slot; k and v (B, Hkv, 1, D)."""
        s = self.length % self.size
        self.k[:, :, s:s + 1].copy_(k)
        self.v[:, :, s:s + 1].copy_(v)
        self.pos[s] = self.length
        self.length += 1

    @staticmethod
    def nbytes(*, batch: int, kv_heads: int, size: int, head_dim: int, itemsize: int) -> int:
        return 2 * batch * kv_heads * size * head_dim * itemsize + 8 * size
