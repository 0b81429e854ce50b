"""Turn a `Case` into a ready-to-call workload: module built, inputs made, the call closed over.

Used by the runner's child process (time, memory, FLOPs, prediction) and by tests.
Building happens here, once, outside anything that is timed or tracked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .cases import Case


@dataclass
class Workload:
    case: Case
    module: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    call: Callable[[], Any]
    build_ms: float
    param_bytes: int
    info: dict = field(default_factory=dict)


def prepare(case: Case, device: str | None = None) -> Workload:
    """Build the mechanism and inputs for ``case`` and return the call to measure.

    ``fwd`` runs the forward under ``torch.no_grad()`` (inference); ``fwd+bwd`` runs the
    forward with inputs (and parameters) requiring grad, then backward from a fixed
    upstream gradient; input grads are cleared before each call.
    """
    spec = case.spec()
    device = device or case.device
    dtype = case.torch_dtype
    t0 = time.perf_counter()
    module = spec.build(head_dim=case.head_dim, heads=case.heads, n=case.n, causal=case.causal,
                        seed=case.seed, **case.knob_dict)
    module = module.to(device=device, dtype=dtype)
    build_ms = (time.perf_counter() - t0) * 1e3
    backward = case.mode == "fwd+bwd"
    inputs = spec.make_inputs(batch=case.batch, heads=case.heads, n=case.n, head_dim=case.head_dim,
                              dtype=dtype, device=device, seed=case.seed, requires_grad=backward)
    if not backward:
        module.requires_grad_(False)
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    info = dict(module.build_info()) if hasattr(module, "build_info") else {}

    if backward:
        g = torch.Generator(device="cpu").manual_seed(case.seed + 7)
        upstream = torch.randn(inputs[0].shape, generator=g).to(device=device, dtype=dtype)  # same shape as the output

        def call():
            for t in inputs:
                t.grad = None
            module.zero_grad(set_to_none=True)
            out = module(*inputs)
            out.backward(upstream)
            return out
    else:
        def call():
            with torch.no_grad():
                return module(*inputs)

    return Workload(case=case, module=module, inputs=inputs, call=call, build_ms=build_ms,
                    param_bytes=param_bytes, info=info)
