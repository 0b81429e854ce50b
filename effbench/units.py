"""Parsing command-line values and formatting numbers for people (bytes are binary: MiB = 2**20)."""

from __future__ import annotations

import math
import re
from typing import Any


class UsageError(ValueError):
    """A command-line value that does not parse or is out of range."""


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, what: str = "size") -> int:
    """'20GiB' -> 21474836480; '512MB' -> 512000000; plain numbers are bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"{what} {text!r} does not parse; use e.g. 20GiB, 512MiB, 8GB or a number of bytes")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise UsageError(f"{what} must be positive, got {text!r}")
    return int(value)


def parse_int_list(text: str, what: str, minimum: int = 1) -> list[int]:
    """'512,4096,32768' -> [512, 4096, 32768]; also accepts 2**k and 1k/32k shorthands."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*\*\*\s*(\d+)|(\d+)([kK]?)", part)
        if not m and re.fullmatch(r"-\s*\d+[kK]?", part):
            raise UsageError(f"{what}: {part} is below the minimum {minimum}")
        if not m:
            raise UsageError(f"{what}: {part!r} is not a whole number (give a comma list such as 512,4096,32768)")
        value = int(m.group(1)) ** int(m.group(2)) if m.group(1) else int(m.group(3)) * (1024 if m.group(4) else 1)
        if value < minimum:
            raise UsageError(f"{what}: {value} is below the minimum {minimum}")
        out.append(value)
    if not out:
        raise UsageError(f"{what}: no values given")
    return list(dict.fromkeys(out))


def parse_list(text: str | None) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c'] (empty items dropped)."""
    return [p.strip() for p in str(text or "").split(",") if p.strip()]


def fmt_bytes(value: Any, compact: bool = False) -> str:
    """Bytes for display in binary units, labelled: ``4.0 MiB``, ``1,000.0 KiB``, ``512 B`` ("—" when missing).

    ``compact`` (axis ticks): no trailing ``.0`` and no thousands separator: ``4 MiB``, ``1.5 GiB``, ``512 B``.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "—"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            q = value / size
            if not compact:
                return f"{q:,.1f} {unit}"
            return f"{q:g} {unit}" if float(round(q, 6)).is_integer() else f"{q:.1f} {unit}"
    return f"{value:g} B" if compact else f"{value:,.0f} B"


# A timing is noisy when its IQR is above this fraction of its median (one threshold for the CLI and the summary).
NOISY_IQR = 0.10


def is_noisy(median: Any, iqr: Any) -> bool:
    """True when ``iqr`` exceeds ``NOISY_IQR`` × ``median`` (False when either is missing or the median is not > 0)."""
    try:
        median, iqr = float(median), float(iqr)
    except (TypeError, ValueError):
        return False
    return median > 0 and iqr > NOISY_IQR * median  # NaN compares False


def fmt_ms(median: Any, iqr: Any = None) -> str:
    """Milliseconds for display, 2/1/0 decimals by size, `` ± IQR`` when given ("—" when missing)."""
    try:
        median = float(median)
    except (TypeError, ValueError):
        return "—"
    if math.isnan(median):
        return "—"
    digits = 2 if median < 10 else 1 if median < 1000 else 0
    text = f"{median:,.{digits}f}"
    try:
        iqr = float(iqr)
        if not math.isnan(iqr):
            text += f" ± {iqr:,.{digits}f}"
    except (TypeError, ValueError):
        pass
    return text


def fmt_flops(value: Any) -> str:
    """A FLOP count for display: ``1.23 GFLOP`` ("—" when missing)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "—"
    if math.isnan(value):
        return "—"
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= size:
            return f"{value / size:,.2f} {unit}"
    return f"{value:,.0f} FLOP"
