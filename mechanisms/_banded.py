"""Banded and blocked attention kernels shared by ``local``, ``dilated``, ``longformer`` and ``bigbird``.

Eager kernels (plain PyTorch, O(N·span) time and memory)
--------------------------------------------------------
The sequence is cut into query chunks of ``c`` rows. Chunk ``t`` (rows
``q_start + t·c ... + c``) attends to one contiguous key span of ``span = left + c + right``
keys starting ``left`` before its first row. Which keys of the span a row sees depends
only on the offset ``d = i - j`` (a ``(c, span)`` mask, the same for every chunk), plus the
range of keys that exist ``[kv_lo, kv_hi)``. Chunks whose span leaves that range (the first
few and the last few, "edge" chunks) get their own ``(c, span)`` bias; every other chunk uses
the shared relative bias. Key spans are ``unfold`` views of K and V (no copies) except on
the edge chunks, where a small zero-padded copy is made. No N×N tensor ever exists:

- :func:`band_sdpa` runs the chunks through ``scaled_dot_product_attention`` with an additive
  ``(c, span)`` mask (the fused CPU flash kernel: scores never materialised, counted by
  FlopCounterMode). Used when each query sees only its band (local, dilated, Longformer
  without globals).
- :func:`band_matmul` computes the ``(c, span)`` scores with matmuls, concatenates scores
  of extra key sets (keys shared by every row, e.g. Longformer/BigBird global keys, and keys
  gathered per chunk, e.g. BigBird random blocks) and takes one softmax over the union, so
  each key is counted once. Loops over groups of chunks to bound the live scores.

FlexAttention (``impl=flex``) and :class:`PatternAttention`, the module plumbing that picks the
eager kernels here or FlexAttention per mechanism, live in :mod:`._flex` (which imports this
module; this one imports nothing from it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

OffsetFn = Callable[[torch.Tensor], torch.Tensor]  # d = i - j -> visible inside the band

SCORE_BUDGET = 1 << 22  # scores (elements) live at once per group in band_matmul: 16 MiB in fp32


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
             kv_lo: int, kv_hi: Sequence[int], offset_ok: OffsetFn) -> "Band":
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


def band_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: Band, biases: dict[str, torch.Tensor],
                scale: float, shared: Shared | None = None, gathered: Gathered | None = None,
                budget: int | None = None) -> torch.Tensor:
    """Banded attention with matmuls, plus optional shared and gathered keys, one softmax over all.

    q, k, v: (SB, L, D); ``biases`` from ``band.biases(..., neg_for(dtype))`` (finite masks,
    so padded rows never produce NaN, not even in gradients). Returns (SB, q_stop - q_start, D).
    Each sequence is processed in groups of chunks with 3-D ``bmm`` on the ``unfold`` views
    (a 4-D ``matmul`` would copy the overlapping spans). Cost per row: 4·D·(span + Ks + Kr)
    FLOPs; live scores bounded by ``budget`` elements per group.
    """
    ks = 0 if shared is None else shared.k.shape[1]
    kr = 0 if gathered is None else gathered.index.shape[1] * gathered.block
    step = max(1, (budget or SCORE_BUDGET) // (band.c * (band.span + ks + kr)))
    groups = _chunk_groups(band, step)
    outs = []
    for i in range(q.shape[0]):
        seq = _Sequence.of(q, k, v, i, shared, gathered)
        pieces = [_group_attention(seq, grp, band, biases, scale, shared, gathered) for grp in groups]  # (E, c, D) each
        outs.append(torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0])  # (nc, c, D)
    out = torch.stack(outs, dim=0)  # (SB, nc, c, D)
    return out.flatten(1, 2)[:, :band.rows]  # (SB, rows, D)


def _chunk_groups(band: Band, step: int) -> list[tuple[int, int, str, int]]:
    """[(g0, g1, kind, t0)]: interior chunks in groups of at most ``step``, each edge segment whole.

    ``t0`` is the first chunk of the group's segment (edge biases are indexed from it).
    """
    groups = []
    for t0, t1, kind in band.segments():
        size = step if kind == "mid" else t1 - t0
        groups += [(g0, min(t1, g0 + size), kind, t0) for g0 in range(t0, t1, size)]
    return groups


class _Sequence(NamedTuple):
    """One sequence ``i`` of the (SB, L, D) batch and its views of the shared and gathered keys."""

    i: int
    q: torch.Tensor  # (1, L, D)
    k: torch.Tensor  # (1, L, D)
    v: torch.Tensor  # (1, L, D)
    shared_kt: torch.Tensor | None  # (D, Ks)
    shared_v: torch.Tensor | None  # (Ks, D)
    blocks_k: torch.Tensor | None  # (nblk, b, D)
    blocks_v: torch.Tensor | None  # (nblk, b, D)

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int, shared: Shared | None,
           gathered: Gathered | None) -> "_Sequence":
        sk_t = sv = kb = vb = None
        if shared is not None:
            sk_t, sv = shared.k[i].transpose(0, 1), shared.v[i]  # (D, Ks), (Ks, D)
        if gathered is not None:
            nblk, blk = gathered.nblocks, gathered.block
            kb = k[i, :nblk * blk].unflatten(0, (nblk, blk))  # (nblk, b, D)
            vb = v[i, :nblk * blk].unflatten(0, (nblk, blk))  # (nblk, b, D)
        return cls(i, q[i:i + 1], k[i:i + 1], v[i:i + 1], sk_t, sv, kb, vb)


def _group_attention(seq: _Sequence, group: tuple[int, int, str, int], band: Band, biases: dict,
                     scale: float, shared: Shared | None, gathered: Gathered | None) -> torch.Tensor:
    """Chunks [g0, g1) of one sequence against span ∪ shared ∪ gathered keys, one softmax: (E, c, D).

    Cost: 4·E·c·(span + Ks + Kr)·D FLOPs; live scores E·c·(span + Ks + Kr) elements.
    """
    g0, g1, kind, t0 = group
    qc = query_chunks(seq.q, band, g0, g1)[0] * scale  # (E, c, D)
    vc = key_spans(seq.v, band, g0, g1)[0]  # (E, span, D) overlapping view
    s, vg = _group_scores(seq, qc, group, band, biases, shared, gathered)  # (E, c, width), (E, Kr, D)
    p = torch.softmax(s, dim=-1)  # (E, c, width)
    o = _group_values(seq, p, vc, vg)  # (E, c, D)
    if kind != "mid" or biases["mid_dead"]:  # rows that see no key at all give 0, not a mean
        o = o * _live_rows(seq, group, band, biases, shared, gathered)
    return o


def _group_scores(seq: _Sequence, qc: torch.Tensor, group: tuple[int, int, str, int], band: Band, biases: dict,
                  shared: Shared | None, gathered: Gathered | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Biased scores of the scaled queries ``qc`` (E, c, D) against [span; shared; gathered] keys.

    Returns the scores (E, c, span + Ks + Kr) and the gathered values (E, Kr, D) (None without
    gathered keys). Cost: 2·E·c·(span + Ks + Kr)·D FLOPs.
    """
    g0, g1, kind, t0 = group
    e, c, d = qc.shape
    kc = key_spans(seq.k, band, g0, g1)[0]  # (E, span, D) overlapping view
    s = torch.bmm(qc, kc.transpose(1, 2))  # (E, c, span)
    s = s + (biases["mid"] if kind == "mid" else biases[kind][seq.i % band.groups, g0 - t0:g1 - t0])
    parts, vg = [s], None
    if shared is not None:
        s2 = torch.mm(qc.reshape(e * c, d), seq.shared_kt)  # (E·c, Ks)
        if shared.bias is not None:
            s2 = s2 + shared.bias
        parts.append(s2.view(e, c, -1))  # (E, c, Ks)
    if gathered is not None:
        idx = gathered.index[g0:g1].reshape(-1)  # (E·r,)
        kg = seq.blocks_k.index_select(0, idx).reshape(e, -1, d)  # (E, Kr, D)
        vg = seq.blocks_v.index_select(0, idx).reshape(e, -1, d)  # (E, Kr, D)
        parts.append(torch.bmm(qc, kg.transpose(1, 2)) + gathered.bias[g0:g1, None, :])  # (E, c, Kr)
    return (torch.cat(parts, dim=-1) if len(parts) > 1 else s), vg  # (E, c, width)


def _group_values(seq: _Sequence, p: torch.Tensor, vc: torch.Tensor, vg: torch.Tensor | None) -> torch.Tensor:
    """Weights ``p`` (E, c, span + Ks + Kr) times [span values vc; shared values; gathered values vg]: (E, c, D)."""
    e, c, _ = p.shape
    span = vc.shape[1]
    o = torch.bmm(p[..., :span], vc)  # (E, c, D)
    ks = 0
    if seq.shared_v is not None:
        ks = seq.shared_v.shape[0]
        o = o + torch.mm(p[..., span:span + ks].reshape(e * c, ks), seq.shared_v).view(e, c, -1)  # (E, c, D)
    if vg is not None:
        o = o + torch.bmm(p[..., span + ks:], vg)  # (E, c, D)
    return o


def _live_rows(seq: _Sequence, group: tuple[int, int, str, int], band: Band, biases: dict,
               shared: Shared | None, gathered: Gathered | None) -> torch.Tensor:
    """Rows of chunks [g0, g1) that see at least one key: (c, 1) or (E, c, 1) bool."""
    g0, g1, kind, t0 = group
    live = biases["mid_live"] if kind == "mid" else biases[kind + "_live"][seq.i % band.groups, g0 - t0:g1 - t0]
    if shared is not None:
        live = live | (True if shared.bias is None else (shared.bias == 0).any())
    if gathered is not None:
        live = live | (gathered.bias[g0:g1] == 0).any(-1)[:, None, None]  # (E, 1, 1)
    return live
