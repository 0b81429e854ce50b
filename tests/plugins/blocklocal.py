"""A correct plugin in the README's form, with no new-style declaration: block-local attention.

Query i sees the keys of its own block of b positions: ⌊i/b⌋ = ⌊j/b⌋ (causal also j ≤ i).
forward pads N up to a multiple of b and runs fused SDPA on (B, H, N/b, b, D) blocks: O(N·b·D)
work and memory, no N×N tensor. The contract suite (``pytest tests/test_contract.py --plugin``)
must pass on it unchanged.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mechanisms import Knob, mask_from_mod, masked_softmax_attention, register


@register(name="block-local", family="sparse", complexity="O(N·b·D)", memory="O(N·D)",
          knobs=[Knob("block", default=64, axis="block", minimum=1, help="block length b")])
class BlockLocal(nn.Module):
    """Block-local attention: query i sees keys j with ⌊i/b⌋ = ⌊j/b⌋ (causal: and j ≤ i)."""

    def __init__(self, *, head_dim, heads, n, causal, seed, block):
        super().__init__()
        self.causal = causal
        self.block = block

    def forward(self, q, k, v):  # (B, H, N, D) -> (B, H, N, D)
        B, H, N, D = q.shape
        b = min(self.block, N)
        pad = (-N) % b
        blocks = [F.pad(t, (0, 0, 0, pad)).unflatten(2, ((N + pad) // b, b)) for t in (q, k, v)]  # (B, H, N/b, b, D)
        idx = torch.arange(b, device=q.device)
        keep = (torch.arange(N + pad, device=q.device) < N).view(-1, 1, b)  # (N/b, 1, b): padded keys hidden
        if self.causal:
            keep = keep & (idx[None, :] <= idx[:, None])  # (N/b, b, b)
        out = F.scaled_dot_product_attention(*blocks, attn_mask=keep)  # (B, H, N/b, b, D)
        return out.flatten(2, 3)[:, :, :N]  # (B, H, N, D)

    def reference(self, q, k, v):  # the same mathematics, the O(N²) way
        b = self.block
        causal = self.causal
        mask = mask_from_mod(lambda i, j: (i // b == j // b) & ((j <= i) | (not causal)), q.shape[-2], device=q.device)
        return masked_softmax_attention(q, k, v, mask)
