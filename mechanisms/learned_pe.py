"""The plain learned N×D position table: the baseline that Reformer's axial encoding replaces."""

from __future__ import annotations

import torch
from torch import nn

from .base import register


@register(name="learned-pe", family="position", complexity="O(N·D)", memory="params N·D")
class LearnedPositionalEncoding(nn.Module):
    """A learned absolute position table E (N, D), D = heads·head_dim: forward(x) = x + E[:N].

    The baseline axial-pe replaces: N·D parameters, entries drawn from N(0, 0.02²) with a
    generator seeded by ``seed``. Cost: B·N·D additions.
    """

    inputs = "x"  # forward(x), x (B, N, H·D)
    comparable = "position"  # its own figure and table, never an attention crossover
    no_decode_reason = "a position encoding, not attention: it keeps no per-token state (a step adds one row)"
    causal_applies = False
    fidelity = None
    no_fidelity_reason = "a position encoding is not attention; only its output and gradients against reference()"

    STD = 0.02

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int):
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.table = nn.Parameter(torch.randn(n, heads * head_dim, generator=g) * self.STD)  # (N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N = x.shape[1]
        if N > self.table.shape[0]:
            raise ValueError(f"learned-pe built for {self.table.shape[0]} positions, got {N}")
        return x + self.table[:N]  # (B, N, D)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Gather the table row of every position, then add."""
        p = torch.arange(x.shape[1], device=x.device)  # (N,)
        return x + self.table[p]  # (B, N, D)
