"""Performer (Choromanski et al. 2021): FAVOR+ positive orthogonal random features for the softmax kernel."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._decode import grouped
from ._prefix import block_rows, blocks, normalise, ones_column, read_state, tracks_grad
from .base import (
    KV_HEADS,
    Fidelity,
    Knob,
    causal_mask,
    ratio_per_4x,
    register,
    repeat_kv,
)

FEATURE_EPS = 1e-4  # added to every feature after the exponential (performer-pytorch's default)
LOG2E = 1.0 / math.log(2.0)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """ω (m, D): stacked blocks of D orthonormal rows (QR of a Gaussian matrix, signs fixed so the
    block is Haar-distributed), each row rescaled to the norm of an independent N(0, I_D) vector (χ_D)."""
    blocks = []
    for _ in range(math.ceil(m / d)):
        gauss = torch.randn(d, d, generator=generator, dtype=torch.float64)  # (D, D)
        qmat, rmat = torch.linalg.qr(gauss)  # (D, D), (D, D)
        qmat = qmat * torch.sign(torch.diagonal(rmat))  # columns orthonormal, Haar
        blocks.append(qmat.T)  # rows orthonormal
    rows = torch.cat(blocks, dim=0)[:m]  # (m, D)
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1)  # (m,) ~ χ_D
    return rows * norms[:, None]  # (m, D)


def chunk_group(chunks: int) -> int:
    """t, the chunks per group of the causal form's two-level prefix for blocks of ``chunks`` chunks:
    ⌈(2·nc)^⅓⌉, which minimises the prefix products 2·(t + 1 + (nc/t + 1)/t)·m·(D+1)/C per position."""
    return max(1, math.ceil((2 * chunks) ** (1 / 3) - 1e-9))


def causal_row_elements(m: int, head_dim: int, chunk: int) -> int:
    """Live temporaries of one row of the causal form, in elements per group: φ(q) and g (2m), [v 1], its
    weighted copy and the [num | den] product (3(D+1)), the masked prefix max, the decay, the C×C scores and
    their product (4C), the chunk states and their exclusive prefixes (m·(D+1) per chunk of C rows each; the
    group totals and prefixes are 1/t of that and are freed, or not yet made, while the read's temporaries
    live), and a few per-row scalars (8: prefix maxima, stabilisers, the floor, the factors)."""
    return 2 * m + 3 * (head_dim + 1) + 4 * chunk + math.ceil(2 * m * (head_dim + 1) / chunk) + 8


def causal_blocks(n: int, groups: int, head_dim: int, m: int, chunk: int, device: torch.device | str,
                  itemsize: int) -> tuple[int, int]:
    """(rows per block, t chunks per group) of the causal form: rows = the budget over
    G·:func:`causal_row_elements`·itemsize bytes, a multiple of t·C (one block: the sequence, padded to t·C)."""
    c = chunk
    rows = block_rows(n, groups * causal_row_elements(m, head_dim, c) * itemsize, device, c,
                      elements=groups * max(m, c))
    t = chunk_group(rows // c)
    if rows < n:  # whole groups in every full block
        rows = max(1, rows // (t * c)) * t * c
    return rows, t


def causal_flops(n: int, head_dim: int, m: int, chunk: int, groups: int, device: torch.device | str = "cpu",
                 itemsize: int = 4) -> int:
    """Products of the causal form over its blocks after the projections (what FlopCounterMode counts); the
    blocks are those of ``device`` and ``itemsize`` (the prefix products and the padding depend on them)."""
    c, d1 = chunk, head_dim + 1
    wide = m * d1
    rows, t = causal_blocks(n, groups, head_dim, m, c, device, itemsize)
    total = 0
    for s in range(0, n, rows):
        sg = -(-min(rows, n - s) // (t * c))
        nc = sg * t
        total += nc * (4 * c * wide + 2 * c * c * (m + d1))  # chunk states, read of S_<c, the C×C block
        total += sg * 2 * (t + 1) * t * wide + 2 * (sg + 1) * sg * wide  # the two levels of the prefix
    return groups * total


class FavorState:
    """The Performer's recurrent decode state, tensors allocated by ``decode_init`` and updated in place.

    Keys enter as φ(k) = 2^(a − h − M) + eps with a = log2 e · ω k', h = log2 e · |k'|²/2 and M the running
    key stabiliser; the eps floor does not scale with M, so it is kept apart and added at read time:

    - sz: (B, Hkv, m, D+1), Σ_j 2^(a_j − h_j − M) [v_j 1]ᵀ (the exponential part of [S | z], no 1/√m);
    - vsum: (B, Hkv, 1, D+1), Σ_j [v_j 1]ᵀ (the eps floor: S, z = sz + eps·vsum on every feature row);
    - kmax: (B, Hkv, 1, 1), M = max of a over the positions summed and all m features.

    When a new key raises M, sz is rescaled by 2^(M_old − M_new) (as an online softmax does), so sz is always
    the sum taken with the current M. Bytes: B·Hkv·(m·(D+1) + (D+1) + 1)·itemsize, whatever the length.
    """

    def __init__(self, sz: torch.Tensor, vsum: torch.Tensor, kmax: torch.Tensor, length: int):
        self.sz = sz  # (B, Hkv, m, D+1)
        self.vsum = vsum  # (B, Hkv, 1, D+1)
        self.kmax = kmax  # (B, Hkv, 1, 1)
        self.length = length


@register(name="performer", family="kernel", complexity="O(N·m·D)", memory="O(N·D + m·D)",
          knobs=[Knob("features", default=256, axis="features", minimum=1, small=48,
                      help="m, the number of random features"),
                 Knob("chunk", default=64, minimum=1,
                      help="causal only: positions per chunk (masked C×C block inside, carried m×D state across)"),
                 Knob("redraw", default=False, type=bool,
                      help="draw fresh features on every call (from a generator seeded by `seed`)"),
                 KV_HEADS])
class PerformerAttention(nn.Module):
    """Performer (FAVOR+): softmax attention estimated with positive orthogonal random features.

    φ(x) = (exp(ω x' − |x'|²/2 − c) + 1e-4)/√m with x' = x·D^-¼, so that φ(q')ᵀφ(k') estimates
    exp(q·k/√D) up to the stabilisers; ω (m×D) is stacked orthogonal blocks from the QR of
    Gaussian matrices, rows rescaled by χ_D norms; m = `features`. The stabilisers c are detached
    (constants for autograd). A query's c is the max over its own m projections ω q' (as in
    performer-pytorch). A key's c:

    - bidirectional: one max M over all positions and features of the (batch, head), as in
      performer-pytorch; out_i = φ(q_i)ᵀ S / φ(q_i)ᵀ z, S = Σ_j φ(k_j) v_jᵀ, z = Σ_j φ(k_j) over all j;
    - causal: the prefix max M_i = max_{j<=i} max_r ω_r k'_j of row i, so row i weighs key j <= i by
      φ(q_i)ᵀ φ_i(k_j), φ_i(k_j) = (exp(ω k'_j − |k'_j|²/2 − M_i) + 1e-4)/√m, and
      out_i = Σ_{j<=i} φ(q_i)ᵀφ_i(k_j) v_j / Σ_{j<=i} φ(q_i)ᵀφ_i(k_j).

    The 1/√m factor cancels between numerator and denominator and is left out of the forward.
    Features are drawn in __init__ from `seed` (each call with redraw=True).

    Why a prefix max (how this differs from performer-pytorch): because of the 1e-4 floor the key
    stabiliser does not cancel, it sets how much the floor weighs against exp(ω k' − |k'|²/2).
    performer-pytorch's causal path uses the bidirectional global key max, so a later key changes
    earlier outputs through it (a causal leak), and no streaming decoder can reproduce it. M_i depends
    on keys j <= i only: it is exactly the running max the decode form keeps.

    Causal forward, by chunks of C positions (base 2: a_j = log2 e · ω k'_j, h_j = log2 e · |k'_j|²/2,
    M_j the prefix max of a in base 2): φ_i(k_j)·√m = 2^(a_j − h_j − M_j)·2^(M_j − M_i) + eps, so

    - each key gets g_j = 2^(a_j − h_j − M_j) once, with its own prefix max;
    - inside a chunk: tril(φ(Q_c) G_cᵀ ⊙ 2^(M_j − M_i) + eps·Σ_r φ(q_i)_r) [V_c 1] (the C×C decay
      2^(M_j − M_i) is masked to 0 above the diagonal before the exponential);
    - across chunks: a carried exponential state P = Σ_{j<s} 2^(a_j − h_j − M_{s−1}) [v_j 1]ᵀ (m×(D+1)),
      relative to the max before the chunk (start s), read as 2^(M_{s−1} − M_i)·φ(q_i)ᵀP, plus the floor
      eps·Σ_r φ(q_i)_r·Σ_{j<s} [v_j 1] (as decode keeps it apart);
    - chunk states U_c = Σ_{j∈c} g_j 2^(M_j − M̂_c) [v_j 1]ᵀ relative to the chunk's last max M̂_c; the
      exclusive prefixes S_<c of a block's nc chunks in two levels, every weight 2^(earlier max − later
      max) <= 1 (a plain cumulative sum would need factors 2^(+…) once the max jumps inside a block):
      the chunks go in groups of t = ⌈(2·nc)^⅓⌉; inside a group one product with the (t+1)×t weights
      2^(M̂_c − M̂_{c'−1}) (c < c') gives each chunk's prefix within its group and the group's total;
      across the S = nc/t groups one product with the (S+1)×S weights of the groups' last maxima Ĝ
      gives each group's prefix, to which the state carried from earlier blocks is added, rescaled by
      2^(M_old − M_new) (as an online softmax does); S_<c = its group prefix·2^(Ĝ_{σ−1} − M̂_{c−1}) + its
      prefix within the group. Σ[v 1] has no stabiliser: its prefixes are one cumulative sum.

    No exponent is ever above 0: each is a projection minus a max that covers it (a_jr − h_j − M_j,
    the query's own) or an earlier prefix max minus a later one. So nothing can overflow, however
    large a key; every factor is <= 1, so a product underflows only where the direct weight
    2^(a_j − h_j − M_i) would underflow too, and the floor keeps every denominator > 0.

    Cost: bidirectional 2·B·H·N·m·(2D + 2(D+1)) FLOPs (projections of q and k, then KᵀV and
    Q(KᵀV); the key max is tracked online while the key state is summed). Causal: projections
    2·B·H·N·m·2D (q and the repeated k, once each), per position 2·m·(D+1) (chunk state),
    2·C·(m + D+1) (C×C block) and 2·m·(D+1) (read of the carried state), and per block of S groups of
    t chunks 2·S·(t+1)·t·m·(D+1) + 2·(S+1)·S·m·(D+1) for the two levels of the prefix: about
    2·(t + 1 + S/t)·m·(D+1)/C per position, 3–8% of the rest at C = 64 (nc from 16 to 600). Not products,
    so not counted: C exponentials (the decay) and 2C comparisons (the prefix max) per position, and the
    cumulative sums of Σ[v 1] (2·(D+1)/C per position). :func:`causal_flops` counts the products of the
    blocks of a given device (the prefix and the padding of the last block to whole groups depend on it;
    ``analytic_flops`` takes the CPU's, float32).

    Blocks (sized by the byte budget of mechanisms/_budget.py: the key pass and the read are streaming passes,
    16 MiB on the CPU, the causal form 64 MiB, 1 GiB on CUDA; G = B·H, B·Hkv for the key pass): a row of the
    key pass costs G·(m + D + 4) elements of live temporaries (the m features, [v 1], three scalars), of the
    read G·(m + D + 4) (the m features and two scalars, [num | den], den), causal
    G·:func:`causal_row_elements` (2m + 3(D+1) + 4C + ⌈2m(D+1)/C⌉ + 8); causal blocks are whole groups of t
    chunks. Memory O(B·H·N·D) + the budget; no N×N tensor, no N×m tensor for the whole sequence.

    Grouped-query (``kv_heads`` = Hkv < H): query head h uses kv head h // (H/Hkv). Bidirectional,
    φ(K) and the key state are made once per kv head (one key max per (batch, kv head), the same
    as per query head since the G = H/Hkv heads of a group share K) and read by its G query heads.
    Causal, K and V are repeated to H heads (:func:`repeat_kv`, memory still linear in N) for the
    chunked form; the prefix max depends on K only, so it is the same for the G heads of a group.

    Decode (causal): the recurrent state (:class:`FavorState`): the exponential part of
    S = Σ φ(k) vᵀ and z = Σ φ(k) (m×(D+1)), Σ [v 1] (D+1) for the 1e-4 floor and the running key max M,
    constant in N. A step folds in the new key (M' = max(M, max_r a_r); sz ·= 2^(M − M') when M grows;
    sz += 2^(a − h − M') [v 1]ᵀ; vsum += [v 1]) and returns
    out = φ(q)ᵀ (sz + eps·1 vsumᵀ)[:, :D] / φ(q)ᵀ (sz + eps·1 vsumᵀ)[:, D], φ(q) with its own row max as in the
    forward. Per step 2·B·(H + Hkv)·m·D FLOPs of projections, 2·B·Hkv·m·(D+1) for the update and
    2·B·H·m·(D+1) for the read (plus B·Hkv·m·(D+1) when M grows), O(1) in N.
    The running max after token i is the causal forward's prefix max M_i, so a step equals the causal
    forward (and reference()) at its row, whatever the later keys. performer-pytorch has no decode form;
    fast-transformers' recurrent attention keeps the same S, z per query head with no running stabiliser.
    """

    decode_form = ("recurrent state S = Σφ(k)vᵀ (m×D) and z = Σφ(k) (m), with Σ[v 1] for the eps floor and a "
                   "running key max: B·kv_heads·(m·(D+1) + D+2), constant in N")

    fidelity = (Fidelity("features", (16, 64, 256, 1024), (ratio_per_4x(0.35, 0.65),),
                         why="a Monte-Carlo estimate: error ∝ 1/√m, so ×4 features halve it"),)

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, features: int = 256,
                 chunk: int = 64, redraw: bool = False, kv_heads: int = 0):
        super().__init__()
        self.causal = causal
        self.heads = heads
        self.kv_heads = kv_heads or heads
        self.features = int(features)
        self.chunk = int(chunk)
        self.redraw = bool(redraw)
        self.head_dim = head_dim
        self.generator = torch.Generator(device="cpu").manual_seed(seed)  # advanced only by redraw
        self.register_buffer("omega", self._draw())  # (m, D)

    def _draw(self) -> torch.Tensor:
        return orthogonal_gaussian(self.features, self.head_dim, self.generator).to(torch.get_default_dtype())

    # -- features, block by block, in base 2 ------------------------------------------------------
    # exp(t) = 2^(t·log2 e): torch's exp2 is several times faster than exp on the CPU, so log2 e is
    # folded into the projection (w = ω·D^-¼·log2 e) and into |x'|²/2; a = w x = log2 e · ω x'.

    def _base2_projection(self) -> torch.Tensor:
        return self.omega * (self.head_dim ** -0.25 * LOG2E)  # (m, D)

    def _half_sq_norm2(self, x: torch.Tensor) -> torch.Tensor:
        return (x * x).sum(dim=-1, keepdim=True).mul_(0.5 * LOG2E / math.sqrt(self.head_dim))  # (..., L, 1)

    def _query_features(self, x: torch.Tensor, w: torch.Tensor, wt: torch.Tensor | None = None) -> torch.Tensor:
        """exp(ω q' − |q'|²/2 − max_r ω_r q') + eps, without 1/√m: (..., L, D) -> (..., L, m), by one bmm with
        ``wt`` = wᵀ expanded to (G, D, m) when given (x (G, L, D)). Live at once per row: the m features and
        two scalars."""
        shift = self._half_sq_norm2(x)  # (..., L, 1), before the m-wide block exists
        a = torch.matmul(x, w.T.to(x.dtype)) if wt is None else torch.bmm(x, wt)  # (..., L, m)
        with torch.no_grad():  # a stabiliser, constant for autograd
            top = a.amax(dim=-1, keepdim=True)  # (..., L, 1)
        return self._exp(a, shift.add_(top))

    @staticmethod
    def _exp(a: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """2^(a − shift) + eps, in place on the fresh block ``a`` (the last step out of place under
        autograd, whose backward of exp2 reads its result)."""
        f = a.sub_(shift).exp2_() if not a.requires_grad else torch.exp2(a - shift)  # (G, L, m)
        return f.add_(FEATURE_EPS) if not f.requires_grad else f + FEATURE_EPS

    @staticmethod
    def _exp2(a: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """2^(a − shift), in place on the fresh block ``a`` (out of place under autograd)."""
        return a.sub_(shift).exp2_() if not a.requires_grad else torch.exp2(a - shift)

    def _prefix_key_features(self, x: torch.Tensor, wt: torch.Tensor, run_max: torch.Tensor | None, chunks: int,
                             lower: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys with their own prefix max: x (G, L, D), wt (G, D, m) -> g = 2^(a − h − M_j) (G, L, m), no eps, and
        M_j (G, nc·C), the padded rows repeating the last M.

        M_j = max of max_r a_tr over this block's rows t <= j and the max carried from earlier blocks
        (``run_max`` (G, 1), None: none): a masked max inside each chunk (``lower`` (C, C), j <= i), then over
        the chunk ends of the earlier chunks ((nc, nc), c' < c). Not torch.cummax: effbench's FLOP counter
        takes any op whose name contains "mm" for an uncounted product. a_jr <= M_j and h_j >= 0, so every
        exponent is <= 0."""
        g, length, _ = x.shape
        c = lower.shape[0]
        shift = self._half_sq_norm2(x)  # (G, L, 1)
        a = torch.bmm(x, wt)  # (G, L, m)
        with torch.no_grad():  # a stabiliser, constant for autograd
            top = F.pad(a.amax(dim=-1), (0, chunks * c - length), value=-math.inf).view(g, chunks, 1, c)  # (G, nc, 1, C)
            within = torch.where(lower, top, -math.inf).amax(dim=-1)  # (G, nc, C): max over j <= i in the chunk
            ends = within.select(2, c - 1)  # (G, nc)
            earlier = torch.ones(chunks, chunks, dtype=torch.bool, device=x.device).tril_(-1)  # (nc, nc): c' < c
            earlier = torch.where(earlier, ends.unsqueeze(1), -math.inf).amax(dim=-1)  # (G, nc)
            if run_max is not None:
                earlier = torch.maximum(earlier, run_max)  # (G, nc), run_max (G, 1)
            pmax = torch.maximum(within, earlier.unsqueeze(-1)).view(g, chunks * c)  # (G, nc·C): M_j
        lead = pmax.narrow(1, 0, length) if chunks * c > length else pmax  # (G, L)
        return self._exp2(a, shift.add_(lead.unsqueeze(-1))), pmax  # (G, L, m), (G, nc·C)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Causal FAVOR+ with the prefix-max key stabiliser, by chunks (the class docstring's scheme):
        (G, N, D) each -> (G, N, D). fp16/bf16 run in float32 (as performer-pytorch's causal form does)."""
        if q.dtype in LOW_PRECISION:
            return self._causal(q.float(), k.float(), v.float(), w).to(q.dtype)
        g, n, d = q.shape
        m, c, d1 = self.features, self.chunk, d + 1
        wide = m * d1
        w = w.to(q.dtype)  # (m, D)
        wt = w.T.expand(g, d, m)  # (G, D, m)
        rows, t = causal_blocks(n, g, d, m, c, q.device, q.dtype.itemsize)
        lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril_()  # (C, C): j <= i in a chunk
        above = ~lower  # (C, C): j > i
        later = torch.ones(t, t, dtype=torch.bool, device=q.device).triu_(1)  # (t, t): τ > r
        state = vstate = run_max = None  # (G, 1, m·(D+1)) relative to run_max, (G, 1, D+1), (G, 1)
        grad = tracks_grad(q, k, v)
        out = None if grad else q.new_empty(g, n, d)
        parts = []
        for _, qb, kb, vb, ob in blocks(rows, q, k, v, out):
            length = qb.shape[1]
            sg = -(-length // (t * c))  # S groups of t chunks
            nc = sg * t
            pad = nc * c - length
            fq = self._query_features(qb, w, wt)  # (G, L, m), eps included
            fk, pm = self._prefix_key_features(kb, wt, run_max, nc, lower)  # (G, L, m), (G, nc·C)
            v1 = ones_column(vb)  # (G, L, D+1)
            if pad:  # zero features and values: padded keys add nothing, padded queries are dropped
                fq, fk, v1 = (F.pad(x, (0, 0, 0, pad)) for x in (fq, fk, v1))
            fq = fq.view(g * nc, c, m)  # (G·nc, C, m)
            fkt = fk.view(g * nc, c, m).transpose(1, 2)  # (G·nc, m, C)
            v1 = v1.view(g * nc, c, d1)  # (G·nc, C, D+1)
            pm = pm.view(g, nc, c)  # (G, nc, C): M_j
            end = pm.select(2, c - 1)  # (G, nc): M̂_c, the max at each chunk's end
            first = run_max if run_max is not None else pm.select(2, 0).narrow(1, 0, 1)  # (G, 1)
            start = torch.cat([first, end.narrow(1, 0, nc - 1)], dim=1)  # (G, nc): the max before chunk c
            # chunk states relative to M̂_c: U_c = Σ_j g_j 2^(M_j − M̂_c) [v_j 1]ᵀ (the per-key weight goes on [v 1])
            to_end = torch.exp2(pm - end.unsqueeze(-1)).view(g * nc, c, 1)  # (G·nc, C, 1), <= 1
            chunks = torch.bmm(fkt, v1 * to_end).view(g * sg, t, wide)  # (G·S, t, m·(D+1))
            # level 1, inside each group of t chunks: incl[r, τ] = 2^(M̂_τ − M̂_r), τ <= r; shifted down one row it
            # weighs the exclusive prefix of chunk r (relative to M̂_{r−1}), its last row the group's total
            ends = end.view(g * sg, t)  # (G·S, t)
            incl = (ends.unsqueeze(1) - ends.unsqueeze(2)).masked_fill_(later, -math.inf).exp2_()  # (G·S, t, t)
            weights = F.pad(incl, (0, 0, 1, 0))  # (G·S, t+1, t), <= 1
            before = torch.bmm(weights.narrow(1, 0, t), chunks)  # (G·S, t, m·(D+1)): relative to start_c
            totals = torch.bmm(weights.narrow(1, t, 1), chunks).view(g, sg, wide)  # (G, S, m·(D+1)): to Ĝ_σ
            del chunks
            # level 2, across the groups: the exclusive prefix of group σ relative to Ĝ_{σ−1} (row S: the block's
            # total, relative to its last max), plus the state of earlier blocks rescaled to Ĝ_{σ−1}
            gend = ends.select(1, t - 1).view(g, sg)  # (G, S): Ĝ_σ, each group's last max
            glater = torch.ones(sg, sg, dtype=torch.bool, device=q.device).triu_(1)  # (S, S): σ > r
            gincl = (gend.unsqueeze(1) - gend.unsqueeze(2)).masked_fill_(glater, -math.inf)  # (G, S, S)
            gprefix = torch.bmm(F.pad(gincl.exp2_(), (0, 0, 1, 0)), totals)  # (G, S+1, m·(D+1))
            gstart = torch.cat([first, gend], dim=1)  # (G, S+1): Ĝ_{σ−1}, row 0 the max before the block
            if state is not None:
                gprefix = gprefix.addcmul_(state, torch.exp2(run_max - gstart).unsqueeze(-1))  # (G, S+1, m·(D+1))
            # chunk c of group σ: S_<c = level 1 + the group's prefix, from Ĝ_{σ−1} to start_c: 2^(Ĝ_{σ−1} − start_c)
            lift = torch.exp2(gstart.narrow(1, 0, sg).unsqueeze(-1) - start.view(g, sg, t))  # (G, S, t), <= 1
            before = before.view(g, sg, t, wide).addcmul_(gprefix.narrow(1, 0, sg).unsqueeze(2),
                                                          lift.unsqueeze(-1))  # (G, S, t, m·(D+1))
            vchunks = v1.view(g, nc, c, d1).sum(dim=2)  # (G, nc, D+1): Σ_{j∈c} [v_j 1]
            vbefore = vchunks.cumsum(dim=1).sub_(vchunks)  # (G, nc, D+1): Σ_{j<c in the block} [v_j 1]
            vtotal = vchunks.sum(dim=1, keepdim=True)  # (G, 1, D+1)
            if vstate is not None:
                vbefore, vtotal = vbefore.add_(vstate), vtotal.add_(vstate)
            state, vstate, run_max = gprefix.narrow(1, sg, 1), vtotal, gstart.narrow(1, sg, 1)  # the block's totals
            # inside a chunk: (φ(q_i)·g_j) 2^(M_j − M_i) + eps·Σφ(q_i), j <= i
            decay = (pm.view(g * nc, 1, c) - pm.view(g * nc, c, 1)).masked_fill_(above, -math.inf)  # (G·nc, C, C)
            floor = fq.sum(dim=-1, keepdim=True).mul_(FEATURE_EPS)  # (G·nc, C, 1): eps·Σ_r φ(q_i)_r
            scores = torch.addcmul(floor, torch.bmm(fq, fkt), decay.exp2_()).tril_()  # (G·nc, C, C)
            # the state before the chunk, from start_c to M_i: 2^(start_c − M_i) <= 1
            to_row = torch.exp2(start.unsqueeze(-1) - pm).view(g * nc, c, 1)  # (G·nc, C, 1)
            nd = torch.bmm(fq, before.view(g * nc, m, d1)).mul_(to_row)  # (G·nc, C, D+1)
            nd = torch.baddbmm(nd, scores, v1).addcmul_(floor, vbefore.view(g * nc, 1, d1))  # (G·nc, C, D+1)
            nd = nd.view(g, nc * c, d1)  # (G, nc·C, D+1)
            if pad:
                nd = nd.narrow(1, 0, length)  # (G, L, D+1)
            parts.append(normalise(nd, 0.0, ob))
            del fq, fk, fkt, v1, pm, to_end, before, totals, scores, decay, floor, to_row, nd  # before the next block's
        return torch.cat(parts, dim=1) if out is None else out

    def _key_state(self, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Σ_j φ(k_j)[v_j 1]ᵀ (without 1/√m) in one pass over key blocks: (G, N, D) -> (G, m, D+1).

        The global key max is not known in advance, so blocks are accumulated against the
        running max M and the sum is rescaled by 2^(M_old − M_new) when M grows (as an online
        softmax does); the eps floor adds eps·Σ_j [v_j 1] to every feature row at the end.
        The result equals the sum taken with the global max of the reference.
        """
        total, v_sum, _ = self._key_sums(k, v, w)
        return total + FEATURE_EPS * v_sum  # (G, m, D+1)

    def _key_sums(self, k: torch.Tensor, v: torch.Tensor,
                  w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The parts of :meth:`_key_state`, (G, N, D) -> Σ_j 2^(a_j − h_j − M)[v_j 1]ᵀ (G, m, D+1),
        Σ_j [v_j 1]ᵀ (G, 1, D+1) and M, the max of a over all positions and features (G, 1, 1).

        One row of a block costs G·(m + D+4) elements of live temporaries: the m features, [v 1] and three
        scalars (h, the shift, the stabiliser)."""
        g, n, d = k.shape
        m = self.features
        rows = block_rows(n, g * (m + d + 4) * k.dtype.itemsize, k.device, elements=g * m, streaming=True)
        wt = w.T.expand(g, d, m)  # (G, D, m)
        total = run_max = None
        for _, x, vb in blocks(rows, k, v):  # x (G, L, D)
            shift = self._half_sq_norm2(x)  # (G, L, 1)
            a = torch.bmm(x, wt)  # (G, L, m)
            with torch.no_grad():  # a stabiliser, constant for autograd
                new_max = a.amax(dim=(1, 2), keepdim=True)  # (G, 1, 1)
                if run_max is not None:
                    new_max = torch.maximum(run_max, new_max)
            ft = self._exp2(a, shift.add_(new_max)).transpose(1, 2)  # (G, m, L), no eps yet
            v1 = ones_column(vb)  # (G, L, D+1)
            if total is None:
                total = torch.bmm(ft, v1)  # (G, m, D+1)
            else:
                total = torch.baddbmm(total.mul_(torch.exp2(run_max - new_max)), ft, v1)  # (G, m, D+1)
            run_max = new_max
            del a, ft, v1  # before the next block's are made
        v_sum = F.pad(v.sum(dim=1, keepdim=True), (0, 1), value=float(n))  # (G, 1, D+1): Σ_j [v_j 1]
        return total, v_sum, run_max  # (G, m, D+1), (G, 1, D+1), (G, 1, 1)

    # -- attention -------------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.redraw:
            self.omega = self._draw().to(device=self.omega.device, dtype=self.omega.dtype)
        b, h, n, d = q.shape
        hkv = k.shape[1]
        w = self._base2_projection()  # (m, D)
        if self.causal:  # K, V repeated to the H heads; the prefix key max is the same within a group
            q3, k3, v3 = (t.reshape(b * h, n, d) for t in (q, repeat_kv(k, h), repeat_kv(v, h)))  # (B·H, N, D)
            out = self._causal(q3, k3, v3, w)  # (B·H, N, D)
        else:
            # the key state once per kv head, read by its G = H/Hkv query heads
            state = self._key_state(k.reshape(b * hkv, n, d), v.reshape(b * hkv, n, d), w)  # (B·Hkv, m, D+1)
            wt = w.T.expand(b * h, d, self.features)  # (B·H, D, m)
            out = read_state(q.reshape(b * h, n, d), state, feature_q=lambda x, s: self._query_features(x, w, wt),
                             feature_floats=self.features + 2, eps=0.0, grad=tracks_grad(q, k, v))  # (B·H, N, D)
        return out.view(b, h, n, d)  # (B, H, N, D)

    def feature_maps(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """φ(Q), φ(K) for the whole sequence, natural exp and the 1/√m factor: (B, H, N, D) -> (B, H, N, m) each."""
        w = self.omega * self.head_dim ** -0.25  # (m, D): ω x' = (ω D^-¼) x
        aq = torch.matmul(q, w.T)  # (B, H, N, m)
        ak = torch.matmul(k, w.T)  # (B, H, N, m)
        qmax = aq.detach().amax(dim=-1, keepdim=True)  # (B, H, N, 1)
        kmax = ak.detach().amax(dim=(-2, -1), keepdim=True)  # (B, H, 1, 1)
        half = 0.5 / math.sqrt(self.head_dim)
        fq = torch.exp(aq - half * (q * q).sum(-1, keepdim=True) - qmax) + FEATURE_EPS  # (B, H, N, m)
        fk = torch.exp(ak - half * (k * k).sum(-1, keepdim=True) - kmax) + FEATURE_EPS  # (B, H, N, m)
        ratio = self.features ** -0.5
        return ratio * fq, ratio * fk

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The quadratic way with the same features and stabilisers: A = φ(Q)φ(K)ᵀ, out = A V / A 1.

        Causal, A_ij = φ(q_i)ᵀφ_i(k_j) for j <= i with φ_i using row i's prefix max M_i, written
        φ_i(k_j) = (exp(ω k'_j − |k'_j|²/2 − M_j)·exp(M_j − M_i) + eps)/√m: no exponent is above 0."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # (B, H, N, D)
        if not self.causal:
            fq, fk = self.feature_maps(q, k)  # (B, H, N, m) each
            a = torch.matmul(fq, fk.transpose(-1, -2))  # (B, H, N, N)
            return torch.matmul(a, v) / a.sum(dim=-1, keepdim=True)  # (B, H, N, D)
        n = q.shape[-2]
        w = self.omega * self.head_dim ** -0.25  # (m, D): ω x' = (ω D^-¼) x
        aq = torch.matmul(q, w.T)  # (B, H, N, m)
        ak = torch.matmul(k, w.T)  # (B, H, N, m)
        half = 0.5 / math.sqrt(self.head_dim)
        ratio = self.features ** -0.5
        fq = ratio * (torch.exp(aq - half * (q * q).sum(-1, keepdim=True) - aq.detach().amax(-1, keepdim=True))
                      + FEATURE_EPS)  # (B, H, N, m)
        pmax = torch.cummax(ak.detach().amax(dim=-1), dim=-1).values  # (B, H, N): M_j = max_{t<=j} max_r ω_r k'_t
        gk = ratio * torch.exp(ak - half * (k * k).sum(-1, keepdim=True) - pmax[..., None])  # (B, H, N, m)
        visible = causal_mask(n, q.device)  # (N, N), j <= i
        decay = (pmax[..., None, :] - pmax[..., :, None]).masked_fill(~visible, -math.inf).exp()  # (B, H, N, N)
        floor = ratio * FEATURE_EPS * fq.sum(dim=-1, keepdim=True)  # (B, H, N, 1): φ(q_i)ᵀ (eps/√m)·1
        a = (torch.matmul(fq, gk.transpose(-1, -2)) * decay + floor).masked_fill(~visible, 0.0)  # (B, H, N, N)
        return torch.matmul(a, v) / a.sum(dim=-1, keepdim=True)  # (B, H, N, D)

    # -- decode ------------------------------------------------------------------------------
    def decode_init(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> FavorState:
        """The state after the context k, v (B, Hkv, N0, D); ``capacity`` does not matter (constant state).
        Decode uses the current ω, as reference() does, even with redraw=True (redraw acts on forward calls;
        the state is tied to one ω, so a generation keeps it)."""
        b, hkv, n0, d = k.shape
        m = self.features
        work = torch.float32 if k.dtype in LOW_PRECISION else k.dtype  # fp16/bf16 summed in float32, as causal
        if n0 == 0:
            return FavorState(k.new_zeros(b, hkv, m, d + 1, dtype=work), k.new_zeros(b, hkv, 1, d + 1, dtype=work),
                              k.new_full((b, hkv, 1, 1), float("-inf"), dtype=work), 0)
        w = self._base2_projection().to(work)  # (m, D)
        k3 = k.reshape(b * hkv, n0, d).to(work)  # (B·Hkv, N0, D)
        v3 = v.reshape(b * hkv, n0, d).to(work)  # (B·Hkv, N0, D)
        with torch.no_grad():
            sz, vsum, kmax = self._key_sums(k3, v3, w)  # (B·Hkv, m, D+1), (B·Hkv, 1, D+1), (B·Hkv, 1, 1)
        return FavorState(sz.view(b, hkv, m, d + 1), vsum.view(b, hkv, 1, d + 1), kmax.view(b, hkv, 1, 1), n0)

    def decode_step(self, state: FavorState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Fold k, v (B, Hkv, 1, D) into the state in place, then read it with q (B, H, 1, D) -> (B, H, 1, D)."""
        b, h, _, d = q.shape
        low, work = q.dtype, state.sz.dtype
        q, k, v = q.to(work), k.to(work), v.to(work)
        w = self._base2_projection().to(work)  # (m, D)
        a = torch.matmul(k, w.T)  # (B, Hkv, 1, m): log2 e · ω k'
        new_max = torch.maximum(state.kmax, a.amax(dim=-1, keepdim=True))  # (B, Hkv, 1, 1)
        # the stabiliser may have grown: rescale the exponential part to it (by 2⁰ = 1 where it did not; no branch on
        # the data, so the step runs on fake tensors too)
        state.sz.mul_(torch.exp2(state.kmax - new_max))  # (B, Hkv, m, D+1)
        state.kmax.copy_(new_max)
        fk = a.sub_(self._half_sq_norm2(k) + state.kmax).exp2_().transpose(-1, -2)  # (B, Hkv, m, 1), no eps
        v1 = ones_column(v)  # (B, Hkv, 1, D+1)
        state.sz.addcmul_(fk, v1)  # (B, Hkv, m, D+1) += 2^(a − h − M) [v 1]ᵀ
        state.vsum.add_(v1)  # (B, Hkv, 1, D+1)
        state.length += 1
        fq = self._query_features(grouped(q, state.sz.shape[1]), w)  # (B, Hkv, G, m), eps included
        nd = torch.matmul(fq, state.sz)  # (B, Hkv, G, D+1)
        nd.add_(fq.sum(dim=-1, keepdim=True) * state.vsum, alpha=FEATURE_EPS)  # the floor: eps·Σ_r φ(q)_r·Σ[v 1]
        out = nd[..., :-1] / nd[..., -1:]  # (B, Hkv, G, D)
        return out.reshape(b, h, 1, d).to(low)  # (B, H, 1, D)

    @classmethod
    def state_bytes(cls, *, batch: int, heads: int, kv_heads: int, head_dim: int, n: int, capacity: int,
                    itemsize: int, features: int = 256, chunk: int = 64, redraw: bool = False) -> int:
        """sz (m·(D+1)), vsum (D+1) and kmax (1) per (batch, kv head), float32 for fp16/bf16; whatever n."""
        per_group = features * (head_dim + 1) + (head_dim + 1) + 1
        return max(itemsize, 4) * batch * kv_heads * per_group

    @classmethod
    def analytic_flops(cls, *, batch: int, heads: int, n: int, head_dim: int, causal: bool, features: int = 256,
                       chunk: int = 64, redraw: bool = False, kv_heads: int = 0) -> int:
        kv = kv_heads or heads
        per_row = 2 * n * head_dim * features  # one projection of N rows onto the m features
        if causal:  # q and the repeated k projected once per query head, then the chunked products
            groups = batch * heads
            return 2 * groups * per_row + causal_flops(n, head_dim, features, chunk, groups)
        # key projections and state per kv head, query projections and reads per query head
        return (kv + heads) * batch * per_row + 2 * batch * (heads + kv) * n * features * (head_dim + 1)
