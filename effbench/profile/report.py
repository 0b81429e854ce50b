"""What `effbench profile` returns for one case: a :class:`ProfileReport` (data only; the CLI renders it).

The child process fills it field by field as each stage finishes (as a sweep's child fills a row), so a
case that times out or dies still keeps the files and readings it had; every report ends with a ``status``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..cases import Case
from ..status import Status

# The files a profile writes, by name (into the report's ``out_dir``).
TRACE = "trace.json"
OPS_MD = "ops.md"
TIMELINE_CSV = "memory_timeline.csv"
TIMELINE_FIGURE = "memory_timeline"  # .png and .svg
SNAPSHOT = "memory_snapshot.pickle"  # CUDA only
TIMELINE_COLUMNS = ["op_index", "op", "output_shape", "bytes_allocated", "live_bytes"]


@dataclass(frozen=True)
class ProfileOptions:
    """How :func:`effbench.profile.run_profile` runs a case (``timeout`` is what the runner's collector reads)."""

    warmup: int = 1
    repeats: int = 3
    plugins: tuple[str, ...] = ()
    threads: int | None = None
    timeout: float = 300.0
    mem_budget: int | None = None
    top: int = 20


@dataclass(frozen=True)
class PeakOp:
    """The op after which live tracked bytes first reach their maximum (one call, the storage tracker)."""

    index: int  # position in the call's dispatch order (the timeline's op_index)
    op: str  # aten name, e.g. aten::bmm
    output_shapes: tuple[tuple[int, ...], ...]  # one shape per tensor output
    bytes: int  # live tracked bytes after the op: the sweep row's peak_tensor_bytes
    allocated: int  # bytes of new storage the op itself returned


@dataclass
class ProfileReport:
    """One profiled case. Op tables are lists of dicts, one per op, values raw (ms as floats, bytes as ints),
    averaged per profiled call; ``time_key``/``memory_key`` name the column each table is sorted by
    (``self_cpu_ms``/``self_cpu_bytes`` on the CPU, ``self_cuda_ms``/``self_cuda_bytes`` on a GPU)."""

    case: Case
    out_dir: Path
    status: Status | None = None
    error: str | None = None
    files: list[Path] = field(default_factory=list)  # every file written, in order
    warmup: int | None = None
    repeats: int | None = None  # warm calls in trace.json and behind the op tables
    ops_by_time: list[dict[str, Any]] = field(default_factory=list)
    ops_by_memory: list[dict[str, Any]] = field(default_factory=list)
    time_key: str | None = None
    memory_key: str | None = None
    ops_count: int | None = None  # aten ops one call dispatches (TorchDispatchMode)
    peak: PeakOp | None = None
    nn_bytes: int | None = None  # one N×N score tensor: B·H·N²·element size
    nn_alive_at_peak: int | None = None  # storages of exactly nn_bytes alive at the peak
    build_info: str | None = None
    wall_s: float | None = None  # the case's time in its child (the fork server's start-up excluded)

    def update(self, values: Mapping[str, Any] | None = None, /, **more: Any) -> None:
        """Set fields by name (the runner's collector calls this with each part the child reports)."""
        given = {**(values or {}), **more}
        check_fields(given)
        for name, value in given.items():
            setattr(self, name, Status.parse(value) if name == "status" and value is not None else value)

    @property
    def peak_ratio(self) -> float | None:
        """The peak against one N×N score tensor (2.0: as much live memory as two of them)."""
        if self.peak is None or not self.nn_bytes:
            return None
        return self.peak.bytes / self.nn_bytes


REPORTED = {f.name for f in fields(ProfileReport)} - {"case", "out_dir"}


def check_fields(names: Iterable[str]) -> None:
    """Raise ValueError naming those of ``names`` that are not report fields (a typo fails loudly, by name)."""
    unknown = sorted(set(names) - REPORTED)
    if unknown:
        raise ValueError(f"not profile report fields: {', '.join(unknown)}")


def fmt_shape(shape: tuple[int, ...], sep: str = "×") -> str:
    """``(2, 2048, 2048)`` -> ``2×2048×2048`` (``[]`` for a 0-dim tensor)."""
    return sep.join(str(d) for d in shape) if shape else "[]"


def fmt_shapes(shapes: tuple[tuple[int, ...], ...], sep: str = "×") -> str:
    """Every output's shape, ``;``-separated (empty when the op returned no tensor)."""
    return ";".join(fmt_shape(s, sep) for s in shapes)
