"""Kernelised attention in O(N): the Q(KᵀV) reordering shared by `linear` and `performer`.

Given feature maps φ_q, φ_k: ℝ^D → ℝ^F with positive values,

    out_i = φ_q(q_i)ᵀ S_i / (φ_q(q_i)ᵀ z_i + eps),   S_i = Σ_{j∈V(i)} φ_k(k_j) v_jᵀ,   z_i = Σ_{j∈V(i)} φ_k(k_j)

with V(i) = all positions (bidirectional) or j ≤ i (causal). The pair (S, z) is kept as
one F×(D+1) "state" by giving v a trailing column of ones, so one product yields the
numerator and the denominator together.

- Bidirectional: one pass over key blocks accumulates the state (:func:`key_state`), one
  pass over query blocks reads it (:func:`read_state`): 4·N·F·(D+1) FLOPs per head.
- Causal, by chunks of C positions (:func:`causal_attention`): inside a chunk a masked C×C
  block, tril(φ_q(Q_c) φ_k(K_c)ᵀ) [V_c 1]; across chunks the carried state of all earlier
  chunks, φ_q(Q_c) S_<c. The chunk states of a block of rows are combined into exclusive
  prefixes by one small product with a constant (nc+1)×nc lower-triangular matrix of ones
  (nc ≤ MAX_CHUNKS_PER_BLOCK chunks per block), never by a cumulative sum over N per-position
  F×D outer products.

Rows go in blocks of about a million elements, so features, C×C blocks and partial results
stay cache-sized and the features never exist for the whole sequence at once. Under
``torch.no_grad()`` each block's result is written straight into the output; with autograd
the blocks are concatenated. Every product is a ``bmm``/``baddbmm``/``matmul``, so
FlopCounterMode counts all of the arithmetic that matters.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

FeatureMap = Callable[[torch.Tensor], torch.Tensor]  # (G, L, D) -> (G, L, F), a fresh tensor

BLOCK_ELEMENTS = 1 << 20  # elements of the widest per-block temporary, (G, L, max(F, C))
MAX_CHUNKS_PER_BLOCK = 32  # bounds the prefix product at 2·(nc+1)·F·(D+1)/C FLOPs per position


def block_rows(n: int, groups: int, width: int, chunk: int = 1) -> int:
    """Rows per block: about BLOCK_ELEMENTS elements of (G, L, width), a multiple of ``chunk``, at most
    MAX_CHUNKS_PER_BLOCK chunks (when chunk > 1) and no more than the (padded) sequence."""
    rows = max(1, BLOCK_ELEMENTS // max(1, groups * width))
    rows = max(chunk, (rows // chunk) * chunk)
    if chunk > 1:
        rows = min(rows, MAX_CHUNKS_PER_BLOCK * chunk)
    return min(rows, chunk * math.ceil(n / chunk))


def tracks_grad(*tensors: torch.Tensor) -> bool:
    """True when autograd records operations on any of ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def ones_column(v: torch.Tensor) -> torch.Tensor:
    """[v | 1]: (G, L, D) -> (G, L, D+1), so one product gives Σ φ v and Σ φ together."""
    return F.pad(v, (0, 1), value=1.0)


def normalise(nd: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """[numerator | denominator] (G, L, D+1) -> numerator / (denominator + eps) (G, L, D)."""
    num, den = nd[..., :-1], nd[..., -1:]
    if eps:
        den = den + eps
    if num.dtype in (torch.float16, torch.bfloat16):
        # divide in float32: the gradient -num/den² overflows fp16 for den > 256 (inf·0 = NaN)
        res = (num.float() / den.float()).to(num.dtype)  # (G, L, D)
        return res if out is None else out.copy_(res)
    return num / den if out is None else torch.div(num, den, out=out)


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, feature_q: FeatureMap,
                     feature_k: FeatureMap, width: int, causal: bool, chunk: int, eps: float) -> torch.Tensor:
    """φ_q(Q)(φ_k(K)ᵀ[V 1]) normalised, in O(N) time and memory; q, k, v (B, H, N, D) -> (B, H, N, D).

    ``width`` is F, the number of features; ``chunk`` is C (causal only); ``eps`` is added
    to the denominator.
    """
    b, h, n, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, n, d) for t in (q, k, v))  # (G, N, D)
    if causal:
        out = causal_attention(q3, k3, v3, feature_q=feature_q, feature_k=feature_k, width=width,
                               chunk=chunk, eps=eps)
    else:
        state = key_state(k3, v3, feature_k=feature_k, width=width)
        out = read_state(q3, state, feature_q=feature_q, width=width, eps=eps, grad=tracks_grad(q, k, v))
    return out.view(b, h, n, d)


def key_state(k: torch.Tensor, v: torch.Tensor, *, feature_k: FeatureMap, width: int) -> torch.Tensor:
    """Σ_j φ_k(k_j) [v_j 1]ᵀ over all positions, block by block: (G, N, D) -> (G, F, D+1)."""
    g, n, _ = k.shape
    rows = block_rows(n, g, width)
    state = None
    for s in range(0, n, rows):
        fkt = feature_k(k[:, s:s + rows]).transpose(1, 2)  # (G, F, L)
        v1 = ones_column(v[:, s:s + rows])  # (G, L, D+1)
        state = torch.bmm(fkt, v1) if state is None else torch.baddbmm(state, fkt, v1)  # (G, F, D+1)
    return state


def read_state(q: torch.Tensor, state: torch.Tensor, *, feature_q: FeatureMap, width: int, eps: float,
               grad: bool) -> torch.Tensor:
    """φ_q(q_i)ᵀ [S z] normalised for every query, block by block: (G, N, D), (G, F, D+1) -> (G, N, D)."""
    g, n, d = q.shape
    rows = block_rows(n, g, width)
    out = None if grad else q.new_empty(g, n, d)
    parts = []
    for s in range(0, n, rows):
        nd = torch.bmm(feature_q(q[:, s:s + rows]), state)  # (G, L, D+1)
        parts.append(normalise(nd, eps, None if out is None else out[:, s:s + rows]))
    return torch.cat(parts, dim=1) if out is None else out


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, feature_q: FeatureMap,
                     feature_k: FeatureMap, width: int, chunk: int, eps: float) -> torch.Tensor:
    """Causal (j <= i) kernel attention by chunks of C: (G, N, D) each -> (G, N, D).

    fp16/bf16 inputs are computed in float32 (as performer-pytorch does for its causal
    form): the carried prefix state sums over all earlier keys and its gradients overflow fp16.
    """
    if q.dtype in (torch.float16, torch.bfloat16):
        low = q.dtype
        return causal_attention(q.float(), k.float(), v.float(), feature_q=feature_q, feature_k=feature_k,
                                width=width, chunk=chunk, eps=eps).to(low)
    g, n, d = q.shape
    c = chunk
    rows = block_rows(n, g, max(width, c), c)
    nc_max = rows // c
    # prefix[i, j] = 1 for j < i: rows 0..nc-1 give the exclusive prefix of each chunk, row nc the total.
    prefix = torch.ones(nc_max + 1, nc_max, dtype=q.dtype, device=q.device).tril_(-1)  # (nc+1, nc)
    state = q.new_zeros(g, 1, width * (d + 1))  # (G, 1, F·(D+1)): [S | z] of all earlier blocks
    grad = tracks_grad(q, k, v)
    out = None if grad else q.new_empty(g, n, d)
    parts = []
    for s in range(0, n, rows):
        e = min(n, s + rows)
        length = e - s
        nc = math.ceil(length / c)
        pad = nc * c - length
        fq = feature_q(q[:, s:e])  # (G, L, F)
        fk = feature_k(k[:, s:e])  # (G, L, F)
        v1 = ones_column(v[:, s:e])  # (G, L, D+1)
        if pad:  # zero features: padded keys add nothing, padded queries are dropped
            fq, fk, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v1))
        fq = fq.reshape(g * nc, c, width)  # (G·nc, C, F)
        fkt = fk.reshape(g * nc, c, width).transpose(1, 2)  # (G·nc, F, C)
        v1 = v1.reshape(g * nc, c, d + 1)  # (G·nc, C, D+1)
        chunk_states = torch.bmm(fkt, v1).view(g, nc, width * (d + 1))  # (G, nc, F·(D+1))
        before = torch.matmul(prefix[:nc + 1, :nc], chunk_states).add_(state)  # (G, nc+1, F·(D+1))
        state = before[:, nc:]  # (G, 1, F·(D+1)), everything up to the end of this block
        scores = torch.bmm(fq, fkt).tril_()  # (G·nc, C, C), j <= i inside the chunk
        nd = torch.baddbmm(torch.bmm(scores, v1), fq, before[:, :nc].reshape(g * nc, width, d + 1))  # (G·nc, C, D+1)
        nd = nd.view(g, nc * c, d + 1)[:, :length]  # (G, L, D+1)
        parts.append(normalise(nd, eps, None if out is None else out[:, s:e]))
    return torch.cat(parts, dim=1) if out is None else out


def kernel_flops(*, groups: int, n: int, head_dim: int, width: int, causal: bool, chunk: int) -> int:
    """FLOPs of the products in :func:`kernel_attention` (what FlopCounterMode counts there)."""
    d1 = head_dim + 1
    if not causal:
        return groups * 4 * n * width * d1
    rows = block_rows(n, groups, max(width, chunk), chunk)
    total = 0
    for s in range(0, n, rows):
        nc = math.ceil((min(n, s + rows) - s) / chunk)
        per_chunk = 2 * chunk * width * d1 + 2 * chunk * chunk * (width + d1) + 2 * chunk * width * d1
        total += nc * per_chunk + 2 * (nc + 1) * nc * width * d1
    return groups * total
