"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"): φ = elu + 1, product reordered as Q(KᵀV)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._decode import grouped
from ._prefix import (
    causal_attention,
    kernel_flops,
    key_state,
    normalise,
    ones_column,
    read_state,
    tracks_grad,
)
from .base import KV_HEADS, Knob, causal_mask, register, repeat_kv

EPS = 1e-6
LOW_PRECISION = (torch.float16, torch.bfloat16)


def elu_feature(x: torch.Tensor, start: int = 0) -> torch.Tensor:
    """φ(x) = elu(x) + 1 > 0, elementwise: (..., D) -> (..., D); ``start`` (the block's first position) is unused."""
    return F.elu(x).add_(1.0)  # elu's backward reads its input, so the in-place +1 is safe


def elu_pair(q: torch.Tensor, k: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """φ(q), φ(k) of one causal block: (G, L, D) each -> (G, L, D) each."""
    return elu_feature(q), elu_feature(k)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a recurrent state is summed in: float32 for fp16/bf16 (as the causal forward computes), else ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


class RecurrentState:
    """[S | z] of every position so far, one tensor allocated by ``decode_init`` and updated in place.

    sz: (B, Hkv, D, D+1), S = Σ_j φ(k_j) v_jᵀ in the first D columns, z = Σ_j φ(k_j) in the last;
    ``length`` positions are summed. Bytes: B·Hkv·D·(D+1)·itemsize, whatever the length.
    """

    def __init__(self, sz: torch.Tensor, length: int):
        self.sz = sz  # (B, Hkv, D, D+1)
        self.length = length


@register(name="linear", family="kernel", complexity="O(N·D²)", memory="O(N·D + D²)",
          knobs=[Knob("chunk", default=64, minimum=1,
                      help="causal only: positions per chunk (masked C×C block inside, carried D×D state across)"),
                 KV_HEADS])
class LinearAttention(nn.Module):
    """Linear attention: out_i = φ(q_i)ᵀ S / (φ(q_i)ᵀ z + eps), φ = elu + 1, product taken as Q(KᵀV).

    S = Σ_j φ(k_j) v_jᵀ (D×D) and z = Σ_j φ(k_j) (D) over all j (bidirectional) or
    j <= i (causal, top-left aligned). As in fast-transformers' LinearAttention: no
    1/√D scaling, eps = 1e-6 added to the denominator. The kernel φ(q)ᵀφ(k) replaces
    exp(q·k/√D), so this is a different model from softmax attention, not an approximation.

    Bidirectional: S and z once, then every query reads them: 4·B·H·N·D·(D+1) FLOPs.
    Causal: chunks of C positions; inside a chunk a masked C×C block, across chunks a
    carried D×(D+1) state (the exclusive prefixes of a block's chunk states by one cumulative sum;
    never a cumulative sum over N outer products): B·H·⌈N/C⌉·(4·C·D·(D+1) + 2·C²·(2D+1)) FLOPs
    in products, plus 4·D·(D+1)/C uncounted additions per position (the cumulative sums, under 1%).

    Blocks (mechanisms/_prefix.py, sized by the byte budget of mechanisms/_budget.py: 16 MiB on the CPU for the
    two streaming bidirectional passes, 64 MiB causal, 1 GiB on CUDA): a row of the
    key pass costs G·(2D+1) elements of live temporaries (φ(k), [v 1]), of the read G·(2D+2) (φ(q),
    [num | den], den + eps), causal G·(5D + 3 + C + 1 + ⌈2D(D+1)/C⌉) (φ(q), φ(k), [v 1], two
    products, the C×C scores, den + eps, the chunk states and their prefixes); G = B·H (B·Hkv for the key pass). Memory
    O(B·H·N·D) + the budget; no N×N tensor is formed.

    Grouped-query (``kv_heads`` = Hkv < H): K and V carry Hkv heads, query head h uses kv head
    h // (H/Hkv). Bidirectional, φ(K) and [S | z] are made once per kv head and read by its H/Hkv
    query heads: 2·B·(H + Hkv)·N·D·(D+1) FLOPs. Causal, K and V are repeated to H heads
    (:func:`repeat_kv`, memory still linear in N) and the chunked form runs per query head.

    Decode (causal): the recurrent state [S | z] (B, Hkv, D, D+1), constant in N. ``decode_init``
    sums it over the context (the bidirectional key pass over the N0 context positions);
    a step adds the new token, S += φ(k) vᵀ, z += φ(k) (one in-place addcmul), then reads
    out = φ(q)ᵀ S / (φ(q)ᵀ z + eps), exactly the causal forward at that position (same eps, no
    1/√D). Per step 2·B·Hkv·D·(D+1) FLOPs for the update plus 2·B·H·D·(D+1) for the read, O(1) in
    N; the step allocates only φ(q), φ(k) and its (B, H, D+1) result. fp16/bf16 state is summed in
    float32 (as the causal forward computes), so z ~ N cannot overflow fp16.
    Compared with fast-transformers' RecurrentLinearAttention (state Si (N, H, D, M), Zi (N, H, D),
    the same φ and eps placement 1/(φ(q)·z + eps)): there the state starts from zeros and is fed one
    token at a time, and every step builds new tensors (Si + einsum(...)) instead of updating in
    place; it has no grouped-query form (one state per query head, not per kv head).
    """

    decode_form = "recurrent state S = Σφ(k)vᵀ (D×D) and z = Σφ(k) (D): B·kv_heads·D·(D+1), constant in N"

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, chunk: int = 64,
                 kv_heads: int = 0):
        super().__init__()
        self.causal = causal
        self.chunk = int(chunk)
        self.heads = heads
        self.kv_heads = kv_heads or heads
        self.eps = EPS

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, n, d = q.shape
        hkv = k.shape[1]
        if self.causal:
            k, v = repeat_kv(k, h), repeat_kv(v, h)  # (B, H, N, D)
            q3, k3, v3 = (t.reshape(b * h, n, d) for t in (q, k, v))  # (B·H, N, D)
            out = causal_attention(q3, k3, v3, features=elu_pair, width=d, chunk=self.chunk,
                                   eps=self.eps)  # (B·H, N, D)
            return out.view(b, h, n, d)  # (B, H, N, D)
        # bidirectional: [S | z] once per kv head, read by its G = H/Hkv query heads
        state = key_state(k.reshape(b * hkv, n, d), v.reshape(b * hkv, n, d), feature_k=elu_feature,
                          feature_floats=d)  # (B·Hkv, D, D+1)
        out = read_state(q.reshape(b * h, n, d), state, feature_q=elu_feature, feature_floats=d,
                         eps=self.eps, grad=tracks_grad(q, k, v))  # (B·H, N, D)
        return out.view(b, h, n, d)  # (B, H, N, D)

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The quadratic way: A = φ(Q)φ(K)ᵀ (masked j <= i when causal), out = A V / (A 1 + eps)."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # (B, H, N, D)
        a = torch.matmul(elu_feature(q), elu_feature(k).transpose(-1, -2))  # (B, H, N, N)
        if self.causal:
            a = a.masked_fill(~causal_mask(q.shape[-2], q.device), 0.0)
        return torch.matmul(a, v) / (a.sum(dim=-1, keepdim=True) + self.eps)  # (B, H, N, D)

    # -- decode ------------------------------------------------------------------------------
    def decode_init(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> RecurrentState:
        """[S | z] summed over the context k, v (B, Hkv, N0, D); ``capacity`` does not matter (constant state)."""
        b, hkv, n0, d = k.shape
        work = state_dtype(k.dtype)
        if n0 == 0:
            return RecurrentState(k.new_zeros(b, hkv, d, d + 1, dtype=work), 0)  # (B, Hkv, D, D+1)
        k3 = k.reshape(b * hkv, n0, d).to(work)  # (B·Hkv, N0, D)
        v3 = v.reshape(b * hkv, n0, d).to(work)  # (B·Hkv, N0, D)
        sz = key_state(k3, v3, feature_k=elu_feature, feature_floats=d)  # (B·Hkv, D, D+1), a fresh tensor
        return RecurrentState(sz.view(b, hkv, d, d + 1), n0)  # (B, Hkv, D, D+1)

    def decode_step(self, state: RecurrentState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """S += φ(k) vᵀ, z += φ(k) in place, then φ(q)ᵀ S / (φ(q)ᵀ z + eps): q (B, H, 1, D) -> (B, H, 1, D)."""
        b, h, _, d = q.shape
        work = state.sz.dtype
        fk = elu_feature(k.to(work)).transpose(-1, -2)  # (B, Hkv, D, 1)
        state.sz.addcmul_(fk, ones_column(v.to(work)))  # (B, Hkv, D, D+1) += φ(k) [v 1]ᵀ
        state.length += 1
        fq = elu_feature(grouped(q, state.sz.shape[1]).to(work))  # (B, Hkv, G, D)
        out = normalise(torch.matmul(fq, state.sz), self.eps)  # (B, Hkv, G, D)
        return out.reshape(b, h, 1, d).to(q.dtype)  # (B, H, 1, D)

    @classmethod
    def state_bytes(cls, *, batch: int, heads: int, kv_heads: int, head_dim: int, n: int, capacity: int,
                    itemsize: int, chunk: int = 64) -> int:
        """[S | z]: B·Hkv·D·(D+1) elements (float32 for fp16/bf16), whatever n and capacity."""
        return max(itemsize, 4) * batch * kv_heads * head_dim * (head_dim + 1)

    @classmethod
    def analytic_flops(cls, *, batch: int, heads: int, n: int, head_dim: int, causal: bool, chunk: int = 64,
                       kv_heads: int = 0) -> int:
        kv = kv_heads or heads
        if causal:  # K, V repeated to H heads
            return kernel_flops(groups=batch * heads, n=n, head_dim=head_dim, width=head_dim, causal=True, chunk=chunk)
        # key state per kv head, read by every query head: 2·F·(D+1) per position each
        return 2 * batch * (heads + kv) * n * head_dim * (head_dim + 1)
