"""Row statuses: one string enum used everywhere (runner, sweep, resume, CLI styles, plot markers, summaries).

``Status`` is a ``str`` subclass, so a status read back from a CSV (plain text) compares equal to
its member: ``Status.OK == "ok"``.
"""

from __future__ import annotations

from enum import Enum


class Status(str, Enum):
    OK = "ok"  # every pass finished
    SKIPPED = "skipped"  # the mechanism says why it cannot run the case (in ``error``)
    PREDICTED_OOM = "predicted_oom"  # predicted over the budget, or beyond an N that ran out of memory
    OOM = "oom"  # torch.OutOfMemoryError, or the CPU allocator's "can't allocate memory"
    TIMEOUT = "timeout"  # past --timeout; the child was killed
    KILLED = "killed"  # the child died from a signal (the OS OOM killer sends SIGKILL)
    ERROR = "error"  # any other exception, as one line

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: object) -> "Status":
        """The member for a status text; an unknown text raises ValueError naming the valid ones."""
        try:
            return cls(str(value))
        except ValueError:
            raise ValueError(f"unknown status {value!r}; one of {', '.join(s.value for s in cls)}") from None


# Statuses after which larger N of the same configuration are not run (the OOM frontier).
OUT_OF_MEMORY = (Status.OOM, Status.KILLED)
