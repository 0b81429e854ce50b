"""Performer (Choromanski et al. 2021): FAVOR+ positive orthogonal random features for the softmax kernel."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._decode import grouped
from ._prefix import block_rows, causal_attention, kernel_flops, ones_column, read_state, tracks_grad
from .base import KV_HEADS, Fidelity, Knob, causal_mask, ratio_per_4x, register, repeat_kv

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
    Gaussian matrices, rows rescaled by χ_D norms; m = `features`. The stabiliser c, as in
    performer-pytorch (detached, a constant for autograd): for a query the max over its own m
    projections ω q'; for keys one max over all positions and features of the (batch, head).
    Then out_i = φ(q_i)ᵀ S / φ(q_i)ᵀ z with S = Σ_j φ(k_j) v_jᵀ, z = Σ_j φ(k_j) over all j
    (bidirectional) or j <= i (causal, by chunks: masked C×C block inside, carried m×(D+1)
    state across). The 1/√m factor cancels between numerator and denominator and is left
    out of the forward. Features are drawn in __init__ from `seed` (each call with redraw=True).

    Causal caveat (shared with performer-pytorch): the key stabiliser c is a max over the whole
    sequence, so a later key can change an output only through c, i.e. through how much the
    1e-4 floor weighs against exp(ω k' − |k'|²/2 − c); it never enters the sums S, z of an
    earlier query.

    Cost: bidirectional 2·B·H·N·m·(2D + 2(D+1)) FLOPs (projections of q and k, then KᵀV and
    Q(KᵀV); the key max is tracked online while the key state is summed); causal projects the
    keys twice (once for their max) and adds 2·C·(m+D+1) per position for the C×C blocks.
    Memory O(B·H·(N·D + m·D)), features made block by block; no N×N or N×m tensor for the
    whole sequence.

    Grouped-query (``kv_heads`` = Hkv < H): query head h uses kv head h // (H/Hkv). Bidirectional,
    φ(K) and the key state are made once per kv head (one key max per (batch, kv head), the same
    as per query head since the G = H/Hkv heads of a group share K) and read by its G query heads.
    Causal, the key max is taken once per kv head, then K and V are repeated to H heads
    (:func:`repeat_kv`, memory still linear in N) for the chunked form.

    Decode (causal): the recurrent state (:class:`FavorState`): the exponential part of
    S = Σ φ(k) vᵀ and z = Σ φ(k) (m×(D+1)), Σ [v 1] (D+1) for the 1e-4 floor and the running key max M,
    constant in N. A step folds in the new key (M' = max(M, max_r a_r); sz ·= 2^(M − M') when M grows;
    sz += 2^(a − h − M') [v 1]ᵀ; vsum += [v 1]) and returns
    out = φ(q)ᵀ (sz + eps·1 vsumᵀ)[:, :D] / φ(q)ᵀ (sz + eps·1 vsumᵀ)[:, D], φ(q) with its own row max as in the
    forward. Per step 2·B·(H + Hkv)·m·D FLOPs of projections, 2·B·Hkv·m·(D+1) for the update and
    2·B·H·m·(D+1) for the read (plus B·Hkv·m·(D+1) when M grows), O(1) in N.
    The decode stabiliser is M over the keys seen so far (the prefix j <= i), while the causal forward
    and reference() use one max over all N keys of the sequence (performer-pytorch's choice, see the
    caveat above), which a streaming decode cannot know. A step therefore equals the causal forward over
    the prefix ending at its token, and equals the causal forward over the whole sequence at that row
    exactly when no later key has a larger max projection a (else it differs through the weight of
    the eps floor only). performer-pytorch has no decode form (its causal path is a prefix sum over the
    whole sequence, stabilised by that global key max); fast-transformers' recurrent attention keeps the
    same S, z per query head with no running stabiliser.
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
        return (x * x).sum(dim=-1, keepdim=True) * (0.5 * LOG2E / math.sqrt(self.head_dim))  # (G, L, 1)

    def _query_features(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """exp(ω q' − |q'|²/2 − max_r ω_r q') + eps, without 1/√m: (G, L, D) -> (G, L, m)."""
        a = torch.matmul(x, w.T.to(x.dtype))  # (G, L, m); the causal form runs fp16/bf16 in float32
        return self._exp(a, self._half_sq_norm2(x) + a.detach().amax(dim=-1, keepdim=True))

    def _key_features(self, x: torch.Tensor, w: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
        """exp(ω k' − |k'|²/2 − max over the (batch, head)) + eps, without 1/√m: (G, L, D) -> (G, L, m)."""
        a = torch.matmul(x, w.T.to(x.dtype))  # (G, L, m)
        return self._exp(a, self._half_sq_norm2(x) + kmax.to(x.dtype))

    @staticmethod
    def _exp(a: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """2^(a − shift) + eps, in place on the fresh block ``a`` (the last step out of place under
        autograd, whose backward of exp2 reads its result)."""
        f = a.sub_(shift).exp2_()  # (G, L, m)
        return f.add_(FEATURE_EPS) if not f.requires_grad else f + FEATURE_EPS

    def _key_max(self, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """max of w k over positions and features per (batch, head), block by block: (G, N, D) -> (G, 1, 1)."""
        g, n, _ = k.shape
        rows = block_rows(n, g, self.features)
        out = None
        with torch.no_grad():  # a stabiliser, constant for autograd (as in performer-pytorch)
            for s in range(0, n, rows):
                part = torch.matmul(k[:, s:s + rows], w.T).amax(dim=(1, 2), keepdim=True)  # (G, 1, 1)
                out = part if out is None else torch.maximum(out, part)
        return out

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
        Σ_j [v_j 1]ᵀ (G, 1, D+1) and M, the max of a over all positions and features (G, 1, 1)."""
        g, n, _ = k.shape
        rows = block_rows(n, g, self.features)
        total = run_max = v_sum = None
        for s in range(0, n, rows):
            x = k[:, s:s + rows]  # (G, L, D)
            a = torch.matmul(x, w.T)  # (G, L, m)
            new_max = a.detach().amax(dim=(1, 2), keepdim=True)  # (G, 1, 1)
            if run_max is not None:
                new_max = torch.maximum(run_max, new_max)
            ft = a.sub_(self._half_sq_norm2(x) + new_max).exp2_().transpose(1, 2)  # (G, m, L), no eps yet
            v1 = ones_column(v[:, s:s + rows])  # (G, L, D+1)
            if total is None:
                total, v_sum = torch.bmm(ft, v1), v1.sum(dim=1, keepdim=True)  # (G, m, D+1), (G, 1, D+1)
            else:
                total = torch.baddbmm(total * torch.exp2(run_max - new_max), ft, v1)  # (G, m, D+1)
                v_sum = v_sum + v1.sum(dim=1, keepdim=True)
            run_max = new_max
        return total, v_sum, run_max  # (G, m, D+1), (G, 1, D+1), (G, 1, 1)

    # -- attention -------------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.redraw:
            self.omega = self._draw().to(device=self.omega.device, dtype=self.omega.dtype)
        b, h, n, d = q.shape
        hkv = k.shape[1]
        w = self._base2_projection()  # (m, D)
        if self.causal:
            kmax = self._key_max(k.reshape(b * hkv, n, d), w)  # (B·Hkv, 1, 1), once per kv head
            if hkv != h:
                kmax = kmax.view(b, hkv, 1, 1, 1).expand(b, hkv, h // hkv, 1, 1).reshape(b * h, 1, 1)  # (B·H, 1, 1)
            q3, k3, v3 = (t.reshape(b * h, n, d) for t in (q, repeat_kv(k, h), repeat_kv(v, h)))  # (B·H, N, D)
            out = causal_attention(q3, k3, v3, feature_q=lambda x: self._query_features(x, w),
                                   feature_k=lambda x: self._key_features(x, w, kmax), width=self.features,
                                   chunk=self.chunk, eps=0.0)  # (B·H, N, D)
        else:
            # the key state once per kv head; its G = H/Hkv query heads are read as G·N rows of that group
            state = self._key_state(k.reshape(b * hkv, n, d), v.reshape(b * hkv, n, d), w)  # (B·Hkv, m, D+1)
            out = read_state(q.reshape(b * hkv, (h // hkv) * n, d), state,
                             feature_q=lambda x: self._query_features(x, w), width=self.features,
                             eps=0.0, grad=tracks_grad(q, k, v))  # (B·Hkv, G·N, D)
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
        """The quadratic way with the same features and stabilisers: A = φ(Q)φ(K)ᵀ (masked), out = A V / A 1."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # (B, H, N, D)
        fq, fk = self.feature_maps(q, k)
        a = torch.matmul(fq, fk.transpose(-1, -2))  # (B, H, N, N)
        if self.causal:
            a = a.masked_fill(~causal_mask(q.shape[-2], q.device), 0.0)
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
        if bool((new_max > state.kmax).any()):  # the stabiliser grew: rescale the exponential part to it
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
        if causal:  # key max per kv head, then q and the repeated k projected per query head inside the chunks
            return (kv + 2 * heads) * batch * per_row + kernel_flops(
                groups=batch * heads, n=n, head_dim=head_dim, width=features, causal=True, chunk=chunk)
        # key projections and state per kv head, query projections and reads per query head
        return (kv + heads) * batch * per_row + 2 * batch * (heads + kv) * n * features * (head_dim + 1)
