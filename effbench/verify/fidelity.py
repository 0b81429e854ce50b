"""Layer 2, fidelity: how far is each mechanism from exact attention, and does it keep theory's promises?

‖o − target‖/‖v‖ and the cosine of o with the target, swept over the knob each mechanism declares
(``spec.fidelity``). The target is exact softmax attention softmax(QKᵀ/√D)V (causal when the case
is), or the mechanism's own ``reference()`` at its declared ``exact_at`` knobs. q, k ~ N(0, D^-½)
so |q|²/√D ≈ 1; a mechanism with random state is averaged over ``FIDELITY_SEEDS`` seeds. The
declared :class:`mechanisms.Trend` s are checked (``trend`` rows), not only printed.
"""

from __future__ import annotations

from typing import Any

import torch

import mechanisms
from mechanisms import Fidelity, Trend, resolve_length

from ..cases import DTYPES
from ..errors import one_line
from ..fits import fit_loglog
from .report import CheckResult
from .settings import FIDELITY_BATCH, FIDELITY_HEADS, FIDELITY_SEEDS, HEAD_DIM, finite, fmt_knobs, make_case, stats


def fidelity_inputs(n: int, seed: int, tdtype: torch.dtype, device: str):
    """q, k ~ N(0, D^-½) (|q|²/√D ≈ 1), v ~ N(0, 1); (in dtype, promoted to float64) each."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 2_000_003)
    shape = (FIDELITY_BATCH, FIDELITY_HEADS, n, HEAD_DIM)
    sigma = HEAD_DIM ** -0.25
    q = torch.randn(shape, generator=gen, dtype=torch.float64) * sigma  # (B, H, N, D)
    k = torch.randn(shape, generator=gen, dtype=torch.float64) * sigma  # (B, H, N, D)
    v = torch.randn(shape, generator=gen, dtype=torch.float64)  # (B, H, N, D)
    low = [t.to(device=device, dtype=tdtype) for t in (q, k, v)]
    return low, [t.to(torch.float64) for t in low]


def _build(spec, n, causal, seed, knobs, device, dtype, heads: int = FIDELITY_HEADS):
    from ..workload import build_on

    return build_on(spec, head_dim=HEAD_DIM, heads=heads, n=n, causal=causal, seed=seed, knobs=knobs,
                    device=device, dtype=dtype)


def seed_dependent(spec, n, causal, knobs, tdtype, device, seed) -> bool:
    """Does the module's random state (features, projections, rotations, blocks) depend on ``seed``?
    Two builds with different seeds on the same inputs; any difference (or an error) means random."""
    try:
        (q, k, v), _ = fidelity_inputs(n, seed, tdtype, device)
        outs = []
        for s in (seed, seed + 1):
            with torch.no_grad():
                outs.append(_build(spec, n, causal, s, knobs, device, tdtype)(q, k, v))
        return not torch.equal(outs[0], outs[1])
    except Exception:
        return True


def dense_target(spec, n, causal, q, k, v, seed, device) -> torch.Tensor:
    """Exact attention, or ``reference()`` at the declared ``exact_at`` knobs, in float64."""
    exact_at = spec.exact_at
    if exact_at is None:
        mask = mechanisms.causal_mask(n, q.device) if causal else None
        return mechanisms.masked_softmax_attention(q, k, v, mask)
    knobs = {name: resolve_length(val, n) for name, val in exact_at.items()}
    return _build(spec, n, causal, seed, knobs, device, torch.float64, heads=q.shape[1]).reference(q, k, v)


def _measure_point(spec, n, causal, knobs, seeds, tdtype, device) -> tuple[float, float, float]:
    """(mean error ‖o−target‖/‖v‖, mean cosine, worst max abs error) over ``seeds``."""
    errs, coss, maxs = [], [], []
    for s in seeds:
        module = _build(spec, n, causal, s, knobs, device, tdtype)
        (q, k, v), (q64, k64, v64) = fidelity_inputs(n, s, tdtype, device)
        with torch.no_grad():
            o = module(q, k, v)  # (B, H, N, D)
            target = dense_target(spec, n, causal, q64, k64, v64, s, device)  # (B, H, N, D) float64
        if not finite(o):
            raise FloatingPointError("forward output has NaN/Inf")
        max_abs, _, cos = stats(o, target)
        errs.append(float((o.to(torch.float64) - target).norm() / v64.norm()))
        coss.append(cos)
        maxs.append(max_abs)
    return sum(errs) / len(errs), sum(coss) / len(coss), max(maxs)


def _sweep_values(sweep: Fidelity, n: int) -> list[Any]:
    resolved: list[Any] = []
    for v in sweep.values:
        r = resolve_length(v, n)
        if r not in resolved:
            resolved.append(r)
    return resolved


def _point_row(spec, sweep, value, knobs, *, n, causal, dtype, device, seed, seeds, tol, exact) -> CheckResult:
    """One fidelity row: the mechanism at ``knobs`` against its target."""
    mode = "causal" if causal else "bidirectional"
    others = fmt_knobs({k: v for k, v in knobs.items() if k != sweep.knob})
    row = CheckResult(mechanism=spec.name, check="fidelity", n=n, causal=causal, knob=sweep.knob,
                      knob_value=value if sweep.knob else None, tolerance=tol if exact else None, mode=mode,
                      target=spec.exact_label, seeds=len(seeds), knobs=fmt_knobs(knobs), inputs="gaussian")
    row.detail = f"{mode}; vs {spec.exact_label}" + (f"; {others}" if others else "") + \
        (f"; mean of {len(seeds)} seeds" if len(seeds) > 1 else "")
    reasons = spec.unsupported(make_case(spec, n, causal, knobs, batch=FIDELITY_BATCH, heads=FIDELITY_HEADS,
                                         dtype=dtype, device=device, seed=seed, mode="fwd"))
    if reasons:
        row.reason = "; ".join(reasons)
        row.detail = f"{mode}; skipped: {row.reason}"
        return row
    try:
        row.error_rel, row.cosine, row.max_abs_err = _measure_point(spec, n, causal, knobs, seeds, DTYPES[dtype],
                                                                    device)
    except Exception as exc:
        row.passed, row.reason = False, one_line(exc, 200, first_line=True)
        row.detail = f"{mode}; {row.reason}"
        return row
    row.passed = (row.max_abs_err <= tol) if exact else True
    return row


def check_fidelity(spec, *, n: int, causal: bool, base_knobs: dict, dtype: str, device: str, seed: int,
                   tol: float) -> list[CheckResult]:
    """fidelity rows over each declared sweep, then its trend rows."""
    exact = spec.exact  # its fidelity row must equal dense attention to the tolerance
    random = not exact and seed_dependent(spec, n, causal, base_knobs, DTYPES[dtype], device, seed)
    seeds = [seed + i for i in range(FIDELITY_SEEDS)] if random else [seed]
    rows: list[CheckResult] = []
    for sweep in spec.fidelity or (Fidelity("", (None,)),):
        values = _sweep_values(sweep, n) if sweep.knob else [None]
        points: dict[Any, CheckResult] = {}
        for value in values:
            knobs = dict(base_knobs)
            if sweep.knob:
                knobs[sweep.knob] = value
            row = _point_row(spec, sweep, value, knobs, n=n, causal=causal, dtype=dtype, device=device, seed=seed,
                             seeds=seeds, tol=tol, exact=exact)
            rows.append(row)
            if row.error_rel is not None:
                points[value] = row
        if sweep.knob:
            rows += [check_trend(spec, sweep.knob, values, points, t, n=n, causal=causal, tol=tol)
                     for t in sweep.expect]
    return rows


def check_trend(spec, knob: str, values: list, points: dict, trend: Trend | Any, *, n: int, causal: bool,
                tol: float) -> CheckResult:
    """One trend row: does the sweep keep the promise ``trend``?"""
    trend = Trend.of(trend)
    mode = "causal" if causal else "bidirectional"
    row = CheckResult(mechanism=spec.name, check="trend", n=n, causal=causal, knob=knob, mode=mode,
                      trend=trend.kind, inputs="gaussian")
    have = [(v, points[v]) for v in values if v in points]
    if trend.kind == "equals_dense_at":
        _equals_dense(row, trend, points, n, tol)
    elif len(have) < 2:
        _not_applicable(row, f"{trend.kind} needs two {knob} values, have {len(have)}")
    elif trend.kind == "decreasing":
        errs = [r.error_rel for _, r in have]
        row.error_rel = errs[-1] / errs[0] if errs[0] > 0 else None
        row.passed = all(b <= a * 1.05 + 1e-6 for a, b in zip(errs, errs[1:])) and errs[-1] < errs[0]
        row.expected = "each step ≤ ×1.05, last < first"
        row.detail = f"{mode}; error decreasing in {knob} ({', '.join(f'{v}: {e:.3g}' for (v, _), e in zip(have, errs))})"
    else:
        _ratio_per_4x(row, trend, have, knob)
    return row


def _not_applicable(row: CheckResult, why: str) -> None:
    row.applicable, row.reason = False, why
    row.detail = f"{row.mode}; n/a: {why}"


def _equals_dense(row: CheckResult, trend: Trend, points: dict, n: int, tol: float) -> None:
    at = resolve_length(trend.at, n)
    row.knob_value, row.tolerance, row.expected = at, tol, f"max abs ≤ {tol:.0e} at {row.knob}={at}"
    r = points.get(at)
    if r is None:
        return _not_applicable(row, f"no fidelity result at {row.knob}={at}")
    row.max_abs_err, row.error_rel, row.cosine = r.max_abs_err, r.error_rel, r.cosine
    row.passed = r.max_abs_err <= tol
    row.detail = f"{row.mode}; {row.knob}={at} covers every key: must equal dense (max abs ≤ tol)"


def _ratio_per_4x(row: CheckResult, trend: Trend, have: list, knob: str) -> None:
    pts = [(v, r.error_rel) for v, r in have
           if isinstance(v, (int, float)) and v > 0 and r.error_rel and r.error_rel > 0]
    row.expected = f"{trend.low}–{trend.high}"
    if len(pts) < 2:
        return _not_applicable(row, "too few positive errors for a slope")
    fit = fit_loglog([p[0] for p in pts], [p[1] for p in pts])
    if fit is None:
        return _not_applicable(row, "too few distinct knob values for a slope")
    ratio = 4.0 ** fit.slope
    row.error_rel = ratio
    row.passed = trend.low <= ratio <= trend.high
    row.detail = (f"{row.mode}; {knob} ×4 → error ×{ratio:.2f} (fit over "
                  f"{', '.join(str(v) for v, _ in have)}), expected {trend.low}–{trend.high}")


# --------------------------------------------------------------------------- real inputs (--inputs minilm)

def default_knobs(spec) -> dict[str, Any]:
    """Every knob at its declared default (a knob whose default is a case field, kv_heads = heads, left out):
    the setting `effbench sweep` measures unless told otherwise."""
    return {k.name: k.default for k in spec.knobs if not k.default_from}


def real_sweep_values(spec, sweep: Fidelity, n: int) -> tuple[list[Any], list[Any]]:
    """(declared values resolved at ``n``, those plus the swept knob's default): the default is where the sweep's
    time and memory were measured, so its error is what pairs with them."""
    declared = _sweep_values(sweep, n)
    default = next((k.default for k in spec.knobs if k.name == sweep.knob), None)
    extra = resolve_length(default, n) if default is not None else None
    return declared, declared + ([extra] if extra is not None and extra not in declared else [])


def _measure_real(spec, n, causal, knobs, seeds, tdtype, device, real) -> dict[str, Any]:
    """Per-head error ‖o_h − target_h‖/‖v_h‖ and cosine on captured q, k, v (layers as the batch), each averaged
    over ``seeds``; their mean and spread across the L×H heads, the worst max abs error and the largest
    |target| (for an exact mechanism's tolerance)."""
    layers, heads = real.q.shape[0], real.q.shape[1]
    low = [t.to(device=device, dtype=tdtype) for t in (real.q, real.k, real.v)]  # (L, H, N, D) each
    q64, k64, v64 = (t.to(torch.float64) for t in low)  # (L, H, N, D)
    errs = torch.zeros(layers, heads, dtype=torch.float64)
    coss = torch.zeros(layers, heads, dtype=torch.float64)
    max_abs, scale = 0.0, 1.0
    for s in seeds:
        module = _build(spec, n, causal, s, knobs, device, tdtype, heads=heads)
        with torch.no_grad():
            o = module(*low)  # (L, H, N, D)
            target = dense_target(spec, n, causal, q64, k64, v64, s, device)  # (L, H, N, D) float64
        if not finite(o):
            raise FloatingPointError("forward output has NaN/Inf")
        o64 = o.to(torch.float64)
        diff = (o64 - target).flatten(2)  # (L, H, N·D)
        errs += (diff.norm(dim=-1) / v64.flatten(2).norm(dim=-1)).cpu()  # (L, H)
        on, tn = o64.flatten(2).norm(dim=-1), target.flatten(2).norm(dim=-1)  # (L, H) each
        coss += ((o64 * target).flatten(2).sum(-1) / (on * tn).clamp_min(1e-300)).cpu()  # (L, H)
        max_abs = max(max_abs, float(diff.abs().max()))
        scale = max(scale, float(target.abs().max()))
    errs, coss = errs / len(seeds), coss / len(seeds)
    return {"error_rel": float(errs.mean()), "error_std": float(errs.std(correction=0)),
            "error_min": float(errs.min()), "error_max": float(errs.max()), "cosine": float(coss.mean()),
            "max_abs_err": max_abs, "scale": scale, "samples": layers * heads}


def _real_row(spec, sweep, value, knobs, *, n, causal, dtype, device, seed, seeds, tol, exact, real,
              inputs: str, gaussian: CheckResult) -> CheckResult:
    """One fidelity row on real inputs: the mean error over layers × heads, its spread, and the Gaussian error of
    the same setting beside it. An exact mechanism is still held to the tolerance (× max(1, max|target|))."""
    mode = "causal" if causal else "bidirectional"
    layers, heads = real.q.shape[0], real.q.shape[1]
    others = fmt_knobs({k: v for k, v in knobs.items() if k != sweep.knob})
    row = CheckResult(mechanism=spec.name, check="fidelity", n=n, causal=causal, knob=sweep.knob,
                      knob_value=value if sweep.knob else None, mode=mode, target=spec.exact_label, seeds=len(seeds),
                      knobs=fmt_knobs(knobs), inputs=inputs, gaussian_error_rel=gaussian.error_rel)
    row.detail = (f"{mode}; vs {spec.exact_label} on {inputs} q, k, v ({layers} layers × {heads} heads: mean, "
                  "spread across heads; reported, not checked)" + (f"; {others}" if others else "")
                  + (f"; mean of {len(seeds)} seeds" if len(seeds) > 1 else ""))
    reasons = spec.unsupported(make_case(spec, n, causal, knobs, batch=layers, heads=heads, dtype=dtype,
                                         device=device, seed=seed, mode="fwd"))
    if reasons:
        row.reason = "; ".join(reasons)
        row.detail = f"{mode}; skipped: {row.reason}"
        return row
    try:
        got = _measure_real(spec, n, causal, knobs, seeds, DTYPES[dtype], device, real)
    except Exception as exc:
        row.passed, row.reason = False, one_line(exc, 200, first_line=True)
        row.detail = f"{mode}; {inputs}: {row.reason}"
        return row
    for key in ("error_rel", "error_std", "error_min", "error_max", "cosine", "max_abs_err", "samples"):
        setattr(row, key, got[key])
    if exact:
        row.tolerance = tol * got["scale"]
        row.passed = row.max_abs_err <= row.tolerance
    else:
        row.passed = True
    return row


def check_fidelity_real(spec, *, n: int, causal: bool, dtype: str, device: str, seed: int, tol: float, real,
                        inputs: str = "minilm") -> list[CheckResult]:
    """Fidelity on real q, k, v (``real``: a :class:`.minilm.Captured` of N positions) at the default knobs over
    each declared sweep plus the swept knob's default; beside each, the same setting on Gaussian inputs, whose
    declared trends are checked (``trend`` rows, inputs gaussian). A Gaussian point that fails is its own row."""
    base = default_knobs(spec)
    exact = spec.exact
    random = not exact and seed_dependent(spec, n, causal, base, DTYPES[dtype], device, seed)
    seeds = [seed + i for i in range(FIDELITY_SEEDS)] if random else [seed]
    rows: list[CheckResult] = []
    for sweep in spec.fidelity or (Fidelity("", (None,)),):
        declared, values = real_sweep_values(spec, sweep, n) if sweep.knob else ([None], [None])
        points: dict[Any, CheckResult] = {}
        for value in values:
            knobs = dict(base)
            if sweep.knob:
                knobs[sweep.knob] = value
            common = {"n": n, "causal": causal, "dtype": dtype, "device": device, "seed": seed, "seeds": seeds,
                      "tol": tol, "exact": exact}
            gaussian = _point_row(spec, sweep, value, knobs, **common)
            if gaussian.passed is False:
                rows.append(gaussian)
            elif gaussian.error_rel is not None and value in declared:
                points[value] = gaussian
            rows.append(_real_row(spec, sweep, value, knobs, real=real, inputs=inputs, gaussian=gaussian, **common))
        if sweep.knob:
            rows += [check_trend(spec, sweep.knob, declared, points, t, n=n, causal=causal, tol=tol)
                     for t in sweep.expect]
    return rows
