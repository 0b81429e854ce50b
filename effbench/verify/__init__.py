"""`effbench verify`: does each mechanism compute what it claims, and what accuracy does it give up?

Two layers, for every registered mechanism (plugins included), in-process on small N, both read
from what the mechanism declares (``mechanisms.base``: knobs' ``small``/``length``, ``fidelity``,
``exact_at``, ``inputs``, ``causal_applies``), never from its name:

1. **Implementation** (:mod:`.implementation`): forward and gradients against the mechanism's own
   ``reference()`` in float64, on B=2, H=3, N=777 with every knob at its small awkward value so that
   no window, block, bucket, chunk or segment tiles N; causal and bidirectional where supported.
2. **Fidelity** (:mod:`.fidelity`): the error against exact attention over the declared sweep, and
   the declared trends theory promises. ``inputs="minilm"``: on the q, k, v of every layer and head of
   the pretrained all-MiniLM-L6-v2 encoder (:mod:`.minilm`; N ≤ 512, its position limit) at the default
   knobs, the Gaussian error of the same setting beside it; trends checked on the Gaussian inputs only.
3. **Decode** (:mod:`.decode`): single-token steps after a context of N equal the causal prefill
   (float64 reference), and the state's measured bytes equal its declared formula; MHA, GQA and MQA
   where the mechanism takes ``kv_heads``; n/a with the mechanism's reason where it has no decode form.

The rows are :class:`.report.CheckResult` records; :mod:`.report` writes and reads the CSV and
``effbench.render`` draws the table. Deterministic under ``seed``.
"""

from __future__ import annotations

from typing import Callable

import mechanisms

from ..cases import DTYPES
from ..errors import one_line
from ..units import UsageError
from .fidelity import check_fidelity, check_fidelity_real, check_trend
from .minilm import INPUTS, check_inputs, verify_length
from .decode import check_decode
from .implementation import check_implementation
from .report import COLUMNS, CheckResult, VerifyReport, read_csv, write_csv
from .settings import BATCH, DEFAULT_N, HEADS, TOLERANCES, fmt_knobs, mode_label, small_value, choose_knobs

__all__ = ["COLUMNS", "INPUTS", "CheckResult", "VerifyReport", "check_fidelity", "check_fidelity_real",
           "check_implementation", "check_trend", "read_csv", "run_verify", "small_value", "verify_mechanism", "write_csv"]


def run_verify(mechs: list[str] | None, n: int | None, device: str = "cpu", dtype: str = "float32",
               seed: int = 0, tolerance: float | None = None,
               progress: Callable[[int, int, str], None] | None = None, inputs: str = "gaussian") -> VerifyReport:
    """Verify ``mechs`` (None, [] or ["all"]: every registered mechanism) and return the report.

    ``inputs`` (:data:`INPUTS`): what the fidelity layer runs on; ``"minilm"`` runs every check at
    N ≤ 512 (a longer ``n`` is clamped, with a note in ``report.notes``; default 512) and loads the model first.
    ``progress(done, total, label)`` is called before each mechanism (label = its name) and once at
    the end (done == total, label "done"). Raises UsageError / RegistryError for bad arguments (and for
    ``minilm`` without the extra [real]); never for a mechanism's own failure (that is a failed row).
    """
    from ..devices import resolve_device

    names = list(mechanisms.REGISTRY) if not mechs or list(mechs) == ["all"] else list(dict.fromkeys(mechs))
    for name in names:
        mechanisms.get(name)  # raises with the valid choices
    check_inputs(inputs)
    notes: list[str] = []
    if n is not None and int(n) < 2:
        raise UsageError(f"--n must be at least 2, got {n}")
    if inputs == "minilm":
        n, note = verify_length(n, DEFAULT_N)
        notes += [note] if note else []
    n = DEFAULT_N if n is None else int(n)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    device = resolve_device(device)
    tol = TOLERANCES[dtype] if tolerance is None else float(tolerance)
    if not tol > 0:
        raise UsageError(f"--tolerance must be positive, got {tolerance}")
    real = None
    if inputs == "minilm":
        from .minilm import TEXT_NAME, capture

        if progress:
            progress(0, len(names), "loading MiniLM")
        real = capture(n)
        notes.append(f"fidelity on the q, k, v of all-MiniLM-L6-v2 ({real.layers} layers × {real.heads} heads, "
                     f"D={real.head_dim}) on the first {real.n} tokens of {TEXT_NAME}, at the default knobs; "
                     "errors reported (mean and spread across heads), trends checked on Gaussian inputs only")
    rows: list[CheckResult] = []
    for i, name in enumerate(names):
        if progress:
            progress(i, len(names), name)
        rows += verify_mechanism(mechanisms.get(name), n=n, device=device, dtype=dtype, seed=seed, tol=tol, real=real)
    if progress:
        progress(len(names), len(names), "done")
    report = VerifyReport(rows=rows, mechanisms=names, n=n, dtype=dtype, device=device, seed=seed, tolerance=tol,
                          inputs=inputs, notes=notes)
    report.passed = all(r.passed is not False for r in rows)
    return report


def verify_mechanism(spec, *, n: int, device: str, dtype: str, seed: int, tol: float, real=None) -> list[CheckResult]:
    """Every check of one mechanism: implementation per causal mode, then its fidelity layer (on ``real``
    inputs, a :class:`.minilm.Captured` of N positions, when given)."""
    rows: list[CheckResult] = []
    for causal in spec.causal_modes:
        mode = mode_label(spec, causal)
        base = dict(mechanism=spec.name, check="impl-output", n=n, causal=causal, mode=mode)
        try:
            knobs, reasons = choose_knobs(spec, n, causal, batch=BATCH, heads=HEADS, mode="fwd+bwd", dtype=dtype,
                                          device=device, seed=seed)
        except Exception as exc:
            why = f"unsupported() raised {one_line(exc, 200, first_line=True)}"
            rows.append(CheckResult(tolerance=tol, passed=False, reason=why, detail=f"{mode}; {why}", **base))
            continue
        if knobs is None:
            why = "; ".join(reasons)
            rows.append(CheckResult(reason=why, detail=f"{mode}; skipped: {why}", **base))
            continue
        rows += check_implementation(spec, n=n, causal=causal, knobs=knobs, dtype=dtype, device=device,
                                     seed=seed, tol=tol)
        if spec.fidelity is None:
            continue
        try:
            if real is not None:
                rows += check_fidelity_real(spec, n=n, causal=causal, dtype=dtype, device=device, seed=seed, tol=tol,
                                            real=real)
            else:
                rows += check_fidelity(spec, n=n, causal=causal, base_knobs=knobs, dtype=dtype, device=device,
                                       seed=seed, tol=tol)
        except Exception as exc:
            why = one_line(exc, 200, first_line=True)
            rows.append(CheckResult(mechanism=spec.name, check="fidelity", n=n, causal=causal, mode=mode,
                                    passed=False, reason=why, detail=f"{mode}; {why}", knobs=fmt_knobs(knobs)))
    if spec.fidelity is None:
        rows.append(CheckResult(mechanism=spec.name, check="fidelity", n=n, applicable=False,
                                reason=spec.no_fidelity_reason, detail=f"n/a: {spec.no_fidelity_reason}"))
    try:
        rows += check_decode(spec, n=n, dtype=dtype, device=device, seed=seed, tol=tol)
    except Exception as exc:
        why = one_line(exc, 200, first_line=True)
        rows.append(CheckResult(mechanism=spec.name, check="decode", n=n, causal=True, mode="causal", passed=False,
                                reason=why, detail=f"causal; {why}"))
    return rows
