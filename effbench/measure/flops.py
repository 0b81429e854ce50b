"""FLOP counting with torch.utils.flop_counter.FlopCounterMode.

torch counts matmuls, convolutions and the CUDA SDPA kernels, but not the CPU flash
kernel (``aten._scaled_dot_product_flash_attention_for_cpu``); we hand FlopCounterMode
torch's own SDPA formulas for it through ``custom_mapping``, so SDPA on the CPU is
counted like SDPA on a GPU. Ops that look like matrix products but that no formula
covers are reported, so a caller can fall back to the mechanism's analytic count.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.utils.flop_counter as fc
from torch.utils._python_dispatch import TorchDispatchMode

_HEAVY = ("mm", "matmul", "attention", "conv", "einsum", "linear", "baddbmm")


def _custom_mapping() -> dict:
    mapping = {}
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None:
        def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)
        mapping[fwd] = cpu_sdpa
    if bwd is not None:
        def cpu_sdpa_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
        mapping[bwd] = cpu_sdpa_bwd
    return mapping


def _heavy_uncounted(name: str) -> bool:
    return any(h in name for h in _HEAVY) and not name.startswith("_to_copy")


class _Uncounted(TorchDispatchMode):
    """Names of heavy-looking ops that no FLOP formula covers (for a torch whose FlopCounterMode has no
    ``_count_flops`` to hook: a mode layer of its own)."""

    def __init__(self, known: set):
        super().__init__()
        self.known = known
        self.missing: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket not in self.known and _heavy_uncounted(func.overloadpacket.__name__):
            self.missing.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class _Counter(fc.FlopCounterMode):
    """FlopCounterMode that also notes the heavy-looking ops it has no formula for, in ``missing``.

    It hooks ``_count_flops``, which FlopCounterMode calls for every op it runs (after its own decompositions),
    rather than stacking a second dispatch mode: each mode layer costs every op a Python re-dispatch, and a
    prediction at N = 1M dispatches ~10⁴ ops twice."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.missing: set[str] = set()

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet not in self.flop_registry:
            name = getattr(func_packet, "__name__", str(func_packet))
            if _heavy_uncounted(name):
                self.missing.add(name)
        return super()._count_flops(func_packet, out, args, kwargs)


@dataclass
class FlopCount:
    """What :func:`counting` found once its block has run: total FLOPs and the uncounted heavy op names."""

    total: int = 0
    missing: list[str] = field(default_factory=list)


@contextlib.contextmanager
def counting() -> Iterator[FlopCount]:
    """Count the FLOPs of everything run inside (FlopCounterMode, with the CPU SDPA mapping); the yielded
    :class:`FlopCount` is filled in on exit. Lets another pass (the prediction's tracker) share the call."""
    mapping = _custom_mapping()
    found = FlopCount()
    if hasattr(fc.FlopCounterMode, "_count_flops"):
        counter = _Counter(display=False, custom_mapping=mapping)
        with counter:
            yield found
        found.total, found.missing = int(counter.get_total_flops()), sorted(counter.missing)
        return
    known = set(fc.flop_registry) | {op.overloadpacket if hasattr(op, "overloadpacket") else op for op in mapping}
    counter, watcher = fc.FlopCounterMode(display=False, custom_mapping=mapping), _Uncounted(known)
    with counter, watcher:
        yield found
    found.total, found.missing = int(counter.get_total_flops()), sorted(watcher.missing)


def count_flops(fn: Callable[[], Any]) -> tuple[int, list[str]]:
    """Run ``fn`` once under FlopCounterMode; return (total FLOPs, uncounted heavy op names)."""
    with counting() as found:
        fn()
    return found.total, found.missing
