"""Planted mechanisms that misbehave in every way a real one can, for the runner's tests."""

import os
import signal
import time

import torch
from torch import nn

from mechanisms import register


class _Base(nn.Module):
    def __init__(self, *, head_dim, heads, n, causal, seed):
        super().__init__()

    def reference(self, q, k, v):
        return v


@register(name="plant-killed", family="exact", complexity="O(1)")
class KillsItself(_Base):
    """Sends itself SIGKILL, as the OS OOM killer would."""

    def forward(self, q, k, v):
        os.kill(os.getpid(), signal.SIGKILL)


@register(name="plant-hang", family="exact", complexity="O(∞)")
class Hangs(_Base):
    """Sleeps far past any timeout."""

    def forward(self, q, k, v):
        time.sleep(600)


@register(name="plant-oom", family="exact", complexity="O(1)")
class RunsOutOfMemory(_Base):
    """Raises torch.OutOfMemoryError, as the CUDA caching allocator does."""

    def forward(self, q, k, v):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (planted)")


@register(name="plant-cpu-oom", family="exact", complexity="O(1)")
class CpuAllocatorFails(_Base):
    """Asks the CPU allocator for 1 PiB: more than any address space, so it raises (a RuntimeError)."""

    def forward(self, q, k, v):
        return torch.empty(1 << 50, dtype=torch.uint8)


@register(name="plant-error", family="exact", complexity="O(1)")
class Fails(_Base):
    """Raises an ordinary exception with a multi-line message."""

    def forward(self, q, k, v):
        raise ValueError("something\nwent wrong")


@register(name="plant-slow", family="exact", complexity="O(1)")
class Slow(_Base):
    """Correct (identity on v) but slow enough to be killed mid-sweep in tests."""

    def forward(self, q, k, v):
        time.sleep(0.3)
        return v.clone()


@register(name="plant-lazy", family="exact", complexity="O(1)")
class BuildsOnFirstCall(_Base):
    """Correct (v scaled by one) but builds a (N, 4·D) table on its first call and keeps it, as a rotary or
    position cache does: a cold call's peak includes the table, a warm call's does not."""

    def __init__(self, *, head_dim, heads, n, causal, seed):
        super().__init__(head_dim=head_dim, heads=heads, n=n, causal=causal, seed=seed)
        self.table = None

    def forward(self, q, k, v):
        if self.table is None:
            self.table = torch.ones(v.shape[-2], 4 * v.shape[-1], dtype=v.dtype, device=v.device)  # (N, 4D)
        return v * self.table[: v.shape[-2], :1]  # (B, H, N, D)


@register(name="plant-lazy-dict", family="exact", complexity="O(1)")
class CachesInADict(_Base):
    """Like plant-lazy, but the table goes into a dict made in __init__ (the attribute stays the same object)."""

    def __init__(self, *, head_dim, heads, n, causal, seed):
        super().__init__(head_dim=head_dim, heads=heads, n=n, causal=causal, seed=seed)
        self.tables = {}

    def forward(self, q, k, v):
        n = v.shape[-2]
        if n not in self.tables:
            self.tables[n] = torch.ones(n, 4 * v.shape[-1], dtype=v.dtype, device=v.device)  # (N, 4D)
        return v * self.tables[n][:, :1]  # (B, H, N, D)
