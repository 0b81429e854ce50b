"""Transformer-XL segment recurrence: causal attention within a segment plus a detached memory."""

from __future__ import annotations

import torch

from ._decode import RingKV, attend_one
from ._segments import SegmentRecurrence, dense_mixed, segment_visible, windows
from .base import KV_HEADS, Fidelity, Knob, decreasing, equals_dense_at, register, repeat_kv


@register(name="transformer-xl", family="recurrent", complexity="O(N·(L+M)·D)", memory="O(N·(L+M))",
          knobs=[Knob("segment", default=128, axis="segment", minimum=1, small=50, length=True,
                      sweep=(16, 64, 256), help="segment length L"),
                 Knob("memory", default=128, axis="memory", minimum=0, small=40, length=True, help="cached positions M"),
                 KV_HEADS])
class TransformerXLAttention(SegmentRecurrence):
    """Transformer-XL segment recurrence: causal attention within a segment plus a detached memory.

    The sequence is cut into segments of L; position i (segment ⌊i/L⌋) sees j when
    j ≤ i and j ≥ ⌊i/L⌋·L − M: its own segment causally and the M positions before it
    (the cached memory, which may span several earlier segments). The memory's keys and
    values are detached (stop-gradient), as in Transformer-XL: no gradient flows from
    segment s into any k, v of an earlier segment. Scores are q·k/√D; no relative
    position terms (this benchmark attends on given q, k, v). Always causal.

    All segments are processed at once: the memory of segment s is the window
    [s·L − M, s·L) of the detached keys/values, an overlapping ``unfold`` view. N not a
    multiple of L: the last segment is padded with keys in every real query's future.
    Cost: 4·B·H·N·(L+M)·D FLOPs, memory O(B·H·N·(L+M)) for the scores.
    Grouped-query (``kv_heads`` < H): K and V carry kv_heads heads, repeated to H first.

    Decode (one token at a time, exactly the causal forward): position i attends over
    j ∈ [⌊i/L⌋·L − M, i], out_i = Σ_j softmax_j(q_i·k_j/√D) v_j. The state is a :class:`RingKV`
    of the last L + M positions (the segment so far plus its memory never exceed L + M), masked
    each step to pos ≥ ⌊i/L⌋·L − M; segments restart at multiples of L, so right after a boundary
    the ring's older slots are hidden and it reads only the M memory positions. State
    2·B·kv_heads·(L+M)·D elements + (L+M) int64 positions, constant in N; a step costs
    4·B·H·(L+M)·D FLOPs and reads the whole ring.
    HuggingFace's TransfoXL instead carries ``mems`` between calls: M hidden states per layer
    (one tensor, K and V recomputed from it with relative positions), updated once per call of
    L tokens; called one token at a time its memory slides with every token (a window of the
    last M, no segment boundaries). Here K and V of each position are cached in a per-token ring
    and the segment-aligned pattern of the prefill is kept token by token.
    """

    decode_form = "segment + memory ring of L + M positions: 2·B·kv_heads·(L+M)·D"

    fidelity = (Fidelity("memory", (0, 16, 64, "N"), (decreasing(), equals_dense_at("N")),
                         why="more memory reaches further back; M ≥ N is causal dense attention"),)

    supports_causal = True
    supports_bidirectional = False
    bidirectional_reason = "segment recurrence only looks back (memory of earlier segments)"

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, segment: int, memory: int,
                 kv_heads: int = 0):
        super().__init__()
        self.segment = segment
        self.memory = memory
        self.heads = heads
        self.kv_heads = kv_heads or heads

    def _context(self, k: torch.Tensor, v: torch.Tensor, n_seg: int, k_kv: torch.Tensor,
                 v_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detached memory keys (B, H, S, D, M), values (B, H, S, M, D) and visibility (S, M)."""
        L, M = self.segment, self.memory
        kd, vd = k.detach(), v.detach()
        ctx_k = windows(kd, M, M, L, n_seg)  # (B, H, S, D, M)
        ctx_v = windows(vd, M, M, L, n_seg).transpose(-1, -2)  # (B, H, S, M, D)
        pos = torch.arange(n_seg, device=k.device)[:, None] * L - M + torch.arange(M, device=k.device)  # (S, M)
        return ctx_k, ctx_v, pos >= 0

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Dense attention under j ≤ i, j ≥ ⌊i/L⌋·L − M, memory keys/values detached."""
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # (B, H, N, D)
        N = q.shape[2]
        i = torch.arange(N, device=q.device)[:, None]  # (N, 1) query positions
        j = torch.arange(N, device=q.device)[None, :]  # (1, N) key positions
        start = (i // self.segment) * self.segment  # (N, 1) start of each query's segment
        same = (j <= i) & (j >= start)  # (N, N) own segment, causal
        mem = (j < start) & (j >= start - self.memory)  # (N, N) memory
        return dense_mixed(q, [(k, v, same), (k.detach(), v.detach(), mem)])

    # -- decode ------------------------------------------------------------------------------
    def decode_init(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> RingKV:
        return RingKV(k, v, self.segment + self.memory)  # (B, Hkv, L+M, D) twice, the last L + M positions

    def decode_step(self, state: RingKV, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        state.append(k, v)  # position i written over i − L − M, which no later position sees
        visible = segment_visible(state, self.segment, self.memory)  # (L+M,) j ∈ [⌊i/L⌋·L − M, i]
        return attend_one(q, state.k, state.v, visible=visible)  # (B, H, 1, D)

    @classmethod
    def state_bytes(cls, *, batch: int, heads: int, kv_heads: int, head_dim: int, n: int, capacity: int,
                    itemsize: int, segment: int, memory: int) -> int:
        return RingKV.nbytes(batch=batch, kv_heads=kv_heads, size=segment + memory, head_dim=head_dim,
                             itemsize=itemsize)
