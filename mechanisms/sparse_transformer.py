"""Sparse Transformer attention (Child et al. 2019): the strided and the fixed factorised patterns, in one head."""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._budget import rows_within, temp_budget
from ._decode import RingKV, StaticKV, attend_one, attend_parts
from ._flex import PatternAttention
from .base import KV_HEADS, Fidelity, Knob, equals_dense_at, register

PATTERNS = ("strided", "fixed")
WINDOW_ROWS = 64  # query rows of a local window: strided 64 (any l), fixed the multiple of l nearest 64 from below
EXP_FLOOR = -80.0  # exp arguments are clamped to this from below (see _softmax_parts)


def auto_stride(n: int) -> int:
    """√n rounded to the nearest power of two (ties down): lo = the largest power of two with lo² ≤ n, then
    lo if √n − lo ≤ 2·lo − √n (i.e. 4n ≤ 9·lo²), else 2·lo. n = 1024 → 32, 777 → 32, 4096 → 64, 2048 → 32."""
    n = max(int(n), 1)
    lo = 1 << (math.isqrt(n).bit_length() - 1)
    return lo if 4 * n <= 9 * lo * lo else 2 * lo


def resolve_stride(stride: int, n: int) -> int:
    """The stride l in force: the knob, or (0) :func:`auto_stride` of the length the module is built for."""
    return int(stride) if stride > 0 else auto_stride(n)


def strided_pattern(stride: int, causal: bool):
    """(i, j) -> |i − j| < l or (i − j) mod l = 0; causal ∩ {j ≤ i}."""
    def pattern(i, j):
        d = i - j
        vis = (d.abs() < stride) | (d % stride == 0)
        return vis & (d >= 0) if causal else vis
    return pattern


def fixed_pattern(stride: int, summary: int, causal: bool):
    """(i, j) -> ⌊j/l⌋ = ⌊i/l⌋ or j mod l ≥ l − c; causal ∩ {j ≤ i}."""
    def pattern(i, j):
        vis = (i // stride == j // stride) | (j % stride >= stride - summary)
        return vis & (j <= i) if causal else vis
    return pattern


def summary_count(x: int, stride: int, summary: int) -> int:
    """Summary columns j < x (j mod l ≥ l − c, c ≤ l)."""
    return (x // stride) * summary + max(0, x % stride - (stride - summary))


def summary_positions(x: int, stride: int, summary: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(summary_count(x),) the summary columns j < x in order: the s-th is ⌊s/c⌋·l + l − c + s mod c (no boolean
    indexing, so its shape is known without the data: fake-tensor predictions see it)."""
    s = torch.arange(summary_count(x, stride, summary), device=device)
    return (s // summary) * stride + (stride - summary) + s % summary


def neg_for(dtype: torch.dtype) -> float:
    """Finite "minus infinity" for masked scores: exp() gives exactly 0, no row is ever NaN, and a score added to
    it (a masked score is neg + q·k/√D) cannot overflow to −inf."""
    return torch.finfo(dtype).min / 2


@dataclass(frozen=True)
class Geometry:
    """Sizes of the eager kernel for one (n, pattern, l, c, causal), on no device.

    Local part: rows in windows of ``chunk`` query rows, window t (of a sequence) against the keys
    [t·chunk − left, t·chunk + chunk + right), ``span`` of them (strided: chunk = 64 rows, left = l − 1,
    right = l − 1 or, causal, 0; fixed: chunk = m·l, m whole blocks, left = right = 0, block-diagonal); each
    sequence padded to ``chunks``·chunk rows. Extra part: strided the P = ⌈n/l⌉ key periods of a row's residue
    class (``extra`` = P), fixed the S summary columns (``extra`` = S); 0 when there is one period or block.
    """

    n: int
    pattern: str
    causal: bool
    stride: int
    summary: int  # c in force, min(c, l)
    chunk: int
    left: int
    right: int
    span: int
    chunks: int  # windows per sequence
    periods: int  # ⌈n/l⌉ key periods (strided) or blocks (fixed)
    extra: int  # extra keys of a row: periods (strided) or summary columns (fixed); 0 when none exist

    @classmethod
    def make(cls, *, n: int, pattern: str, stride: int, summary: int, causal: bool) -> Geometry:
        l = stride
        c = min(summary, l)
        periods = -(-n // l)
        if pattern == "strided":
            chunk = max(1, min(WINDOW_ROWS, n))
            left = min(l - 1, max(n - 1, 0))
            right = 0 if causal else left
            extra = periods if periods > 1 else 0  # one period: every offset multiple of l is 0, in the band
        else:
            chunk = max(1, min(WINDOW_ROWS // l, periods)) * l
            left = right = 0  # the window's own blocks; block-diagonal
            extra = summary_count(n, l, c) if periods > 1 else 0  # one block: every summary column is in it
        return cls(n=n, pattern=pattern, causal=causal, stride=l, summary=c, chunk=chunk, left=left, right=right,
                   span=left + chunk + right, chunks=-(-n // chunk), periods=periods, extra=extra)

    @property
    def n_pad(self) -> int:
        return self.chunks * self.chunk

    def scored_keys(self) -> int:
        """Query-key products per sequence (padded rows included): windows·chunk·span, plus strided l residue
        classes of P·P, fixed n·S."""
        local = self.chunks * self.chunk * self.span
        if not self.extra:
            return local
        if self.pattern == "strided":
            return local + self.stride * self.periods * self.periods
        return local + self.n * self.extra

    def local_visible(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """The local part of the pattern (disjoint from the extra keys): strided |i − j| < l, fixed ⌊i/l⌋ = ⌊j/l⌋;
        causal ∩ {j ≤ i}."""
        l = self.stride
        vis = (i - j).abs() < l if self.pattern == "strided" else (i // l == j // l)
        return vis & (j <= i) if self.causal else vis


@register(
    name="sparse-transformer", family="sparse", complexity="O(N·√N·D)",
    memory="O(N·D) inference, O(N·√N) with grad",
    knobs=[
        Knob("pattern", default="strided", type=str, choices=PATTERNS,
             help="strided: |i − j| < l or l divides i − j; fixed: i's own block of l or a summary column"),
        Knob("stride", default=0, axis="stride", minimum=0, small=37, length=True,
             help="stride / block length l of the sparse transformer; 0: √N rounded to a power of two"),
        Knob("summary", default=8, minimum=1, small=5,
             help="summary columns c at the end of each block (fixed pattern): j mod l ≥ l − c"),
        KV_HEADS,
    ],
)
class SparseTransformerAttention(PatternAttention):
    """Sparse Transformer (Child et al. 2019): one head sees the union of two factorised sub-patterns, strided or fixed.

    With stride l (knob ``stride``; 0: √N rounded to the nearest power of two, resolved when the module is built,
    for the n it is built for) query i sees S(i), each key once, and out_i = Σ_{j ∈ S(i)} softmax_j(q_i·k_j/√D) v_j:

    - strided: S(i) = {j : |i − j| < l} ∪ {j : (i − j) mod l = 0}: a band of 2l − 1 keys and every l-th key
      (the paper's strided pattern for data with a period, e.g. image rows);
    - fixed: S(i) = {j : ⌊j/l⌋ = ⌊i/l⌋} ∪ {j : j mod l ≥ l − c}: i's own block of l and the last c columns of
      every block, "summary" columns every row sees (the paper's fixed pattern, for text). c ≥ l makes every
      column a summary column: dense attention.

    Causal (the paper's setting) intersects S(i) with {j ≤ i}; bidirectional is the pattern as written.
    Keys per row: strided ≈ 2l + N/l (causal l + i/l), fixed ≈ l + N·c/l; at l = √N both are O(√N).

    eager (no N×N tensor, every head at once): the two disjoint parts of S(i) are attended separately and
    merged exactly. Part p gives, per row, its maximum score m_p, n_p = Σ_j e^{s_j − m_p}·v_j and
    l_p = Σ_j e^{s_j − m_p}; with M = max(m_1, m_2) and a_p = e^{m_p − M} (no gradient: M cancels),
    o = (a_1·n_1 + a_2·n_2) / (a_1·l_1 + a_2·l_2) is the softmax over the union, each key counted once, and the
    backward keeps no per-part output (only o).
    - local part: the B·H sequences are laid end to end (each padded to whole windows) and cut into windows of
      C query rows (strided C = 64, any l; fixed C = m·l, m = max(1, ⌊64/l⌋) whole blocks). Window t sees one
      contiguous key span, an ``unfold`` view of K and V (strided: [t·C − (l − 1), t·C + C + l − 1), causal
      [t·C − (l − 1), t·C + C), on K, V padded once with l − 1 zero rows at either end; fixed: the window
      itself). One additive (C, span) mask holds the offsets (strided |i − j| < l, fixed the block diagonal;
      causal j ≤ i); keys outside the window's own sequence (the l − 1 next to a sequence's ends) are masked per
      window from a small table of the few edge kinds.
    - extra part: strided: the keys at offsets ±l·t, t ≥ 1, are i's residue class mod l. Q, K and V are
      regrouped by residue, (B·H·l, ⌈N/l⌉, D) (a strided view copied, as dilated attention does), and each class
      is dense attention over its ⌈N/l⌉ periods with its own period (offset 0, in the band) masked, causal
      also the later ones. Fixed: the N·c/l summary columns are gathered once (``index_select``) and shared by
      every row, those in the row's own block masked (causal: those not in an earlier block), as Longformer's
      global keys.
    Blocks: each part goes in blocks of windows, residue classes or rows sized from one byte budget of live
    temporaries (``_budget.temp_budget``: 64 MiB on the CPU, 1 GiB on CUDA). A block's temporaries are its
    scores, exponentiated in place (n, l and m, D + 2 numbers a row, are the part's output): a row costs
    span·itemsize bytes (local), ⌈N/l⌉·itemsize (strided), B·H·S·itemsize + S per position (fixed, whose
    mask is shared by the heads). So one call dispatches a constant number of ops (~60) plus ~10 to 13 per
    block (counted on fake tensors, views included), with blocks of tens of thousands of rows at the default
    sizes.
    Cost: 4·B·H·D·(windows·C·span + extra) FLOPs (``analytic_flops``, exactly what FlopCounterMode counts),
    extra = l·⌈N/l⌉² (strided) or N·S (fixed): strided ≈ 4·B·H·N·D·(64 + 2l + N/l), O(N^1.5·D) at the default
    l = √N; fixed ≈ 4·B·H·N·D·(C + N·c/l), O(N^1.5·D) at l = √N. At a fixed l the N/l strided keys (N·c/l
    summary keys) per row make the work quadratic: there is no stride at which it is linear (l + N/l ≥ 2√N).
    Memory: O(B·H·N·D) inference (the regrouped and padded copies, the parts' outputs, plus one block's
    budget), O(B·H·N·(l + N/l)) (fixed O(B·H·N·(l + N·c/l))) saved for the backward: O(N·√N) at the default
    stride.

    Decode (causal):
    - strided: query i needs the last l positions and every earlier position ≡ i (mod l); over the steps every
      residue class is needed, so the state keeps every position, a :class:`StaticKV` of the whole capacity
      (as dense: 2·B·kv_heads·N·D elements, O(N)). A step gathers (``index_select``) its min(l, i + 1) + ⌊i/l⌋
      keys and values and reads 2·B·kv_heads·(l + N/l)·D elements: O(√N) at the default stride.
    - fixed: the current block, a ring of l (:class:`RingKV`, positions ≥ ⌊i/l⌋·l visible), and every summary
      column so far (a :class:`StaticKV` of the N·c/l summary positions up to the capacity, O(N)); a step reads
      the ring and the summary columns of the earlier blocks: 2·B·kv_heads·(l + ⌊i/l⌋·c)·D elements.
    ``decode_read_bytes`` declares the median over the steps N0 … capacity − 1 of what a step reads.
    """

    decode_form = ("strided: KV cache of every position, a step gathers l + N/l keys: 2·B·kv_heads·N·D; fixed: "
                   "the current block (ring of l) + every summary column so far: 2·B·kv_heads·(l + N·c/l)·D")

    # A wider stride widens the band but thins the strided keys (≈ 2l + N/l per row, fewest at l ≈ √(N/2)), and
    # blocks grow while summary columns thin out (l + N·c/l): the error is not monotone in l. What holds: l = N
    # is dense (the band |i − j| < N, or one block, covers every key). For the fixed pattern more summary
    # columns are a superset (decreasing in c, dense at c ≥ l): tests/test_sparse_transformer.py checks that
    # sweep, since a declared sweep runs at the default pattern.
    fidelity = (Fidelity("stride", (4, 16, 64, "N"), (equals_dense_at("N"),),
                         why="keys per row ≈ 2l + N/l are not monotone in l; l = N covers every key"),)
    linear_memory = False  # O(N·√N) saved for the backward at the default stride
    linear_flops = False  # O(N·√N·D); quadratic at a fixed stride

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, pattern: str = "strided",
                 stride: int = 0, summary: int = 8, kv_heads: int = 0):
        super().__init__()
        self.pattern, self.stride_knob, self.summary_knob = pattern, stride, summary
        self.stride = resolve_stride(stride, n)  # resolved once, for the n built for
        self.summary = min(summary, self.stride)  # c ≥ l: every column is a summary column
        self._setup(head_dim=head_dim, heads=heads, n=n, causal=causal, impl="eager")

    # -- the pattern ---------------------------------------------------------------------
    def pattern_on(self, device: torch.device | str | None = None):
        if self.pattern == "strided":
            return strided_pattern(self.stride, self.causal)
        return fixed_pattern(self.stride, self.summary, self.causal)

    def geometry(self, N: int) -> Geometry:
        return Geometry.make(n=N, pattern=self.pattern, stride=self.stride, summary=self.summary, causal=self.causal)

    def build_info(self) -> dict:
        info = super().build_info()
        info["pattern"] = self.pattern
        info["stride"] = self.stride
        info["stride_from"] = "knob" if self.stride_knob > 0 else f"auto: sqrt(n) to a power of two at n {self.n}"
        if self.pattern == "fixed":
            info["summary"] = self.summary
        geo = self.geometry(self.n)
        info["chunk"], info["span"] = geo.chunk, geo.span
        return info

    # -- eager ---------------------------------------------------------------------------
    temp_bytes: int | None = None  # live-temporary budget; None: _budget.temp_budget(device) (tests set it small)

    def _make_plan(self, N: int, device: torch.device, dtype: torch.dtype) -> dict:
        geo = self.geometry(N)
        neg = neg_for(dtype)
        C, span, l = geo.chunk, geo.span, geo.stride
        x = torch.arange(C, device=device)[:, None]  # (C, 1) row in its window
        y = torch.arange(span, device=device)[None, :]  # (1, span) key in the window's span
        zero = torch.zeros((), dtype=dtype, device=device)
        local = torch.where(geo.local_visible(x, y - geo.left), zero, neg)  # (C, span): window 0 of an endless row
        # Keys of window t outside its sequence: y < left − t·C or y >= N + left − t·C. The few kinds of windows
        # (the edge ones, and every inner one alike) each get a row of a table.
        t = torch.arange(geo.chunks, device=device)[:, None]  # (chunks, 1)
        bounds = torch.cat([(geo.left - t * C).clamp(0, span), (N + geo.left - t * C).clamp(0, span)], dim=1)
        kinds, kind = torch.unique(bounds, dim=0, return_inverse=True)  # (K, 2), (chunks,)
        outside = (y < kinds[:, :1]) | (y >= kinds[:, 1:])  # (K, span)
        plan: dict = {"geo": geo, "neg": neg, "local": local, "zero": zero}
        if bool(outside.any()):
            plan["outside"], plan["kind"] = outside[:, None, :], kind  # (K, 1, span), (chunks,)
            edge = outside.any(dim=1)[kind].tolist()  # windows t with keys outside their sequence
            plan["edges_before"] = [0, *itertools.accumulate(edge)]  # (chunks + 1,) prefix counts
        if geo.extra and self.pattern == "strided":
            p = torch.arange(geo.periods, device=device)
            if self.causal:  # later periods and the own one (offset 0, in the band); bidirectional: the diagonal
                plan["period_bias"] = torch.where(p[None, :] >= p[:, None], neg, zero)  # (P, P)
            if N % l:  # residues r >= N mod l have no key in the last period
                r = torch.arange(l, device=device)[:, None, None]  # (l, 1, 1)
                plan["missing"] = (r >= N % l) & (p == geo.periods - 1)  # (l, 1, P)
        elif geo.extra:
            idx = summary_positions(N, l, geo.summary, device)  # (S,) the summary columns
            plan["summary_index"], plan["summary_block"] = idx, idx // l  # (S,) each
            plan["row_block"] = (torch.arange(N, device=device) // l)[:, None]  # (N, 1)
        return plan

    def _budget(self, device: torch.device) -> int:
        return self.temp_bytes or temp_budget(device)

    @staticmethod
    def _has_edge(plan: dict, w0: int, w1: int) -> bool:
        """Whether windows [w0, w1) of the sequences laid end to end include one with keys outside its sequence."""
        before, chunks = plan["edges_before"], plan["geo"].chunks

        def count(w: int) -> int:  # edge windows among the first w
            return (w // chunks) * before[-1] + before[w % chunks]
        return count(w1) > count(w0)

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: dict) -> torch.Tensor:
        B, H, N, D = q.shape
        geo = plan["geo"]
        qf, kf, vf = (t.reshape(B * H, N, D) for t in (q, k, v))  # (BH, N, D)
        if not geo.extra:
            n1, l1, _ = self._local(qf, kf, vf, plan)  # (BH, N, D), (BH, N, 1), ·
            return n1.div_(l1).view(B, H, N, D)
        extra = self._residues if self.pattern == "strided" else self._summaries
        n2, l2, m2 = extra(qf, kf, vf, plan)  # (BH, N, ·) each; strided: (BH, P, l, ·) views, row p·l + r at [p, r]
        n1, l1, m1 = self._local(qf, kf, vf, plan)  # (BH, N, D), (BH, N, 1), (BH, N, 1)
        out = n1  # the result is written into it
        if n2.dim() == 4:  # the residue classes' rows, back in order
            if geo.periods * geo.stride == N:  # a view of the local part's rows as (BH, P, l, ·): no copy
                n1, l1, m1 = (t.view(n2.shape[:3] + t.shape[-1:]) for t in (n1, l1, m1))
            else:
                n2, l2, m2 = (t.reshape(B * H, -1, t.shape[-1]).narrow(1, 0, N) for t in (n2, l2, m2))
        # One softmax over the union: each part is Σ e^{s − m_p}·v and Σ e^{s − m_p}; rescaled to a common
        # M = max(m_1, m_2) (no gradient: M cancels) they add up. Only the output is kept for the backward.
        with torch.no_grad():
            top = torch.maximum(m1, m2)  # (BH, N, 1)
            a1, a2 = (m1 - top).exp_(), (m2 - top).exp_()  # (BH, N, 1) each, <= 1
        total = torch.addcmul(l1 * a1, l2, a2)  # (BH, N, 1) Σ over both parts of e^{s − M}
        n1.mul_(a1).addcmul_(n2, a2).div_(total)  # in place on the local part's Σ e·v
        return out.view(B, H, N, D)  # (B, H, N, D)

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: dict) -> tuple[torch.Tensor, ...]:
        """The local part of every sequence: (BH, N, D) each -> the unnormalised Σ e·v (BH, N, D), Σ e (BH, N, 1)
        and the row maxima m (BH, N, 1) of e = exp(s − m) (see ``_softmax_parts``).

        Windows of C rows of the sequences laid end to end: (W, C, D) queries against (W, D, span) key views,
        W = BH·chunks, in blocks of temp_budget / (span·itemsize) rows. Cost 4·W·C·span·D FLOPs."""
        geo = plan["geo"]
        G, N, D = q.shape
        C, span, Np = geo.chunk, geo.span, geo.n_pad
        W = G * geo.chunks
        if Np > N:  # each sequence padded to whole windows (zero rows, masked as outside their sequence)
            q, k, v = (F.pad(t, (0, 0, 0, Np - N)) for t in (q, k, v))  # (BH, Np, D)
        if geo.left or geo.right:  # the first and last window's keys reach past the ends of the flat layout
            def padded(t: torch.Tensor) -> torch.Tensor:  # (L + BH·Np + R, D): left and right zero rows at the ends
                return torch.cat([t.new_zeros(geo.left, D), t.reshape(G * Np, D), t.new_zeros(geo.right, D)])
            kw = padded(k).unfold(0, span, C)  # (W, D, span) view
            vw = padded(v).unfold(0, span, C).transpose(1, 2)  # (W, span, D) view
        else:
            kw, vw = k.reshape(W, C, D).transpose(1, 2), v.reshape(W, C, D)  # (W, D, C), (W, C, D) views
        step = rows_within(self._budget(q.device), span * q.element_size(), W * C, multiple=C) // C
        kinds = plan["kind"].repeat(G) if "outside" in plan else None  # (W,) kind of each window
        outs, maxes, sums = [], [], []
        scores = _Scratch(q, step, W, (C, span))
        for w0, qb, kb, vb in zip(range(0, W, step), *(_split(t, step) for t in (q.reshape(W, C, D), kw, vw))):
            s = torch.baddbmm(plan["local"], qb, kb, alpha=self.scale, out=scores.take(len(qb)))  # (Wb, C, span)
            if kinds is not None and self._has_edge(plan, w0, w0 + qb.shape[0]):  # keys of other sequences
                s.masked_fill_(plan["outside"].index_select(0, kinds.narrow(0, w0, qb.shape[0])), plan["neg"])
            _softmax_parts(s, vb, outs, maxes, sums)
            del s  # before the next block's scores exist
        del qb, kb, vb, kw, vw, k, v, scores
        parts = (t.view(G, Np, -1) for t in _join(outs, sums, maxes))  # (BH, Np, D), (BH, Np, 1), (BH, Np, 1)
        return tuple(t.narrow(1, 0, N) if Np > N else t for t in parts)  # (BH, N, ·)

    def _residues(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: dict) -> tuple[torch.Tensor, ...]:
        """The strided keys: each residue class mod l is dense attention over its P = ⌈N/l⌉ periods, its own period
        (offset 0, in the band) masked, causal also the later ones. (BH, N, D) each -> Σ e·v, Σ e, m as ``_local``,
        as (BH, P, l, ·) views (row p·l + r at [p, r]; rows past N when l does not divide it).

        Q, K, V regrouped (BH·l, P, D) (copies), in blocks of temp_budget / (P·itemsize) rows. Cost 4·BH·l·P²·D
        FLOPs."""
        geo = plan["geo"]
        G, N, D = q.shape
        l, P = geo.stride, geo.periods

        def by_residue(t: torch.Tensor) -> torch.Tensor:  # (BH, N, D) -> (BH·l, P, D), key a·l + r at [g·l + r, a]
            if P * l > N:
                t = F.pad(t, (0, 0, 0, P * l - N))  # (BH, P·l, D)
            return t.view(G, P, l, D).transpose(1, 2).reshape(G * l, P, D)

        blocks = [by_residue(q), by_residue(k).transpose(1, 2), by_residue(v)]  # (BH·l, P, D), (BH·l, D, P), ·
        if "missing" in plan:
            blocks.append(plan["missing"].repeat(G, 1, 1))  # (BH·l, 1, P) keys past the end
        step = rows_within(self._budget(q.device), P * q.element_size(), G * l * P, multiple=P) // P
        outs, maxes, sums = [], [], []
        scores = _Scratch(q, step, G * l, (P, P))
        for qb, kb, vb, *missing in zip(*(_split(t, step) for t in blocks)):
            out = scores.take(len(qb))
            if self.causal:  # later periods and the own one (offset 0, in the band) masked
                s = torch.baddbmm(plan["period_bias"], qb, kb, alpha=self.scale, out=out)  # (Bb, P, P)
            else:  # the own period only: the diagonal (an additive bias would cost a pass over the scores)
                s = torch.baddbmm(plan["zero"], qb, kb, beta=0, alpha=self.scale, out=out)  # (Bb, P, P)
                s.diagonal(dim1=1, dim2=2).fill_(plan["neg"])
            if missing:
                s.masked_fill_(missing[0], plan["neg"])
            _softmax_parts(s, vb, outs, maxes, sums)
            del s  # before the next block's scores exist
        del blocks, qb, kb, vb, missing, scores
        return tuple(t.view(G, l, P, -1).transpose(1, 2) for t in _join(outs, sums, maxes))  # (BH, P, l, ·) views

    def _summaries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: dict) -> tuple[torch.Tensor, ...]:
        """The summary columns, shared by every row of a sequence: (BH, N, D) each -> Σ e·v, Σ e, m as ``_local``.

        Rows in blocks of positions across all BH sequences, temp_budget / (BH·S·itemsize + S) positions a block
        (the (rows, S) mask is shared by the heads). Cost 4·BH·N·S·D FLOPs."""
        G, N, _ = q.shape
        idx, sblk = plan["summary_index"], plan["summary_block"]
        S = idx.shape[0]
        ks = k.index_select(1, idx).mul_(self.scale).transpose(1, 2)  # (BH, D, S) scaled summary keys
        vs = v.index_select(1, idx)  # (BH, S, D)
        step = rows_within(self._budget(q.device), G * S * q.element_size() + S, N)
        outs, maxes, sums = [], [], []
        scores = _Scratch(q, step, N, (G, S), dim=1)  # (BH, step, S)
        for qb, rb in zip(_split(q, step, dim=1), _split(plan["row_block"], step)):  # (BH, rows, D), (rows, 1)
            s = torch.bmm(qb, ks, out=scores.take(qb.shape[1]))  # (BH, rows, S)
            s.masked_fill_(sblk >= rb if self.causal else sblk == rb, plan["neg"])  # own block: in the local part
            _softmax_parts(s, vs, outs, maxes, sums)
            del s  # before the next block's scores exist
        del qb, rb, scores
        return _join(outs, sums, maxes, dim=1)  # (BH, N, D), (BH, N, 1), (BH, N, 1)

    # -- decode --------------------------------------------------------------------------
    def decode_init(self, k: torch.Tensor, v: torch.Tensor, capacity: int):
        if self.pattern == "strided":
            return StaticKV(k, v, capacity)  # (B, Hkv, capacity, D) twice
        l, c = self.stride, self.summary
        n0 = k.shape[2]
        idx = summary_positions(n0, l, c, k.device)  # (S0,) the summary columns of the context
        summaries = StaticKV(k[:, :, idx], v[:, :, idx], summary_count(capacity, l, c))  # (B, Hkv, S, D) twice
        return summaries, RingKV(k, v, l)  # ring (B, Hkv, l, D): the current block is among its last l

    def decode_step(self, state, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        l = self.stride
        if self.pattern == "strided":
            state.append(k, v)
            i = state.length - 1
            dev = state.k.device
            far = torch.arange(i % l, i - l + 1, l, device=dev)  # (⌊i/l⌋,) i − l·t, t ≥ 1
            near = torch.arange(max(0, i - l + 1), i + 1, device=dev)  # (min(l, i + 1),) the band
            idx = torch.cat([far, near])  # distinct positions
            return attend_one(q, state.k.index_select(2, idx), state.v.index_select(2, idx), self.scale)
        summaries, ring = state
        i = ring.length
        ring.append(k, v)
        if i % l >= l - self.summary:
            summaries.append(k, v)
        start = (i // l) * l  # the current block
        before = summary_count(start, l, self.summary)  # summary columns of earlier blocks: a prefix
        parts = [(summaries.k[:, :, :before], summaries.v[:, :, :before], None),
                 (ring.k, ring.v, ring.pos >= start)]
        return attend_parts(q, parts, self.scale)  # (B, H, 1, D)

    @staticmethod
    def _keys_read(i: int, pattern: str, stride: int, summary: int) -> int:
        """Keys and values a decode step at position i reads."""
        if pattern == "strided":
            return min(stride, i + 1) + i // stride
        return stride + summary_count((i // stride) * stride, stride, min(summary, stride))

    @classmethod
    def state_bytes(cls, *, batch: int, heads: int, kv_heads: int, head_dim: int, n: int, capacity: int,
                    itemsize: int, pattern: str = "strided", stride: int = 0, summary: int = 8) -> int:
        """The module is built for ``capacity`` positions (the harness does): the stride resolves there."""
        if pattern == "strided":
            return StaticKV.nbytes(batch=batch, kv_heads=kv_heads, capacity=capacity, head_dim=head_dim,
                                   itemsize=itemsize)
        l = resolve_stride(stride, capacity)
        c = min(summary, l)
        return (StaticKV.nbytes(batch=batch, kv_heads=kv_heads, capacity=summary_count(capacity, l, c),
                                head_dim=head_dim, itemsize=itemsize)
                + RingKV.nbytes(batch=batch, kv_heads=kv_heads, size=l, head_dim=head_dim, itemsize=itemsize))

    @classmethod
    def decode_read_bytes(cls, *, batch: int, heads: int, kv_heads: int, head_dim: int, n: int, capacity: int,
                          itemsize: int, pattern: str = "strided", stride: int = 0, summary: int = 8) -> int:
        """The median over the steps at positions n … capacity − 1 of the keys and values a step reads:
        strided min(l, i + 1) + ⌊i/l⌋ gathered, fixed the ring of l + the summary columns of earlier blocks."""
        l = resolve_stride(stride, capacity)
        seen = [cls._keys_read(i, pattern, l, summary) for i in range(n, max(capacity, n + 1))]
        return 2 * batch * kv_heads * statistics.median_low(seen) * head_dim * itemsize

    # -- declarations --------------------------------------------------------------------
    @classmethod
    def check(cls, *, n: int, causal: bool, heads: int, head_dim: int, device: str, dtype: str,
              pattern: str = "strided", stride: int = 0, summary: int = 8, **_) -> list[str]:
        if stride > n:
            return [(f"stride {stride} > n {n}: one band (or block) already covers every key at stride n, "
                     "this is dense attention")]
        return []

    @classmethod
    def analytic_flops(cls, *, batch: int, heads: int, n: int, head_dim: int, causal: bool, pattern: str = "strided",
                       stride: int = 0, summary: int = 8, kv_heads: int = 0) -> int:
        """Exactly what FlopCounterMode counts for the eager kernel (padded rows of the last chunk included)."""
        l = resolve_stride(stride, n)
        geo = Geometry.make(n=n, pattern=pattern, stride=l, summary=min(summary, l), causal=causal)
        return 4 * batch * heads * head_dim * geo.scored_keys()


class _Scratch:
    """One block's score buffer, reused by every block of a call when nothing needs a block's scores afterwards
    (no autograd) and there are several blocks. On the CPU a fresh tensor of 32 MiB or more comes from new mmap
    pages (glibc), whose page faults cost ~0.5 ms per MiB on every block; one buffer pays that once a call.
    Otherwise ``take`` gives None (``out=None``: a fresh tensor)."""

    def __init__(self, like: torch.Tensor, step: int, total: int, shape: tuple[int, ...], dim: int = 0):
        reuse = step < total and not torch.is_grad_enabled()
        self.dim = dim
        self.buf = like.new_empty(*shape[:dim], step, *shape[dim:]) if reuse else None  # step rows along dim

    def take(self, rows: int) -> torch.Tensor | None:
        if self.buf is None:
            return None
        return self.buf if rows == self.buf.shape[self.dim] else self.buf.narrow(self.dim, 0, rows)


def _split(t: torch.Tensor, step: int, dim: int = 0) -> tuple[torch.Tensor, ...]:
    """Blocks of ``step`` along ``dim`` (views; the tensor itself when it is one block)."""
    return (t,) if step >= t.shape[dim] else t.split(step, dim=dim)


def _softmax_parts(s: torch.Tensor, v: torch.Tensor, outs: list, maxes: list, sums: list) -> None:
    """One block's softmax in place on its scores s (B, rows, keys) against v (B, keys, D): appends the
    unnormalised output e·v, the row maxima m and the sums Σ e of e = exp(max(s − m, −80)) (m without gradient: it
    cancels). The floor keeps exp in its fast range (an argument of −3e38, a masked score, costs it ~8×); it changes
    a weight of at most e^-80 ≈ 2e-35 against the row's largest, 1 (invisible in a float32 or float64 sum). The shift
    and the floor are outside autograd, which sees e = exp(s): exact gradients but for those tiny weights'."""
    with torch.no_grad():
        m = s.amax(dim=-1, keepdim=True)  # (B, rows, 1)
        s.sub_(m).clamp_min_(EXP_FLOOR)  # masked scores (≈ −3e38) and far ones: exp's fast range, weight <= e^-80
    e = s.exp_()  # (B, rows, keys) in place
    sums.append(e.sum(dim=-1, keepdim=True))  # (B, rows, 1), >= 1
    outs.append(torch.bmm(e, v))  # (B, rows, D)
    maxes.append(m)


def _join(*lists: list, dim: int = 0) -> tuple[torch.Tensor, ...]:
    """Each list of block pieces joined along ``dim``."""
    return tuple(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim) for pieces in lists)
