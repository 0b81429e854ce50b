"""Reformer LSH attention: shared-QK, random-rotation hashing, sorted chunks, rounds combined by logsumexp."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ._budget import rows_within, temp_budget
from .base import Fidelity, Knob, decreasing, register


@register(
    name="reformer", family="hashing",
    complexity="O(N·R·(c + √n_b)·D + N·R·log N)", memory="O(N·(c + D))",
    knobs=[
        Knob("rounds", default=1, axis="rounds", minimum=1, small=2, help="hash rounds R"),
        Knob("bucket", default=64, axis="bucket", minimum=1, small=48, length=True, sweep=(16, 32, 64, 128),
             help="chunk length c of the sorted sequence"),
        Knob("buckets", default=0, minimum=0,
             help="number of hash buckets n_b (even), one rotation of n_b/2 columns; 0 = HuggingFace's default, "
                  "2N/c rounded down to a power of two (the paper's choice), factorised into two powers of two "
                  "f1·f2 once above 2·max(√(N/c), c): hashing then costs N·D·(f1 + f2) ≈ N^1.5 FLOPs; a fixed "
                  "n_b keeps FLOPs linear in N"),
    ],
)
class ReformerAttention(nn.Module):
    """Reformer LSH attention with shared QK, as in the HuggingFace ``LSHSelfAttention``.

    Keys are the length-normalised queries, exactly HF's ``_len_and_dim_norm``:
    k̂_j = q_j · rsqrt(mean(q_j²) + 1e-6) / √D, a unit vector up to the 1e-6; the score is
    s_ij = q_i·k̂_j (the RMS-normalised key scaled by 1/√D; no further scaling). The ``k``
    argument is ignored and gets no gradient.

    Hashing: R_r (D, n_b/2) random rotations drawn from ``seed`` at build; round r puts
    position i in bucket argmax([q_i R_r ; −q_i R_r]) (no gradient). The default n_b is
    HuggingFace's (``_set_num_buckets``): 2^⌊log2(2·⌊N/c⌋)⌋, and above 2·max(⌊√⌊N/c⌋⌋, c) it is
    factorised as HF does, n_b = f1·f2 with f1 = 2^⌊p/2⌋, f2 = 2^(p−⌊p/2⌋): R_r is then
    (D, f1/2 + f2/2), its first f1/2 columns hash into b1 = argmax([q_i R_r1; −q_i R_r1]), the
    rest into b2 the same way, and the bucket is b1 + f1·b2. Each round
    stable-sorts the positions by (bucket, position) and cuts the sorted order into
    chunks of c; a query sees every key of its own chunk and of the previous chunk.
    Rounds are independent: chunk 0 of a round wraps to the *last chunk of the same
    round* (HF and reformer-pytorch sort all rounds as one sequence, so there chunk 0 of
    round r sees the last chunk of round r−1; we keep rounds separate so that the count
    below is a count of rounds). Causal: additionally j ≤ i. The self score is replaced
    by −1e5 (HF's value; −1e3 in float16, as HF): a token sees itself only when nothing
    else is visible. When N
    is not a multiple of c the sorted sequence is padded with masked keys placed after
    every real position of each round. With one chunk (N ≤ c) every round sees all keys:
    plain dense shared-QK attention with the self score −1e5.

    Rounds are combined with logsumexp weights, o_i = Σ_r exp(lse_ri − LSE_i) o_ri, which
    is exactly softmax over the union of the rounds' windows with each key counted as
    often as it is visible: o = softmax(s + log c) v, where c_ij = number of rounds in
    which j is visible to i (0 = masked). ``reference`` computes that densely.

    Cost per round: hashing N·D·n_b FLOPs for one rotation, N·D·(f1 + f2) ≈ 2N·D·√(2N/c)
    factorised (the default above the limit: FLOPs grow as N^1.5, linear in N only for a fixed
    ``buckets``), sorting N log N, attention 4·N·2c·D
    FLOPs (plus the G−1 windows straddling two heads). Memory O(N·(c + D)) whatever R:
    rounds run one after the other, every head of a round at once. Work goes in blocks
    sized from one byte budget of live temporaries (``_budget.temp_budget``: 64 MiB on the
    CPU, 1 GiB on CUDA): a hashed row costs its R·Σf/2 float32 projections, a sorted query
    row its 2c scores and their softmax (4c·itemsize bytes; 2c·itemsize with several rounds),
    so a call dispatches a constant number of ops (~65, ~60 more per extra round) plus ~4 per
    hashing block (~2 more per extra factor) and ~8 (causal ~10; several rounds ~12, ~14) per block
    of windows (counted on fake tensors, views included): blocks of tens of thousands of rows at
    the default sizes (a hashed row costs 2·Σf bytes, ~770 at N = 1M). No N×N tensor and no
    duplicate-count tensor.
    """

    fidelity = (Fidelity("rounds", (1, 2, 4, 8), (decreasing(),), why="more rounds, fewer neighbours lost to hashing"),)
    exact_at: ClassVar[dict] = {"rounds": 1, "bucket": "N"}  # one chunk, one round: dense shared-QK attention
    exact_label = "dense shared-QK"
    linear_at: ClassVar[dict] = {"buckets": 64}  # the default (HF's factorised n_b) makes hashing FLOPs grow as N^1.5

    supports_causal = True
    no_decode_reason = ("not implemented: a new token's LSH bucket neighbours come from re-sorting every past key "
                        "per round, so decode needs the whole KV cache plus each key's bucket (HuggingFace keeps "
                        "exactly that); it would measure as dense's cache")
    supports_bidirectional = True
    SELF_SCORE = -1e5  # HF self_mask_value_float32
    SELF_SCORE_FP16 = -1e3  # HF self_mask_value_float16 (−1e5 overflows float16)
    EPS = 1e-6  # HF _len_norm epsilon
    EXP_FLOOR = -80.0  # several rounds: exp arguments clamped from below (weight <= e^-80 ≈ 2e-35 vs the row's max)
    temp_bytes: int | None = None  # live-temporary budget; None: _budget.temp_budget(device) (tests set it small)

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int,
                 rounds: int, bucket: int, buckets: int):
        super().__init__()
        self.causal = causal
        self.rounds = rounds
        self.bucket = bucket
        self.factors = bucket_factors(n, bucket, buckets)  # (n_b,) or HF's factorisation (f1, f2)
        self.n_buckets = math.prod(self.factors)
        if any(f < 2 or f % 2 for f in self.factors):
            raise ValueError(f"reformer: buckets must be even and >= 2, got {self.n_buckets}")
        g = torch.Generator(device="cpu").manual_seed(seed)
        columns = sum(f // 2 for f in self.factors)
        rotations = torch.randn(head_dim, rounds, columns, generator=g)  # (D, R, Σf/2)
        self.register_buffer("rotations", rotations)

    @classmethod
    def check(cls, *, n: int, causal: bool, heads: int, head_dim: int, device: str, dtype: str,
              rounds: int, bucket: int, buckets: int) -> list[str]:
        reasons = []
        if buckets and (buckets < 2 or buckets % 2):
            reasons.append(f"buckets must be even and >= 2 (or 0 for HuggingFace's count, about 2N/c), got {buckets}")
        return reasons

    def build_info(self) -> dict:
        return {"n_buckets": self.n_buckets, "bucket_factors": "·".join(map(str, self.factors))}

    # ------------------------------------------------------------------ pieces

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """HF's shared-QK keys x · rsqrt(mean(x²) + 1e-6) / √D, written as x / sqrt(‖x‖² + D·1e-6)."""
        sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square()  # (..., 1)
        return x * torch.rsqrt(sq + x.shape[-1] * self.EPS)

    def _budget(self, device: torch.device) -> int:
        return self.temp_bytes or temp_budget(device)

    @torch.no_grad()
    def hash(self, x: torch.Tensor) -> torch.Tensor:
        """Buckets of every round: Σ_f (Π_{f'<f} f') · argmax([xR_rf; −xR_rf]), first maximum on ties.
        x (G, N, D) -> (G, N, R) int64.

        Without forming the concatenations: per row, round and factor, max(xR) at its first index names a bucket
        of the first half, min(xR) at its first index one of the second; the first half wins when max ≥ −min:
        the index torch.argmax would return. All rounds and factors share one matmul over the G·N rows, in
        blocks whose live temporaries are the projections, R·Σf/2 float32 a row (1 + 2 per factor ops a block;
        the maxima, minima and their indices, 24·R bytes a row per factor, are the output).
        """
        D, R, cols = self.rotations.shape
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # hash fp16/bf16 inputs in float32
        rot = self.rotations.to(x.dtype).view(D, R * cols)  # (D, R·Σh), h = f/2 per factor
        G, N, _ = x.shape
        halves = [f // 2 for f in self.factors]
        step = rows_within(self._budget(x.device), R * cols * x.element_size(), G * N)
        extremes = [([], [], [], []) for _ in halves]  # per factor: max, its index, min, its index: (rows, R) pieces
        # One block's projections, reused: on the CPU a fresh tensor above 32 MiB comes from new mmap pages
        # (glibc), ~0.5 ms per MiB of page faults on every block.
        buf = x.new_empty(step, R * cols)  # (step, R·Σh)
        for xb in _split(x.reshape(G * N, D), step):  # (rows, D)
            proj = torch.mm(xb, rot, out=buf if len(xb) == step else buf.narrow(0, 0, len(xb)))  # (rows, R·Σh)
            proj = proj.view(-1, R, cols)  # (rows, R, Σh)
            start = 0
            for half, found in zip(halves, extremes):
                part = proj if half == cols else proj.narrow(-1, start, half)  # (rows, R, h)
                for pieces, value in zip(found, (*part.max(dim=-1), *part.min(dim=-1))):  # first index of each
                    pieces.append(value)
                start += half
            del proj
        del buf
        bucket, scale = None, 1
        for half, found in zip(halves, extremes):
            hi, i_hi, lo, i_lo = (_cat(t) for t in found)  # (G·N, R) each
            b = torch.where(hi >= lo.neg_(), i_hi, i_lo.add_(half))  # (G·N, R) bucket of this factor
            bucket = b if bucket is None else bucket.add_(b.mul_(scale))  # b1 + f1·b2
            scale *= 2 * half
        return bucket.view(G, N, R)  # (G, N, R)

    def _self_score(self, dtype: torch.dtype) -> float:
        return self.SELF_SCORE_FP16 if dtype == torch.float16 else self.SELF_SCORE

    def _chunks(self, n: int) -> tuple[int, int]:
        """(chunk length, number of chunks): one chunk of N when N <= c."""
        if n <= self.bucket:
            return n, 1
        return self.bucket, math.ceil(n / self.bucket)

    # ----------------------------------------------------------------- forward

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, N, D = q.shape
        c, n_chunks = self._chunks(N)
        x = q.reshape(B * H, N, D)  # (BH, N, D)
        vv = v.reshape(B * H, N, D)  # (BH, N, D)
        if n_chunks == 1:  # every round sees every key: plain attention, the counts cancel
            return self._dense(x, vv).reshape(B, H, N, D)
        return self._lsh(x, vv, c, n_chunks).view(B, H, N, D)

    def _dense(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One chunk holding everything (N <= c). x, v (G, N, D) -> (G, N, D)."""
        N = x.shape[1]
        s = torch.matmul(x, self.keys(x).transpose(-1, -2))  # (G, N, N), N <= c
        if self.causal:
            future = torch.ones(N, N, dtype=torch.bool, device=x.device).triu_(1)  # (N, N), N <= c
            s.masked_fill_(future, float("-inf"))
        s.diagonal(dim1=-2, dim2=-1).fill_(self._self_score(s.dtype))
        return torch.matmul(torch.softmax(s, dim=-1), v)  # (G, N, D)

    def _lsh(self, x: torch.Tensor, v: torch.Tensor, c: int, n_chunks: int) -> torch.Tensor:
        """All rounds for all G = B·H heads. x, v (G, N, D) -> (G, N, D) contiguous.

        Layout: each head's sorted sequence is preceded by a copy of its last chunk, and the
        heads are laid end to end, G·(C+1) chunks of c rows. Window w = chunks w and w+1
        (previous, current), an overlapping ``unfold`` view, so one batched matmul scores
        a block of windows against [previous; current] with no concatenation; the G−1 windows
        that straddle two heads are computed and thrown away (1/(C+1) of the work). Rounds run
        one after the other (each gathers O(N·D) sorted copies; all at once would hold R times
        that), every head of a round at once, its windows in blocks (``_round``).
        """
        lay = _Layout.of(x, v, c, n_chunks, pad_bias=not self.causal)
        orders = torch.sort(self.hash(x), dim=1, stable=True).indices.unbind(-1)  # R × (G, N) by (bucket, position)
        acc = None  # running (Σ_r w_r·o_r, Σ_r w_r, M) over the rounds
        for order in orders:
            o_r, lse_r = self._round(lay, order)  # (G, N, D), (G, N, 1)
            if self.rounds == 1:
                return o_r
            acc = _combine_rounds(acc, o_r, lse_r)
            del o_r
        return acc[0].div_(acc[1])

    def _round(self, lay: _Layout, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One round in sorted order: every chunk against [previous; current] (see ``_lsh``).

        order (G, N): the positions in sorted order. Returns the output o (G, N, D) by position and,
        for several rounds, its logsumexp (G, N, 1). The sorted queries, keys k̂ and values are
        gathered once per round (O(N·D) each); the windows then go in blocks of views whose live
        temporaries are the scores: a query row costs its 2c scores and their softmax, 4c·itemsize
        bytes (several rounds: 2c·itemsize, exponentiated in place, for the logsumexp); a block holds
        temp_budget / that rows, and a round is a constant number of ops plus ~8 (causal ~10; several
        rounds ~12, ~14) per block. Causal: the (W, c, 2c) comparison j > i of the round is formed once,
        2c bytes a row (O(N·c), like the sorted copies). Cost: 4·W·c·2c·D FLOPs.
        """
        c, W, N, Np = lay.c, lay.windows, lay.n, lay.n_pad
        D = lay.x_flat.shape[1]
        if Np > N:
            order = torch.cat([order, lay.tail], dim=1)  # (G, Np), padded slots last
        order_ext = torch.cat([order.narrow(1, Np - c, c), order], dim=1)  # (G, Np + c)
        rows = order_ext.add(lay.base).view(-1)  # (G·(Np + c),) row of x_flat / v_flat
        xs = lay.x_flat.index_select(0, rows)  # (G·(Np + c), D) sorted queries
        vs = lay.v_flat.index_select(0, rows)  # (G·(Np + c), D) sorted values
        blocks = [xs.view(W + 1, c, D).narrow(0, 1, W),  # (W, c, D) queries of window w = chunk w+1
                  self.keys(xs).unfold(0, 2 * c, c),  # (W, D, 2c) sorted keys k̂ of chunks w, w+1
                  vs.unfold(0, 2 * c, c).transpose(1, 2)]  # (W, 2c, D) their values
        del xs, vs
        if lay.key_bias is not None:
            blocks.append(lay.key_bias)  # (W, 1, 2c) −inf on padded key slots
        if self.causal:  # j <= i; padded slots have positions >= N, always in the future
            pos = order_ext.view(-1)  # (G·(Np + c),)
            blocks.append(pos.unfold(0, 2 * c, c).unsqueeze(1) > pos.view(W + 1, c, 1).narrow(0, 1, W))  # (W, c, 2c)
        one = self.rounds == 1  # no logsumexp needed: the fused softmax, out of place
        self_score = self._self_score(blocks[0].dtype)
        row_bytes = 2 * c * (2 if one else 1) * blocks[0].element_size()
        step = rows_within(self._budget(order.device), row_bytes, W * c, multiple=c) // c  # windows per block
        outs, maxes, sums = [], [], []
        scores, probs = _Scratch(blocks[0], step, W, (c, 2 * c)), _Scratch(blocks[0], step, W, (c, 2 * c))
        for qb, kb, vb, *rest in zip(*(_split(t, step) for t in blocks)):
            if lay.key_bias is None:
                s = torch.bmm(qb, kb, out=scores.take(len(qb)))  # (Wb, c, 2c)
            else:
                s = torch.baddbmm(rest.pop(0), qb, kb, out=scores.take(len(qb)))  # (Wb, c, 2c), padded keys −inf
            if self.causal:
                s.masked_fill_(rest[0], float("-inf"))  # the future
            s.masked_fill_(lay.self_mask, self_score)  # query i against key c + i: itself
            if one:
                outs.append(torch.bmm(probs.softmax(s), vb))  # (Wb, c, D)
            else:
                with torch.no_grad():
                    m = s.amax(dim=-1, keepdim=True)  # (Wb, c, 1), finite: the self score is
                    s.sub_(m).clamp_min_(self.EXP_FLOOR)  # −inf and −1e5: exp's fast range, weight <= e^-80
                e = s.exp_()  # (Wb, c, 2c) in place; autograd sees exp(s): the shift cancels
                sums.append(e.sum(dim=-1, keepdim=True))  # (Wb, c, 1), >= exp(0)
                outs.append(torch.bmm(e, vb))  # (Wb, c, D), unnormalised
                maxes.append(m)
                del e
            del s
        del blocks, qb, kb, vb, rest, scores, probs
        o = _cat(outs)  # (W, c, D)
        del outs
        back = lay.unsort(order)  # (G·N,) sorted row of each position
        if one:
            return o.view(W * c, D).index_select(0, back).view(lay.heads, N, D), None  # (G, N, D) by position
        l = _cat(sums)  # (W, c, 1)
        o = o.div_(l).view(W * c, D).index_select(0, back).view(lay.heads, N, D)  # (G, N, D) by position
        lse = torch.log(l).add_(_cat(maxes))  # (W, c, 1)
        return o, lse.view(W * c, 1).index_select(0, back).view(lay.heads, N, 1)  # (G, N, D), (G, N, 1)

    # --------------------------------------------------------------- reference

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(s + log c) v densely: c_ij = rounds in which j is visible to i, from the same buckets."""
        B, H, N, D = q.shape
        c, n_chunks = self._chunks(N)
        kn = self.keys(q)  # (B, H, N, D)
        s = torch.matmul(q, kn.transpose(-1, -2))  # (B, H, N, N)
        eye = torch.eye(N, dtype=torch.bool, device=q.device)  # (N, N)
        s = s.masked_fill(eye, self._self_score(s.dtype))
        count = torch.zeros(B * H, N, N, dtype=q.dtype, device=q.device)  # (BH, N, N)
        x = q.reshape(B * H, N, D)  # (BH, N, D)
        buckets = self.hash(x) if n_chunks > 1 else None  # (BH, N, R)
        for r in range(self.rounds):
            if n_chunks == 1:
                count += 1
                continue
            order = torch.sort(buckets[..., r], dim=-1, stable=True).indices  # (BH, N)
            slot = torch.argsort(order, dim=-1)  # (BH, N) slot of each position
            chunk = slot // c  # (BH, N)
            same = chunk[:, None, :] == chunk[:, :, None]  # (BH, Nq, Nk)
            before = chunk[:, None, :] == (chunk[:, :, None] - 1) % n_chunks
            count += (same | before).to(q.dtype)
        count = count.view(B, H, N, N)
        if self.causal:
            i = torch.arange(N, device=q.device)
            count = count * (i[None, :] <= i[:, None]).to(q.dtype)
        s = s + torch.log(count)  # log 0 = -inf: not visible
        return torch.matmul(torch.softmax(s, dim=-1), v)  # (B, H, N, D)


def bucket_factors(n: int, bucket: int, buckets: int) -> tuple[int, ...]:
    """The bucket count as factors: ``(buckets,)`` when given, else HuggingFace's ``_set_num_buckets`` with its
    ``max_position_embeddings`` = N: n_b = 2^p, p = ⌊log2(2·⌊N/c⌋)⌋ (at least 2 buckets), split into
    (2^⌊p/2⌋, 2^(p−⌊p/2⌋)) when n_b > 2·max(⌊√⌊N/c⌋⌋, c)."""
    if buckets:
        return (buckets,)
    p = max(1, (2 * (n // bucket)).bit_length() - 1)
    if 2 ** p > 2 * max(math.isqrt(n // bucket), bucket):
        return 2 ** (p // 2), 2 ** (p - p // 2)
    return (2 ** p,)


@dataclass
class _Layout:
    """The extended sorted layout of ``_lsh`` for G heads of N positions, C chunks of c rows (per call).

    Extended row g·(Np + c) + j holds slot (j − c) mod Np of head g's sorted order: first a copy of the
    last chunk, then the Np slots (slots N.. are the padded positions, sorted after every real one)."""

    n: int
    c: int
    heads: int  # G
    chunks: int  # C
    n_pad: int  # Np = C·c
    x_flat: torch.Tensor  # (G·Np, D), zero rows at the padded slots
    v_flat: torch.Tensor  # (G·Np, D)
    base: torch.Tensor  # (G, 1) g·Np: x_flat row of head g's position 0
    tail: torch.Tensor  # (G, Np − N) padded positions N..
    slots: torch.Tensor  # (G, Np) g·(Np + c) + slot: the windows' output row of each slot
    key_bias: torch.Tensor | None  # (W, 1, 2c) −inf on padded key slots, 0 elsewhere; None: no padding or causal
    self_mask: torch.Tensor  # (c, 2c) query i of a window against key c + i, itself

    @classmethod
    def of(cls, x: torch.Tensor, v: torch.Tensor, c: int, n_chunks: int, pad_bias: bool) -> _Layout:
        """x, v (G, N, D), padded to C·c rows per head (zero vectors at positions N..) and flattened."""
        G, N, D = x.shape
        n_pad = n_chunks * c
        dev = x.device
        if n_pad > N:  # padded slots: zero vectors at positions N.., sorted after every real position
            x, v = F.pad(x, (0, 0, 0, n_pad - N)), F.pad(v, (0, 0, 0, n_pad - N))  # (G, Np, D) each
        key_bias = None
        if pad_bias and n_pad > N:  # padded slots >= N, in the copied last chunk and at the end
            slot = torch.arange(-c, n_pad, device=dev).remainder_(n_pad)  # (Np + c,)
            bias = torch.zeros(n_pad + c, dtype=x.dtype, device=dev).masked_fill_(slot >= N, float("-inf"))
            key_bias = bias.repeat(G).unfold(0, 2 * c, c).unsqueeze(1)  # (W, 1, 2c)
        ext = torch.arange(0, G * (n_pad + c), n_pad + c, device=dev).unsqueeze(1)  # (G, 1)
        return cls(
            n=N, c=c, heads=G, chunks=n_chunks, n_pad=n_pad,
            x_flat=x.reshape(G * n_pad, D), v_flat=v.reshape(G * n_pad, D),  # (G·Np, D)
            base=torch.arange(0, G * n_pad, n_pad, device=dev).unsqueeze(1),  # (G, 1)
            tail=torch.arange(N, n_pad, device=dev).expand(G, -1) if n_pad > N else None,  # (G, Np − N)
            slots=torch.arange(n_pad, device=dev).add(ext),  # (G, Np)
            key_bias=key_bias, self_mask=torch.arange(2 * c, device=dev) == torch.arange(c, 2 * c, device=dev)[:, None],
        )

    @property
    def windows(self) -> int:
        """W = G·(C+1) − 1 windows of 2c keys."""
        return self.heads * (self.chunks + 1) - 1

    def unsort(self, order: torch.Tensor) -> torch.Tensor:
        """(G·N,) output row of each position: window w's queries are extended rows (w+1)·c .., so position p
        of head g, at extended row g·(Np + c) + c + slot(p), is output row g·(Np + c) + slot(p)."""
        inv = torch.empty_like(order).scatter_(1, order, self.slots)  # (G, Np)
        if self.n_pad > self.n:
            inv = inv.narrow(1, 0, self.n)  # (G, N)
        return inv.reshape(-1)  # (G·N,)


class _Scratch:
    """One block's buffer, reused by every block of a call when nothing needs the block's tensors afterwards
    (no autograd) and there are several blocks. On the CPU a fresh tensor of 32 MiB or more comes from new mmap
    pages (glibc), whose page faults cost ~0.5 ms per MiB on every block; one buffer pays that once a call.
    Otherwise ``take`` gives None (``out=None``: a fresh tensor)."""

    def __init__(self, like: torch.Tensor, step: int, total: int, shape: tuple[int, ...]):
        reuse = step < total and not torch.is_grad_enabled()
        self.buf = like.new_empty(step, *shape) if reuse else None  # (step, *shape)

    def take(self, rows: int) -> torch.Tensor | None:
        if self.buf is None:
            return None
        return self.buf if rows == self.buf.shape[0] else self.buf.narrow(0, 0, rows)

    def softmax(self, s: torch.Tensor) -> torch.Tensor:
        """softmax over the last dim, into the buffer when there is one."""
        out = self.take(s.shape[0])
        return torch.softmax(s, dim=-1) if out is None else torch.ops.aten._softmax.out(s, -1, False, out=out)


def _split(t: torch.Tensor, step: int) -> tuple[torch.Tensor, ...]:
    """Blocks of ``step`` along dim 0 (views; the tensor itself when it is one block)."""
    return (t,) if step >= t.shape[0] else t.split(step)


def _cat(pieces: list[torch.Tensor]) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def _combine_rounds(acc: tuple | None, o_r: torch.Tensor, lse_r: torch.Tensor) -> tuple:
    """Fold round r, o_r (G, N, D) with logsumexp lse_r (G, N, 1), into acc = (Σ w·o, Σ w, M).

    o = Σ_r exp(lse_r − M) o_r / Σ_r exp(lse_r − M) with M a running max (no gradient: it
    cancels). Rows that see only themselves have lse = −1e5 in every round, where
    logaddexp would lose the weights to float32 rounding of −1e5 + log 2.
    """
    if acc is None:
        acc_m = lse_r.detach()  # (G, N, 1)
        acc_w = torch.exp(lse_r - acc_m)  # (G, N, 1), value 1
        return o_r * acc_w, acc_w, acc_m  # (G, N, D), (G, N, 1), (G, N, 1)
    acc_o, acc_w, acc_m = acc
    m_new = torch.maximum(acc_m, lse_r.detach())  # (G, N, 1)
    rescale = torch.exp(acc_m - m_new)  # (G, N, 1)
    w = torch.exp(lse_r - m_new)  # (G, N, 1)
    acc_o = acc_o.mul_(rescale).addcmul_(o_r, w)  # (G, N, D), in place: no new N·D buffers
    return acc_o, acc_w * rescale + w, m_new  # (G, N, D), (G, N, 1), (G, N, 1)
