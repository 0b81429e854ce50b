"""A planted mechanism for `effbench verify`: a sliding window whose forward sees one key too many.

``reference`` is the honest window (bidirectional |i − j| <= w, causal 0 <= i − j <= w);
``forward`` lets each query also see the key at offset i − j = w + 1, so verify must fail it.
Plain torch and self-contained (a plugin imports only ``mechanisms``' decorator).
"""

import math

import torch
from torch import nn

from mechanisms import Knob, register


def _window_attention(q, k, v, lo, hi):
    """softmax(q kᵀ/√D) v over keys with lo <= i − j <= hi, the dense way. (B, H, N, D) -> (B, H, N, D)."""
    n = q.shape[-2]
    idx = torch.arange(n, device=q.device)
    d = idx[:, None] - idx[None, :]  # (N, N) offsets i − j
    visible = (d >= lo) & (d <= hi)  # (N, N); the diagonal is always visible
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    s = s.masked_fill(~visible, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)  # (B, H, N, D)


@register(name="leaky", family="sparse", complexity="O(N²·D)",
          knobs=[Knob("window", default=16, axis="window", minimum=1, help="one-sided window w")])
class LeakyWindow(nn.Module):
    """Planted bug: forward's band reaches w + 1 keys back (one key too many); reference uses w."""

    def __init__(self, *, head_dim, heads, n, causal, seed, window):
        super().__init__()
        self.causal = causal
        self.window = window

    def forward(self, q, k, v):
        lo = 0 if self.causal else -self.window
        return _window_attention(q, k, v, lo, self.window + 1)  # the leak: one more key behind

    def reference(self, q, k, v):
        lo = 0 if self.causal else -self.window
        return _window_attention(q, k, v, lo, self.window)
