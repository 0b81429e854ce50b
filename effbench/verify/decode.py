"""The decode check: T single-token steps after a context of N0 equal the causal prefill over N0 + T.

For a mechanism that declares a decode form (``decode_init`` / ``decode_step``): the module built for
N0 + T positions fills its state from the first N0 keys and values in float32, then decodes the last T
tokens one at a time; the outputs are compared with ``reference()`` over all N0 + T positions in float64,
at its last T rows (atol ``tol``·max(1, max|ref|)). The state's bytes are measured by the storage tracker
while ``decode_init`` runs (what it allocated and still holds) and must equal the declared
``state_bytes`` to 1%. Grouped-query attention is checked too where the mechanism takes ``kv_heads``
(H = 4 with kv_heads 4, 2 and 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import mechanisms.base as mechanisms

from ..cases import DTYPES
from ..errors import one_line
from ..measure import memory
from .report import CheckResult
from .settings import BATCH, HEAD_DIM, choose_knobs, fmt_knobs, stats

DECODE_STEPS = 9  # T at least; more where a length knob is longer, so every ring wraps and a segment closes
DECODE_HEADS = 4  # H divisible by 2 and 1: MHA, GQA and MQA in one check
STATE_TOLERANCE = 0.01


@dataclass
class DecodeOutcome:
    """What one decode check found (outputs compared, state measured against the declaration)."""

    max_abs_err: float
    error_rel: float
    cosine: float
    scale: float  # max(1, max|ref|)
    state_bytes: int
    state_bytes_analytic: int
    kv_heads: int


def run_decode(spec, *, n0: int, steps: int, knobs: dict, kv_heads: int, batch: int = BATCH,
               heads: int = DECODE_HEADS, head_dim: int = HEAD_DIM, dtype: str = "float32", device: str = "cpu",
               seed: int = 0) -> DecodeOutcome:
    """Decode ``steps`` tokens after ``n0`` and compare them with the float64 causal reference."""
    knobs = dict(knobs)
    if "kv_heads" in spec.knob_names:
        knobs["kv_heads"] = kv_heads
    tdtype = DTYPES[dtype]
    total = n0 + steps
    module = spec.build(head_dim=head_dim, heads=heads, n=total, causal=True, seed=seed, **knobs)
    module = module.to(device=device, dtype=torch.float64)
    q, k, v = spec.make_inputs(batch=batch, heads=heads, n=total, head_dim=head_dim, dtype=torch.float64,
                               device=device, seed=seed, knobs=knobs)
    with torch.no_grad():
        ref = module.reference(q, k, v)[:, :, n0:]  # (B, H, T, D)
        module = module.to(tdtype)
        q, k, v = (t.to(tdtype) for t in (q, k, v))
        tracker, state = memory.track(lambda: module.decode_init(k[:, :, :n0], v[:, :, :n0], total))
        held = tracker.current  # bytes decode_init allocated and its state still holds
        outs = []
        for i in range(n0, total):
            outs.append(module.decode_step(state, q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1]))
    out = torch.cat(outs, dim=2)  # (B, H, T, D)
    if out.shape != ref.shape:
        raise ValueError(f"decode steps returned shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    max_abs, rel, cos = stats(out, ref)
    declared = spec.state_bytes(batch=batch, heads=heads, head_dim=head_dim, n=n0, capacity=total,
                                itemsize=tdtype.itemsize, knobs=knobs)
    return DecodeOutcome(max_abs_err=max_abs, error_rel=rel, cosine=cos, scale=max(1.0, float(ref.abs().max())),
                         state_bytes=int(held), state_bytes_analytic=int(declared),
                         kv_heads=spec.kv_heads_of(heads, knobs))


def kv_variants(spec, heads: int = DECODE_HEADS) -> list[int]:
    """kv_heads values to check: heads, heads/2 and 1 where the mechanism takes ``kv_heads``; else heads."""
    if "kv_heads" not in spec.knob_names:
        return [heads]
    return list(dict.fromkeys([heads, heads // 2, 1]))


def steps_for(spec, knobs: dict) -> int:
    """T: :data:`DECODE_STEPS`, or two more than the longest length knob (window, segment, block), so the steps
    wrap every ring buffer and cross a segment or block boundary whatever N0 is."""
    lengths = [int(knobs[k.name]) for k in spec.knobs if k.name in knobs and mechanisms.is_length(k)
               and isinstance(knobs[k.name], int)]
    return max([DECODE_STEPS] + [v + 2 for v in lengths])


def check_decode(spec, *, n: int, dtype: str, device: str, seed: int, tol: float,
                 steps: int | None = None) -> list[CheckResult]:
    """The ``decode`` rows of ``effbench verify`` for one mechanism (one per kv_heads variant)."""
    base = dict(mechanism=spec.name, check="decode", n=n, causal=True, mode="causal")
    if not spec.decodes:
        return [CheckResult(applicable=False, reason=spec.no_decode_reason,
                            detail=f"n/a: {spec.no_decode_reason}", **base)]
    knobs, reasons = choose_knobs(spec, n, True, batch=BATCH, heads=DECODE_HEADS, mode="fwd", dtype=dtype,
                                  device=device, seed=seed)
    if knobs is None:
        why = "; ".join(reasons)
        return [CheckResult(reason=why, detail=f"causal; skipped: {why}", **base)]
    knobs.pop("kv_heads", None)
    steps = steps or steps_for(spec, knobs)
    rows = []
    for kv in kv_variants(spec):
        label = fmt_knobs({**knobs, **({"kv_heads": kv} if "kv_heads" in spec.knob_names else {})})
        try:
            o = run_decode(spec, n0=n, steps=steps, knobs=knobs, kv_heads=kv, dtype=dtype, device=device,
                           seed=seed)
        except Exception as exc:
            why = one_line(exc, 200, first_line=True)
            rows.append(CheckResult(passed=False, reason=why, detail=f"causal; {why}", knobs=label, tolerance=tol,
                                    **base))
            continue
        close = o.max_abs_err <= tol * o.scale
        state_ok = abs(o.state_bytes - o.state_bytes_analytic) <= STATE_TOLERANCE * max(o.state_bytes_analytic, 1)
        why = "" if close and state_ok else (
            f"max|decode − prefill| {o.max_abs_err:.2e} > {tol * o.scale:.1e}" if not close else
            f"state {o.state_bytes} B measured, {o.state_bytes_analytic} B declared")
        rows.append(CheckResult(
            max_abs_err=o.max_abs_err, error_rel=o.error_rel, cosine=o.cosine, tolerance=tol, passed=close and state_ok,
            reason=why, knobs=label, knob="kv_heads" if "kv_heads" in spec.knob_names else "",
            knob_value=o.kv_heads if "kv_heads" in spec.knob_names else None,
            detail=(f"causal; kv_heads {o.kv_heads} of {DECODE_HEADS}; {steps} steps after N0={n}; state {o.state_bytes} B measured = "
                    f"{o.state_bytes_analytic} B declared" if state_ok else f"causal; {why}"), **base))
    return rows
