"""One way to say an exception in one line (rows, verify checks, CLI messages)."""

from __future__ import annotations


def one_line(exc: BaseException, limit: int = 300, first_line: bool = False) -> str:
    """``Type: message`` on one line, at most ``limit`` characters: the whole message with its whitespace
    folded, or (``first_line``) only its first line, for a table cell."""
    text = str(exc).strip()
    if first_line:
        text = text.splitlines()[0] if text else ""
    msg = " ".join(text.split())
    out = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return out if len(out) <= limit else out[: limit - 3] + "..."
