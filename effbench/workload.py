"""Turn a `Case` into a ready-to-call workload: module built, inputs made, the call closed over.

Used by the runner's child process (time, memory, FLOPs, prediction) and by tests.
Building happens here, once, outside anything that is timed or tracked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from .cases import Case

if TYPE_CHECKING:
    from mechanisms import MechanismSpec


@dataclass
class Workload:
    case: Case
    module: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    call: Callable[[], Any]
    build_ms: float
    param_bytes: int
    info: dict = field(default_factory=dict)


def build_on(spec: MechanismSpec, *, head_dim: int, heads: int, n: int, causal: bool, seed: int,
             knobs: Mapping[str, Any], device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The mechanism ``spec`` built for these sizes (random state drawn from ``seed``), moved to ``device``/``dtype``:
    the one way a module is built, for the runner (through :func:`build_module`) and for verify."""
    module = spec.build(head_dim=head_dim, heads=heads, n=n, causal=causal, seed=seed, **knobs)
    return module.to(device=device, dtype=dtype)


def build_module(case: Case, device: str | None = None) -> tuple[torch.nn.Module, float]:
    """The mechanism for ``case`` on its device and dtype (parameters frozen for ``fwd``), and the build time in ms."""
    t0 = time.perf_counter()
    module = build_on(case.spec(), head_dim=case.head_dim, heads=case.heads, n=case.n, causal=case.causal,
                      seed=case.seed, knobs=case.knob_dict, device=device or case.device, dtype=case.torch_dtype)
    if case.mode == "fwd":
        module.requires_grad_(False)
    return module, (time.perf_counter() - t0) * 1e3


def make_call(case: Case, module: torch.nn.Module, device: str | None = None) -> tuple[tuple[torch.Tensor, ...], Callable[[], Any]]:
    """Inputs for ``case`` and the call to measure.

    ``fwd`` runs the forward under ``torch.no_grad()`` (inference); ``fwd+bwd`` runs the
    forward with inputs (and parameters) requiring grad, then backward from a fixed
    upstream gradient made here; input and parameter grads are cleared before each call.
    Under a FakeTensorMode the inputs come out fake, which is how predictions are made.
    """
    device = device or case.device
    dtype = case.torch_dtype
    backward = case.mode == "fwd+bwd"
    inputs = case.spec().make_inputs(batch=case.batch, heads=case.heads, n=case.n, head_dim=case.head_dim,
                                     dtype=dtype, device=device, seed=case.seed, requires_grad=backward,
                                     knobs=case.knob_dict)  # K and V with kv_heads heads
    if backward:
        g = torch.Generator(device="cpu").manual_seed(case.seed + 7)
        upstream = torch.randn(inputs[0].shape, generator=g).to(device=device, dtype=dtype)  # output's shape

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
    return inputs, call


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def prepare(case: Case, device: str | None = None) -> Workload:
    """Build the mechanism and inputs for ``case`` and return the call to measure."""
    module, build_ms = build_module(case, device)
    inputs, call = make_call(case, module, device)
    info = dict(module.build_info()) if hasattr(module, "build_info") else {}
    return Workload(case=case, module=module, inputs=inputs, call=call, build_ms=build_ms,
                    param_bytes=param_bytes(module), info=info)
