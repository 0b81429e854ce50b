"""A decode case made ready to run: the module, the context's state, and the single-token steps to take.

A decode case (``Case.phase == "decode"``) is inference one token at a time: the mechanism's
``decode_init`` fills its cache or state from a context of N tokens (untimed, outside every peak), then
``decode_step`` takes one token after another. The module is built for ``case.capacity`` positions (N, the
``decode_steps`` timed steps and the harness' few extra steps), so a position-dependent table (BigBird's
random blocks) covers every step and a static cache never reallocates.

Readings (the runner's decode stages):

- ``state_bytes``: the bytes of tensor storage ``decode_init`` allocated and its state still holds, counted by
  the storage tracker (never a formula); ``state_bytes_analytic`` is the mechanism's declared formula beside it;
- ``time_ms_per_token``: median (and IQR) over the ``decode_steps`` timed steps, one sample per step, after
  one warm-up step (``--min-time`` does not apply: each call consumes a token);
- ``peak_tensor_bytes``: the tracker's peak of one step on top of the state (scores, output);
- ``read_bytes`` / ``read_gbps``: what one step reads from its state (declared ``decode_read_bytes``, else the
  measured state) over its median time — decode is bound by memory bandwidth, so this is read against the
  device's copy bandwidth recorded in the sidecar.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .cases import Case
from .measure import memory
from .workload import build_on, param_bytes


class DecodeExhausted(RuntimeError):
    """More steps were asked of a decode workload than its case has room for."""


@dataclass
class DecodeWorkload:
    """The module, the context's keys and values, and the queued single-token inputs of one decode case."""

    case: Case
    module: torch.nn.Module
    context: tuple[torch.Tensor, torch.Tensor]  # k, v (B, Hkv, N, D)
    steps: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q (B, H, S, D), k and v (B, Hkv, S, D), S = capacity − N
    build_ms: float
    param_bytes: int
    info: dict = field(default_factory=dict)
    state: Any = None
    taken: int = 0

    def input_bytes(self) -> int:
        """Bytes of the context, the queued tokens and the parameters (held for the whole case)."""
        return int(sum(t.untyped_storage().nbytes() for t in (*self.context, *self.steps))) + self.param_bytes

    def fill(self) -> tuple[int, Any]:
        """Fill the state from the context under the storage tracker; returns (bytes it holds, the state)."""
        k, v = self.context
        tracker, state = memory.track(lambda: self.module.decode_init(k, v, self.case.capacity))
        self.state, self.taken = state, 0
        return int(tracker.current), state

    def step(self) -> torch.Tensor:
        """Decode the next token: out (B, H, 1, D)."""
        q, k, v = self.steps
        t = self.taken
        if t >= q.shape[2]:
            raise DecodeExhausted(f"decode case has room for {q.shape[2]} steps after N={self.case.n}")
        self.taken += 1
        with torch.no_grad():
            return self.module.decode_step(self.state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])


def build_decode_module(case: Case, device: str | None = None) -> tuple[torch.nn.Module, float]:
    """The mechanism built for ``case.capacity`` positions, causal, parameters frozen; and the build time in ms."""
    t0 = time.perf_counter()
    module = build_on(case.spec(), head_dim=case.head_dim, heads=case.heads, n=case.capacity, causal=True,
                      seed=case.seed, knobs=case.knob_dict, device=device or case.device, dtype=case.torch_dtype)
    module.requires_grad_(False)
    return module, (time.perf_counter() - t0) * 1e3


def decode_workload(case: Case, module: torch.nn.Module, build_ms: float = 0.0,
                    device: str | None = None) -> DecodeWorkload:
    """The inputs of ``case`` (real, or fake under a FakeTensorMode) around a built ``module``.

    They are the prefill inputs of ``capacity`` positions (the tensors a causal prefill over them would take);
    the first N keys and values are the context, the rest are the steps' tokens.
    """
    device = device or case.device
    q, k, v = case.spec().make_inputs(batch=case.batch, heads=case.heads, n=case.capacity, head_dim=case.head_dim,
                                      dtype=case.torch_dtype, device=device, seed=case.seed, knobs=case.knob_dict)
    n = case.n
    steps = (q[:, :, n:].clone(), k[:, :, n:].clone(), v[:, :, n:].clone())  # (B, H|Hkv, capacity − N, D)
    context = (k[:, :, :n].clone(), v[:, :, :n].clone())  # (B, Hkv, N, D); the full q is dropped here
    info = dict(module.build_info()) if hasattr(module, "build_info") else {}
    return DecodeWorkload(case=case, module=module, context=context, steps=steps, build_ms=build_ms,
                          param_bytes=param_bytes(module), info=info)


def prepare_decode(case: Case, device: str | None = None) -> DecodeWorkload:
    """Build the module and make the inputs of a decode case."""
    module, build_ms = build_decode_module(case, device)
    return decode_workload(case, module, build_ms, device)


def analytic_fields(case: Case, state_bytes: int | None) -> dict[str, Any]:
    """``state_bytes_analytic`` and ``read_bytes`` of a decode case (read: declared, else the measured state)."""
    spec = case.spec()
    kw = dict(batch=case.batch, heads=case.heads, head_dim=case.head_dim, n=case.n, capacity=case.capacity,
              itemsize=case.torch_dtype.itemsize, knobs=case.knob_dict)
    declared = spec.state_bytes(**kw)
    read = spec.decode_read_bytes(**kw)
    return {"state_bytes_analytic": declared, "read_bytes": read if read is not None else state_bytes}


def read_gbps(read_bytes: int | None, ms_per_token: float | None) -> float | None:
    """Bytes one step reads over its time, in GB/s (10⁹ B/s)."""
    if not read_bytes or not ms_per_token:
        return None
    return round(read_bytes / (ms_per_token * 1e-3) / 1e9, 4)
