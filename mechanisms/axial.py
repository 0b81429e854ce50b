"""Reformer's axial positional encoding (the learned N×D table it replaces is ``learned_pe.py``)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Knob, register


def _axial_shape(n: int, shape1: int, shape2: int) -> tuple[int, int]:
    """(n₁, n₂) with n₁·n₂ >= n: the knobs when given, else n₁ = ceil(√n), n₂ = ceil(n / n₁)."""
    n1 = shape1 or (math.ceil(n / shape2) if shape2 else math.ceil(math.sqrt(n)))
    n2 = shape2 or math.ceil(n / n1)
    return n1, n2


@register(name="axial-pe", family="position", complexity="O(N·D)", memory="params (n₁·d₁ + n₂·d₂)",
          knobs=[Knob("shape1", default=0, minimum=0, help="n₁ rows of the first axis; 0 = ceil(√N)"),
                 Knob("shape2", default=0, minimum=0, help="n₂ rows of the second axis; 0 = ceil(N/n₁)"),
                 Knob("split", default=0, minimum=0, help="d₁, width of the first axis' part; 0 = D/2")])
class AxialPositionalEncoding(nn.Module):
    """Reformer's axial position encoding: position p ↦ concat(E₁[p // n₂], E₂[p mod n₂]).

    forward(x), x (B, N, D) with D = heads·head_dim, returns x + encoding. Two learned
    tables E₁ (n₁, d₁) and E₂ (n₂, d₂) with n₁·n₂ >= N (n₁ = ceil(√N), n₂ = ceil(N/n₁)
    unless the knobs ``shape1``/``shape2`` fix them) and d₁ + d₂ = D (d₁ = ``split``,
    default ⌊D/2⌋). Parameters n₁·d₁ + n₂·d₂ ≈ √N·D instead of N·D; entries drawn from
    N(0, 0.02²) with a generator seeded by ``seed`` (same init as ``learned-pe``).

    The forward never gathers the N×D table: a copy of x viewed as (B, n₁, n₂, D) gets E₁ added
    in place, broadcast along the second axis, on its first d₁ channels and E₂ along the first on
    the rest (the last, partial row of n₂ handled apart). Cost: B·N·D additions; memory: the
    output, B·N·D, and no temporary of that size.
    """

    inputs = "x"  # forward(x), x (B, N, H·D)
    comparable = "position"  # its own figure and table, never an attention crossover
    no_decode_reason = "a position encoding, not attention: it keeps no per-token state (a step adds one row)"
    causal_applies = False
    fidelity = None
    no_fidelity_reason = "a position encoding is not attention; only its output and gradients against reference()"

    STD = 0.02

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int,
                 shape1: int, shape2: int, split: int):
        super().__init__()
        dim = heads * head_dim
        self.n = n
        self.n1, self.n2 = _axial_shape(n, shape1, shape2)
        if self.n1 * self.n2 < n:
            raise ValueError(f"axial-pe: shape {self.n1}x{self.n2} holds fewer than {n} positions")
        self.d1 = split or dim // 2
        if not 0 < self.d1 < dim:
            raise ValueError(f"axial-pe: split must be in 1..{dim - 1}, got {self.d1}")
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.e1 = nn.Parameter(torch.randn(self.n1, self.d1, generator=g) * self.STD)  # (n₁, d₁)
        self.e2 = nn.Parameter(torch.randn(self.n2, dim - self.d1, generator=g) * self.STD)  # (n₂, d₂)

    @classmethod
    def check(cls, *, n: int, causal: bool, heads: int, head_dim: int, device: str, dtype: str,
              shape1: int, shape2: int, split: int) -> list[str]:
        reasons = []
        n1, n2 = _axial_shape(n, shape1, shape2)
        if n1 * n2 < n:
            reasons.append(f"shape1·shape2 = {n1}·{n2} < N = {n}")
        dim = heads * head_dim
        if split and not 0 < split < dim:
            reasons.append(f"split must be in 1..{dim - 1} (D = {dim}), got {split}")
        return reasons

    def build_info(self) -> dict:
        return {"axial_shape": f"{self.n1}x{self.n2}", "split": f"{self.d1}+{self.e2.shape[1]}"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        if N > self.n1 * self.n2:
            raise ValueError(f"axial-pe built for {self.n1 * self.n2} positions, got {N}")
        d1, n2 = self.d1, self.n2
        rows = N // n2  # complete rows of n₂ positions
        out = x.clone()  # (B, N, D): the one output buffer; the tables are added into it in place
        if rows:
            grid = out[:, :rows * n2].view(B, rows, n2, D)  # (B, n₁', n₂, D), a view of out
            grid[..., :d1] += self.e1[:rows, None, :]  # E₁ broadcast along the second axis
            grid[..., d1:] += self.e2[None, :, :]  # E₂ broadcast along the first axis
        if N > rows * n2:  # the partial last row: positions rows·n₂ .. N−1
            r = N - rows * n2
            tail = out[:, rows * n2:]  # (B, r, D), a view of out
            tail[..., :d1] += self.e1[rows]
            tail[..., d1:] += self.e2[:r]
        return out  # (B, N, D)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Gather the full N×D table the obvious way, then add."""
        p = torch.arange(x.shape[1], device=x.device)  # (N,)
        table = torch.cat([self.e1[p // self.n2], self.e2[p % self.n2]], dim=-1)  # (N, D)
        return x + table  # (B, N, D)
