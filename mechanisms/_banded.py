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

FlexAttention (``impl=flex``)
-----------------------------
:class:`FlexKernel` compiles ``torch.nn.attention.flex_attention`` for one mask and one
length at build time. Its ``BlockMask`` is built by :func:`build_block_mask` from the same
``mask_mod`` evaluated only on candidate tiles (linear in N), instead of
``create_block_mask``, which evaluates the full N×N mask (4.4 GiB of RSS at N=16,384 on
the CPU). The tile-level candidate table is a boolean (nt, nt), nt = ⌈N/128⌉: quadratic, but
in tiles (2 MiB at N=131,072; 64 MiB at N=10⁶), built once at build time, never per call. The compiled call is wrapped in a custom op (``effbench::flex_sparse_attention``)
so that dispatch-mode instrumentation (the storage tracker, FlopCounterMode) sees one opaque
op, the way it sees SDPA's fused kernel, instead of forcing dynamo back to the unfused
eager path (which materialises N×N scores and fails under dispatch modes).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import shutil
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

PatternFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (i, j) -> visible, broadcasting
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
    sb, _, d = q.shape
    c, span, groups = band.c, band.span, band.groups
    ks = 0 if shared is None else shared.k.shape[1]
    kr = 0 if gathered is None else gathered.index.shape[1] * gathered.block
    step = max(1, (budget or SCORE_BUDGET) // (c * (span + ks + kr)))
    segs = []  # (g0, g1, kind, t0)
    for t0, t1, kind in band.segments():
        size = step if kind == "mid" else t1 - t0
        segs += [(g0, min(t1, g0 + size), kind, t0) for g0 in range(t0, t1, size)]
    outs = []
    for i in range(sb):
        qi, ki, vi = q[i:i + 1], k[i:i + 1], v[i:i + 1]  # (1, L, D)
        if shared is not None:
            sk_t, sv = shared.k[i].transpose(0, 1), shared.v[i]  # (D, Ks), (Ks, D)
        if gathered is not None:
            nblk, blk = gathered.nblocks, gathered.block
            kb = k[i, :nblk * blk].unflatten(0, (nblk, blk))  # (nblk, b, D)
            vb = v[i, :nblk * blk].unflatten(0, (nblk, blk))
        pieces = []
        for g0, g1, kind, t0 in segs:
            e = g1 - g0
            qc = query_chunks(qi, band, g0, g1)[0] * scale  # (E, c, D)
            kc = key_spans(ki, band, g0, g1)[0]  # (E, span, D) overlapping view
            vc = key_spans(vi, band, g0, g1)[0]
            s = torch.bmm(qc, kc.transpose(1, 2))  # (E, c, span)
            s = s + (biases["mid"] if kind == "mid" else biases[kind][i % groups, g0 - t0:g1 - t0])
            parts = [s]
            if shared is not None:
                s2 = torch.mm(qc.reshape(e * c, d), sk_t)  # (E·c, Ks)
                if shared.bias is not None:
                    s2 = s2 + shared.bias
                parts.append(s2.view(e, c, ks))
            if gathered is not None:
                idx = gathered.index[g0:g1].reshape(-1)  # (E·r,)
                kg = kb.index_select(0, idx).reshape(e, kr, d)  # (E, Kr, D)
                vg = vb.index_select(0, idx).reshape(e, kr, d)
                parts.append(torch.bmm(qc, kg.transpose(1, 2)) + gathered.bias[g0:g1, None, :])  # (E, c, Kr)
            p = torch.softmax(torch.cat(parts, dim=-1) if len(parts) > 1 else s, dim=-1)  # (E, c, width)
            o = torch.bmm(p[..., :span], vc)  # (E, c, D)
            if shared is not None:
                o = o + torch.mm(p[..., span:span + ks].reshape(e * c, ks), sv).view(e, c, d)
            if gathered is not None:
                o = o + torch.bmm(p[..., span + ks:], vg)
            if kind != "mid" or biases["mid_dead"]:  # rows that see no key at all give 0, not a mean
                live = biases["mid_live"] if kind == "mid" else biases[kind + "_live"][i % groups, g0 - t0:g1 - t0]
                if shared is not None:
                    live = live | (True if shared.bias is None else (shared.bias == 0).any())
                if gathered is not None:
                    live = live | (gathered.bias[g0:g1] == 0).any(-1)[:, None, None]
                o = o * live
            pieces.append(o)
        outs.append(torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0])  # (nc, c, D)
    out = torch.stack(outs, dim=0)  # (SB, nc, c, D)
    return out.flatten(1, 2)[:, :band.rows]  # (SB, rows, D)


# ------------------------------------------------------------------------ FlexAttention

FLEX_TILE = 128


def flex_reasons(device: str, dtype: str, mode: str | None = None) -> list[str]:
    """Why ``impl=flex`` cannot run here (empty: it can)."""
    try:
        from torch.nn.attention import flex_attention as _fa  # noqa: F401
    except ImportError:
        return [f"impl=flex needs torch.nn.attention.flex_attention (torch >= 2.5); this is torch {torch.__version__}"]
    kind = torch.device(device).type
    if kind == "cpu":
        reasons = []
        if dtype not in ("float32", "float16", "bfloat16"):
            reasons.append(f"impl=flex on the CPU supports float32/float16/bfloat16, not {dtype}")
        if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
            reasons.append("impl=flex on the CPU compiles C++ kernels and no C++ compiler (g++/clang++) was found")
        if mode is not None and "bwd" in mode:
            reasons.append(f"impl=flex has no CPU backward in torch {torch.__version__}; use impl=eager for fwd+bwd")
        return reasons
    if kind == "cuda":
        if importlib.util.find_spec("triton") is None:
            return ["impl=flex on CUDA needs triton, which is not installed"]
        return []
    return [f"impl=flex is not supported on device {kind!r} (cpu and cuda only)"]


def tile_span_candidates(n: int, tile: int, reach_back: int, reach_fwd: int) -> torch.Tensor:
    """(nt, nt) tiles holding some pair with -reach_fwd <= i - j <= reach_back (a superset is fine)."""
    nt = -(-n // tile)
    a = torch.arange(nt)[:, None]
    b = torch.arange(nt)[None, :]
    # smallest and largest i - j over tile pair (a, b)
    lo = (a - b) * tile - (tile - 1)
    hi = (a - b) * tile + (tile - 1)
    return (hi >= -reach_fwd) & (lo <= reach_back)


def build_block_mask(pattern: PatternFn, n: int, candidates: torch.Tensor, tile: int,
                     device: torch.device | str = "cpu"):
    """A ``BlockMask`` for ``pattern`` on length ``n``, classifying only the candidate tiles.

    Each candidate (q tile, kv tile) is evaluated in full (T×T) and marked empty, partial
    (mask_mod applied in the kernel) or full; positions >= n count as masked, like
    ``create_block_mask`` (which pads its dense mask with False). Work and memory are
    O(#candidates·T²), linear in N for banded patterns.
    """
    from torch.nn.attention.flex_attention import BlockMask

    nt = candidates.shape[0]
    qt, kt = candidates.nonzero(as_tuple=True)  # (P,)
    cls = torch.zeros(nt, nt, dtype=torch.int8)  # 0 empty, 1 partial, 2 full
    ar = torch.arange(tile)
    step = max(1, (1 << 22) // (tile * tile))
    for p0 in range(0, qt.numel(), step):
        a, b = qt[p0:p0 + step], kt[p0:p0 + step]
        i = (a[:, None] * tile + ar)[:, :, None]  # (P, T, 1)
        j = (b[:, None] * tile + ar)[:, None, :]  # (P, 1, T)
        inside = (i < n) & (j < n)  # (P, T, T)
        m = pattern(i, j) & inside
        any_ = m.flatten(1).any(1)
        full = m.flatten(1).all(1)
        cls[a, b] = torch.where(full, 2, torch.where(any_, 1, 0)).to(torch.int8)

    def pack(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num = sel.sum(-1, dtype=torch.int32)  # (nt,)
        idx = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)  # selected first
        return num[None, None].to(device), idx[None, None].to(device)

    kv_num, kv_idx = pack(cls == 1)
    full_num, full_idx = pack(cls == 2)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=tile,
                                    mask_mod=lambda b, h, i, j: pattern(i, j), seq_lengths=(n, n))


def count_tiles(pattern: PatternFn, n: int, candidates: torch.Tensor, tile: int) -> int:
    """Query-key products FlexAttention computes: T×T per non-empty tile, clipped to n (for analytic FLOPs)."""
    bm = build_block_mask(pattern, n, candidates, tile)
    nt = candidates.shape[0]
    sizes = torch.tensor([min(tile, n - t * tile) for t in range(nt)], dtype=torch.int64)
    total = 0
    for num, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
        num, idx = num[0, 0].long(), idx[0, 0].long()
        keep = torch.arange(nt)[None, :] < num[:, None]  # (nt, nt)
        total += int((sizes[:, None] * sizes[idx] * keep).sum())
    return total


# One weak table so the custom op (which can only take tensors and numbers) finds its kernel.
_KERNELS: "weakref.WeakValueDictionary[int, FlexKernel]" = weakref.WeakValueDictionary()


@functools.lru_cache(maxsize=None)
def _flex_op():
    """The opaque custom op around a compiled FlexAttention call (defined on first use)."""

    @torch.library.custom_op("effbench::flex_sparse_attention", mutates_args=())
    def flex_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int) -> torch.Tensor:
        return _KERNELS[handle].run(q, k, v)

    @flex_sparse_attention.register_fake
    def _(q, k, v, handle):
        return torch.empty_like(q)

    return flex_sparse_attention


@dataclass
class FlexKernel:
    """``torch.compile(flex_attention)`` for one mask pattern and one length, built up front.

    ``pattern_for(device)`` returns the (i, j) pattern with any captured tensors on ``device``.
    ``prepare(device, dtype)`` builds the block mask there and compiles + warms the kernel for
    (1, heads, n, head_dim) inputs (batch 1, the harness default: another batch size compiles
    once more on its first call, i.e. in the warm-up); ``build_ms`` records where the time went.
    """

    pattern_for: Callable[[torch.device], PatternFn]
    n: int
    candidates: torch.Tensor
    tile: int
    heads: int
    head_dim: int
    scale: float
    build_ms: dict = field(default_factory=dict)
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    block_mask: object = None
    _compiled: Callable | None = None

    def __post_init__(self):
        _KERNELS[id(self)] = self

    @property
    def handle(self) -> int:
        return id(self)

    def prepare(self, device: torch.device | str, dtype: torch.dtype) -> None:
        device = torch.device(device)
        if (device, dtype) == (self.device, self.dtype):
            return
        from torch.nn.attention.flex_attention import flex_attention

        t0 = time.perf_counter()
        if self.block_mask is None or device != self.device:
            self.block_mask = build_block_mask(self.pattern_for(device), self.n, self.candidates, self.tile, device)
        t1 = time.perf_counter()
        if self._compiled is None:
            self._compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
        self.device, self.dtype = device, dtype
        q, k, v = (torch.zeros(1, self.heads, self.n, self.head_dim, device=device, dtype=dtype) for _ in range(3))
        with torch.no_grad():
            _flex_op()(q, k, v, self.handle)  # compile (and warm) now, not in the first timed call
        t2 = time.perf_counter()
        self.build_ms = {"block_mask_ms": (t1 - t0) * 1e3, "compile_ms": (t2 - t1) * 1e3}

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with torch._dynamo.config.patch(recompile_limit=64):
            return self._compiled(q, k, v, block_mask=self.block_mask, scale=self.scale)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if (q.device, q.dtype) != (self.device, self.dtype):
            self.prepare(q.device, q.dtype)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if needs_grad:
            if q.device.type == "cpu":
                raise NotImplementedError(
                    f"impl=flex has no CPU backward in torch {torch.__version__}; use impl=eager for gradients")
            return self.run(q, k, v)
        return _flex_op()(q, k, v, self.handle)


# ------------------------------------------------------------------ shared module plumbing

class PatternAttention(torch.nn.Module):
    """Plumbing shared by the sparse-pattern mechanisms.

    A subclass defines ``pattern_on(device) -> (i, j) -> bool`` (the mask, for the reference
    and for FlexAttention), ``flex_candidates(n, tile)``, ``_make_plan(N, device, dtype)``
    and ``_eager(q, k, v, plan)``. Plans (biases, indices) and the compiled FlexAttention
    kernel are built in ``__init__`` for ``n`` and rebuilt when ``.to()`` changes the device
    or dtype, so nothing is built inside a measured call.
    """

    flex_tile: int = FLEX_TILE

    def _setup(self, *, head_dim: int, heads: int, n: int, causal: bool, impl: str) -> None:
        self.head_dim, self.heads, self.n, self.causal, self.impl = head_dim, heads, n, causal, impl
        self.scale = default_scale(head_dim)
        self.register_buffer("_probe", torch.zeros(()), persistent=False)  # follows .to(device, dtype)
        self._plans: dict = {}
        self._flex: FlexKernel | None = None
        self._build_ms: dict = {}
        self._build()

    # -- building -------------------------------------------------------------------------
    def _build(self) -> None:
        device, dtype = self._probe.device, self._probe.dtype
        t0 = time.perf_counter()
        if self.impl == "flex":
            if flex_reasons(str(device), str(dtype).removeprefix("torch.")):
                return  # forward explains; check() refuses such cases up front
            if self._flex is None:
                tile = self.flex_tile
                self._flex = FlexKernel(self.pattern_on, self.n, self.flex_candidates(self.n, tile), tile,
                                        self.heads, self.head_dim, self.scale)
            self._flex.prepare(device, dtype)
            self._build_ms = dict(self._flex.build_ms)
        else:
            self._plans.clear()
            self._plan(self.n, device, dtype)
            self._build_ms = {"plan_ms": (time.perf_counter() - t0) * 1e3}

    def _apply(self, fn, recurse: bool = True):
        before = (self._probe.device, self._probe.dtype)
        out = super()._apply(fn, recurse)
        if (self._probe.device, self._probe.dtype) != before:
            self._build()
        return out

    def _plan(self, N: int, device: torch.device, dtype: torch.dtype):
        key = (N, device, dtype)
        if key not in self._plans:
            self._plans[key] = self._make_plan(N, device, dtype)
        return self._plans[key]

    def build_info(self) -> dict:
        info: dict = {"impl": self.impl}
        if self.impl == "eager" and self._plans:
            band = next(iter(self._plans.values())).get("band")
            if band is not None:
                info["chunk"] = band.c
                info["span"] = band.span
        if self.impl == "flex":
            info["flex_tile"] = self.flex_tile
            info["compiled_batch"] = 1  # other batch sizes compile once more on their first call
        info.update(self._build_ms)
        return info

    # -- calling --------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.impl == "flex":
            reasons = flex_reasons(str(q.device), str(q.dtype).removeprefix("torch."))
            if reasons:
                raise NotImplementedError("; ".join(reasons))
            if q.shape[-2] != self.n:
                raise ValueError(f"impl=flex was built for n={self.n}, got N={q.shape[-2]}")
            return self._flex(q, k, v)  # (B, H, N, D)
        return self._eager(q, k, v, self._plan(q.shape[-2], q.device, q.dtype))

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Dense softmax attention under the same mask (N×N: small N only)."""
        from .base import mask_from_mod, masked_softmax_attention

        mask = mask_from_mod(self.pattern_on(q.device), q.shape[-2], device=q.device)  # (N, N)
        return masked_softmax_attention(q, k, v, mask, scale=self.scale)
