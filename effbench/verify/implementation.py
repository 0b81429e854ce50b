"""Layer 1, the implementation check: does ``forward`` compute what the mechanism's ``reference()`` says?

The efficient ``forward`` in the chosen dtype against ``reference()`` evaluated in float64 (the module
converted with ``module.to(torch.float64)``, the same inputs promoted): the output (``impl-output``)
and the gradients of every input and parameter from one fixed upstream gradient g (``impl-grad``).
Pass: finite, and max|o − ref| ≤ tol·max(1, max|ref|). Anything the mechanism raises is a failed row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..cases import DTYPES
from ..errors import one_line
from .report import CheckResult
from .settings import BATCH, HEAD_DIM, HEADS, finite, fmt_knobs, mode_label, stats


class StageFailed(Exception):
    """A mechanism raised (or returned something wrong) at one stage of the check."""


@dataclass
class Pair:
    """What the float32 forward and the float64 reference produced, detached."""

    out: torch.Tensor
    ref: torch.Tensor
    names: list[str]  # input names (q, k, v or x)
    param_names: list[str]
    grads: list[torch.Tensor | None]  # inputs then parameters
    ref_grads: list[torch.Tensor | None]
    grad_error: str | None = None
    extra: dict = field(default_factory=dict)


def _forward(spec, module, inputs, seed: int, device: str, tdtype):
    """Run forward and its backward from a fixed g; (output, grads, upstream g, grad_error)."""
    out = module(*inputs)
    if not isinstance(out, torch.Tensor):
        raise StageFailed(f"forward returned {type(out).__name__}, not a tensor")
    if out.shape != inputs[0].shape:
        raise StageFailed(f"forward returned shape {tuple(out.shape)}, expected {tuple(inputs[0].shape)}")
    params = [p for p in module.parameters() if p.requires_grad]
    gen = torch.Generator(device="cpu").manual_seed(seed + 7)
    upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64)  # fixed g, output's shape
    if out.requires_grad:
        grads = torch.autograd.grad(out, [*inputs, *params], upstream.to(device=device, dtype=tdtype),
                                    allow_unused=True)
        return out.detach().clone(), [None if g is None else g.detach().clone() for g in grads], upstream, None
    return (out.detach().clone(), [None] * (len(inputs) + len(params)), upstream,
            "forward output carries no gradient (detached or computed under no_grad)")


def _reference(module, inputs, upstream: torch.Tensor, device: str, shape) -> tuple[torch.Tensor, Sequence]:
    """reference() in float64 on the promoted inputs, and its gradients from the same g."""
    module.to(torch.float64)
    inputs64 = [t.detach().to(torch.float64).requires_grad_(True) for t in inputs]
    params64 = [p for p in module.parameters() if p.requires_grad]
    ref = module.reference(*inputs64)
    if ref.shape != shape:
        raise StageFailed(f"reference returned shape {tuple(ref.shape)}, forward {tuple(shape)}")
    if ref.requires_grad:
        rgrads = torch.autograd.grad(ref, [*inputs64, *params64], upstream.to(device=device), allow_unused=True)
    else:
        rgrads = [None] * (len(inputs64) + len(params64))
    return ref.detach(), rgrads


def run_pair(spec, *, n: int, causal: bool, knobs: dict, dtype: str, device: str, seed: int) -> Pair:
    """Build the module, run forward + backward in ``dtype`` and reference + backward in float64."""
    from ..workload import build_on

    tdtype = DTYPES[dtype]
    stage = "build"
    try:
        torch.manual_seed(seed)
        module = build_on(spec, head_dim=HEAD_DIM, heads=HEADS, n=n, causal=causal, seed=seed, knobs=knobs,
                          device=device, dtype=tdtype)
        inputs = spec.make_inputs(batch=BATCH, heads=HEADS, n=n, head_dim=HEAD_DIM, dtype=tdtype, device=device,
                                  seed=seed, requires_grad=True, knobs=knobs)
        names = ["x"] if spec.inputs == "x" else ["q", "k", "v"][:len(inputs)]
        pnames = [name for name, p in module.named_parameters() if p.requires_grad]
        stage = "forward"
        out, grads, upstream, grad_error = _forward(spec, module, inputs, seed, device, tdtype)
        stage = "reference (float64)"
        ref, rgrads = _reference(module, inputs, upstream, device, out.shape)
    except StageFailed:
        raise
    except Exception as exc:  # a mechanism's failure is a failed check, not a crash
        raise StageFailed(f"{stage} raised {one_line(exc, 200, first_line=True)}") from None
    return Pair(out=out, ref=ref, names=names, param_names=pnames, grads=list(grads), ref_grads=list(rgrads),
                grad_error=grad_error)


def output_row(pair: Pair, base: dict, tol: float) -> CheckResult:
    """impl-output: max abs error against the float64 reference, tolerance scaled by max(1, max|ref|)."""
    max_abs, rel, cos = stats(pair.out, pair.ref)
    scale = max(1.0, float(pair.ref.abs().max())) if pair.ref.numel() else 1.0
    row = CheckResult(check="impl-output", max_abs_err=max_abs, error_rel=rel, cosine=cos, tolerance=tol * scale,
                      **base)
    if not finite(pair.out):
        row.passed, row.reason = False, "forward output has NaN/Inf"
    elif not finite(pair.ref):
        row.passed, row.reason = False, "reference output has NaN/Inf"
    else:
        row.passed = max_abs <= tol * scale
    note = row.reason or (f"tol {tol:.0e}×max|ref| {scale:.3g}" if scale > 1 else "")
    row.detail = _detail(base) + (f"; {note}" if note else "")
    return row


def _grad_groups(pair: Pair) -> dict[str, list[tuple[torch.Tensor | None, torch.Tensor | None, str]]]:
    """Gradients grouped by input name, and all parameters as one group ``params``."""
    k = len(pair.names)
    groups = {name: [(pair.grads[i], pair.ref_grads[i], name)] for i, name in enumerate(pair.names)}
    if pair.param_names:
        groups["params"] = [(pair.grads[k + j], pair.ref_grads[k + j], pname)
                            for j, pname in enumerate(pair.param_names)]
    return groups


def _compare_grad(g, rg, gname: str, tol: float, pair: Pair, problems: list[str]):
    """(name, max abs, rel, cos, effective tolerance) for one gradient, or None when not comparable."""
    if g is None and pair.grad_error is None and rg is not None:
        g = torch.zeros_like(rg)
        if float(rg.abs().max()) > 0:
            problems.append(f"forward gives no gradient to {gname}, reference does")
    if g is None:
        return None
    rg = torch.zeros_like(g, dtype=torch.float64) if rg is None else rg
    if not finite(g):
        problems.append(f"grad {gname} has NaN/Inf")
        return None
    if not finite(rg):
        problems.append(f"reference grad {gname} has NaN/Inf")
        return None
    ga, gr, gc = stats(g, rg)
    return gname, ga, gr, gc, tol * max(1.0, float(rg.abs().max()) if rg.numel() else 1.0)


def grad_row(pair: Pair, base: dict, tol: float) -> CheckResult:
    """impl-grad: one row, the worst tensor by error/tolerance; every tensor listed in the detail."""
    problems: list[str] = []
    unused: list[str] = []
    per = []
    for label, members in _grad_groups(pair).items():
        worst = None
        for g, rg, gname in members:
            if g is None and rg is None:
                if label != "params":
                    unused.append(gname)
                continue
            cand = _compare_grad(g, rg, gname, tol, pair, problems)
            if cand is not None and (worst is None or cand[1] / cand[4] > worst[1] / worst[4]):
                worst = cand
        if worst is not None:
            per.append(worst)
    if pair.grad_error:
        problems.append(pair.grad_error)
    row = CheckResult(check="impl-grad", tolerance=tol, **base)
    if per:
        w = max(per, key=lambda p: p[1] / p[4])
        row.max_abs_err, row.error_rel, row.cosine, row.tolerance = w[1], w[2], w[3], w[4]
        bad = [p[0] for p in per if p[1] > p[4]]
        if bad:
            problems.append(f"grad {', '.join(bad)} beyond tolerance")
    note = f"; {', '.join(unused)} unused (no gradient in forward and reference)" if unused and not pair.grad_error else ""
    listed = ", ".join(f"{p[0]} {p[1]:.1e}" for p in per) or "none comparable"
    row.passed = not problems
    row.reason = "; ".join(problems)
    row.detail = f"{_detail(base)}; max abs per grad: {listed}{note}" + (f"; {row.reason}" if problems else "")
    return row


def _detail(base: dict) -> str:
    return base["mode"] + (f"; {base['knobs']}" if base["knobs"] else "")


def check_implementation(spec, *, n: int, causal: bool, knobs: dict, dtype: str, device: str, seed: int,
                         tol: float) -> list[CheckResult]:
    """impl-output and impl-grad rows for one (mechanism, causal) at ``knobs``."""
    base = dict(mechanism=spec.name, n=n, causal=causal, mode=mode_label(spec, causal), knobs=fmt_knobs(knobs))
    try:
        pair = run_pair(spec, n=n, causal=causal, knobs=knobs, dtype=dtype, device=device, seed=seed)
    except StageFailed as exc:
        return [CheckResult(check="impl-output", tolerance=tol, passed=False, reason=str(exc),
                            detail=f"{_detail(base)}; {exc}", **base)]
    return [output_row(pair, base, tol), grad_row(pair, base, tol)]
