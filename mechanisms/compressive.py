"""Compressive Transformer: Transformer-XL memory plus a compressed memory of mean-pooled older positions."""

from __future__ import annotations

import torch

from ._segments import SegmentRecurrence, dense_mixed, windows
from .base import Fidelity, Knob, register


@register(name="compressive", family="recurrent", complexity="O(N·(L+M+Mc)·D)", memory="O(N·(L+M+Mc))",
          knobs=[Knob("segment", default=128, axis="segment", minimum=1, small=50, length=True, help="segment length L"),
                 Knob("memory", default=128, axis="memory", minimum=0, small=40, length=True, help="cached positions M"),
                 Knob("compress", default=4, axis="compress", minimum=1, small=3,
                      help="compression rate c"),
                 Knob("compressed", default=64, minimum=0, help="compressed memory slots Mc")])
class CompressiveAttention(SegmentRecurrence):
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

    fidelity = (Fidelity("compress", (1, 2, 4, 8), (),
                         why="mean pooling: longer reach, blurrier keys; no promise"),)

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
                wk = windows(k, front, span, L, n_seg)  # (B, H, S, D, Mc·c) view
                wv = windows(v, front, span, L, n_seg)
                ks.append(wk.unflatten(-1, (Mc, c)).mean(-1))  # (B, H, S, D, Mc)
                vs.append(wv.unflatten(-1, (Mc, c)).mean(-1).transpose(-1, -2))  # (B, H, S, Mc, D)
            vis.append(seg_start - front + torch.arange(Mc, device=dev) * c >= 0)  # (S, Mc) group start >= 0
        if M:
            kd, vd = k.detach(), v.detach()
            ks.append(windows(kd, M, M, L, n_seg))  # (B, H, S, D, M)
            vs.append(windows(vd, M, M, L, n_seg).transpose(-1, -2))  # (B, H, S, M, D)
            vis.append(seg_start - M + torch.arange(M, device=dev) >= 0)  # (S, M)
        if not ks:
            B, H, _, D = k.shape
            empty = k.new_zeros(B, H, n_seg, D, 0)
            return empty, empty.transpose(-1, -2), torch.zeros(n_seg, 0, dtype=torch.bool, device=dev)
        if len(ks) == 1:
            return ks[0], vs[0], vis[0]
        return torch.cat(ks, dim=-1), torch.cat(vs, dim=-2), torch.cat(vis, dim=-1)

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Dense: N raw keys plus every window mean of c keys (one per end position), under the mask."""
        N = q.shape[2]
        L, M, c, Mc = self.segment, self.memory, self.compress, self.compressed
        dev = q.device
        i = torch.arange(N, device=dev)[:, None]  # (N, 1) query positions
        j = torch.arange(N, device=dev)[None, :]  # (1, N) key positions
        start = (i // L) * L  # (N, 1) start of each query's segment
        same = (j <= i) & (j >= start)  # (N, N)
        mem = (j < start) & (j >= start - M)  # (N, N)
        parts = [(k, v, same), (k.detach(), v.detach(), mem)]
        if Mc and N >= c:
            # pooled key e = mean of positions [e, e + c), e = 0..N−c (the obvious way: a loop over offsets)
            kd, vd = k.detach(), v.detach()
            pk = sum(kd[:, :, t:N - c + 1 + t] for t in range(c)) / c  # (B, H, N − c + 1, D)
            pv = sum(vd[:, :, t:N - c + 1 + t] for t in range(c)) / c  # (B, H, N − c + 1, D)
            e = torch.arange(N - c + 1, device=dev)[None, :]  # (1, N − c + 1) pooled key positions
            first = start - M - Mc * c  # start of the oldest compressed group
            comp = (e >= first) & (e < start - M) & ((e - first) % c == 0) & (e >= 0)
            parts.append((pk, pv, comp))
        return dense_mixed(q, parts)
