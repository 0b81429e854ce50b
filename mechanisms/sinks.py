"""Attention sinks (StreamingLLM, Xiao et al. 2023): the first S positions plus a sliding window."""

from __future__ import annotations

import torch

from ._decode import RingKV, StaticKV
from .base import KV_HEADS, Fidelity, Knob, decreasing, equals_dense_at, register
from .longformer import LongformerAttention


@register(
    name="sinks", family="sparse", complexity="O(N·(W+S)·D)", memory="O(N·D) inference, O(N·(W+S)) with grad",
    knobs=[
        Knob("sinks", default=4, axis="sinks", minimum=0, small=3, sweep=(0, 1, 4, 16),
             help="the first S positions every query keeps seeing"),
        Knob("window", default=256, axis="window", minimum=1, small=37, length=True, help="one-sided window w"),
        Knob("impl", default="eager", type=str, choices=("eager", "flex"),
             help="eager: banded chunks + the sink columns; flex: compiled FlexAttention"),
        KV_HEADS,
    ],
)
class SinkAttention(LongformerAttention):
    """StreamingLLM: query i sees the first S positions and the last w, causally.

    S(i) = {j ≤ i : j < S or i − j ≤ w}, each key once; out_i = Σ_{j ∈ S(i)} softmax_j(q_i·k_j/√D) v_j.
    The sinks soak up the attention mass a model learned to park on the first tokens, so a window
    that has slid past them still behaves (Xiao et al., "Efficient Streaming Language Models with
    Attention Sinks", 2023; HuggingFace's ``SinkCache``).

    This is causal Longformer with its g = S global positions: a query i < S sees every j ≤ i,
    which are all sinks. Prefill runs Longformer's eager kernel (chunks of c ≈ 64 against their
    window span and the S sink keys, one softmax; no N×N tensor; the B·H sequences end to end, in
    row blocks of ``temp_budget`` bytes at 4·(2·(c + w + S) + 2S·D/c) bytes per fp32 row):
    4·B·H·D·(S² + (N − S)·(c + w + S)) FLOPs plus about w/c + 1 chunks per sequence computed twice,
    memory O(B·H·N·D) plus the budget.

    Decode: a cache of S + w + 1 positions, constant in N (the S sinks and a ring of the last
    w + 1): 2·B·kv_heads·(S + w + 1)·D elements; a step costs 4·B·H·(S + w + 1)·D FLOPs.
    Differs from StreamingLLM's cache in positions: StreamingLLM re-numbers positions inside the
    cache for RoPE; here there is no position encoding inside attention, so nothing is re-numbered.
    """

    supports_bidirectional = False
    bidirectional_reason = "attention sinks are a causal streaming pattern (a key past the window is dropped for good)"
    fidelity = (Fidelity("window", (8, 32, 128, "N-1"), (decreasing(), equals_dense_at("N-1")),
                         why="a wider window sees more keys; w ≥ N − 1 sees them all"),)
    decode_form = "the S sinks + a ring of the last w + 1: 2·B·kv_heads·(S+w+1)·D"

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, sinks: int, window: int,
                 impl: str = "eager", kv_heads: int = 0):
        super().__init__(head_dim=head_dim, heads=heads, n=n, causal=True, seed=seed, window=window,
                         globals=sinks, impl=impl, kv_heads=kv_heads)
        self.sinks = sinks

    def decode_init(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> tuple[StaticKV, RingKV]:
        return super().decode_init(k, v, capacity)  # (B, Hkv, S, D) sinks, (B, Hkv, w + 1, D) ring

    @classmethod
    def state_bytes(cls, *, batch: int, heads: int, kv_heads: int, head_dim: int, n: int, capacity: int,
                    itemsize: int, sinks: int, window: int, impl: str = "eager") -> int:
        return super().state_bytes(batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, n=n,
                                   capacity=capacity, itemsize=itemsize, window=window, globals=sinks, impl=impl)

    @classmethod
    def check(cls, *, n: int, causal: bool, heads: int, head_dim: int, device: str, dtype: str, sinks: int,
              window: int, impl: str = "eager", mode: str | None = None, **_) -> list[str]:
        reasons = super().check(n=n, causal=True, heads=heads, head_dim=head_dim, device=device, dtype=dtype,
                                window=window, globals=0, impl=impl, mode=mode)
        if sinks >= n:
            reasons.append(f"sinks {sinks} >= n {n}: every position is a sink, this is causal dense attention")
        return reasons

    @classmethod
    def analytic_flops(cls, *, batch: int, heads: int, n: int, head_dim: int, causal: bool, sinks: int, window: int,
                       impl: str = "eager", kv_heads: int = 0) -> int:
        return super().analytic_flops(batch=batch, heads=heads, n=n, head_dim=head_dim, causal=True, window=window,
                                      globals=sinks, impl=impl)
