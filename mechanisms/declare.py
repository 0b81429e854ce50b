"""What a mechanism declares about its accuracy: fidelity sweeps and the trends theory promises.

Read by ``effbench verify`` and the contract suite (tests/test_contract.py); a mechanism file sets
``fidelity = (Fidelity("window", (8, 32, 128, "N-1"), (decreasing(), equals_dense_at("N-1"))),)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class DeclarationError(ValueError):
    """A declaration that does not make sense (unknown trend kind, ...)."""


TREND_KINDS = ("decreasing", "ratio_per_4x", "equals_dense_at")


@dataclass(frozen=True)
class Trend:
    """A promise theory makes about a fidelity sweep, checked by ``effbench verify`` and the contract suite.

    - ``decreasing``: the error falls (within 5% per step) along the sweep, last below first;
    - ``ratio_per_4x``: error × (``low``..``high``) per ×4 of the knob (log-log least-squares fit);
    - ``equals_dense_at``: at knob = ``at`` every key is visible, so the output equals dense attention.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    at: Any = None

    def __post_init__(self):
        if self.kind not in TREND_KINDS:
            raise DeclarationError(f"unknown trend {self.kind!r}; choose from {', '.join(TREND_KINDS)}")

    @classmethod
    def of(cls, value: Any) -> "Trend":
        """A Trend from itself or the older tuple forms ``"decreasing"``, ``("ratio_per_4x", lo, hi)``,
        ``("equals_dense_at", value)``."""
        if isinstance(value, Trend):
            return value
        if isinstance(value, str):
            return cls(value)
        kind, *args = value
        if kind == "ratio_per_4x":
            return cls(kind, low=float(args[0]), high=float(args[1]))
        if kind == "equals_dense_at":
            return cls(kind, at=args[0])
        return cls(kind)

    def describe(self) -> str:
        if self.kind == "ratio_per_4x":
            return f"error ×{self.low}–{self.high} per ×4"
        if self.kind == "equals_dense_at":
            return f"equals dense at {self.at}"
        return "error decreasing"


def decreasing() -> Trend:
    return Trend("decreasing")


def ratio_per_4x(low: float, high: float) -> Trend:
    return Trend("ratio_per_4x", low=low, high=high)


def equals_dense_at(value: Any) -> Trend:
    return Trend("equals_dense_at", at=value)


@dataclass(frozen=True)
class Fidelity:
    """One fidelity sweep: the error against exact attention over ``values`` of ``knob``, and what it promises."""

    knob: str
    values: tuple
    expect: tuple = ()
    why: str = ""

    def __post_init__(self):
        object.__setattr__(self, "values", tuple(self.values))
        object.__setattr__(self, "expect", tuple(Trend.of(e) for e in self.expect))

    @classmethod
    def of(cls, value: Any) -> "Fidelity":
        """A Fidelity from itself or the older ``verify_sweep`` tuple (knob, values, expectations)."""
        if isinstance(value, Fidelity):
            return value
        knob, values, *rest = value
        return cls(knob, tuple(values), tuple(rest[0]) if rest else ())


def resolve_length(value: Any, n: int) -> Any:
    """``"N"`` -> n, ``"N-1"`` -> n - 1, ``"N/4"`` -> n // 4 (at least 1); anything else unchanged."""
    if isinstance(value, str):
        s = value.replace(" ", "").upper()
        if s == "N":
            return n
        if s.startswith("N-") and s[2:].isdigit():
            return n - int(s[2:])
        if s.startswith("N/") and s[2:].isdigit():
            return max(1, n // int(s[2:]))
    return value
