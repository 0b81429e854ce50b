"""Sparse Transformer attention (Child et al. 2019): the strided and the fixed factorised patterns, in one head."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from ._banded import SCORE_BUDGET, Band, _chunk_groups, additive_bias, key_spans, neg_for, query_chunks, rows
from ._decode import RingKV, StaticKV, attend_one, attend_parts
from ._flex import PatternAttention
from .base import KV_HEADS, Fidelity, Knob, equals_dense_at, register

PATTERNS = ("strided", "fixed")
CHUNK_ROWS = 64  # query rows per chunk: the multiple of l nearest 64 from below (l itself when l >= 64)
CAUSAL_GROUPS = 8  # causal: at least this many groups of chunks per sequence (each skips the keys after it)


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


@dataclass(frozen=True)
class Geometry:
    """Chunks, groups and extra key widths of the eager kernel for one (n, pattern, l, c, causal), on no device.

    Chunks are ``chunk = m·l`` query rows (m = max(1, ⌊64/l⌋), capped by the rows), so a chunk is m whole
    periods (strided) or m whole blocks (fixed). ``band`` is the chunked local part: strided |i − j| < l
    (span chunk + 2(l − 1), causal chunk + l − 1), fixed the chunk itself (span = chunk, block-diagonal).
    ``groups`` are (g0, g1, kind, t0, width): chunks [g0, g1) processed together (scores bounded by the
    budget; causal: at least :data:`CAUSAL_GROUPS` groups), with ``width`` extra keys per row (strided: key
    periods, fixed: summary columns; 0: none), causal only those before the group's last row.
    """

    n: int
    pattern: str
    causal: bool
    stride: int
    summary: int  # c in force, min(c, l)
    chunk: int
    band: Band
    periods: int  # ⌈n/l⌉ key periods (strided) or blocks (fixed)
    extra: int  # extra keys of a full row: periods (strided) or summary columns (fixed); 0 when none exist
    groups: tuple

    @classmethod
    def make(cls, *, n: int, pattern: str, stride: int, summary: int, causal: bool,
             budget: int = SCORE_BUDGET) -> Geometry:
        l = stride
        c = min(summary, l)
        periods = -(-n // l)
        m = max(1, min(CHUNK_ROWS // l, periods))
        chunk = m * l
        if pattern == "strided":
            reach = min(l - 1, max(n - 1, 0))
            left, right = reach, 0 if causal else reach
            extra = periods if periods > 1 else 0  # one period: every offset multiple of l is 0, in the band
            offset_ok = (lambda d: (d >= 0) & (d < l)) if causal else (lambda d: d.abs() < l)
        else:
            left = right = 0  # the chunk's own blocks; block-diagonal, not an offset mask (see local_visible)
            extra = summary_count(n, l, c) if periods > 1 else 0  # one block: every summary column is in it
            offset_ok = None
        band = Band.make(L=n, q_start=0, q_stop=n, c=chunk, left=left, right=right, kv_lo=0, kv_hi=(n,),
                         offset_ok=offset_ok)
        step = max(1, budget // (chunk * (band.span + extra)))
        if causal:  # a group sees the extra keys before its last row: more groups skip more of the causal triangle
            step = min(step, max(1, -(-band.nc // CAUSAL_GROUPS)))
        groups = []
        for g0, g1, kind, t0 in _chunk_groups(band, step):
            if extra == 0:
                width = 0
            elif pattern == "strided":  # rows of periods [g0·m, g1·m) see key periods a ≠ p (causal a < p)
                width = min(extra, g1 * m - 1) if causal else extra
            else:  # causal: summary columns of blocks before the group's last block
                width = summary_count(min(n, g1 * chunk - l), l, c) if causal else extra
            groups.append((g0, g1, kind, t0, max(width, 0)))
        return cls(n=n, pattern=pattern, causal=causal, stride=l, summary=c, chunk=chunk, band=band,
                   periods=periods, extra=extra, groups=tuple(groups))

    def local_visible(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """The local part of the pattern (disjoint from the extra keys): strided |i − j| < l, fixed ⌊i/l⌋ = ⌊j/l⌋;
        causal ∩ {j ≤ i}."""
        l = self.stride
        vis = (i - j).abs() < l if self.pattern == "strided" else (i // l == j // l)
        return vis & (j <= i) if self.causal else vis

    def scored_keys(self) -> int:
        """Query-key products per sequence: Σ over groups of rows·(span + width) (padded rows included)."""
        return sum((g1 - g0) * self.chunk * (self.band.span + w) for g0, g1, _, _, w in self.groups)


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

    eager (no N×N tensor): rows are cut into chunks of C = m·l rows (m = max(1, ⌊64/l⌋)), m whole periods or
    blocks. The local part is an ``unfold`` view of each chunk's key span (strided: [t·C − (l − 1), t·C + C + l − 1),
    causal [t·C − (l − 1), t·C + C); fixed: the chunk itself) with one additive mask shared by the inner chunks
    (strided |i − j| < l, fixed the block diagonal; edge chunks get their own). The other part, disjoint from it:
    - strided: the keys at offsets ±l·t, t ≥ 1, are i's residue class mod l. K and V are regrouped by residue
      (l, ⌈N/l⌉, D) once (a strided view copied, as dilated attention does); a chunk's rows, regrouped the same
      way, take one batched product per residue against their class: (l, periods of the chunk, ⌈N/l⌉) scores,
      their own period (offset 0, in the band) and, causal, later periods masked;
    - fixed: the N·c/l summary columns are gathered once (``index_select``) and shared by every row, those in
      the row's own block masked (causal: those not in an earlier block), as Longformer's global keys.
    Scores of both parts are concatenated before one softmax, so each key is counted once; groups of chunks
    are processed in turn so that live scores stay under 2²² elements. Causal: a group scores only the extra
    keys before its last row (at least 8 groups per sequence), the rest of its triangle is masked.
    Cost: 4·B·H·D·Σ rows·(span + extra) FLOPs (``analytic_flops``, exactly what FlopCounterMode counts):
    strided ≈ 4·B·H·N·D·(C + 2l + N/l), at the default l = √N (C = l for N ≥ 4096) 4·B·H·D·N·(4√N − 2), so
    O(N^1.5·D); fixed ≈ 4·B·H·N·D·(C + N·c/l), O(N^1.5·D) at l = √N. At a fixed l the N/l strided keys
    (N·c/l summary keys) per row make the work quadratic: there is no stride at which it is linear
    (l + N/l ≥ 2√N). Memory: O(B·H·N·D) inference (plus one group's ≤ 2²² scores), O(B·H·N·(l + N/l))
    (fixed O(B·H·N·(l + N·c/l))) saved for the backward: O(N·√N) at the default stride.

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
        return info

    # -- eager ---------------------------------------------------------------------------
    def _make_plan(self, N: int, device: torch.device, dtype: torch.dtype) -> dict:
        geo = self.geometry(N)
        band, neg = geo.band, neg_for(dtype)
        x = torch.arange(band.c, device=device)[:, None]  # (c, 1) row in its chunk
        y = torch.arange(band.span, device=device)[None, :]  # (1, span) key in the chunk's span

        def visible(t0: int, t1: int) -> torch.Tensor:  # (E, c, span) local part of chunks [t0, t1)
            t = torch.arange(t0, t1, device=device)[:, None, None]
            i, j = t * band.c + x, t * band.c - band.left + y
            return geo.local_visible(i, j) & (j >= 0) & (j < N) & (i < N)

        biases = {}
        for t0, t1, kind in band.segments():  # inner chunks all alike: chunks start at multiples of l
            biases[kind] = additive_bias(visible(t0, t0 + 1)[0] if kind == "mid" else visible(t0, t1), dtype, neg)
        plan: dict = {"geo": geo, "band": band, "biases": biases, "neg": neg}
        l = geo.stride
        if geo.extra and self.pattern == "strided":
            a = torch.arange(geo.periods, device=device)[None, :]
            r = torch.arange(l, device=device)[:, None]
            plan["key_missing"] = (a * l + r >= N)[:, None, :]  # (l, 1, periods) key a·l + r past the end
        elif geo.extra:
            idx = summary_positions(N, l, geo.summary, device)  # (S,) the summary columns
            plan["summary_index"], plan["summary_block"] = idx, idx // l  # (S,) each
        return plan

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: dict) -> torch.Tensor:
        B, H, N, D = q.shape
        geo = plan["geo"]
        qf, kf, vf = (t.reshape(B * H, N, D) for t in (q, k, v))  # (B·H, N, D)
        extra = None
        if geo.extra and self.pattern == "strided":  # K, V by residue: (B·H, l, periods, D), key a·l + r at [r, a]
            length = geo.periods * geo.stride  # N padded to whole periods
            extra = tuple(rows(t, 0, length).unflatten(1, (geo.periods, geo.stride)).transpose(1, 2).contiguous()
                          for t in (kf, vf))
        elif geo.extra:  # the summary columns: (B·H, S, D) each
            extra = tuple(t.index_select(1, plan["summary_index"]) for t in (kf, vf))
        outs = []
        for s in range(B * H):
            seq = (qf[s:s + 1], kf[s:s + 1], vf[s:s + 1])  # (1, N, D) each
            mine = None if extra is None else (extra[0][s], extra[1][s])
            pieces = [self._group(seq, mine, group, plan) for group in geo.groups]  # (E, c, D) each
            outs.append(torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0])  # (nc, c, D)
        out = torch.stack(outs, dim=0).flatten(1, 2)[:, :N]  # (B·H, N, D)
        return out.unflatten(0, (B, H))  # (B, H, N, D)

    def _group(self, seq, extra, group, plan: dict) -> torch.Tensor:
        """Chunks [g0, g1) of one sequence against their local span and their extra keys, one softmax: (E, c, D).
        Cost 4·E·c·(span + width)·D FLOPs; live scores E·c·(span + width) elements."""
        g0, g1, kind, t0, width = group
        geo, band = plan["geo"], plan["band"]
        q1, k1, v1 = seq
        qc = query_chunks(q1, band, g0, g1)[0] * self.scale  # (E, c, D)
        kc = key_spans(k1, band, g0, g1)[0]  # (E, span, D) overlapping view
        vc = key_spans(v1, band, g0, g1)[0]  # (E, span, D)
        s1 = torch.bmm(qc, kc.transpose(1, 2))  # (E, c, span)
        s1 = s1 + (plan["biases"]["mid"] if kind == "mid" else plan["biases"][kind][g0 - t0:g1 - t0])
        if width == 0:
            return torch.bmm(torch.softmax(s1, dim=-1), vc)  # (E, c, D)
        E, c, D = qc.shape
        l, m, neg = geo.stride, c // geo.stride, plan["neg"]
        span = band.span
        if self.pattern == "strided":
            kr, vr = extra[0][:, :width], extra[1][:, :width]  # (l, width, D): key periods a < width, by residue
            P = E * m  # periods of the group's rows, p = g0·m …
            qr = qc.reshape(P, l, D).transpose(0, 1)  # (l, P, D): row p·l + r at [r, p]
            s2 = torch.bmm(qr, kr.transpose(1, 2))  # (l, P, width): q_{p·l+r}·k_{a·l+r}
            per = torch.arange(g0 * m, g0 * m + P, device=qc.device)[:, None]  # (P, 1)
            a = torch.arange(width, device=qc.device)[None, :]  # (1, width)
            hide = (a >= per) if self.causal else (a == per)  # own period: in the band; causal: later ones
            s2 = s2.masked_fill(hide[None] | plan["key_missing"][..., :width], neg)  # (l, P, width)
            s2 = s2.transpose(0, 1).reshape(E, c, width)  # rows back in order
        else:
            ks, vs = extra[0][:width], extra[1][:width]  # (width, D) summary columns (causal: a prefix)
            s2 = torch.mm(qc.reshape(E * c, D), ks.transpose(0, 1)).view(E, m, l, width)
            blocks = torch.arange(g0 * m, g1 * m, device=qc.device).view(E, m, 1, 1)  # each row's block
            sblk = plan["summary_block"][:width].view(1, 1, 1, width)
            hide = (sblk >= blocks) if self.causal else (sblk == blocks)  # own block: in the local part
            s2 = s2.masked_fill(hide, neg).view(E, c, width)
        p = torch.softmax(torch.cat([s1, s2], dim=-1), dim=-1)  # (E, c, span + width)
        o = torch.bmm(p[..., :span], vc)  # (E, c, D)
        p2 = p[..., span:]  # (E, c, width)
        if self.pattern == "strided":
            p2 = p2.reshape(E * m, l, width).transpose(0, 1)  # (l, P, width)
            o2 = torch.bmm(p2, vr).transpose(0, 1).reshape(E, c, D)  # (E, c, D)
        else:
            o2 = torch.mm(p2.reshape(E * c, width), vs).view(E, c, D)  # (E, c, D)
        return o + o2

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
        geo = Geometry.make(n=n, pattern=pattern, stride=l, summary=summary, causal=causal)
        return 4 * batch * heads * head_dim * geo.scored_keys()
