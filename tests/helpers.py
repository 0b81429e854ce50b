"""Shared test helpers: measure how peak memory and counted FLOPs grow with N."""

from __future__ import annotations

from typing import Any, Sequence

from effbench.cases import Case
from effbench.measure.flops import count_flops
from effbench.measure.memory import tracked_peak
from effbench.workload import prepare


def growth(mechanism: str, ns: Sequence[int], *, knobs: dict[str, Any] | None = None, causal: bool = False,
           mode: str = "fwd", batch: int = 1, heads: int = 2, head_dim: int = 32) -> list[tuple[int, int, int]]:
    """[(n, peak tensor bytes, counted FLOPs)] for each n, measured for real on the CPU."""
    rows = []
    for n in ns:
        case = Case(mechanism=mechanism, n=n, batch=batch, heads=heads, head_dim=head_dim,
                    mode=mode, causal=causal, knobs=tuple((knobs or {}).items()))
        w = prepare(case)
        w.call()  # warm: lazy buffers are not part of the peak
        peak, _ = tracked_peak(w.call)
        flops, uncounted = count_flops(w.call)
        assert not uncounted, f"{mechanism}: FlopCounterMode cannot count {uncounted}"
        rows.append((n, peak, flops))
    return rows


def assert_linear(rows: list[tuple[int, int, int]], max_ratio: float = 2.3) -> None:
    """Each doubling of N at most ``max_ratio``× more peak memory and FLOPs."""
    for (n0, m0, f0), (n1, m1, f1) in zip(rows, rows[1:]):
        assert n1 == 2 * n0, "growth rows must double N"
        assert m0 > 0 and f0 > 0, f"nothing measured at n={n0}: peak={m0}, flops={f0}"
        assert m1 / m0 <= max_ratio, f"memory ×{m1 / m0:.2f} from n={n0} to {n1} ({m0} -> {m1} bytes)"
        assert f1 / f0 <= max_ratio, f"FLOPs ×{f1 / f0:.2f} from n={n0} to {n1} ({f0} -> {f1})"
