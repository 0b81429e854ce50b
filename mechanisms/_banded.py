"""Banded and blocked attention kernels shared by ``local``, ``dilated``, ``longformer`` and ``bigbird``.

Eager kernels (plain PyTorch, O(N·span) time and memory)
--------------------------------------------------------
The sequence is cut into query chunks of ``c`` rows. Chunk ``t`` (rows
``q_start + t·c ... + c``) attends to one contiguous key span of ``span = left + c + right``
keys starting ``left`` before its first row. Which keys of the span a row sees depends
only on the offset ``d = i - j`` (a ``(c, span)`` mask, the same for every chunk), plus the
range of keys that exist ``[kv_lo, kv_hi)``. Chunks whose span leaves that range (the first
few and the last few, "edge" chunks) get their own ``(c, span)`` mask; every other chunk uses
the shared relative one. Key spans are ``unfold`` views of K and V (no copies). No N×N tensor
ever exists:

- :func:`band_sdpa` runs the chunks through ``scaled_dot_product_attention`` with an additive
  ``(c, span)`` mask (the fused CPU flash kernel: scores never materialised, counted by
  FlopCounterMode), a constant number of calls per call. Used when each query sees only its band
  (local, dilated, Longformer without globals).
- :func:`band_attention` adds extra keys per chunk (:class:`Extra`: Longformer/BigBird global keys,
  BigBird random blocks), scored with matmuls and concatenated to the band scores before one softmax,
  so each key is counted once. It lays the B·H sequences end to end (:class:`Layout`) so that one chunk
  grid, one set of views and one loop over groups of chunks serve the whole batch; groups are sized from
  the byte budget of :mod:`._budget`, so a call dispatches a constant plus N·B·H / (budget / row bytes)
  groups' worth of ops. :func:`band_matmul` is its form with the extra keys given as tensors.

FlexAttention (``impl=flex``) and :class:`PatternAttention`, the module plumbing that picks the
eager kernels here or FlexAttention per mechanism, live in :mod:`._flex` (which imports this
module; this one imports nothing from it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._budget import rows_within, temp_budget

OffsetFn = Callable[[torch.Tensor], torch.Tensor]  # d = i - j -> visible inside the band



def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def pick_chunk(left: int, right: int, rows: int) -> int:
    """Query chunk size: ~64 rows (small batched GEMMs stay efficient while the span
    ``left + c + right`` wastes little beyond the 2w+1 visible keys); smaller for tiny windows."""
    reach = max(left, right, 1)
    c = 64 if reach >= 48 else max(16, 1 << (reach - 1).bit_length())
    return max(1, min(c, rows))


# ----------------------------------------------------------------------------- geometry

@dataclass
class Band:
    """Geometry of a chunked band over sequences of length ``L`` (see the module docstring).

    ``kv_hi`` has one entry per group ``G`` (dilated attention runs δ sub-sequences of
    different real lengths as groups; everything else has one group). Tensors handed to
    the kernels are ``(SB, L, D)`` with ``SB = B·H·G``, groups innermost.
    """

    L: int
    q_start: int
    q_stop: int
    c: int
    left: int
    right: int
    kv_lo: int
    kv_hi: tuple[int, ...]
    offset_ok: OffsetFn
    nc: int = 0
    span: int = 0
    head: int = 0
    tail: int = 0

    @classmethod
    def make(cls, *, L: int, q_start: int, q_stop: int, c: int, left: int, right: int,
             kv_lo: int, kv_hi: Sequence[int], offset_ok: OffsetFn) -> Band:
        b = cls(L=L, q_start=q_start, q_stop=q_stop, c=c, left=left, right=right, kv_lo=kv_lo,
                kv_hi=tuple(int(h) for h in kv_hi), offset_ok=offset_ok)
        b.nc = max(0, -(-(q_stop - q_start) // c))
        b.span = left + c + right
        lo_ok, hi_ok = kv_lo, min(b.kv_hi)
        starts = [q_start + t * c - left for t in range(b.nc)]
        edge = [s < lo_ok or s + b.span > hi_ok or q_start + (t + 1) * c > q_stop for t, s in enumerate(starts)]
        head = 0
        while head < b.nc and edge[head]:
            head += 1
        tail = 0
        while tail < b.nc - head and edge[b.nc - 1 - tail]:
            tail += 1
        b.head, b.tail = head, tail
        return b

    @property
    def groups(self) -> int:
        return len(self.kv_hi)

    @property
    def rows(self) -> int:
        return self.q_stop - self.q_start

    def segments(self) -> list[tuple[int, int, str]]:
        """[(t0, t1, kind)]: head edge chunks, interior chunks, tail edge chunks (empty ones left out)."""
        out = [(0, self.head, "head"), (self.head, self.nc - self.tail, "mid"), (self.nc - self.tail, self.nc, "tail")]
        return [s for s in out if s[1] > s[0]]

    def _visible(self, t0: int, t1: int, device: torch.device | str | None) -> torch.Tensor:
        """(G, t1-t0, c, span) boolean visibility of the chunks [t0, t1)."""
        x = torch.arange(self.c, device=device)[:, None]
        y = torch.arange(self.span, device=device)[None, :]
        rel = self.offset_ok(x + self.left - y)  # (c, span)
        t = torch.arange(t0, t1, device=device)[:, None, None]
        pos_i = self.q_start + t * self.c + x  # (E, c, 1)
        pos_j = self.q_start + t * self.c - self.left + y  # (E, 1, span)
        hi = torch.tensor(self.kv_hi, device=device)[:, None, None, None]  # (G, 1, 1, 1)
        ok = (pos_j >= self.kv_lo) & (pos_j < hi) & (pos_i < self.q_stop)  # (G, E, c, span)
        return ok & rel

    def biases(self, device: torch.device | str | None, dtype: torch.dtype, neg: float) -> dict:
        """Additive biases (0 visible, ``neg`` hidden): "mid" (c, span), "head"/"tail" (G, E, c, span).

        Also "<kind>_live": rows with a visible key in the span ((c, 1) or (G, E, c, 1) bool), and
        "mid_dead" (Python bool): whether some row of an interior chunk sees no key of its span.
        """
        x = torch.arange(self.c, device=device)[:, None]
        y = torch.arange(self.span, device=device)[None, :]
        rel = self.offset_ok(x + self.left - y)  # (c, span)
        out: dict = {"mid": additive_bias(rel, dtype, neg), "mid_live": rel.any(-1, keepdim=True)}
        out["mid_dead"] = not bool(out["mid_live"].all())
        for t0, t1, kind in self.segments():
            if kind != "mid":
                vis = self._visible(t0, t1, device)  # (G, E, c, span)
                out[kind] = additive_bias(vis, dtype, neg)
                out[kind + "_live"] = vis.any(-1, keepdim=True)
        return out

    def scored_keys(self) -> int:
        """Query-key products the kernels compute per sequence (for analytic FLOPs)."""
        return self.nc * self.c * self.span


def additive_bias(visible: torch.Tensor, dtype: torch.dtype, neg: float) -> torch.Tensor:
    """0 where visible, ``neg`` elsewhere, in ``dtype``."""
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.full((), neg, dtype=dtype, device=visible.device))


def neg_for(dtype: torch.dtype) -> float:
    """Finite "minus infinity" for matmul-path masks: exp() gives exactly 0 and no row is ever NaN."""
    return torch.finfo(dtype).min


# ------------------------------------------------------------------------------- views

def rows(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """x[:, lo:hi] of a (SB, L, D) tensor, zero-padded where [lo, hi) leaves [0, L) (a view when it does not)."""
    L = x.shape[1]
    if lo >= 0 and hi <= L:
        return x[:, lo:hi]
    if hi <= 0 or lo >= L:
        return x.new_zeros(x.shape[0], hi - lo, *x.shape[2:])
    a, b = max(lo, 0), min(hi, L)
    return F.pad(x[:, a:b], (0, 0, a - lo, hi - b))


def query_chunks(q: torch.Tensor, band: Band, t0: int, t1: int) -> torch.Tensor:
    """(SB, t1-t0, c, D) query rows of chunks [t0, t1)."""
    lo = band.q_start + t0 * band.c
    return rows(q, lo, lo + (t1 - t0) * band.c).unflatten(1, (t1 - t0, band.c))


def key_spans(k: torch.Tensor, band: Band, t0: int, t1: int) -> torch.Tensor:
    """(SB, t1-t0, span, D) overlapping key spans of chunks [t0, t1): an unfold view, no copy inside [0, L)."""
    lo = band.q_start + t0 * band.c - band.left
    hi = band.q_start + (t1 - 1) * band.c - band.left + band.span
    return rows(k, lo, hi).unfold(1, band.span, band.c).transpose(-1, -2)


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(SB, E, r, D) -> (SB/G, G·E, r, D) so a (G, E, ...) bias broadcasts over the batch."""
    sb, e = x.shape[:2]
    return x.reshape(sb // groups, groups * e, *x.shape[2:])


# ----------------------------------------------------------------------------- kernels

def band_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: Band, biases: dict[str, torch.Tensor],
              scale: float) -> torch.Tensor:
    """Banded attention via the fused SDPA kernel on (SB, chunks, c, span) blocks.

    q, k, v: (SB, L, D). Returns (SB, q_stop - q_start, D). Cost: 4·SB·nc·c·span·D FLOPs,
    memory O(SB·N·D) (SDPA never materialises the scores).
    """
    pieces = []
    for t0, t1, kind in band.segments():
        qc = query_chunks(q, band, t0, t1)  # (SB, E, c, D)
        kc = key_spans(k, band, t0, t1)  # (SB, E, span, D)
        vc = key_spans(v, band, t0, t1)  # (SB, E, span, D)
        bias = biases[kind]
        if kind == "mid":
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=bias, scale=scale)  # (SB, E, c, D)
        else:
            g = band.groups
            o = F.scaled_dot_product_attention(
                _grouped(qc, g), _grouped(kc, g), _grouped(vc, g),
                attn_mask=bias.flatten(0, 1)[None], scale=scale,  # 4-D mask: 3-D ones push SDPA off the fused kernel
            ).reshape(qc.shape)  # (SB, E, c, D)
        pieces.append(o)
    out = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]  # (SB, nc, c, D)
    return out.flatten(1, 2)[:, :band.rows]  # (SB, rows, D)


# ------------------------------------------------------ band + extra keys, one softmax (flat layout)

@dataclass
class Extra:
    """Keys each band chunk sees besides its span (global keys, random blocks), as positions in its sequence.

    ``pos`` (nc, X) long: the X key positions of chunk t (every position < the padded length ``Lp``);
    ``ok`` (nc, X) bool: which slots are used (an unused slot, e.g. a missing random block or the padded part
    of a short last block, is hidden). Extra keys must not also be band keys of the chunk: each key once.
    """

    pos: torch.Tensor
    ok: torch.Tensor


@dataclass(frozen=True)
class Layout:
    """Where :func:`band_attention` computes each chunk of a one-group band: pure geometry, no tensors.

    The B·H sequences are laid end to end in one flat (SB·Lp, D) array, ``Lp`` = L rounded up to a multiple
    of c (a padded copy only when c does not divide L), so chunk t of sequence s starts at flat row
    q_start + (s·M + t)·c, M = Lp / c: one chunk grid for the whole batch, whose query chunks and key spans
    are views (``view`` and ``unfold``) across every sequence at once.

    A chunk t < nc is *clean* when its span lies inside its own sequence's band keys [kv_lo, kv_hi) (and its
    rows inside [0, Lp)) and its extra slots are the common ones (``ok[t]`` equals ``ok.any(0)``): the shared
    (c, span) offset mask and the shared slot mask are then exactly its visibility. Clean chunks lie in
    [t_lo, t_hi). The main pass runs every flat chunk from (0, t_lo) to (SB − 1, t_hi − 1); in between, the
    chunks of the gap between two sequences ([t_hi, M) ∪ [0, t_lo), about (left + right)/c + 1 of them)
    come out wrong and are not used. ``boundary`` lists the chunks that are not clean (for longformer the
    first ⌈left/c⌉ and the last ⌈right/c⌉ + 1 or so, for bigbird those whose random blocks are missing too):
    a gathered pass redoes them for every sequence with their own masks.
    """

    band: Band
    Lp: int
    M: int
    X: int
    boundary: tuple[int, ...]
    t_lo: int
    t_hi: int

    @classmethod
    def make(cls, band: Band, ok: torch.Tensor | None = None, length: int | None = None) -> Layout:
        """``ok`` (nc, X) bool slot mask of the extra keys (None: no extra keys); ``length`` the per-sequence
        length of the K/V the kernel gets (default ``band.L``)."""
        if band.groups != 1:
            raise ValueError("band_attention takes one group (kv_hi of length 1)")
        c = band.c
        Lp = c * -(-(length or band.L) // c)
        t = torch.arange(band.nc)
        start = band.q_start + t * c - band.left  # first key of each chunk's span
        clean = (start >= band.kv_lo) & (start + band.span <= band.kv_hi[0]) & (band.q_start + (t + 1) * c <= Lp)
        X = 0
        if ok is not None and ok.shape[1] > 0:
            X = ok.shape[1]
            clean &= (ok == ok.any(0)).all(1)
        where = clean.nonzero().flatten().tolist()
        t_lo, t_hi = (where[0], where[-1] + 1) if where else (0, 0)
        boundary = tuple((~clean).nonzero().flatten().tolist())
        return cls(band=band, Lp=Lp, M=Lp // c, X=X, boundary=boundary, t_lo=t_lo, t_hi=t_hi)

    @property
    def width(self) -> int:
        """Keys a chunk scores: its span and its extra keys."""
        return self.band.span + self.X

    def main_chunks(self, sb: int) -> int:
        """Flat chunks of the main pass for ``sb`` sequences: (SB − 1)·M + t_hi − t_lo (0 when none is clean)."""
        return (sb - 1) * self.M + self.t_hi - self.t_lo if self.t_hi > self.t_lo else 0

    def scored_keys(self, sb: int) -> int:
        """Query-key products of one call on ``sb`` sequences (for analytic FLOPs): every main-pass chunk and
        every boundary chunk of every sequence, c·(span + X) each."""
        return (self.main_chunks(sb) + sb * len(self.boundary)) * self.band.c * self.width


@dataclass
class BandPlan:
    """The tensors :func:`band_attention` needs for one layout on one device and dtype (built by :func:`band_plan`).

    ``mid`` (c, span) additive offset mask of clean chunks; ``slots`` (1, 1, X) additive mask of their extra
    slots; ``pos`` (1, M, X) long extra positions of every chunk of a sequence (0 past nc); boundary chunks:
    ``bnd_rows`` (nB·c,) query rows in the sequence (clamped into [0, Lp)), ``bnd_keys`` (nB·W,) key positions
    (span clamped into [0, Lp), then the extra keys), ``bnd_bias`` (nB, c, W) their additive mask,
    ``bnd_kept`` how many of ``bnd_rows`` are inside [0, Lp) (a prefix: only the last chunk can pass Lp);
    ``live`` (Lp, 1) bool rows that see a key, None when every row of [q_start, q_stop) does.
    """

    layout: Layout
    mid: torch.Tensor
    slots: torch.Tensor | None
    pos: torch.Tensor | None
    bnd_rows: torch.Tensor
    bnd_keys: torch.Tensor
    bnd_bias: torch.Tensor
    bnd_kept: int
    live: torch.Tensor | None


def band_plan(band: Band, extra: Extra | None, device: torch.device | str | None, dtype: torch.dtype,
              length: int | None = None) -> BandPlan:
    """Masks and indices of :func:`band_attention` for ``band`` plus ``extra`` keys (finite masks,
    ``neg_for(dtype)``): O(c·span + nc·X + nB·c·W) elements, built once per length, device and dtype."""
    ok = None if extra is None else extra.ok.cpu()
    lay = Layout.make(band, ok, length)
    neg = neg_for(dtype)
    c, span, left, X = band.c, band.span, band.left, lay.X
    x = torch.arange(c)[:, None]  # (c, 1) row in its chunk
    y = torch.arange(span)[None, :]  # (1, span) key in the chunk's span
    rel = band.offset_ok(x + left - y)  # (c, span) offset i − j visible
    slot_ok = ok.any(0) if X else torch.zeros(0, dtype=torch.bool)  # (X,) slots of clean chunks
    pos = None
    if X:
        pos = torch.zeros(lay.M, X, dtype=torch.long)
        pos[:band.nc] = extra.pos.cpu()
    tb = torch.tensor(lay.boundary, dtype=torch.long)  # (nB,)
    i = band.q_start + tb[:, None, None] * c + x  # (nB, c, 1) query positions
    j = band.q_start + tb[:, None, None] * c - left + y  # (nB, 1, span) key positions
    vis = band.offset_ok(i - j) & (j >= band.kv_lo) & (j < band.kv_hi[0]) & (i < band.q_stop)  # (nB, c, span)
    if X:
        vis = torch.cat([vis, ok[tb][:, None, :].expand(-1, c, -1)], dim=-1)  # (nB, c, W)
    keys = j[:, 0].clamp(0, lay.Lp - 1)  # (nB, span)
    if X:
        keys = torch.cat([keys, pos[tb]], dim=1)  # (nB, W)
    rows_b = i.flatten()  # (nB·c,)
    inside = rows_b < lay.Lp  # a prefix
    # rows of [q_start, q_stop) that see no key at all give 0, not a mean of hidden values
    live = torch.zeros(lay.Lp, dtype=torch.bool)
    wanted = torch.arange(band.q_start, band.q_stop)
    live[wanted] = bool(slot_ok.any()) | rel.any(-1)[(wanted - band.q_start) % c]
    live[rows_b[inside]] = vis.any(-1).flatten()[inside]
    live = None if bool(live[wanted].all()) else live[:, None]
    to = {"device": device}
    return BandPlan(layout=lay, mid=additive_bias(rel.to(**to), dtype, neg),
                    slots=additive_bias(slot_ok.to(**to), dtype, neg).view(1, 1, X) if X else None,
                    pos=None if pos is None else pos[None].to(**to),
                    bnd_rows=rows_b.clamp(max=lay.Lp - 1).to(**to), bnd_keys=keys.flatten().to(**to),
                    bnd_bias=additive_bias(vis.to(**to), dtype, neg),
                    bnd_kept=int(inside.sum()),
                    live=None if live is None else live.to(**to))


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BandPlan, scale: float,
                   budget: int | None = None) -> torch.Tensor:
    """Band keys plus extra keys, one softmax over both (each key once), for the whole batch at once.

    q, k, v: (SB, L, D). Returns (SB, Lp, D): rows [q_start, q_stop) of each sequence attend to their band
    keys {j ∈ [kv_lo, kv_hi) : offset_ok(i − j)} and their chunk's extra keys (``Extra``); the other rows
    hold values no caller should read (it writes its own there). No N×N tensor, no row against all keys.

    Main pass (see :class:`Layout`): the flat chunk grid is cut into groups of chunks; per group one
    ``baddbmm`` of the query chunks (a view) against their key spans (an ``unfold`` view, no copy) with the
    shared (c, span) mask, one ``baddbmm`` against the extra keys gathered per chunk (``embedding`` on the
    flat K), one softmax over the concatenation, then the values the same way. Row block rule (knob-free):
    a group holds as many rows as ``temp_budget`` bytes allow at ``itemsize·(2·(span + X) + 2·X·D/c)`` bytes
    per row of one sequence, its scores and probabilities and its gathered extra keys and values (the only
    temporaries that live at once; the extra-key index, 8·X/c bytes per row, is built once per call).
    Boundary pass: the nB boundary chunks of every sequence, keys gathered (``index_select``) with their own
    (nB, c, W) masks, in blocks of ``itemsize·(D + 2·W + 2·W·D/c)`` bytes per row, written into the output.
    So a call dispatches a constant plus ~18 ops per group (counted on fake tensors, views included), with
    SB·N·row bytes / budget groups.

    Cost: 4·D·c·W FLOPs per main-pass or boundary chunk (``Layout.scored_keys``), W = span + X. Memory on top
    of the inputs: the groups' pieces so far plus one group's temporaries (≤ the budget), then the pieces and
    the output they are concatenated into: max(output + budget, 2·output) (plus a padded copy of q, k, v when
    c does not divide L).
    """
    lay, band = plan.layout, plan.layout.band
    SB, L, D = q.shape
    c, span, X, W, Lp, M = band.c, band.span, lay.X, lay.width, lay.Lp, lay.M
    if budget is None:
        budget = temp_budget(q.device)
    if Lp != L:  # c does not divide L: pad every sequence to Lp (a copy; the padded keys are masked)
        q, k, v = (F.pad(t, (0, 0, 0, Lp - t.shape[1])) for t in (q, k, v))  # (SB, Lp, D)
    elif k.shape[1] != L:
        raise ValueError(f"q has {L} rows per sequence, k has {k.shape[1]}")
    qf, kf, vf = (t.reshape(SB * Lp, D) for t in (q, k, v))  # (SB·Lp, D) flat: one chunk grid
    isz = q.element_size()
    U = lay.main_chunks(SB)
    ua = lay.t_lo  # first flat chunk of the main pass
    if U:
        step = rows_within(budget, isz * (2 * W + 2 * X * D // c), U * c, c) // c  # chunks per group
        first = band.q_start + ua * c  # its first query row
        qc = qf.narrow(0, first, U * c).view(U, c, D).split(step)  # (step, c, D) views
        kt = kf.narrow(0, first - band.left, (U - 1) * c + span).unfold(0, span, c).split(step)  # (step, D, span)
        vs = vf.narrow(0, first - band.left, (U - 1) * c + span).unfold(0, span, c).mT.split(step)  # (step, span, D)
        ix = [None] * len(qc)
        if X:  # extra key rows in the flat layout: position in the sequence + s·Lp
            seq = torch.arange(0, SB * Lp, Lp, device=q.device).view(SB, 1, 1)  # (SB, 1, 1)
            ix = (plan.pos + seq).view(SB * M, X).narrow(0, ua, U).split(step)  # (step, X) long
        pieces = [_group(qg, kg, vg, ig, kf, vf, plan, scale) for qg, kg, vg, ig in zip(qc, kt, vs, ix)]
        # chunk-structured output from flat row q_start − a·c ≤ 0: zeros before and after the main pass
        a = -(-band.q_start // c)
        pieces = [qf.new_zeros(ua + a, c, D)] + pieces + [qf.new_zeros(SB * M - ua - U, c, D)]
        out = torch.cat(pieces).view(-1, D).narrow(0, a * c - band.q_start, SB * Lp)  # (SB·Lp, D)
        del pieces  # the output is the only copy from here on
    else:
        out = qf.new_zeros(SB * Lp, D)  # (SB·Lp, D)
    out3 = out.view(SB, Lp, D)
    if lay.boundary:
        _boundary(q, k, v, out3, plan, scale, budget)  # q, k, v (SB, Lp, D)
    if plan.live is not None:
        out3 = out3 * plan.live  # rows that see no key: 0
    return out3


def _group(qg: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, ig: torch.Tensor | None, kf: torch.Tensor,
           vf: torch.Tensor, plan: BandPlan, scale: float) -> torch.Tensor:
    """One group of E main-pass chunks: query chunks ``qg`` (E, c, D), key spans ``kg`` (E, D, span), value
    spans ``vg`` (E, span, D) (views), extra-key rows ``ig`` (E, X) into the flat ``kf``, ``vf`` (SB·Lp, D).
    Returns (E, c, D). Live at once: the (E, c, span + X) scores and probabilities and the (E, X, D) gathered
    extra keys or values; all of them are freed on return. Cost 4·E·c·(span + X)·D FLOPs."""
    s = torch.baddbmm(plan.mid, qg, kg, alpha=scale)  # (E, c, span) band scores, masked
    if ig is None:
        return torch.bmm(torch.softmax(s, dim=-1), vg)  # (E, c, D)
    ke = F.embedding(ig, kf)  # (E, X, D) gathered extra keys
    s = torch.cat([s, torch.baddbmm(plan.slots, qg, ke.mT, alpha=scale)], dim=-1)  # (E, c, span + X)
    del ke
    p = torch.softmax(s, dim=-1)  # (E, c, span + X)
    del s
    pb, px = p.split([kg.shape[-1], ig.shape[-1]], dim=-1)  # (E, c, span), (E, c, X)
    return torch.baddbmm(torch.bmm(pb, vg), px, F.embedding(ig, vf))  # (E, c, D)


def _boundary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, plan: BandPlan, scale: float,
              budget: int) -> None:
    """Writes the boundary chunks of every sequence (q, k, v (SB, Lp, D)) into their rows of ``out``
    (SB, Lp, D), with gathered keys and their own masks. A chunk of one sequence costs
    ``itemsize·c·(D + 2·W + 2·W·D/c)`` bytes (gathered queries, scores and probabilities, gathered keys and
    values): blocks of whole sequences, or of a range of chunks of one sequence when one sequence's do not
    fit; each block is written as soon as it is done. Cost 4·SB·nB·c·W·D FLOPs."""
    lay = plan.layout
    SB, _, D = q.shape
    nb, c, W = len(lay.boundary), lay.band.c, lay.width
    per_chunk = c * q.element_size() * (D + 2 * W + 2 * W * D // c)
    e = rows_within(budget, per_chunk, nb)  # chunks per block
    n = rows_within(budget, per_chunk * nb, SB) if e == nb else 1  # sequences per block
    for s0 in range(0, SB, n):
        blk = [t if n >= SB else t.narrow(0, s0, min(n, SB - s0)) for t in (q, k, v, out)]  # (n, Lp, D) each
        for b0 in range(0, nb, e):
            _boundary_block(*blk, plan, scale, b0, min(e, nb - b0))


def _boundary_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, plan: BandPlan,
                    scale: float, b0: int, e: int) -> None:
    """Boundary chunks b0 … b0 + e − 1 of n sequences (q, k, v, out (n, Lp, D)), written into ``out``; its
    temporaries die on return."""
    n, _, D = q.shape
    c, W = plan.layout.band.c, plan.layout.width
    rows, keys, bias = plan.bnd_rows, plan.bnd_keys, plan.bnd_bias  # (nB·c,), (nB·W,), (nB, c, W)
    if e < len(plan.layout.boundary):
        rows, keys, bias = rows.narrow(0, b0 * c, e * c), keys.narrow(0, b0 * W, e * W), bias.narrow(0, b0, e)
    qb = q.index_select(1, rows).view(n * e, c, D)  # (n·e, c, D)
    kb = k.index_select(1, keys).view(n * e, W, D)  # (n·e, W, D)
    s = torch.add(bias, torch.bmm(qb, kb.mT).view(n, e, c, W), alpha=scale)  # (n, e, c, W)
    del qb, kb
    p = torch.softmax(s, dim=-1).view(n * e, c, W)  # (n·e, c, W)
    del s
    vb = v.index_select(1, keys).view(n * e, W, D)  # (n·e, W, D)
    o = torch.bmm(p, vb).view(n, e * c, D)  # (n, e·c, D)
    keep = min(e * c, plan.bnd_kept - b0 * c)  # rows past Lp (the last chunk's tail, clamped) are not written
    if keep < e * c:
        o, rows = o.narrow(1, 0, keep), rows.narrow(0, 0, keep)
    out.index_copy_(1, rows, o)


# ------------------------------------------------ tensor-extras API (kept for existing callers, tests)

@dataclass
class Shared:
    """Keys every band row also sees (e.g. global tokens): k, v (SB, Ks, D), optional bias (Ks,)."""

    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class Gathered:
    """Key blocks gathered per chunk (e.g. BigBird random blocks).

    ``index`` (nc, r) block ids into ``k[:, :nblocks·block]`` viewed as blocks; ``bias``
    (nc, r·block) masks unused slots.
    """

    index: torch.Tensor
    block: int
    nblocks: int
    bias: torch.Tensor


def band_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: Band, biases: dict | None,
                scale: float, shared: Shared | None = None, gathered: Gathered | None = None,
                budget: int | None = None) -> torch.Tensor:
    """Banded attention plus shared keys (given as tensors) and gathered blocks, one softmax: (SB, rows, D).

    The tensor form of :func:`band_attention`, which the mechanisms call with a plan built once: here the
    shared keys are appended to K and V (a copy), the plan is built on every call and ``biases`` is not used
    (kept for the signature). Rows that see no key give 0. Cost: :func:`band_attention`'s.
    """
    L = q.shape[1]
    nc = band.nc
    pos, ok = [], []
    if gathered is not None:
        blk = gathered.index.cpu()[..., None] * gathered.block + torch.arange(gathered.block)  # (nc, r, block)
        pos.append(blk.flatten(1))
        ok.append(gathered.bias.cpu() == 0)  # (nc, r·block)
    if shared is not None:
        ks = shared.k.shape[1]
        k, v = torch.cat([k, shared.k], 1), torch.cat([v, shared.v], 1)  # (SB, L + Ks, D)
        pos.append((L + torch.arange(ks)).expand(nc, ks))
        sok = torch.ones(ks, dtype=torch.bool) if shared.bias is None else shared.bias.cpu() == 0
        ok.append(sok.expand(nc, ks))
    extra = Extra(torch.cat(pos, 1), torch.cat(ok, 1)) if pos else None
    lk = k.shape[1]
    if lk != L:
        q = F.pad(q, (0, 0, 0, lk - L))  # (SB, Lk, D): one length for the flat layout
    plan = band_plan(band, extra, q.device, q.dtype, length=lk)
    out = band_attention(q, k, v, plan, scale, budget)  # (SB, Lp, D)
    return out[:, band.q_start:band.q_stop]  # (SB, rows, D)
