"""One way to say an exception in one line (rows, verify checks, CLI messages)."""

from __future__ import annotations


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (whitespace folded), at most ``limit`` characters."""
    msg = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
