"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"): φ = elu + 1, product reordered as Q(KᵀV)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._prefix import kernel_attention, kernel_flops
from .base import Knob, causal_mask, register

EPS = 1e-6


def elu_feature(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1 > 0, elementwise: (..., D) -> (..., D)."""
    return F.elu(x).add_(1.0)  # elu's backward reads its input, so the in-place +1 is safe


@register(name="linear", family="kernel", complexity="O(N·D²)", memory="O(N·D + D²)",
          knobs=[Knob("chunk", default=64, minimum=1,
                      help="causal only: positions per chunk (masked C×C block inside, carried D×D state across)")])
class LinearAttention(nn.Module):
    """Linear attention: out_i = φ(q_i)ᵀ S / (φ(q_i)ᵀ z + eps), φ = elu + 1, product taken as Q(KᵀV).

    S = Σ_j φ(k_j) v_jᵀ (D×D) and z = Σ_j φ(k_j) (D) over all j (bidirectional) or
    j <= i (causal, top-left aligned). As in fast-transformers' LinearAttention: no
    1/√D scaling, eps = 1e-6 added to the denominator. The kernel φ(q)ᵀφ(k) replaces
    exp(q·k/√D), so this is a different model from softmax attention, not an approximation.

    Bidirectional: S and z once, then every query reads them: 4·B·H·N·D·(D+1) FLOPs.
    Causal: chunks of C positions; inside a chunk a masked C×C block, across chunks a
    carried D×(D+1) state (never a cumulative sum over N outer products):
    ≈ B·H·N·(4·C·(D+1) + 4·D·(D+1)) FLOPs. Memory O(B·H·(N·D + N/C·D²)) with blocks of
    rows processed one at a time; no N×N tensor is formed.
    """

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, chunk: int = 64):
        super().__init__()
        self.causal = causal
        self.chunk = int(chunk)
        self.eps = EPS

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return kernel_attention(q, k, v, feature_q=elu_feature, feature_k=elu_feature, width=q.shape[-1],
                                causal=self.causal, chunk=self.chunk, eps=self.eps)  # (B, H, N, D)

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The quadratic way: A = φ(Q)φ(K)ᵀ (masked j <= i when causal), out = A V / (A 1 + eps)."""
        a = torch.matmul(elu_feature(q), elu_feature(k).transpose(-1, -2))  # (B, H, N, N)
        if self.causal:
            a = a.masked_fill(~causal_mask(q.shape[-2], q.device), 0.0)
        return torch.matmul(a, v) / (a.sum(dim=-1, keepdim=True) + self.eps)  # (B, H, N, D)

    @classmethod
    def analytic_flops(cls, *, batch: int, heads: int, n: int, head_dim: int, causal: bool, chunk: int = 64) -> int:
        return kernel_flops(groups=batch * heads, n=n, head_dim=head_dim, width=head_dim, causal=causal, chunk=chunk)
