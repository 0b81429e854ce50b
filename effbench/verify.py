"""`effbench verify`: does each mechanism compute what it claims, and what accuracy does it give up?

Two layers, for every registered mechanism (plugins included), in-process on small N:

1. **Implementation** (``impl-output``, ``impl-grad``): the efficient ``forward`` in the chosen
   dtype against the mechanism's own ``reference()`` evaluated in float64 (the module converted
   with ``module.to(torch.float64)``, the same inputs promoted). Output and the gradients of
   q, k, v (position family: x) and of the parameters, from one fixed upstream gradient g.
   Shapes are awkward on purpose: B=2, H=3, N=777 by default, and every knob with a sweep
   axis set to a small value well below N that divides nothing (window 37 → 38 at N=777,
   block 16, bucket 48, ...), so that no window, block, bucket, chunk or segment tiles N.
   Causal and bidirectional, each where ``spec.unsupported(case)`` allows (else a skipped
   row with the reason). Pass: finite, and max|o − ref| ≤ tol·max(1, max|ref|) with tol
   1e-5 in float32 (2e-2 float16, 5e-2 bfloat16, 1e-10 float64, or ``tolerance``).

2. **Fidelity** (``fidelity``, ``trend``): ‖o − dense‖/‖v‖ and the cosine of o with exact
   softmax attention softmax(QKᵀ/√D)V (causal when the case is), with q, k ~ N(0, D^-½) so
   |q|²/√D ≈ 1, averaged over ``FIDELITY_SEEDS`` seeds (module and inputs), swept over the
   mechanism's own knob. What theory promises is checked, not only printed (``TRENDS``):
   error decreasing in Reformer rounds, Performer ×4 features → error ×0.35–0.65, window
   ≥ N − 1 equal to dense. The "position" family has no fidelity layer (an n/a row).

Everything a mechanism raises becomes a failed row with a one-line message; NaN or Inf
in any output or gradient is a failure. Deterministic under ``seed``.

Mechanisms may declare their own sweep and dense target (overriding ``TRENDS``/``TARGETS``)::

    verify_sweep = ("rounds", (1, 2, 4, 8), ("decreasing",))   # knob, values, expectations
    verify_target_knobs = {"rounds": 1, "bucket": "N"}           # dense target = reference() here

Values may be ints or the strings "N" and "N-1" (resolved at the verify length). Expectations:
``"decreasing"``, ``("ratio_per_4x", lo, hi)``, ``("equals_dense_at", value)``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import mechanisms

from .cases import DTYPES, Case
from .units import UsageError

DEFAULT_N = 777
BATCH, HEADS, HEAD_DIM = 2, 3, 32  # implementation check: B > 1, H > 1
FIDELITY_BATCH, FIDELITY_HEADS = 1, 2
FIDELITY_SEEDS = 3

TOLERANCES = {"float32": 1e-5, "float64": 1e-10, "float16": 2e-2, "bfloat16": 5e-2}

# Implementation-check value per sweep axis: small, and (for lengths) not a divisor of N.
SMALL = {"window": 37, "dilation": 3, "globals": 5, "block": 16, "rounds": 2, "bucket": 48, "features": 48,
         "rank": 48, "segment": 50, "memory": 40, "compress": 3}
LENGTH_AXES = {"window", "block", "bucket", "segment", "memory"}

# Fidelity sweep per axis for mechanisms that declare nothing (informational, no expectation).
GENERIC_SWEEP = {"window": (8, 32, 128, "N-1"), "dilation": (1, 2, 4), "globals": (0, 4, 16),
                 "block": (8, 16, 32, 64), "rounds": (1, 2, 4, 8), "bucket": (16, 32, 64, 128),
                 "features": (16, 64, 256, 1024), "rank": (16, 64, 256), "segment": (16, 64, 256),
                 "memory": (0, 16, 64, "N"), "compress": (1, 2, 4)}

# mechanism -> (knob, values, expectations); applied only when that mechanism is registered.
TRENDS: dict[str, tuple[str, tuple, tuple]] = {
    "local": ("window", (8, 32, 128, "N-1"), ("decreasing", ("equals_dense_at", "N-1"))),
    "longformer": ("window", (8, 32, 128, "N-1"), ("decreasing", ("equals_dense_at", "N-1"))),
    "dilated": ("window", (8, 32, 128), ("decreasing",)),  # dilated keys never cover every key unless δ = 1
    "bigbird": ("block", (8, 16, 32, 64), ("decreasing",)),  # (5 + r)·b keys per query: more with b
    "performer": ("features", (16, 64, 256, 1024), (("ratio_per_4x", 0.35, 0.65),)),
    "reformer": ("rounds", (1, 2, 4, 8), ("decreasing",)),
    "linformer": ("rank", (16, 64, 256), ()),  # a projection: never equal to dense, no promise
    "transformer-xl": ("memory", (0, 16, 64, "N"), ("decreasing", ("equals_dense_at", "N"))),
    "compressive": ("compress", (1, 2, 4, 8), ()),  # mean pooling: longer reach, blurrier keys; no promise
}

# mechanism -> knobs at which its own reference() is the exact attention it approximates.
TARGETS: dict[str, dict[str, Any]] = {
    "reformer": {"rounds": 1, "bucket": "N"},  # shared-QK: one chunk, one round = dense shared-QK attention
}

COLUMNS = ("mechanism", "check", "knob", "knob_value", "n", "causal", "error_rel", "cosine", "max_abs_err",
           "tolerance", "passed", "detail")


@dataclass
class CheckResult:
    """One row of the verify table and CSV. ``passed`` None: skipped or not applicable."""

    mechanism: str
    check: str  # impl-output | impl-grad | fidelity | trend
    n: int
    causal: bool | None = None
    knob: str = ""
    knob_value: Any = None
    error_rel: float | None = None
    cosine: float | None = None
    max_abs_err: float | None = None
    tolerance: float | None = None
    passed: bool | None = None
    detail: str = ""

    def as_row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class VerifyReport:
    rows: list[CheckResult]
    mechanisms: list[str]
    n: int
    dtype: str
    device: str
    seed: int
    tolerance: float
    passed: bool = True

    def failing(self) -> dict[str, list[CheckResult]]:
        """Failing rows grouped by mechanism, in run order."""
        out: dict[str, list[CheckResult]] = {}
        for r in self.rows:
            if r.passed is False:
                out.setdefault(r.mechanism, []).append(r)
        return out

    @property
    def failing_mechanisms(self) -> list[str]:
        return list(self.failing())


# ------------------------------------------------------------------------------ helpers

def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")[:200]


def _resolve(value: Any, n: int) -> Any:
    if isinstance(value, str):
        s = value.replace(" ", "").upper()
        if s == "N":
            return n
        if s.startswith("N-"):
            return n - int(s[2:])
        if s.startswith("N/"):
            return max(1, n // int(s[2:]))
    return value


def _fmt_knobs(knobs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items())


def small_value(knob: mechanisms.Knob, n: int) -> Any:
    """A small, awkward value for ``knob`` at length ``n`` (the default if it has no sweep axis)."""
    if knob.axis is None or knob.axis not in SMALL or knob.type is not int:
        return knob.default
    value = min(SMALL[knob.axis], max(1, n // 4)) if knob.axis in LENGTH_AXES else SMALL[knob.axis]
    lo = int(knob.minimum) if knob.minimum is not None else 1
    hi = int(knob.maximum) if knob.maximum is not None else None
    value = max(value, lo)
    if hi is not None:
        value = min(value, hi)
    if knob.axis in LENGTH_AXES:
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


def _knob_candidates(spec: mechanisms.MechanismSpec, n: int) -> list[dict[str, Any]]:
    """The awkward setting first, then fallbacks (one axis knob back to its default, then all defaults)."""
    awkward = {k.name: small_value(k, n) for k in spec.knobs}
    out = [awkward]
    for k in spec.knobs:
        if k.axis is not None and awkward[k.name] != k.default:
            out.append({**awkward, k.name: k.default})
    out.append({k.name: k.default for k in spec.knobs})
    unique = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


def _case(spec, n: int, causal: bool, knobs: dict, *, batch: int, heads: int, dtype: str, device: str,
          seed: int, mode: str) -> Case:
    return Case(mechanism=spec.name, n=n, batch=batch, heads=heads, head_dim=HEAD_DIM, dtype=dtype,
                device=device, mode=mode, causal=causal, knobs=tuple(knobs.items()), seed=seed)


def _choose_knobs(spec, n: int, causal: bool, **case_kw) -> tuple[dict | None, list[str]]:
    """The first candidate setting the mechanism supports, or (None, reasons of the awkward one)."""
    first_reasons: list[str] = []
    for i, knobs in enumerate(_knob_candidates(spec, n)):
        reasons = spec.unsupported(_case(spec, n, causal, knobs, **case_kw))
        if not reasons:
            return knobs, []
        if i == 0:
            first_reasons = reasons
    return None, first_reasons


def _causal_modes(spec) -> list[bool]:
    """Both, each checked against ``unsupported``; a position encoding has no causal form: once."""
    if spec.family == "position":
        return [False] if spec.supports_bidirectional else [True]
    return [False, True]


def _stats(o: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(max abs error, ‖o−ref‖/‖ref‖, cosine) in float64."""
    o64, r64 = o.detach().to(torch.float64), ref.detach().to(torch.float64)
    diff = o64 - r64
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    rn = float(r64.norm())
    rel = float(diff.norm()) / rn if rn > 0 else float(diff.norm())
    on = float(o64.norm())
    cos = float((o64 * r64).sum()) / (on * rn) if on > 0 and rn > 0 else (1.0 if on == rn else 0.0)
    return max_abs, rel, cos


def _finite(t: torch.Tensor | None) -> bool:
    return t is None or bool(torch.isfinite(t).all())


# ------------------------------------------------------------------- layer 1: implementation

def check_implementation(spec, *, n: int, causal: bool, knobs: dict, dtype: str, device: str, seed: int,
                         tol: float) -> list[CheckResult]:
    """impl-output and impl-grad rows for one (mechanism, causal) at ``knobs``."""
    tdtype = DTYPES[dtype]
    mode = "position encoding" if spec.family == "position" else "causal" if causal else "bidirectional"
    detail = mode + (f"; {_fmt_knobs(knobs)}" if knobs else "")
    base = dict(mechanism=spec.name, n=n, causal=causal)
    out_row = CheckResult(check="impl-output", **base)
    grad_row = CheckResult(check="impl-grad", **base)

    def fail(msg: str) -> list[CheckResult]:
        return [CheckResult(check="impl-output", tolerance=tol, passed=False, detail=f"{detail}; {msg}", **base)]

    stage = "build"
    try:
        torch.manual_seed(seed)
        module = spec.build(head_dim=HEAD_DIM, heads=HEADS, n=n, causal=causal, seed=seed, **knobs)
        module = module.to(device=device, dtype=tdtype)
        inputs = spec.make_inputs(batch=BATCH, heads=HEADS, n=n, head_dim=HEAD_DIM, dtype=tdtype, device=device,
                                  seed=seed, requires_grad=True)
        names = ["x"] if spec.family == "position" else ["q", "k", "v"][:len(inputs)]
        stage = "forward"
        out = module(*inputs)
        if not isinstance(out, torch.Tensor):
            return fail(f"forward returned {type(out).__name__}, not a tensor")
        if out.shape != inputs[0].shape:
            return fail(f"forward returned shape {tuple(out.shape)}, expected {tuple(inputs[0].shape)}")
        params = [p for p in module.parameters() if p.requires_grad]
        pnames = [name for name, p in module.named_parameters() if p.requires_grad]
        gen = torch.Generator(device="cpu").manual_seed(seed + 7)
        upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64)  # fixed g
        grads: Sequence[torch.Tensor | None]
        grad_error = None
        if out.requires_grad:
            stage = "backward"
            grads = torch.autograd.grad(out, [*inputs, *params], upstream.to(device=device, dtype=tdtype),
                                        allow_unused=True)
            grads = [None if g is None else g.detach().clone() for g in grads]
        else:
            grads = [None] * (len(inputs) + len(params))
            grad_error = "forward output carries no gradient (detached or computed under no_grad)"
        o = out.detach().clone()
        del out

        stage = "reference (float64)"
        module.to(torch.float64)
        inputs64 = [t.detach().to(torch.float64).requires_grad_(True) for t in inputs]
        params64 = [p for p in module.parameters() if p.requires_grad]
        ref = module.reference(*inputs64)
        if ref.shape != o.shape:
            return fail(f"reference returned shape {tuple(ref.shape)}, forward {tuple(o.shape)}")
        stage = "reference backward (float64)"
        if ref.requires_grad:
            rgrads = torch.autograd.grad(ref, [*inputs64, *params64], upstream.to(device=device), allow_unused=True)
        else:
            rgrads = [None] * (len(inputs64) + len(params64))
        ref = ref.detach()
    except Exception as exc:  # a mechanism's failure is a failed check, not a crash
        return fail(f"{stage} raised {_one_line(exc)}")

    # -- output
    max_abs, rel, cos = _stats(o, ref)
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    eff = tol * scale
    out_row.max_abs_err, out_row.error_rel, out_row.cosine, out_row.tolerance = max_abs, rel, cos, eff
    if not _finite(o):
        out_row.passed, out_row.detail = False, f"{detail}; forward output has NaN/Inf"
    elif not _finite(ref):
        out_row.passed, out_row.detail = False, f"{detail}; reference output has NaN/Inf"
    else:
        out_row.passed = max_abs <= eff
        out_row.detail = detail + (f"; tol {tol:.0e}×max|ref| {scale:.3g}" if scale > 1 else "")

    # -- gradients: one row, the worst tensor by error/tolerance, every tensor listed in the detail
    labels = names + (["params"] if params else [])
    per: list[tuple[str, float, float, float, float]] = []  # name, max_abs, rel, cos, effective tolerance
    problems = []
    groups: dict[str, list[tuple[torch.Tensor | None, torch.Tensor | None, str]]] = {}
    for i, name in enumerate(names):
        groups[name] = [(grads[i], rgrads[i], name)]
    if params:
        groups["params"] = [(grads[len(names) + j], rgrads[len(names) + j], pnames[j]) for j in range(len(params))]
    unused = []
    for label in labels:
        worst = None
        for g, rg, gname in groups[label]:
            if g is None and rg is None:
                if label != "params":
                    unused.append(gname)
                continue
            if g is None and grad_error is None:
                g = torch.zeros_like(rg)
                if float(rg.abs().max()) > 0:
                    problems.append(f"forward gives no gradient to {gname}, reference does")
            if g is None:
                continue
            rg = torch.zeros_like(g, dtype=torch.float64) if rg is None else rg
            if not _finite(g):
                problems.append(f"grad {gname} has NaN/Inf")
                continue
            if not _finite(rg):
                problems.append(f"reference grad {gname} has NaN/Inf")
                continue
            ga, gr, gc = _stats(g, rg)
            geff = tol * max(1.0, float(rg.abs().max()) if rg.numel() else 1.0)
            cand = (gname, ga, gr, gc, geff)
            if worst is None or ga / geff > worst[1] / worst[4]:
                worst = cand
        if worst is not None:
            per.append(worst)
    if grad_error:
        problems.append(grad_error)
    note = f"; {', '.join(unused)} unused (no gradient in forward and reference)" if unused and not grad_error else ""
    listed = ", ".join(f"{p[0]} {p[1]:.1e}" for p in per) or "none comparable"
    if per:
        w = max(per, key=lambda p: p[1] / p[4])
        grad_row.max_abs_err, grad_row.error_rel, grad_row.cosine, grad_row.tolerance = w[1], w[2], w[3], w[4]
        bad = [p[0] for p in per if p[1] > p[4]]
        if bad:
            problems.append(f"grad {', '.join(bad)} beyond tolerance")
    else:
        grad_row.tolerance = tol
    grad_row.passed = not problems
    grad_row.detail = f"{detail}; max abs per grad: {listed}{note}" + (f"; {'; '.join(problems)}" if problems else "")
    return [out_row, grad_row]


# ------------------------------------------------------------------- layer 2: fidelity

def _sweep_for(spec) -> list[tuple[str, tuple, tuple]]:
    declared = getattr(spec.cls, "verify_sweep", None)
    if declared is not None:
        return [tuple(declared)]
    if spec.name in TRENDS:
        knob, values, expect = TRENDS[spec.name]
        if knob in spec.knob_names:
            return [(knob, values, expect)]
    return [(k.name, GENERIC_SWEEP[k.axis], ()) for k in spec.knobs
            if k.axis in GENERIC_SWEEP and k.type is int]


def _target_knobs(spec) -> dict | None:
    declared = getattr(spec.cls, "verify_target_knobs", None)
    if declared is not None:
        return dict(declared)
    return TARGETS.get(spec.name)


def _fidelity_inputs(n: int, seed: int, tdtype: torch.dtype, device: str):
    """q, k ~ N(0, D^-½) (|q|²/√D ≈ 1), v ~ N(0, 1); (in dtype, promoted to float64) each."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 2_000_003)
    shape = (FIDELITY_BATCH, FIDELITY_HEADS, n, HEAD_DIM)
    sigma = HEAD_DIM ** -0.25
    q = torch.randn(shape, generator=gen, dtype=torch.float64) * sigma
    k = torch.randn(shape, generator=gen, dtype=torch.float64) * sigma
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    low = [t.to(device=device, dtype=tdtype) for t in (q, k, v)]
    return low, [t.to(torch.float64) for t in low]


def _seed_dependent(spec, n, causal, knobs, tdtype, device, seed) -> bool:
    """Does the module's random state (features, projections, rotations, blocks) depend on ``seed``?

    Two builds with different seeds run on the same inputs; any difference means random state,
    whose fidelity is then averaged over ``FIDELITY_SEEDS`` seeds. Errors here count as random.
    """
    try:
        (q, k, v), _ = _fidelity_inputs(n, seed, tdtype, device)
        outs = []
        for s in (seed, seed + 1):
            module = spec.build(head_dim=HEAD_DIM, heads=FIDELITY_HEADS, n=n, causal=causal, seed=s, **knobs)
            with torch.no_grad():
                outs.append(module.to(device=device, dtype=tdtype)(q, k, v))
        return not torch.equal(outs[0], outs[1])
    except Exception:
        return True


def _dense_target(spec, target_knobs, n, causal, q, k, v, seed, device):
    if target_knobs is None:
        mask = mechanisms.causal_mask(n, q.device) if causal else None
        return mechanisms.masked_softmax_attention(q, k, v, mask)
    knobs = {name: _resolve(val, n) for name, val in target_knobs.items()}
    module = spec.build(head_dim=HEAD_DIM, heads=FIDELITY_HEADS, n=n, causal=causal, seed=seed, **knobs)
    return module.to(device=device, dtype=torch.float64).reference(q, k, v)


def check_fidelity(spec, *, n: int, causal: bool, base_knobs: dict, dtype: str, device: str, seed: int,
                   tol: float) -> list[CheckResult]:
    """fidelity rows over the mechanism's knob sweep, then trend rows."""
    tdtype = DTYPES[dtype]
    mode = "causal" if causal else "bidirectional"
    target_knobs = _target_knobs(spec)
    target_label = ("dense shared-QK" if spec.name == "reformer" else
                    f"{spec.name} reference at {_fmt_knobs(target_knobs)}") if target_knobs else "dense softmax"
    exact = spec.family == "exact"
    random = not exact and _seed_dependent(spec, n, causal, base_knobs, tdtype, device, seed)
    seeds = [seed + i for i in range(FIDELITY_SEEDS)] if random else [seed]
    rows: list[CheckResult] = []
    sweeps = _sweep_for(spec) or [("", (None,), ())]
    for knob, values, expectations in sweeps:
        resolved: list[Any] = []
        for v in values:
            r = _resolve(v, n)
            if r not in resolved:
                resolved.append(r)
        sweep_rows: dict[Any, CheckResult] = {}
        for value in resolved:
            knobs = dict(base_knobs)
            if knob:
                knobs[knob] = value
            row = CheckResult(mechanism=spec.name, check="fidelity", n=n, causal=causal, knob=knob,
                              knob_value=value if knob else None, tolerance=tol if exact else None)
            others = _fmt_knobs({k: v for k, v in knobs.items() if k != knob})
            row.detail = f"{mode}; vs {target_label}" + (f"; {others}" if others else "") + \
                (f"; mean of {len(seeds)} seeds" if len(seeds) > 1 else "")
            reasons = spec.unsupported(_case(spec, n, causal, knobs, batch=FIDELITY_BATCH, heads=FIDELITY_HEADS,
                                             dtype=dtype, device=device, seed=seed, mode="fwd"))
            if reasons:
                row.detail = f"{mode}; skipped: {'; '.join(reasons)}"
                rows.append(row)
                continue
            errs, coss, maxs = [], [], []
            try:
                for s in seeds:
                    module = spec.build(head_dim=HEAD_DIM, heads=FIDELITY_HEADS, n=n, causal=causal, seed=s,
                                        **knobs).to(device=device, dtype=tdtype)
                    (q, k, v), (q64, k64, v64) = _fidelity_inputs(n, s, tdtype, device)
                    with torch.no_grad():
                        o = module(q, k, v)
                        target = _dense_target(spec, target_knobs, n, causal, q64, k64, v64, s, device)
                    if not _finite(o):
                        raise FloatingPointError("forward output has NaN/Inf")
                    max_abs, _, cos = _stats(o, target)
                    errs.append(float((o.to(torch.float64) - target).norm() / v64.norm()))
                    coss.append(cos)
                    maxs.append(max_abs)
            except Exception as exc:
                row.passed = False
                row.detail = f"{mode}; {_one_line(exc)}"
                rows.append(row)
                continue
            row.error_rel = sum(errs) / len(errs)
            row.cosine = sum(coss) / len(coss)
            row.max_abs_err = max(maxs)
            row.passed = (row.max_abs_err <= tol) if exact else True
            rows.append(row)
            sweep_rows[value] = row
        if knob:
            rows += _trends(spec, knob, resolved, sweep_rows, expectations, n=n, causal=causal, tol=tol)
    return rows


def _trends(spec, knob, values, sweep_rows, expectations, *, n, causal, tol) -> list[CheckResult]:
    out = []
    mode = "causal" if causal else "bidirectional"
    for expect in expectations:
        kind = expect if isinstance(expect, str) else expect[0]
        row = CheckResult(mechanism=spec.name, check="trend", n=n, causal=causal, knob=knob)
        have = [(v, sweep_rows[v]) for v in values if v in sweep_rows]
        if kind == "equals_dense_at":
            at = _resolve(expect[1], n)
            row.knob_value, row.tolerance = at, tol
            r = sweep_rows.get(at)
            if r is None:
                row.detail = f"{mode}; n/a: no fidelity result at {knob}={at}"
            else:
                row.max_abs_err, row.error_rel, row.cosine = r.max_abs_err, r.error_rel, r.cosine
                row.passed = r.max_abs_err <= tol
                row.detail = f"{mode}; {knob}={at} covers every key: must equal dense (max abs ≤ tol)"
        elif len(have) < 2:
            row.detail = f"{mode}; n/a: {kind} needs two {knob} values, have {len(have)}"
        elif kind == "decreasing":
            errs = [r.error_rel for _, r in have]
            steps_ok = all(b <= a * 1.05 + 1e-6 for a, b in zip(errs, errs[1:]))
            row.error_rel = errs[-1] / errs[0] if errs[0] > 0 else None
            row.passed = steps_ok and errs[-1] < errs[0]
            row.detail = (f"{mode}; error decreasing in {knob} "
                          f"({', '.join(f'{v}: {e:.3g}' for (v, _), e in zip(have, errs))})")
        elif kind == "ratio_per_4x":
            lo, hi = expect[1], expect[2]
            pts = [(math.log(v), math.log(r.error_rel)) for v, r in have
                   if isinstance(v, (int, float)) and v > 0 and r.error_rel and r.error_rel > 0]
            if len(pts) < 2:
                row.detail = f"{mode}; n/a: too few positive errors for a slope"
            else:
                mx = sum(p[0] for p in pts) / len(pts)
                my = sum(p[1] for p in pts) / len(pts)
                slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
                ratio = 4.0 ** slope
                row.error_rel = ratio
                row.passed = lo <= ratio <= hi
                row.detail = (f"{mode}; {knob} ×4 → error ×{ratio:.2f} (fit over "
                              f"{', '.join(str(v) for v, _ in have)}), expected {lo}–{hi}")
        else:
            row.detail = f"{mode}; n/a: unknown expectation {expect!r}"
        out.append(row)
    return out


# ------------------------------------------------------------------------------ driver

def run_verify(mechs: list[str] | None, n: int | None, device: str = "cpu", dtype: str = "float32",
               seed: int = 0, tolerance: float | None = None,
               progress: Callable[[int, int, str], None] | None = None) -> VerifyReport:
    """Verify ``mechs`` (None, [] or ["all"]: every registered mechanism) and return the report.

    ``progress(done, total, label)`` is called before each mechanism (label = its name) and
    once at the end (done == total, label "done"). Raises UsageError / RegistryError for bad
    arguments; never for a mechanism's own failure (that is a failed row).
    """
    names = list(mechanisms.REGISTRY) if not mechs or list(mechs) == ["all"] else list(dict.fromkeys(mechs))
    for name in names:
        mechanisms.get(name)  # raises with the valid choices
    n = DEFAULT_N if n is None else int(n)
    if n < 2:
        raise UsageError(f"--n must be at least 2, got {n}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tol = TOLERANCES[dtype] if tolerance is None else float(tolerance)
    if not tol > 0:
        raise UsageError(f"--tolerance must be positive, got {tolerance}")

    rows: list[CheckResult] = []
    for i, name in enumerate(names):
        if progress:
            progress(i, len(names), name)
        rows += verify_mechanism(mechanisms.get(name), n=n, device=device, dtype=dtype, seed=seed, tol=tol)
    if progress:
        progress(len(names), len(names), "done")
    report = VerifyReport(rows=rows, mechanisms=names, n=n, dtype=dtype, device=device, seed=seed, tolerance=tol)
    report.passed = all(r.passed is not False for r in rows)
    return report


def verify_mechanism(spec, *, n: int, device: str, dtype: str, seed: int, tol: float) -> list[CheckResult]:
    rows: list[CheckResult] = []
    case_kw = dict(dtype=dtype, device=device, seed=seed)
    for causal in _causal_modes(spec):
        mode = "causal" if causal else "bidirectional"
        try:
            knobs, reasons = _choose_knobs(spec, n, causal, batch=BATCH, heads=HEADS, mode="fwd+bwd", **case_kw)
        except Exception as exc:
            rows.append(CheckResult(mechanism=spec.name, check="impl-output", n=n, causal=causal, tolerance=tol,
                                    passed=False, detail=f"{mode}; unsupported() raised {_one_line(exc)}"))
            continue
        if knobs is None:
            rows.append(CheckResult(mechanism=spec.name, check="impl-output", n=n, causal=causal,
                                    detail=f"{mode}; skipped: {'; '.join(reasons)}"))
            continue
        rows += check_implementation(spec, n=n, causal=causal, knobs=knobs, dtype=dtype, device=device,
                                     seed=seed, tol=tol)
        if spec.family == "position":
            continue
        try:
            rows += check_fidelity(spec, n=n, causal=causal, base_knobs=knobs, dtype=dtype, device=device,
                                   seed=seed, tol=tol)
        except Exception as exc:
            rows.append(CheckResult(mechanism=spec.name, check="fidelity", n=n, causal=causal, passed=False,
                                    detail=f"{mode}; {_one_line(exc)}"))
    if spec.family == "position":
        rows.append(CheckResult(mechanism=spec.name, check="fidelity", n=n, detail=(
            "n/a: a position encoding is not attention; only its output and gradients against reference()")))
    return rows


# ------------------------------------------------------------------------------ output

def write_csv(report: VerifyReport, path: str | Path) -> Path:
    """Write every row (schema ``COLUMNS``) to ``path``, replacing it; return the path."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for r in report.rows:
            row = r.as_row()
            writer.writerow({c: ("" if row[c] is None else row[c]) for c in COLUMNS})
    return path


def _e(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}e}"


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def _result(passed: bool | None, detail: str) -> str:
    if passed is True:
        return "[green]pass[/]"
    if passed is False:
        return "[bold red]FAIL[/]"
    return "[dim]n/a[/]" if "n/a" in detail else "[dim]skip[/]"


def summary_line(report: VerifyReport) -> str:
    """One line naming each failing mechanism with its worst error and tolerance."""
    failing = report.failing()
    if not failing:
        checked = len(report.mechanisms)
        return f"all {checked} mechanism(s) pass (n={report.n}, {report.dtype}, {report.device}, seed {report.seed})"
    parts = []
    for name, bad in failing.items():
        r = next((b for b in bad if b.check.startswith("impl")), bad[0])
        what = r.check + ("" if r.causal is None else (" causal" if r.causal else " bidirectional"))
        if r.max_abs_err is not None and r.tolerance is not None and r.check != "trend":
            parts.append(f"{name} ({what}: max abs error {r.max_abs_err:.2e} > tolerance {r.tolerance:.1e})")
        elif r.check == "trend":
            parts.append(f"{name} ({what}: {r.detail.split('; ', 1)[-1]})")
        else:
            msg = r.detail.split("; ")[-1]
            parts.append(f"{name} ({what}: {msg}" + (f"; tolerance {r.tolerance:.1e})" if r.tolerance else ")"))
    return f"verify failed for {len(failing)} of {len(report.mechanisms)} mechanism(s): " + "; ".join(parts)


def render(report: VerifyReport, console) -> None:
    """A rich table (fidelity sweeps folded into one line each), then the summary line."""
    from rich.table import Table

    table = Table(title=f"effbench verify: n={report.n}, {report.dtype}, {report.device}, seed {report.seed}")
    for col, just in (("mechanism", "left"), ("check", "left"), ("detail (causal / knobs)", "left"),
                      ("error", "right"), ("tolerance", "right"), ("result", "left")):
        table.add_column(col, justify=just, overflow="fold")
    rows = report.rows
    i = 0
    last_mech = None
    while i < len(rows):
        r = rows[i]
        mech = r.mechanism if r.mechanism != last_mech else ""
        if last_mech is not None and r.mechanism != last_mech:
            table.add_section()
        last_mech = r.mechanism
        if r.check == "fidelity" and r.knob:
            j = i
            group = []
            while j < len(rows) and rows[j].check == "fidelity" and rows[j].mechanism == r.mechanism \
                    and rows[j].causal == r.causal and rows[j].knob == r.knob:
                group.append(rows[j])
                j += 1
            ran = [g for g in group if g.error_rel is not None]
            mode = "causal" if r.causal else "bidirectional"
            skipped = [g for g in group if g.passed is None]
            failed = [g for g in group if g.passed is False]
            vals = ", ".join(str(g.knob_value) for g in ran)
            detail = f"{mode}; {r.knob} = {vals or '—'}; rel err ‖o−dense‖/‖v‖ (cos)"
            if skipped:
                detail += f"; {len(skipped)} skipped: " + skipped[0].detail.split("skipped: ", 1)[-1][:80]
            if failed:
                detail += f"; {failed[0].detail.split('; ', 1)[-1]}"
            err = " → ".join(f"{g.error_rel:.3g} ({g.cosine:.3f})" for g in ran) or "—"
            passed = False if failed else (True if ran else None)
            table.add_row(mech, "fidelity", detail, err, _e(r.tolerance), _result(passed, detail))
            i = j
            continue
        if r.check == "fidelity":
            err = f"{r.error_rel:.3g} (cos {r.cosine:.3f})" if r.error_rel is not None else "—"
            if r.max_abs_err is not None and r.tolerance is not None:
                err += f"; max abs {_e(r.max_abs_err)}"
        elif r.check == "trend":
            if r.knob_value is not None and r.max_abs_err is not None:
                err = f"max abs {_e(r.max_abs_err)}"
            elif "×4" in r.detail and r.error_rel is not None:
                err = f"×{r.error_rel:.2f}"
            else:
                err = f"last/first {_g(r.error_rel)}" if r.error_rel is not None else "—"
        else:
            err = f"{_e(r.max_abs_err)} (rel {_e(r.error_rel)})" if r.max_abs_err is not None else "—"
        table.add_row(mech, r.check, r.detail, err, _e(r.tolerance), _result(r.passed, r.detail))
        i += 1
    console.print(table)
    line = summary_line(report)
    console.print(("[green]" if report.passed else "[bold red]") + line + "[/]", highlight=False, soft_wrap=True)
