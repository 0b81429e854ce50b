"""cosFormer (Qin et al. 2022, "cosFormer: Rethinking Softmax in Attention"): ReLU features, cos re-weighting."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._decode import grouped
from ._prefix import (
    causal_attention,
    kernel_flops,
    key_state,
    ones_column,
    read_state,
    tracks_grad,
    work_dtype,
)
from .base import KV_HEADS, Fidelity, Knob, causal_mask, register, repeat_kv

EPS = 1e-6  # the paper's code: the denominator is clamped from below, max(Σ_j s_ij, 1e-6) (clamp_min, not + eps)


def trig_table(start: int, stop: int, m: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """[cos a_i, sin a_i] for positions i in [start, stop), a_i = π/2 · i/M: (L, 2, 1)."""
    a = torch.arange(start, stop, dtype=dtype, device=device) * (math.pi / (2 * m))  # (L,)
    return torch.stack((a.cos(), a.sin()), dim=-1).unsqueeze(-1)  # (L, 2, 1)


def cos_features(x: torch.Tensor, trig: torch.Tensor) -> torch.Tensor:
    """φ(x_i) = [ReLU(x_i) cos a_i, ReLU(x_i) sin a_i]: x (..., L, D), ``trig`` (L, 2, 1) -> (..., L, 2D), a fresh
    tensor (cos part in the first D features, sin part in the last D). With a_i ∈ [0, π/2) every feature is ≥ 0.
    cos, sin ≥ 0 there, so ReLU(x)·t = ReLU(x·t): the ReLU runs in place on the product (no D-wide temporary)."""
    return (x.unsqueeze(-2) * trig).relu_().flatten(-2)  # (..., L, 2, D) -> (..., L, 2D)


def normalise(nd: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """[numerator | denominator] (..., D+1) -> numerator / max(denominator, eps) (..., D), into ``out`` if given
    (cast to its dtype: fp16/bf16 outputs of a float32 computation)."""
    num, den = nd[..., :-1], nd[..., -1:].clamp_min(eps)
    if out is None:
        return num / den
    if out.dtype == num.dtype:
        return torch.div(num, den, out=out)
    return out.copy_(num / den)


class CosState:
    """[S | z] of the two terms over every position so far, one tensor allocated by ``decode_init``, updated in place.

    sz: (B, Hkv, 2D, D+1): rows 0..D−1 the cos term, S_cos = Σ_j ReLU(k_j) cos a_j v_jᵀ and (last column)
    z_cos = Σ_j ReLU(k_j) cos a_j, rows D..2D−1 the sin term S_sin, z_sin likewise; ``length`` positions are
    summed (the next token's position). Bytes: B·Hkv·2D·(D+1)·itemsize (float32 for fp16/bf16), whatever the length.
    """

    def __init__(self, sz: torch.Tensor, length: int):
        self.sz = sz  # (B, Hkv, 2D, D+1)
        self.length = length


@register(name="cosformer", family="kernel", complexity="O(N·D²)", memory="O(N·D + D²)",
          knobs=[Knob("reweight", default=0, minimum=0,
                      help="M of the re-weighting cos(π/2·(i−j)/M), at least N; 0: M = the n the module is built for"),
                 Knob("chunk", default=64, minimum=1,
                      help="causal only: positions per chunk (masked C×C block inside, carried 2D×D state across)"),
                 KV_HEADS])
class CosformerAttention(nn.Module):
    """cosFormer: s_ij = ReLU(q_i)·ReLU(k_j) · cos(π/2·(i−j)/M), out_i = Σ_j s_ij v_j / max(Σ_j s_ij, eps).

    j runs over all positions (bidirectional) or j <= i (causal, top-left aligned); positions are 0-based and
    M is `reweight`, or the n the module was built for when `reweight` is 0 (the paper: M = the sequence length;
    ``build_info`` reports it). As in the paper's code (OpenNLPLab/cosFormer): no 1/√D scaling, eps = 1e-6 as a
    lower clamp on the denominator, max(Σ_j s_ij, 1e-6), not added to it (a row whose query shares no positive
    coordinate with any visible key has Σ_j s_ij = 0 and gives 0). The paper indexes positions 1..M; s_ij depends
    on i − j only, so the weights are the same. ReLU(q)·ReLU(k) with a locality bias replaces exp(q·k/√D): a
    different kernel, not an approximation of softmax attention.

    With a_i = π/2 · i/M, cos(a_i − a_j) = cos a_i cos a_j + sin a_i sin a_j, so s_ij = φ(q_i)·φ(k_j) with the
    2D features φ(x_i) = [ReLU(x_i) cos a_i, ReLU(x_i) sin a_i]: linear attention of feature width F = 2D, the
    product taken as Q(KᵀV). N ≤ M is required (forward raises otherwise, ``check`` refuses 0 < M < N): then
    |i − j| < M, every a_i ∈ [0, π/2), every feature is ≥ 0 and so is every s_ij (cos(π/2·(i−j)/M) > 0); the
    sums have no cancellation. With M < N, keys M or more positions apart would get negative weights.

    Bidirectional: [S | z] = Σ_j φ(k_j) [v_j 1]ᵀ (2D×(D+1)) once, read by every query:
    8·B·H·N·D·(D+1) FLOPs. Causal: mechanisms/_prefix.py's chunked form (a masked C×C block inside a chunk,
    the carried 2D×(D+1) state across chunks, exclusive prefixes of a block's chunk states by one cumulative
    sum; never a cumulative sum over N outer products), the features told their block's first position:
    B·H·⌈N/C⌉·(8·C·D·(D+1) + 2·C²·(3D+1)) FLOPs in products, plus 8·D·(D+1)/C uncounted additions per
    position (the cumulative sums, under 1%). fp16/bf16 are summed in float32 (z grows with N).

    Blocks (sized by the byte budget of mechanisms/_budget.py: 16 MiB on the CPU for the two streaming
    bidirectional passes, 64 MiB causal, 1 GiB on CUDA; features and the cos/sin table made block by
    block): a row of the key pass costs G·(3D+1) elements of live temporaries (φ(k), [v 1]), of the read
    G·(3D+2) (φ(q), [num | den], den + eps), causal G·(7D + 3 + C + 1 + ⌈4D(D+1)/C⌉) (φ(q), φ(k), [v 1],
    two products, the C×C scores, den, the chunk states and their prefixes), plus 2 for the table; G = B·H (B·Hkv
    for the key pass). Memory O(B·H·N·D) + the budget, no N×N tensor.

    Grouped-query (``kv_heads`` = Hkv < H): query head h uses kv head h // (H/Hkv). Bidirectional, φ(K) and
    [S | z] are made once per kv head and read by its H/Hkv query heads: 4·B·(H + Hkv)·N·D·(D+1) FLOPs. Causal,
    K and V are repeated to H heads (:func:`repeat_kv`, memory still linear in N) and the chunked form runs per
    query head.

    Decode (causal): the recurrent state of the two terms, S_cos, S_sin (D×D) and z_cos, z_sin (D) per (batch,
    kv head), kept as one [S | z] (B, Hkv, 2D, D+1) (:class:`CosState`), constant in N. M must be known before
    the first token (a later position p ≥ M would turn cos negative): it is the capacity the harness builds
    the module for (n = context + steps + a few), so the steps equal the causal prefill over that same n.
    ``decode_init`` sums the state over the context (positions 0..N0−1); a step at position p adds the new key,
    [S | z] += φ_p(k) [v 1]ᵀ (one in-place addcmul), then reads out = φ_p(q)ᵀ S / max(φ_p(q)ᵀ z, eps), φ_p with
    a_p = π/2 · p/M: exactly the causal forward at that row. Per step 4·B·Hkv·D·(D+1) FLOPs for the update
    plus 4·B·H·D·(D+1) for the read, O(1) in N; a step past M raises. The paper's code has no decode form; its
    causal form takes cumulative sums over N of the N (2D×D) outer products, O(N·D²) memory.
    """

    decode_form = ("recurrent state S_cos, S_sin = Σφ(k)vᵀ (2D×D) and z_cos, z_sin = Σφ(k) (2D), φ with the "
                   "position's cos/sin: B·kv_heads·2D·(D+1), constant in N")

    fidelity = (Fidelity("reweight", ("N", 4096, 65536), (),
                         why="a different kernel (ReLU features, cos re-weighting), not an estimate of softmax "
                             "attention: no promise; a larger M flattens the re-weighting towards plain ReLU "
                             "linear attention"),)

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, reweight: int = 0,
                 chunk: int = 64, kv_heads: int = 0):
        super().__init__()
        if reweight and reweight < n:
            raise ValueError(f"cosformer: reweight M={reweight} < n={n}: keys M or more positions apart would get "
                             "negative weights cos(π/2·(i−j)/M); use reweight=0 (M = n) or reweight >= n")
        self.causal = causal
        self.chunk = int(chunk)
        self.heads = heads
        self.kv_heads = kv_heads or heads
        self.reweight = int(reweight)
        self.m = int(reweight) or max(1, int(n))  # M
        self.eps = EPS

    @classmethod
    def check(cls, *, n: int, causal: bool, heads: int, head_dim: int, device: str, dtype: str, reweight: int = 0,
              chunk: int = 64, kv_heads: int = 0) -> list[str]:
        """Refuses 0 < M < N: positions M or more apart would get negative weights (the paper keeps |i − j| < M)."""
        if reweight and reweight < n:
            return [(f"reweight M={reweight} < N={n}: keys M or more positions apart would get negative weights "
                     "cos(π/2·(i−j)/M); use reweight=0 (M = N) or reweight >= N")]
        return []

    def build_info(self) -> dict:
        return {"M": self.m, "M_from": "reweight" if self.reweight else "built n"}

    def _check_length(self, n: int) -> None:
        if n > self.m:
            raise ValueError(f"cosformer was built with M={self.m} (the re-weighting cos(π/2·(i−j)/M)); got "
                             f"N={n} > M, which would give keys M or more positions apart negative weights. "
                             "Build it with n >= N.")

    def _trig(self, start: int, stop: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return trig_table(start, stop, self.m, dtype, device)  # (L, 2, 1)

    # -- the two-term linear attention, block by block (mechanisms/_prefix.py) ---------------------
    def _features(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """φ of a block of positions start.. start+L−1: (G, L, D) -> (G, L, 2D)."""
        return cos_features(x, self._trig(start, start + x.shape[-2], x.dtype, x.device))

    def _pair(self, q: torch.Tensor, k: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """φ(q), φ(k) of one causal block, one cos/sin table: (G, L, D) each -> (G, L, 2D) each."""
        trig = self._trig(start, start + q.shape[-2], q.dtype, q.device)  # (L, 2, 1)
        return cos_features(q, trig), cos_features(k, trig)

    def _key_state(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Σ_j φ(k_j) [v_j 1]ᵀ over positions 0..N−1, block by block: (G, N, D) each -> (G, 2D, D+1) (work dtype)."""
        return key_state(k, v, feature_k=self._features, feature_floats=2 * k.shape[-1], work=work_dtype(k.dtype))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, n, d = q.shape
        hkv = k.shape[1]
        self._check_length(n)
        if self.causal:
            q3, k3, v3 = (t.reshape(b * h, n, d) for t in (q, repeat_kv(k, h), repeat_kv(v, h)))  # (B·H, N, D)
            out = causal_attention(q3, k3, v3, features=self._pair, width=2 * d, chunk=self.chunk, eps=self.eps,
                                   norm=normalise)  # (B·H, N, D)
            return out.view(b, h, n, d)  # (B, H, N, D)
        # bidirectional: [S | z] once per kv head, read by its G = H/Hkv query heads
        state = self._key_state(k.reshape(b * hkv, n, d), v.reshape(b * hkv, n, d))  # (B·Hkv, 2D, D+1)
        out = read_state(q.reshape(b * h, n, d), state, feature_q=self._features, feature_floats=2 * d,
                         eps=self.eps, grad=tracks_grad(q, k, v), norm=normalise)  # (B·H, N, D)
        return out.view(b, h, n, d)  # (B, H, N, D)

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The quadratic way: s_ij = ReLU(q_i)·ReLU(k_j) · cos(π/2·(i−j)/M) (masked j <= i when causal),
        out = S V / max(S 1, eps), the re-weighting taken directly, not as two terms."""
        n = q.shape[-2]
        self._check_length(n)
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # (B, H, N, D)
        pos = torch.arange(n, dtype=q.dtype, device=q.device)  # (N,)
        reweight = torch.cos((pos[:, None] - pos[None, :]) * (math.pi / (2 * self.m)))  # (N, N)
        s = torch.matmul(F.relu(q), F.relu(k).transpose(-1, -2)) * reweight  # (B, H, N, N)
        if self.causal:
            s = s.masked_fill(~causal_mask(n, q.device), 0.0)
        return torch.matmul(s, v) / s.sum(dim=-1, keepdim=True).clamp_min(self.eps)  # (B, H, N, D)

    # -- decode ------------------------------------------------------------------------------
    def decode_init(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> CosState:
        """[S | z] of both terms summed over the context k, v (B, Hkv, N0, D), positions 0..N0−1; ``capacity``
        positions in all must fit under M (the state itself is constant in size)."""
        b, hkv, n0, d = k.shape
        if capacity > self.m:
            raise ValueError(f"cosformer decode: capacity {capacity} > M={self.m}; positions past M would get "
                             "negative weights. Build the module with n >= capacity (M = n).")
        work = work_dtype(k.dtype)
        if n0 == 0:
            return CosState(k.new_zeros(b, hkv, 2 * d, d + 1, dtype=work), 0)  # (B, Hkv, 2D, D+1)
        sz = self._key_state(k.reshape(b * hkv, n0, d), v.reshape(b * hkv, n0, d))  # (B·Hkv, 2D, D+1), fresh
        return CosState(sz.view(b, hkv, 2 * d, d + 1), n0)  # (B, Hkv, 2D, D+1)

    def decode_step(self, state: CosState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """At position p = state.length: [S | z] += φ_p(k) [v 1]ᵀ in place, then φ_p(q)ᵀ S / max(φ_p(q)ᵀ z, eps):
        q (B, H, 1, D), k and v (B, Hkv, 1, D) -> (B, H, 1, D)."""
        b, h, _, d = q.shape
        p = state.length
        if p >= self.m:
            raise ValueError(f"cosformer decode: position {p} >= M={self.m}; build the module with a larger n")
        work = state.sz.dtype
        trig = self._trig(p, p + 1, work, q.device)  # (1, 2, 1): cos a_p, sin a_p
        fk = cos_features(k.to(work), trig).transpose(-1, -2)  # (B, Hkv, 2D, 1)
        state.sz.addcmul_(fk, ones_column(v.to(work)))  # (B, Hkv, 2D, D+1) += φ_p(k) [v 1]ᵀ
        state.length += 1
        fq = cos_features(grouped(q, state.sz.shape[1]).to(work), trig)  # (B, Hkv, G, 2D), all at position p
        out = normalise(torch.matmul(fq, state.sz), self.eps)  # (B, Hkv, G, D)
        return out.reshape(b, h, 1, d).to(q.dtype)  # (B, H, 1, D)

    @classmethod
    def state_bytes(cls, *, batch: int, heads: int, kv_heads: int, head_dim: int, n: int, capacity: int,
                    itemsize: int, reweight: int = 0, chunk: int = 64) -> int:
        """[S | z] of both terms: B·Hkv·2D·(D+1) elements (float32 for fp16/bf16), whatever n and capacity."""
        return max(itemsize, 4) * batch * kv_heads * 2 * head_dim * (head_dim + 1)

    @classmethod
    def analytic_flops(cls, *, batch: int, heads: int, n: int, head_dim: int, causal: bool, reweight: int = 0,
                       chunk: int = 64, kv_heads: int = 0) -> int:
        kv = kv_heads or heads
        if causal:  # K, V repeated to H heads; linear attention of width 2D by chunks
            return kernel_flops(groups=batch * heads, n=n, head_dim=head_dim, width=2 * head_dim, causal=True,
                                chunk=chunk)
        # key state per kv head, read by every query head: 2·2D·(D+1) per position each
        return 2 * batch * (heads + kv) * n * 2 * head_dim * (head_dim + 1)
