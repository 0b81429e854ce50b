"""Compressive Transformer: Transformer-XL memory plus a compressed memory of mean-pooled older positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._decode import RingKV, attend_parts
from ._segments import SegmentRecurrence, dense_mixed, repeat_heads, segment_visible, windows
from .base import KV_HEADS, Fidelity, Knob, register, repeat_kv


@dataclass
class CompressiveState:
    """Decode state (see :class:`CompressiveAttention`): the segment + memory ring, the compressed slots of
    the current segment ``seg`` (visible from slot ``first``), and running sums for the next F segments."""

    ring: RingKV  # (B, Hkv, L+M, D) twice + (L+M,) positions
    ck: torch.Tensor  # (B, Hkv, Mc, D) compressed keys of segment seg
    cv: torch.Tensor  # (B, Hkv, Mc, D) compressed values of segment seg
    ak: torch.Tensor  # (B, Hkv, F, Mc, D) key sums of segments seg+1 … seg+F (slot s mod F), evicted positions only
    av: torch.Tensor  # (B, Hkv, F, Mc, D) value sums, likewise
    seg: int
    first: int


@register(name="compressive", family="recurrent", complexity="O(N·(L+M+Mc)·D)", memory="O(N·(L+M+Mc))",
          knobs=[Knob("segment", default=128, axis="segment", minimum=1, small=50, length=True, help="segment length L"),
                 Knob("memory", default=128, axis="memory", minimum=0, small=40, length=True, help="cached positions M"),
                 Knob("compress", default=4, axis="compress", minimum=1, small=3,
                      help="compression rate c"),
                 Knob("compressed", default=64, minimum=0, help="compressed memory slots Mc"),
                 KV_HEADS])
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
    Grouped-query (``kv_heads`` < H): the compressed memory is pooled per kv head (B·kv_heads·S·Mc
    slots), then repeated to the H query heads with K and V; the same numbers as pooling after
    repeating, which ``reference()`` does.

    Decode (one token at a time, exactly the causal forward): position i in segment s = ⌊i/L⌋ attends,
    in one softmax, to j ∈ [s·L − M, i] and to the visible compressed slots of segment s, slot t
    (w_s = s·L − M − Mc·c, visible when w_s + t·c ≥ 0) holding the means of k and v over
    [w_s + t·c, w_s + t·c + c). The state, constant in N:

    - a :class:`RingKV` of the last L + M positions, masked to pos ≥ s·L − M, as ``transformer-xl``;
    - the Mc compressed slots of segment s (keys and values), computed once at its first position;
    - running sums for the next F = ⌈Mc·c / L⌉ − 1 segments (Mc slots each, keys and values): a
      position leaving the ring (i − L − M, written over) is added to the slot covering it in every
      later segment whose window holds it. At the start of segment s its slots are those sums plus
      the window positions still in the ring, divided by c. The sums are per future segment because
      groups are aligned to each segment's memory boundary: with L mod c ≠ 0 consecutive segments
      pool different groups (with c | L a FIFO of Mc + L/c slots would do).

    Bytes 2·B·kv_heads·((L+M) + (1+F)·Mc)·D·itemsize + 8·(L+M). A step costs 4·B·H·(L+M+Mc)·D
    FLOPs, plus F·D adds per kv head for the position leaving the ring and, once per segment,
    pooling (L+M)·D. The original Compressive Transformer (and a HuggingFace-style ``mems`` cache)
    updates memory and compressed memory once per call of L tokens, each evicted segment compressed
    into L/c new FIFO slots; here the segment-aligned pattern of the prefill is kept token by token.
    """

    decode_form = ("segment + memory ring of L + M positions, Mc compressed slots and running sums for the "
                   "next F = ⌈Mc·c/L⌉ − 1 segments: 2·B·kv_heads·(L+M+(1+F)·Mc)·D")

    fidelity = (Fidelity("compress", (1, 2, 4, 8), (),
                         why="mean pooling: longer reach, blurrier keys; no promise"),)

    supports_causal = True
    supports_bidirectional = False
    bidirectional_reason = "segment recurrence only looks back (memory of earlier segments)"

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, segment: int, memory: int,
                 compress: int, compressed: int, kv_heads: int = 0):
        super().__init__()
        self.segment = segment
        self.memory = memory
        self.compress = compress
        self.compressed = compressed
        self.heads = heads
        self.kv_heads = kv_heads or heads

    def _context(self, k: torch.Tensor, v: torch.Tensor, n_seg: int, k_kv: torch.Tensor,
                 v_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detached [compressed; memory] keys (B, H, S, D, Mc+M), values (B, H, S, Mc+M, D), visibility (S, Mc+M).

        k, v (B, H, N, D) repeated to the query heads; k_kv, v_kv (B, Hkv, N, D), pooled per kv head."""
        L, M, c, Mc = self.segment, self.memory, self.compress, self.compressed
        span = Mc * c
        front = M + span
        dev = k.device
        seg_start = torch.arange(n_seg, device=dev)[:, None] * L  # (S, 1)
        ks, vs, vis = [], [], []
        if Mc:
            with torch.no_grad():
                H = k.shape[1]
                wk = windows(k_kv, front, span, L, n_seg)  # (B, Hkv, S, D, Mc·c) view
                wv = windows(v_kv, front, span, L, n_seg)
                ks.append(repeat_heads(wk.unflatten(-1, (Mc, c)).mean(-1), H))  # (B, H, S, D, Mc)
                vs.append(repeat_heads(wv.unflatten(-1, (Mc, c)).mean(-1), H).transpose(-1, -2))  # (B, H, S, Mc, D)
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
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # (B, H, N, D)
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

    # -- decode ------------------------------------------------------------------------------
    @staticmethod
    def _future(segment: int, compress: int, compressed: int) -> int:
        """F: how many later segments' windows a position leaving the ring (i − L − M, i in segment s) can fall
        in: s' ≤ s + ⌊(Mc·c − 1)/L⌋."""
        return -(-compressed * compress // segment) - 1 if compressed else 0

    def _window(self, s: int) -> int:
        """w_s = s·L − M − Mc·c: the first position of segment s's compressed groups."""
        return s * self.segment - self.memory - self.compressed * self.compress

    def _first_visible(self, s: int) -> int:
        """The first compressed slot of segment s whose group starts at a position ≥ 0."""
        w = self._window(s)
        return min(self.compressed, max(0, -(w // self.compress)))  # ⌈−w/c⌉ clipped to [0, Mc]

    def _pool(self, dk: torch.Tensor, dv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
              s: int, below: int) -> None:
        """Add into dk, dv (B, Hkv, Mc, D) every source position p (k, v (B, Hkv, n, D), pos (n,), −1 empty)
        with p < below in segment s's window, to the slot t = (p − w_s) // c; groups starting before 0 skipped."""
        c, Mc = self.compress, self.compressed
        w = self._window(s)
        t = torch.div(pos - w, c, rounding_mode="floor")  # (n,) slot of each source position
        take = (pos >= 0) & (pos < below) & (t >= 0) & (t < Mc) & (w + t * c >= 0)  # (n,)
        if Mc == 0:
            return
        # every source position is added, the ones not taken as zeros: no data-dependent shape (nonzero), so the
        # same code runs on fake tensors (effbench estimate) and the work per step stays fixed
        slot = torch.where(take, t, torch.zeros_like(t))  # (n,)
        keep = take[:, None]  # (n, 1)
        dk.index_add_(2, slot, torch.where(keep, k, torch.zeros((), dtype=k.dtype, device=k.device)))  # (B, Hkv, n, D)
        dv.index_add_(2, slot, torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device)))

    def decode_init(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> CompressiveState:
        B, Hkv, N0, D = k.shape
        L, M, c, Mc = self.segment, self.memory, self.compress, self.compressed
        F = self._future(L, c, Mc)
        ring = RingKV(k, v, L + M)  # (B, Hkv, L+M, D) twice: the last L + M positions
        seg = N0 // L  # the segment of the next position, N0
        ck, cv = k.new_zeros(B, Hkv, Mc, D), v.new_zeros(B, Hkv, Mc, D)  # (B, Hkv, Mc, D)
        ak, av = k.new_zeros(B, Hkv, F, Mc, D), v.new_zeros(B, Hkv, F, Mc, D)  # (B, Hkv, F, Mc, D)
        if Mc:
            pos = torch.arange(N0, device=k.device)  # (N0,)
            self._pool(ck, cv, k, v, pos, seg, N0)  # the window ends at seg·L − M ≤ N0: complete
            ck.div_(c)
            cv.div_(c)
            for s in range(seg + 1, seg + F + 1):  # sums of the positions already out of the ring
                self._pool(ak[:, :, s % F], av[:, :, s % F], k, v, pos, s, N0 - L - M)
        return CompressiveState(ring, ck, cv, ak, av, seg, self._first_visible(seg))

    def _enter_segment(self, state: CompressiveState, s: int) -> None:
        """At position s·L (before it is written): segment s's compressed slots = (its running sums + the
        window positions still in the ring, [s·L − L − M, s·L)) / c; its sum slot is freed for segment s + F."""
        F, c = self._future(self.segment, self.compress, self.compressed), self.compress
        ring = state.ring
        state.ck.zero_()
        state.cv.zero_()
        if self.compressed:
            self._pool(state.ck, state.cv, ring.k, ring.v, ring.pos, s, ring.length)
            if F:
                state.ck.add_(state.ak[:, :, s % F])
                state.cv.add_(state.av[:, :, s % F])
                state.ak[:, :, s % F].zero_()
                state.av[:, :, s % F].zero_()
            state.ck.div_(c)
            state.cv.div_(c)
        state.seg, state.first = s, self._first_visible(s)

    def _evict(self, state: CompressiveState, s: int) -> None:
        """Before position i = ring.length overwrites i − L − M: add that position to the running sums of the
        later segments s + 1 … s + F whose window holds it."""
        L, M, c = self.segment, self.memory, self.compress
        F = self._future(L, c, self.compressed)
        ring = state.ring
        e = ring.length - (L + M)
        if not F or e < 0:
            return
        slot = e % (L + M)
        for s2 in range(s + 1, s + F + 1):
            w = self._window(s2)
            t = (e - w) // c
            if w <= e < s2 * L - M and w + t * c >= 0:
                state.ak[:, :, s2 % F, t].add_(ring.k[:, :, slot])  # (B, Hkv, D)
                state.av[:, :, s2 % F, t].add_(ring.v[:, :, slot])

    def decode_step(self, state: CompressiveState, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> torch.Tensor:
        ring = state.ring
        s = ring.length // self.segment  # segment of this position i
        if s != state.seg:
            self._enter_segment(state, s)
        self._evict(state, s)
        ring.append(k, v)
        parts = [(ring.k, ring.v, segment_visible(ring, self.segment, self.memory))]  # j ∈ [s·L − M, i]
        if state.first < self.compressed:
            parts.append((state.ck[:, :, state.first:], state.cv[:, :, state.first:], None))  # (B, Hkv, ≤Mc, D)
        return attend_parts(q, parts)  # (B, H, 1, D)

    @classmethod
    def state_bytes(cls, *, batch: int, heads: int, kv_heads: int, head_dim: int, n: int, capacity: int,
                    itemsize: int, segment: int, memory: int, compress: int, compressed: int) -> int:
        slots = (1 + cls._future(segment, compress, compressed)) * compressed
        return (RingKV.nbytes(batch=batch, kv_heads=kv_heads, size=segment + memory, head_dim=head_dim,
                              itemsize=itemsize)
                + 2 * batch * kv_heads * slots * head_dim * itemsize)

    @classmethod
    def decode_read_bytes(cls, *, batch: int, heads: int, kv_heads: int, head_dim: int, n: int, capacity: int,
                          itemsize: int, segment: int, memory: int, compress: int, compressed: int) -> int:
        """A step reads the ring and the Mc compressed slots; of the running sums it touches F rows."""
        rows = compressed + cls._future(segment, compress, compressed)
        return (RingKV.nbytes(batch=batch, kv_heads=kv_heads, size=segment + memory, head_dim=head_dim,
                              itemsize=itemsize)
                + 2 * batch * kv_heads * rows * head_dim * itemsize)
