"""Kernelised attention in O(N): the Q(KᵀV) reordering shared by `linear`, `performer` and `cosformer`.

Given feature maps φ_q, φ_k: ℝ^D → ℝ^F with non-negative values,

    out_i = φ_q(q_i)ᵀ S_i / (φ_q(q_i)ᵀ z_i + eps),   S_i = Σ_{j∈V(i)} φ_k(k_j) v_jᵀ,   z_i = Σ_{j∈V(i)} φ_k(k_j)

with V(i) = all positions (bidirectional) or j ≤ i (causal). The pair (S, z) is kept as
one F×(D+1) "state" by giving v a trailing column of ones, so one product yields the
numerator and the denominator together.

- Bidirectional: one pass over key blocks accumulates the state (:func:`key_state`), one
  pass over query blocks reads it (:func:`read_state`): 4·N·F·(D+1) FLOPs per head.
- Causal, by chunks of C positions (:func:`causal_attention`): inside a chunk a masked C×C
  block, tril(φ_q(Q_c) φ_k(K_c)ᵀ) [V_c 1]; across chunks the state of all earlier chunks,
  φ_q(Q_c) S_<c. The chunk states U_c = φ_k(K_c)ᵀ [V_c 1] of a block become the exclusive
  prefixes S_<c by one cumulative sum over the block's chunks (minus U_c, plus the state carried
  from earlier blocks), never by a cumulative sum over N per-position F×(D+1) outer products.

Blocks are sized in bytes (:mod:`mechanisms._budget`): rows per block = temp_budget(device) // (bytes of
live temporaries one row costs; the two bidirectional passes are *streaming*, 16 MiB on the CPU, the causal
form 64 MiB), each pass stating its cost, so one call dispatches a constant plus a few
ops per block of thousands of rows, and peak memory is the inputs and output plus at most the budget (the
state and the carried totals are O(F·D), not O(N)). Under ``torch.no_grad()`` each block's result is
written straight into the output; with autograd the blocks are concatenated (and autograd keeps each
block's tensors for the backward: linear in N, not bounded by the budget). Feature maps get the block
and its first position (cosFormer's features depend on the position). Every product is a
``bmm``/``baddbmm``, so FlopCounterMode counts all of the products; the cumulative sums of the causal
form are additions it does not count, 4·F·(D+1)/C per position against 4·F·(D+1) + 2·C·(F + D+1) in
products (under 1/C of them: 0.8% for linear at C = 64).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._budget import rows_within, temp_budget

FeatureMap = Callable[[torch.Tensor, int], torch.Tensor]  # (block (G, L, D), its first position) -> (G, L, F)
PairFeatures = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]  # (q, k, start)
LOW_PRECISION = (torch.float16, torch.bfloat16)

BLOCK_ELEMENTS: int | None = None  # tests only: blocks of this many elements of (G, L, width), not the byte budget


def block_rows(n: int, row_bytes: int, device: torch.device | str, multiple: int = 1, *, elements: int,
               streaming: bool = False) -> int:
    """Rows per block: ``temp_budget(device, streaming=streaming) // row_bytes`` (a multiple of ``multiple``, no
    more than the padded sequence), ``row_bytes`` being the live temporaries of one row. With
    :data:`BLOCK_ELEMENTS` set (tests, so that small sizes run several blocks), ``BLOCK_ELEMENTS // elements`` rows
    instead, ``elements`` being one row of the block's widest temporary."""
    budget = (temp_budget(device, streaming=streaming) if BLOCK_ELEMENTS is None
              else BLOCK_ELEMENTS * row_bytes // max(1, elements))
    return rows_within(budget, row_bytes, n, multiple)


def blocks(rows: int, *tensors: torch.Tensor | None):
    """(start, the block of each tensor) along dim 1, ``rows`` at a time, by one split per tensor (None stays None).
    A split, not narrow or indexing: under autograd its gradient is one concatenation after the last block,
    where each narrowed block's gradient would be a zero-filled tensor of the whole sequence."""
    n = next(t for t in tensors if t is not None).shape[1]
    count = -(-n // rows)
    parts = [[None] * count if t is None else t.split(rows, dim=1) for t in tensors]
    return zip(range(0, n, rows), *parts)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums over positions are taken in: float32 for fp16/bf16 (a prefix or key sum overflows fp16)."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def tracks_grad(*tensors: torch.Tensor) -> bool:
    """True when autograd records operations on any of ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def ones_column(v: torch.Tensor) -> torch.Tensor:
    """[v | 1]: (G, L, D) -> (G, L, D+1), so one product gives Σ φ v and Σ φ together."""
    return F.pad(v, (0, 1), value=1.0)


def normalise(nd: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """[numerator | denominator] (G, L, D+1) -> numerator / (denominator + eps) (G, L, D), into ``out`` if given
    (cast to its dtype: fp16/bf16 outputs of a float32 computation)."""
    num, den = nd.split([nd.shape[-1] - 1, 1], dim=-1)  # (G, L, D), (G, L, 1)
    if eps:
        den = den + eps
    if num.dtype in LOW_PRECISION:
        # divide in float32: the gradient -num/den² overflows fp16 for den > 256 (inf·0 = NaN)
        res = (num.float() / den.float()).to(num.dtype)  # (G, L, D)
        return res if out is None else out.copy_(res)
    if out is None:
        return num / den
    return torch.div(num, den, out=out) if out.dtype == num.dtype else out.copy_(num / den)


def key_state(k: torch.Tensor, v: torch.Tensor, *, feature_k: FeatureMap, feature_floats: int,
              work: torch.dtype | None = None) -> torch.Tensor:
    """Σ_j φ_k(k_j) [v_j 1]ᵀ over all positions, block by block: (G, N, D) -> (G, F, D+1), in ``work`` dtype
    (default: k's).

    One row costs G·(feature_floats + D+1) elements of live temporaries: φ_k of the block (``feature_floats``:
    what the feature map holds at once per row, at least F) and [v 1]."""
    g, n, d = k.shape
    work = work or k.dtype
    rows = block_rows(n, g * (feature_floats + d + 1) * work.itemsize, k.device, elements=g * feature_floats,
                      streaming=True)
    state = None
    for s, kb, vb in blocks(rows, k, v):
        fkt = feature_k(kb.to(work), s).transpose(1, 2)  # (G, F, L)
        v1 = ones_column(vb.to(work))  # (G, L, D+1)
        state = torch.bmm(fkt, v1) if state is None else torch.baddbmm(state, fkt, v1)  # (G, F, D+1)
        del fkt, v1  # before the next block's are made
    return state


def read_state(q: torch.Tensor, state: torch.Tensor, *, feature_q: FeatureMap, feature_floats: int, eps: float,
               grad: bool, norm: Callable = normalise) -> torch.Tensor:
    """φ_q(q_i)ᵀ [S z] normalised for every query, block by block: q (Gk·Gq, N, D), the Gq query heads of each
    of the Gk states (Gk, F, D+1) in turn -> (Gk·Gq, N, D), in q's dtype. ``norm(nd, eps, out)`` divides.

    One row costs Gk·Gq·(feature_floats + D+2) elements of live temporaries: φ_q of the block, the product
    [num | den] and den + eps; the quotient goes straight into the output (no grad)."""
    gq, n, d = q.shape
    gk, f, d1 = state.shape
    rows = block_rows(n, gq * (feature_floats + d1 + 1) * state.dtype.itemsize, q.device,
                      elements=gq * feature_floats, streaming=True)
    out = None if grad else q.new_empty(gq, n, d)
    parts = []
    for s, qb, ob in blocks(rows, q, out):
        fq = feature_q(qb.to(state.dtype), s)  # (Gk·Gq, L, F)
        nd = torch.bmm(fq.view(gk, -1, f), state).view(gq, qb.shape[1], d1)  # (Gk, Gq·L, D+1) -> (Gk·Gq, L, D+1)
        parts.append(norm(nd, eps, ob))
        del fq, nd  # before the next block's are made
    return torch.cat(parts, dim=1).to(q.dtype) if out is None else out


def causal_row_elements(width: int, head_dim: int, chunk: int) -> int:
    """Live temporaries of one row of :func:`causal_attention`, in elements per group: φ_q and φ_k (2F), [v 1],
    the masked block's product and the [num | den] sum (3(D+1)), the C×C scores (C), den + eps (1), the chunk
    states and their exclusive prefixes (F·(D+1) per chunk of C rows each)."""
    return 2 * width + 3 * (head_dim + 1) + chunk + 1 + math.ceil(2 * width * (head_dim + 1) / chunk)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, features: PairFeatures, width: int,
                     chunk: int, eps: float, norm: Callable = normalise) -> torch.Tensor:
    """Causal (j <= i) kernel attention by chunks of C: (G, N, D) each -> (G, N, D).

    ``features(q_block, k_block, start)`` gives φ_q, φ_k (G, L, F) of a block starting at position ``start``;
    ``norm(nd, eps, out)`` divides numerator by denominator. Rows per block: the budget over G·
    :func:`causal_row_elements` elements, a multiple of C. fp16/bf16 blocks are computed in float32 (as
    performer-pytorch does for its causal form): the carried prefix state sums over all earlier keys and its
    gradients overflow fp16.
    """
    low = q.dtype
    work = work_dtype(low)
    g, n, d = q.shape
    c, f, d1 = chunk, width, d + 1
    wide = f * d1
    row_bytes = g * causal_row_elements(f, d, c) * work.itemsize
    rows = block_rows(n, row_bytes, q.device, c, elements=g * max(f, c))
    state = q.new_zeros(g, 1, wide, dtype=work)  # (G, 1, F·(D+1)): [S | z] of all earlier blocks
    grad = tracks_grad(q, k, v)
    out = None if grad else q.new_empty(g, n, d)
    parts = []
    for s, qb, kb, vb, ob in blocks(rows, q, k, v, out):
        length = qb.shape[1]
        nc = -(-length // c)
        pad = nc * c - length
        fq, fk = features(qb.to(work), kb.to(work), s)  # (G, L, F) each
        v1 = ones_column(vb.to(work))  # (G, L, D+1)
        if pad:  # zero features: padded keys add nothing, padded queries are dropped
            fq, fk, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v1))
        fq = fq.view(g * nc, c, f)  # (G·nc, C, F)
        fkt = fk.view(g * nc, c, f).transpose(1, 2)  # (G·nc, F, C)
        v1 = v1.view(g * nc, c, d1)  # (G·nc, C, D+1)
        chunks = torch.bmm(fkt, v1).view(g, nc, wide)  # (G, nc, F·(D+1)): U_c
        before = chunks.cumsum(dim=1).sub_(chunks).add_(state)  # (G, nc, F·(D+1)): S_<c, earlier blocks included
        state = state + chunks.sum(dim=1, keepdim=True)  # (G, 1, F·(D+1)): everything up to the end of this block
        del chunks
        inner = torch.bmm(torch.bmm(fq, fkt).tril_(), v1)  # (G·nc, C, D+1): masked C×C block, j <= i in the chunk
        nd = torch.baddbmm(inner, fq, before.view(g * nc, f, d1)).view(g, nc * c, d1)  # (G, nc·C, D+1): + φ_q S_<c
        del inner
        if pad:
            nd = nd.narrow(1, 0, length)  # (G, L, D+1)
        parts.append(norm(nd, eps, ob))
        del fq, fk, fkt, v1, before, nd  # before the next block's are made
    return torch.cat(parts, dim=1).to(low) if out is None else out


def kernel_flops(*, groups: int, n: int, head_dim: int, width: int, causal: bool, chunk: int) -> int:
    """FLOPs of the products of :func:`key_state` + :func:`read_state` (bidirectional) or
    :func:`causal_attention` (what FlopCounterMode counts there). Causal, per chunk of C (padded: ⌈N/C⌉
    chunks whatever the blocks): the chunk state and the read of S_<c, 2·C·F·(D+1) each, and the C×C
    block, 2·C²·(F + D+1)."""
    d1 = head_dim + 1
    if not causal:
        return groups * 4 * n * width * d1
    per_chunk = 4 * chunk * width * d1 + 2 * chunk * chunk * (width + d1)
    return groups * math.ceil(n / chunk) * per_chunk
