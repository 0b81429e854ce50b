"""Shared pieces of the segment-recurrent mechanisms (``transformer-xl``, ``compressive``).

Not a mechanism: no ``@register`` here. Each segment of L queries attends, causally, to
itself and to a detached context of earlier positions; all segments are processed at once.
Grouped-query: K and V arrive with kv_heads heads and are repeated to H (:func:`repeat_kv`)
before the attention; a context computed from them (compressive pooling) may be built per kv
head first and repeated after (:func:`repeat_heads`).

Decode: :func:`segment_visible` masks a :class:`RingKV` of the last L + M positions down to the
segment-and-memory window of the position just written.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._decode import RingKV
from .base import masked_softmax_attention, repeat_kv


def repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, ...) -> (B, H, ...): :func:`repeat_kv` for any rank (kv head h serves query heads
    h·G … h·G + G − 1, G = H / Hkv); the tensor itself when Hkv == H."""
    Hkv = t.shape[1]
    if Hkv == heads:
        return t
    return t.unsqueeze(2).expand(t.shape[0], Hkv, heads // Hkv, *t.shape[2:]).flatten(1, 2)  # (B, H, ...)


def segment_visible(ring: RingKV, segment: int, memory: int) -> torch.Tensor:
    """(size,) the ring slots position i = ring.length − 1 sees: j ∈ [⌊i/L⌋·L − M, i] (its segment so far
    and the M positions before the segment start). The ring holds the last L + M ≥ i − (⌊i/L⌋·L − M) + 1."""
    i = ring.length - 1
    return ring.visible & (ring.pos >= (i // segment) * segment - memory)  # (L+M,)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor,
                       ctx_visible: torch.Tensor, segment: int) -> torch.Tensor:
    """Each segment of L queries against its detached context (C keys) and, causally, itself.

    q, k, v (B, H, S·L, D) (already padded to whole segments); ctx_k (B, H, S, D, C) and
    ctx_v (B, H, S, C, D) are detached; ctx_visible (S, C) bool. Returns (B, H, S·L, D).
    Every query sees at least itself, so no row is empty.
    """
    B, H, NP, D = q.shape
    L = segment
    S = NP // L
    scale = 1.0 / math.sqrt(D)
    qs = q.view(B, H, S, L, D) * scale  # (B, H, S, L, D)
    ks = k.view(B, H, S, L, D)  # (B, H, S, L, D)
    vs = v.view(B, H, S, L, D)  # (B, H, S, L, D)
    s_cur = torch.matmul(qs, ks.transpose(-1, -2))  # (B, H, S, L, L)
    future = torch.ones(L, L, dtype=torch.bool, device=q.device).triu_(1)  # (L, L)
    s_cur.masked_fill_(future, float("-inf"))  # (B, H, S, L, L), in place
    m = s_cur.detach().amax(-1, keepdim=True)  # (B, H, S, L, 1), finite: the diagonal is visible
    if ctx_k.shape[-1]:
        s_ctx = torch.matmul(qs, ctx_k)  # (B, H, S, L, C)
        s_ctx.masked_fill_(~ctx_visible[:, None, :], float("-inf"))  # (S, 1, C) mask over (B, H, S, L, C)
        m = torch.maximum(m, s_ctx.detach().amax(-1, keepdim=True))  # (B, H, S, L, 1)
        e_ctx = s_ctx.sub_(m).exp_()  # (B, H, S, L, C)
    e_cur = s_cur.sub_(m).exp_()  # (B, H, S, L, L)
    denom = e_cur.sum(-1, keepdim=True)  # (B, H, S, L, 1), >= 1 once the context is added
    out = torch.matmul(e_cur, vs)  # (B, H, S, L, D)
    if ctx_k.shape[-1]:
        denom = denom + e_ctx.sum(-1, keepdim=True)  # (B, H, S, L, 1)
        out = out.add_(torch.matmul(e_ctx, ctx_v))  # in place: matmul's backward does not need its output
    out = out.div_(denom)
    return out.view(B, H, NP, D)


def windows(x: torch.Tensor, front: int, length: int, segment: int, n_seg: int) -> torch.Tensor:
    """Per-segment windows of x (B, H, N, D): the view (B, H, S, D, length) whose window s
    holds positions [s·L − front, s·L − front + length), zeros outside [0, N) (overlapping
    windows share storage: an ``unfold`` view, nothing copied beyond the padding)."""
    xp = F.pad(x, (0, 0, front, 0))  # (B, H, front + N, D)
    need = (n_seg - 1) * segment + length
    if xp.shape[2] < need:
        xp = F.pad(xp, (0, 0, 0, need - xp.shape[2]))
    return xp.unfold(2, length, segment)[:, :, :n_seg]  # (B, H, S, D, length) view



def dense_mixed(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One softmax over several key sets: parts = [(k (B,H,Nk,D), v, visible (Nq, Nk))], O(N²)."""
    keys = torch.cat([p[0] for p in parts], dim=2)  # (B, H, ΣNk, D)
    values = torch.cat([p[1] for p in parts], dim=2)  # (B, H, ΣNk, D)
    mask = torch.cat([p[2] for p in parts], dim=1)  # (Nq, ΣNk)
    return masked_softmax_attention(q, keys, values, mask)



class SegmentRecurrence(nn.Module):
    """Shared forward of the segment-recurrent mechanisms: repeat K, V (B, Hkv, N, D) to the H query
    heads, pad N to whole segments of ``self.segment``, ask ``self._context(k, v, S, k_kv, v_kv)`` for
    each segment's detached context (keys (B, H, S, D, C), values (B, H, S, C, D), visibility (S, C);
    k, v repeated, k_kv, v_kv the kv-head originals), attend, unpad."""

    segment: int

    def _context(self, k: torch.Tensor, v: torch.Tensor, n_seg: int, k_kv: torch.Tensor,
                 v_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        N = q.shape[2]
        L = self.segment
        S = math.ceil(N / L)
        k_kv, v_kv = k, v  # (B, Hkv, N, D)
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # (B, H, N, D)
        ctx_k, ctx_v, visible = self._context(k, v, S, k_kv, v_kv)
        if S * L > N:
            pad = (0, 0, 0, S * L - N)
            q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        return segment_attention(q, k, v, ctx_k, ctx_v, visible, L)[:, :, :N]
