"""Segment recurrence: Transformer-XL memory and the Compressive Transformer's compressed memory."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Knob, masked_softmax_attention, register


def _segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor,
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
    ks = k.view(B, H, S, L, D)
    vs = v.view(B, H, S, L, D)
    s_cur = torch.matmul(qs, ks.transpose(-1, -2))  # (B, H, S, L, L)
    future = torch.ones(L, L, dtype=torch.bool, device=q.device).triu_(1)  # (L, L)
    s_cur.masked_fill_(future, float("-inf"))
    m = s_cur.detach().amax(-1, keepdim=True)  # (B, H, S, L, 1), finite: the diagonal is visible
    if ctx_k.shape[-1]:
        s_ctx = torch.matmul(qs, ctx_k)  # (B, H, S, L, C)
        s_ctx.masked_fill_(~ctx_visible[:, None, :], float("-inf"))
        m = torch.maximum(m, s_ctx.detach().amax(-1, keepdim=True))
        e_ctx = s_ctx.sub_(m).exp_()  # (B, H, S, L, C)
    e_cur = s_cur.sub_(m).exp_()  # (B, H, S, L, L)
    denom = e_cur.sum(-1, keepdim=True)  # (B, H, S, L, 1), >= 1 once the context is added
    out = torch.matmul(e_cur, vs)  # (B, H, S, L, D)
    if ctx_k.shape[-1]:
        denom = denom + e_ctx.sum(-1, keepdim=True)
        out = out.add_(torch.matmul(e_ctx, ctx_v))  # in place: matmul's backward does not need its output
    out = out.div_(denom)
    return out.view(B, H, NP, D)


def _windows(x: torch.Tensor, front: int, length: int, segment: int, n_seg: int) -> torch.Tensor:
    """Per-segment windows of x (B, H, N, D): the view (B, H, S, D, length) whose window s
    holds positions [s·L − front, s·L − front + length), zeros outside [0, N) (overlapping
    windows share storage: an ``unfold`` view, nothing copied beyond the padding)."""
    xp = F.pad(x, (0, 0, front, 0))  # (B, H, front + N, D)
    need = (n_seg - 1) * segment + length
    if xp.shape[2] < need:
        xp = F.pad(xp, (0, 0, 0, need - xp.shape[2]))
    return xp.unfold(2, length, segment)[:, :, :n_seg]  # (B, H, S, D, length) view


@register(name="transformer-xl", family="recurrent", complexity="O(N·(L+M)·D)", memory="O(N·(L+M))",
          knobs=[Knob("segment", default=128, axis="segment", minimum=1, help="segment length L"),
                 Knob("memory", default=128, axis="memory", minimum=0, help="cached positions M")])
class TransformerXLAttention(nn.Module):
    """Transformer-XL segment recurrence: causal attention within a segment plus a detached memory.

    The sequence is cut into segments of L; position i (segment ⌊i/L⌋) sees j when
    j ≤ i and j ≥ ⌊i/L⌋·L − M: its own segment causally and the M positions before it
    (the cached memory, which may span several earlier segments). The memory's keys and
    values are detached (stop-gradient), as in Transformer-XL: no gradient flows from
    segment s into any k, v of an earlier segment. Scores are q·k/√D; no relative
    position terms (this benchmark attends on given q, k, v). Always causal.

    All segments are processed at once: the memory of segment s is the window
    [s·L − M, s·L) of the detached keys/values, an overlapping ``unfold`` view. N not a
    multiple of L: the last segment is padded with keys in every real query's future.
    Cost: 4·B·H·N·(L+M)·D FLOPs, memory O(B·H·N·(L+M)) for the scores.
    """

    supports_causal = True
    supports_bidirectional = False
    bidirectional_reason = "segment recurrence only looks back (memory of earlier segments)"

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, segment: int, memory: int):
        super().__init__()
        self.segment = segment
        self.memory = memory

    def _context(self, k: torch.Tensor, v: torch.Tensor, n_seg: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detached memory keys (B, H, S, D, M), values (B, H, S, M, D) and visibility (S, M)."""
        L, M = self.segment, self.memory
        kd, vd = k.detach(), v.detach()
        ctx_k = _windows(kd, M, M, L, n_seg)  # (B, H, S, D, M)
        ctx_v = _windows(vd, M, M, L, n_seg).transpose(-1, -2)  # (B, H, S, M, D)
        pos = torch.arange(n_seg, device=k.device)[:, None] * L - M + torch.arange(M, device=k.device)  # (S, M)
        return ctx_k, ctx_v, pos >= 0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        N = q.shape[2]
        L = self.segment
        S = math.ceil(N / L)
        ctx_k, ctx_v, visible = self._context(k, v, S)
        if S * L > N:
            pad = (0, 0, 0, S * L - N)
            q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        return _segment_attention(q, k, v, ctx_k, ctx_v, visible, L)[:, :, :N]

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Dense attention under j ≤ i, j ≥ ⌊i/L⌋·L − M, memory keys/values detached."""
        N = q.shape[2]
        i = torch.arange(N, device=q.device)[:, None]
        j = torch.arange(N, device=q.device)[None, :]
        start = (i // self.segment) * self.segment
        same = (j <= i) & (j >= start)  # (N, N) own segment, causal
        mem = (j < start) & (j >= start - self.memory)  # (N, N) memory
        return _dense_mixed(q, [(k, v, same), (k.detach(), v.detach(), mem)])


def _dense_mixed(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One softmax over several key sets: parts = [(k (B,H,Nk,D), v, visible (Nq, Nk))], O(N²)."""
    keys = torch.cat([p[0] for p in parts], dim=2)
    values = torch.cat([p[1] for p in parts], dim=2)
    mask = torch.cat([p[2] for p in parts], dim=1)
    return masked_softmax_attention(q, keys, values, mask)


@register(name="compressive", family="recurrent", complexity="O(N·(L+M+Mc)·D)", memory="O(N·(L+M+Mc))",
          knobs=[Knob("segment", default=128, axis="segment", minimum=1, help="segment length L"),
                 Knob("memory", default=128, axis="memory", minimum=0, help="cached positions M"),
                 Knob("compress", default=4, axis="compress", minimum=1, help="compression rate c"),
                 Knob("compressed", default=64, minimum=0, help="compressed memory slots Mc")])
class CompressiveAttention(nn.Module):
    """Compressive Transformer: Transformer-XL plus a compressed memory of mean-pooled older positions.

    Segment s (positions [s·L, s·L + L)) sees, causally, itself; the memory [s·L − M, s·L)
    as in Transformer-XL; and Mc compressed slots: the positions evicted from the memory
    just before it, [s·L − M − Mc·c, s·L − M), cut into Mc groups of c consecutive
    positions, each group one key (the mean of its keys) and one value (the mean of its
    values) — mean-pooling compression with rate c. Groups are aligned to the memory
    boundary of each segment; a group reaching before position 0 is not yet complete
    and is not visible. Memory and compressed memory are detached (no gradient into
    earlier segments). With c = 1 and Mc = 0 this is exactly ``transformer-xl``; with
    c = 1 it is Transformer-XL with memory M + Mc.

    Scores q·k/√D; always causal. Cost 4·B·H·N·(L+M+Mc)·D FLOPs plus B·H·N·Mc·c·D/L
    for pooling; memory O(B·H·N·(L+M+Mc)).
    """

    supports_causal = True
    supports_bidirectional = False
    bidirectional_reason = "segment recurrence only looks back (memory of earlier segments)"

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, segment: int, memory: int,
                 compress: int, compressed: int):
        super().__init__()
        self.segment = segment
        self.memory = memory
        self.compress = compress
        self.compressed = compressed

    def _context(self, k: torch.Tensor, v: torch.Tensor, n_seg: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detached [compressed; memory] keys (B, H, S, D, Mc+M), values (B, H, S, Mc+M, D), visibility (S, Mc+M)."""
        L, M, c, Mc = self.segment, self.memory, self.compress, self.compressed
        span = Mc * c
        front = M + span
        dev = k.device
        seg_start = torch.arange(n_seg, device=dev)[:, None] * L  # (S, 1)
        ks, vs, vis = [], [], []
        if Mc:
            with torch.no_grad():
                wk = _windows(k, front, span, L, n_seg)  # (B, H, S, D, Mc·c) view
                wv = _windows(v, front, span, L, n_seg)
                ks.append(wk.unflatten(-1, (Mc, c)).mean(-1))  # (B, H, S, D, Mc)
                vs.append(wv.unflatten(-1, (Mc, c)).mean(-1).transpose(-1, -2))  # (B, H, S, Mc, D)
            vis.append(seg_start - front + torch.arange(Mc, device=dev) * c >= 0)  # (S, Mc) group start >= 0
        if M:
            kd, vd = k.detach(), v.detach()
            ks.append(_windows(kd, M, M, L, n_seg))  # (B, H, S, D, M)
            vs.append(_windows(vd, M, M, L, n_seg).transpose(-1, -2))  # (B, H, S, M, D)
            vis.append(seg_start - M + torch.arange(M, device=dev) >= 0)  # (S, M)
        if not ks:
            B, H, _, D = k.shape
            empty = k.new_zeros(B, H, n_seg, D, 0)
            return empty, empty.transpose(-1, -2), torch.zeros(n_seg, 0, dtype=torch.bool, device=dev)
        if len(ks) == 1:
            return ks[0], vs[0], vis[0]
        return torch.cat(ks, dim=-1), torch.cat(vs, dim=-2), torch.cat(vis, dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        N = q.shape[2]
        L = self.segment
        S = math.ceil(N / L)
        ctx_k, ctx_v, visible = self._context(k, v, S)
        if S * L > N:
            pad = (0, 0, 0, S * L - N)
            q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        return _segment_attention(q, k, v, ctx_k, ctx_v, visible, L)[:, :, :N]

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Dense: N raw keys plus every window mean of c keys (one per end position), under the mask."""
        N = q.shape[2]
        L, M, c, Mc = self.segment, self.memory, self.compress, self.compressed
        dev = q.device
        i = torch.arange(N, device=dev)[:, None]
        j = torch.arange(N, device=dev)[None, :]
        start = (i // L) * L
        same = (j <= i) & (j >= start)
        mem = (j < start) & (j >= start - M)
        parts = [(k, v, same), (k.detach(), v.detach(), mem)]
        if Mc and N >= c:
            # pooled key e = mean of positions [e, e + c), e = 0..N−c (the obvious way: a loop over offsets)
            kd, vd = k.detach(), v.detach()
            pk = sum(kd[:, :, t:N - c + 1 + t] for t in range(c)) / c  # (B, H, N − c + 1, D)
            pv = sum(vd[:, :, t:N - c + 1 + t] for t in range(c)) / c
            e = torch.arange(N - c + 1, device=dev)[None, :]
            first = start - M - Mc * c  # start of the oldest compressed group
            comp = (e >= first) & (e < start - M) & ((e - first) % c == 0) & (e >= 0)
            parts.append((pk, pv, comp))
        return _dense_mixed(q, parts)
