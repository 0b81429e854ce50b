"""What every verify check shares: sizes, tolerances, the awkward knob values, the error statistics.

The awkward value of a knob comes from its declaration (``Knob.small`` and ``Knob.length``, or the
axis' declaration on another knob): verify knows no mechanism and no axis by name.
"""

from __future__ import annotations

from typing import Any

import torch

import mechanisms
from mechanisms.base import is_length, small_value_of

from ..cases import Case

DEFAULT_N = 777  # a multiple of no window, block, bucket or segment
BATCH, HEADS, HEAD_DIM = 2, 3, 32  # implementation check: B > 1, H > 1
FIDELITY_BATCH, FIDELITY_HEADS = 1, 2
FIDELITY_SEEDS = 3

TOLERANCES = {"float32": 1e-5, "float64": 1e-10, "float16": 2e-2, "bfloat16": 5e-2}


def mode_label(spec: mechanisms.MechanismSpec, causal: bool | None) -> str:
    if not spec.causal_applies:
        return "position encoding"
    return "causal" if causal else "bidirectional"


def fmt_knobs(knobs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items())


def small_value(knob: mechanisms.Knob, n: int) -> Any:
    """A small, awkward value for ``knob`` at length ``n``: its declared ``small`` (else its axis'),
    capped at n/4 for a length and moved off divisors of ``n``; the default when nothing is declared
    or the value would be invalid."""
    small = small_value_of(knob)
    if small is None or knob.type is not int:
        return knob.default
    length = is_length(knob)
    value = min(int(small), max(1, n // 4)) if length else int(small)
    lo = int(knob.minimum) if knob.minimum is not None else 1
    hi = int(knob.maximum) if knob.maximum is not None else None
    value = max(value, lo)
    if hi is not None:
        value = min(value, hi)
    if length:
        step = 0
        while n % value == 0 and value > 1 and step < 64 and (hi is None or value + 1 <= hi):
            value += 1
            step += 1
    if knob.choices is not None and value not in knob.choices:
        return knob.default
    try:
        return knob.parse(value)
    except mechanisms.RegistryError:
        return knob.default


def knob_candidates(spec: mechanisms.MechanismSpec, n: int) -> list[dict[str, Any]]:
    """The awkward setting first, then fallbacks (one axis knob back to its default, then all defaults)."""
    # a knob whose default is a case field (kv_heads = heads) stays at it: the decode check varies kv_heads itself
    awkward = {k.name: small_value(k, n) for k in spec.knobs if not k.default_from}
    out = [awkward]
    for k in spec.knobs:
        if k.axis is not None and k.name in awkward and awkward[k.name] != k.default:
            out.append({**awkward, k.name: k.default})
    out.append({k.name: k.default for k in spec.knobs if not k.default_from})
    unique: list[dict[str, Any]] = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


def make_case(spec, n: int, causal: bool, knobs: dict, *, batch: int, heads: int, dtype: str, device: str,
              seed: int, mode: str) -> Case:
    return Case(mechanism=spec.name, n=n, batch=batch, heads=heads, head_dim=HEAD_DIM, dtype=dtype,
                device=device, mode=mode, causal=causal, knobs=tuple(knobs.items()), seed=seed)


def choose_knobs(spec, n: int, causal: bool, **case_kw) -> tuple[dict | None, list[str]]:
    """The first candidate setting the mechanism supports, or (None, reasons of the awkward one)."""
    first_reasons: list[str] = []
    for i, knobs in enumerate(knob_candidates(spec, n)):
        reasons = spec.unsupported(make_case(spec, n, causal, knobs, **case_kw))
        if not reasons:
            return knobs, []
        if i == 0:
            first_reasons = reasons
    return None, first_reasons


def stats(o: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(max abs error, ‖o−ref‖/‖ref‖, cosine) in float64."""
    o64, r64 = o.detach().to(torch.float64), ref.detach().to(torch.float64)
    diff = o64 - r64
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    rn = float(r64.norm())
    rel = float(diff.norm()) / rn if rn > 0 else float(diff.norm())
    on = float(o64.norm())
    cos = float((o64 * r64).sum()) / (on * rn) if on > 0 and rn > 0 else (1.0 if on == rn else 0.0)
    return max_abs, rel, cos


def finite(t: torch.Tensor | None) -> bool:
    return t is None or bool(torch.isfinite(t).all())
