"""Reformer LSH attention: shared-QK, random-rotation hashing, sorted chunks, rounds combined by logsumexp."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Fidelity, Knob, decreasing, register


@register(
    name="reformer", family="hashing",
    complexity="O(N·R·(c + n_b)·D + N·R·log N)", memory="O(N·(c + D))",
    knobs=[
        Knob("rounds", default=1, axis="rounds", minimum=1, small=2, help="hash rounds R"),
        Knob("bucket", default=64, axis="bucket", minimum=1, small=48, length=True, sweep=(16, 32, 64, 128),
             help="chunk length c of the sorted sequence"),
        Knob("buckets", default=0, minimum=0,
             help="number of hash buckets n_b (even); 0 = 2·ceil(N/c) ≈ 2N/c, the paper's choice, whose "
                  "hashing costs N·D·n_b ≈ 2N²·D/c FLOPs; a fixed n_b keeps FLOPs linear in N"),
    ],
)
class ReformerAttention(nn.Module):
    """Reformer LSH attention with shared QK, as in the HuggingFace ``LSHSelfAttention``.

    Keys are the length-normalised queries, exactly HF's ``_len_and_dim_norm``:
    k̂_j = q_j · rsqrt(mean(q_j²) + 1e-6) / √D, a unit vector up to the 1e-6; the score is
    s_ij = q_i·k̂_j (the RMS-normalised key scaled by 1/√D; no further scaling). The ``k``
    argument is ignored and gets no gradient.

    Hashing: R_r (D, n_b/2) random rotations drawn from ``seed`` at build; round r puts
    position i in bucket argmax([q_i R_r ; −q_i R_r]) (no gradient). Each round
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

    Cost per round: hashing N·D·n_b FLOPs (2N²·D/c with the default n_b ≈ 2N/c: FLOPs
    are linear in N only for a fixed ``buckets``), sorting N log N, attention 4·N·2c·D
    FLOPs. Memory O(N·(c + D)) whatever R: rounds run one after the other, heads in groups
    whose chunk scores stay under SCORE_BUDGET elements, hashing in blocks of HASH_BLOCK
    projections; no N×N tensor and no duplicate-count tensor.
    """

    fidelity = (Fidelity("rounds", (1, 2, 4, 8), (decreasing(),), why="more rounds, fewer neighbours lost to hashing"),)
    exact_at = {"rounds": 1, "bucket": "N"}  # one chunk, one round: dense shared-QK attention
    exact_label = "dense shared-QK"
    linear_at = {"buckets": 64}  # the default n_b ≈ 2N/c makes hashing FLOPs quadratic

    supports_causal = True
    no_decode_reason = ("not implemented: a new token's LSH bucket neighbours come from re-sorting every past key "
                        "per round, so decode needs the whole KV cache plus each key's bucket (HuggingFace keeps "
                        "exactly that); it would measure as dense's cache")
    supports_bidirectional = True
    SELF_SCORE = -1e5  # HF self_mask_value_float32
    SELF_SCORE_FP16 = -1e3  # HF self_mask_value_float16 (−1e5 overflows float16)
    EPS = 1e-6  # HF _len_norm epsilon
    SCORE_BUDGET = 1 << 24  # elements of chunk scores per group of heads (64 MiB in fp32)
    HASH_BLOCK = 1 << 22  # rotated-vector elements per hashing block (16 MiB in fp32)

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int,
                 rounds: int, bucket: int, buckets: int):
        super().__init__()
        self.causal = causal
        self.rounds = rounds
        self.bucket = bucket
        n_chunks = max(1, math.ceil(n / bucket))
        self.n_buckets = buckets if buckets else 2 * n_chunks
        if self.n_buckets < 2 or self.n_buckets % 2:
            raise ValueError(f"reformer: buckets must be even and >= 2, got {self.n_buckets}")
        g = torch.Generator(device="cpu").manual_seed(seed)
        rotations = torch.randn(head_dim, rounds, self.n_buckets // 2, generator=g)  # (D, R, n_b/2)
        self.register_buffer("rotations", rotations)

    @classmethod
    def check(cls, *, n: int, causal: bool, heads: int, head_dim: int, device: str, dtype: str,
              rounds: int, bucket: int, buckets: int) -> list[str]:
        reasons = []
        if buckets and (buckets < 2 or buckets % 2):
            reasons.append(f"buckets must be even and >= 2 (or 0 for 2·ceil(N/c)), got {buckets}")
        return reasons

    def build_info(self) -> dict:
        return {"n_buckets": self.n_buckets}

    # ------------------------------------------------------------------ pieces

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """HF's shared-QK keys x · rsqrt(mean(x²) + 1e-6) / √D, written as x / sqrt(‖x‖² + D·1e-6)."""
        sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square()  # (..., 1)
        return x * torch.rsqrt(sq + x.shape[-1] * self.EPS)

    @torch.no_grad()
    def hash(self, x: torch.Tensor) -> torch.Tensor:
        """Buckets of every round: argmax([xR_r; −xR_r]), first maximum on ties. x (G, N, D) -> (G, R, N) int64.

        Without forming the concatenation: per row, the larger of max(xR) and −min(xR) names
        the half, and the first column equal to that extreme (argmin of |xR − extreme|, which
        is 0 exactly there) the bucket: the same index torch.argmax would return. All rounds
        share one matmul; rows go in blocks of at most HASH_BLOCK projections.
        """
        D, R, half = self.rotations.shape
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # hash fp16/bf16 inputs in float32
        rot = self.rotations.to(x.dtype).reshape(D, R * half)  # (D, R·h), h = n_b/2
        G, N, _ = x.shape
        out = torch.empty(G, R, N, dtype=torch.long, device=x.device)  # (G, R, N)
        step = max(1, self.HASH_BLOCK // max(1, R * half * G))
        for a in range(0, N, step):
            proj = torch.matmul(x[:, a:a + step], rot).unflatten(-1, (R, half))  # (G, rows, R, h)
            hi = proj.amax(dim=-1, keepdim=True)  # (G, rows, R, 1)
            lo = proj.amin(dim=-1, keepdim=True)
            upper = hi >= -lo  # the maximum of [p; −p] is in the first half (ties: first half)
            idx = proj.sub_(torch.where(upper, hi, lo)).abs_().argmin(dim=-1)  # (G, rows, R)
            idx += (~upper[..., 0]) * half
            out[:, :, a:a + step] = idx.transpose(1, 2)
            del proj
        return out

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
        group = max(1, self.SCORE_BUDGET // (N * 2 * c))
        outs = [self._lsh(x[a:a + group], vv[a:a + group], c, n_chunks) for a in range(0, B * H, group)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # (BH, N, D)
        return out.reshape(B, H, N, D)

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
        """All rounds for a group of G heads. x, v (G, N, D) -> (G, N, D).

        Layout: each head's sorted sequence is preceded by a copy of its last chunk, and the
        heads are laid end to end, G·(C+1) chunks of c rows. Window w = chunks w and w+1
        (previous, current), an overlapping ``unfold`` view, so one batched matmul scores
        every chunk against [previous; current] with no concatenation; the G−1 windows that
        straddle two heads are computed and thrown away (1/(C+1) of the work).
        """
        G, N, D = x.shape
        lay = _Layout.of(x, v, c, n_chunks)
        acc = None  # running (Σ_r w_r·o_r, Σ_r w_r, M) over the rounds
        buckets = self.hash(x)  # (G, R, N)
        for r in range(self.rounds):
            order = torch.sort(buckets[:, r], dim=-1, stable=True).indices  # (G, N) by (bucket, position)
            if lay.n_pad > N:
                order = torch.cat([order, lay.tail], dim=-1)  # (G, Np)
            o, m, l = self._round(lay, order)  # (W, c, D); (W, c, 1) each, None for one round
            back = lay.unsort(order)  # (G·N,)
            o_r = o.view(lay.windows * c, D).index_select(0, back).view(G, N, D)  # (G, N, D)
            if self.rounds == 1:
                return o_r
            lse_r = (m + torch.log(l)).view(lay.windows * c).index_select(0, back).view(G, N, 1)  # (G, N, 1)
            acc = _combine_rounds(acc, o_r, lse_r)
            del o_r
        return acc[0].div_(acc[1])

    def _round(self, lay: "_Layout", order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                       torch.Tensor | None]:
        """One round in sorted order: every chunk against [previous; current] (see ``_lsh``).

        order (G, Np): the positions in sorted order, padded slots last. Returns o (W, c, D) and,
        for several rounds, the row max m (W, c, 1) and the sum l (W, c, 1) of exp(s − m), o being
        already divided by l. Cost: 4·W·c·2c·D FLOPs; live scores W·c·2c elements.
        """
        c, W = lay.c, lay.windows
        D = lay.x_flat.shape[1]
        order_ext = torch.cat([order[:, -c:], order], dim=-1)  # (G, Np + c)
        rows = (order_ext + lay.heads * lay.n_pad).reshape(-1)  # (G·(Np + c),)
        xs = lay.x_flat.index_select(0, rows)  # (G·(Np + c), D)
        vs = lay.v_flat.index_select(0, rows)  # (G·(Np + c), D)
        qw = xs[c:].view(W, c, D)  # (W, c, D) queries of window w = chunk w+1
        kw = self.keys(xs).unfold(0, 2 * c, c)  # (W, D, 2c) view
        vw = vs.unfold(0, 2 * c, c).transpose(1, 2)  # (W, 2c, D) view
        s = torch.matmul(qw, kw)  # (W, c, 2c)
        del xs, qw, kw  # free the sorted queries/keys now (without autograd holding them)
        self._mask_windows(s, lay, order_ext)
        if self.rounds == 1:  # no logsumexp needed: the fused softmax kernel
            return torch.matmul(torch.softmax(s, dim=-1), vw), None, None  # (W, c, D)
        m = s.detach().amax(dim=-1, keepdim=True)  # (W, c, 1), finite: the self score is
        e = s.sub_(m).exp_()  # (W, c, 2c)
        l = e.sum(dim=-1, keepdim=True)  # (W, c, 1), >= 1
        return torch.matmul(e, vw).div_(l), m, l  # (W, c, D)

    def _mask_windows(self, s: torch.Tensor, lay: "_Layout", order_ext: torch.Tensor) -> None:
        """In place on the scores s (W, c, 2c): causal or padded keys −inf, the self score last."""
        c, C, W, N = lay.c, lay.chunks, lay.windows, lay.n
        if self.causal:  # j <= i; padded slots have positions >= N, always in the future
            pos = order_ext.reshape(-1)  # (G·(Np + c),)
            s.masked_fill_(pos.unfold(0, 2 * c, c)[:, None, :] > pos[c:].view(W, c, 1), float("-inf"))
        elif lay.n_pad > N:  # padded key slots: the tail of each head's last chunk
            real = N - (C - 1) * c
            s[0::C + 1, :, real:c] = float("-inf")  # chunk 0: its previous chunk is the last one
            s[C - 1::C + 1, :, c + real:] = float("-inf")  # the last chunk itself
        s[:, :, c:].diagonal(dim1=1, dim2=2).fill_(self._self_score(s.dtype))  # self only if nothing else

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
        buckets = self.hash(x) if n_chunks > 1 else None  # (BH, R, N)
        for r in range(self.rounds):
            if n_chunks == 1:
                count += 1
                continue
            order = torch.sort(buckets[:, r], dim=-1, stable=True).indices  # (BH, N)
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


@dataclass
class _Layout:
    """The extended sorted layout of ``_lsh`` for G heads of N positions, C chunks of c rows."""

    n: int
    c: int
    chunks: int  # C
    n_pad: int  # Np = C·c
    x_flat: torch.Tensor  # (G·Np, D), zero rows at the padded slots
    v_flat: torch.Tensor  # (G·Np, D)
    heads: torch.Tensor  # (G, 1) head index
    tail: torch.Tensor  # (G, Np − N) padded positions N.., sorted after every real one
    slots: torch.Tensor  # (G, Np) 0..Np−1

    @classmethod
    def of(cls, x: torch.Tensor, v: torch.Tensor, c: int, n_chunks: int) -> "_Layout":
        """x, v (G, N, D), padded to C·c rows per head (zero vectors at positions N..) and flattened."""
        G, N, D = x.shape
        n_pad = n_chunks * c
        if n_pad > N:  # padded slots: zero vectors at positions N.., sorted after every real position
            x_p = F.pad(x, (0, 0, 0, n_pad - N))  # (G, Np, D)
            v_p = F.pad(v, (0, 0, 0, n_pad - N))  # (G, Np, D)
        else:
            x_p, v_p = x, v
        return cls(
            n=N, c=c, chunks=n_chunks, n_pad=n_pad,
            x_flat=x_p.reshape(G * n_pad, D), v_flat=v_p.reshape(G * n_pad, D),  # (G·Np, D)
            heads=torch.arange(G, device=x.device)[:, None],  # (G, 1)
            tail=torch.arange(N, n_pad, device=x.device).expand(G, -1),  # (G, Np − N)
            slots=torch.arange(n_pad, device=x.device).expand(G, -1),  # (G, Np)
        )

    @property
    def windows(self) -> int:
        """W = G·(C+1) − 1 windows of 2c keys."""
        return self.heads.shape[0] * (self.chunks + 1) - 1

    def unsort(self, order: torch.Tensor) -> torch.Tensor:
        """(G·N,) output row of each position: position p of head g sits at g·(Np + c) + slot(p)."""
        inv = torch.empty_like(order).scatter_(1, order, self.slots)  # (G, Np)
        return (inv[:, :self.n] + self.heads * (self.n_pad + self.c)).reshape(-1)  # (G·N,)


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
