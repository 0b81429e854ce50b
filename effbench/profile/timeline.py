"""The memory timeline of one call: live tracked bytes after every op, from the exact storage tracker.

Recorded by :class:`effbench.measure.memory.TimelineTracker` (the sweep's :class:`StorageTracker`, recording), so
its maximum is the ``peak_tensor_bytes`` of a sweep row for the same case. Written as ``memory_timeline.csv`` and
drawn as ``memory_timeline.png``/``.svg`` with the peak annotated and a dashed line at one N×N score tensor.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..cases import Case
from ..measure.memory import OpRecord, TimelineTracker, track
from ..units import fmt_bytes
from .report import TIMELINE_COLUMNS, TIMELINE_FIGURE, PeakOp, fmt_shapes


@dataclass
class Timeline:
    ops: list[OpRecord]
    peak: PeakOp | None
    peak_live: list[int]  # sizes of the storages alive at the peak, largest first
    tracker_peak: int  # StorageTracker.peak of the pass (== max live bytes)

    def alive_at_peak(self, nbytes: int) -> int:
        """How many storages of exactly ``nbytes`` were alive at the peak."""
        return sum(1 for b in self.peak_live if b == nbytes)


def record_timeline(call: Callable[[], Any]) -> Timeline:
    """One call of ``call`` under a recording tracker, exactly as a sweep's tracker pass runs it (GC paused)."""
    tracker, _ = track(call, TimelineTracker())
    peak = None
    if tracker.peak_index is not None:
        r = tracker.ops[tracker.peak_index]
        peak = PeakOp(index=r.index, op=r.op, output_shapes=r.output_shapes, bytes=r.live_bytes,
                      allocated=r.bytes_allocated)
    return Timeline(ops=tracker.ops, peak=peak, peak_live=tracker.peak_live, tracker_peak=tracker.peak)


def nn_bytes(case: Case) -> int:
    """Bytes of one N×N score tensor of ``case``: B·H·N²·element size of its dtype."""
    itemsize = torch.empty((), dtype=case.torch_dtype).element_size()
    return case.batch * case.heads * case.n * case.n * itemsize


def write_csv(ops: list[OpRecord], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(TIMELINE_COLUMNS)
        for r in ops:
            w.writerow([r.index, r.op, fmt_shapes(r.output_shapes, "x"), r.bytes_allocated, r.live_bytes])
    return path


def read_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``memory_timeline.csv``, integers typed."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("op_index", "bytes_allocated", "live_bytes"):
            r[k] = int(r[k])
    return rows


# --------------------------------------------------------------------------- the figure

def _binary_step(top: float, ticks: int = 6) -> float:
    """A tick step of 2^k or 3·2^k bytes giving about ``ticks`` ticks from 0 to ``top``."""
    raw = max(top / ticks, 1.0)
    k = math.floor(math.log2(raw))
    return next(s for s in (2.0**k, 1.5 * 2.0**k, 2.0 ** (k + 1)) if s >= raw)


def case_title(case: Case) -> str:
    return (f"{case.label()}, N={case.n:,} (B={case.batch}, H={case.heads}, D={case.head_dim}, {case.dtype}, "
            f"{case.mode}{', causal' if case.causal else ''}, {case.device})")


def draw(case: Case, timeline: Timeline, nn: int):
    """The timeline figure (a :class:`~effbench.figure_base.PlotResult` named ``memory_timeline``)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, MultipleLocator

    from ..figure_base import PlotResult, new_figure, tick_bytes

    fig, axes = new_figure(10.0, 5.2)
    ax = axes[0][0]
    xs = [r.index for r in timeline.ops]
    ys = [r.live_bytes for r in timeline.ops]
    result = PlotResult(name=TIMELINE_FIGURE, figure=fig)
    (line,) = ax.step(xs, ys, where="post", color="#1f77b4", linewidth=1.6, label="live tracked bytes after each op")
    ax.fill_between(xs, ys, step="post", color="#1f77b4", alpha=0.15, linewidth=0)
    result.lines["live"] = line
    nn_line = ax.axhline(nn, color="#d62728", linestyle="--", linewidth=1.2,
                         label=f"one N×N score tensor (B·H·N²·{nn // (case.batch * case.heads * case.n ** 2)} bytes)")
    result.lines["nn"] = nn_line
    top = max(max(ys, default=0), nn) * 1.35 or 1.0  # room above the N×N line for the legend
    xmax = max(xs[-1] if xs else 0, 1)
    # labelled at the left, just under the line: a call starts with little tracked memory (inputs are not counted)
    ax.annotate(f"one N×N score tensor: {fmt_bytes(nn)}", xy=(-0.5, nn), xytext=(6, -4),
                textcoords="offset points", ha="left", va="top", fontsize=9, color="#d62728",
                bbox={"boxstyle": "square,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    if timeline.peak is not None:
        p = timeline.peak
        alive = timeline.alive_at_peak(nn)
        (dot,) = ax.plot([p.index], [p.bytes], "o", color="#d62728", markersize=7, zorder=5,
                         label=f"peak: {fmt_bytes(p.bytes)} ({p.bytes / nn:.2f}× one N×N tensor)")
        result.lines["peak"] = dot
        text = (f"peak {fmt_bytes(p.bytes)} ({p.bytes:,} B) after op {p.index}\n"
                f"{p.op} → {fmt_shapes(p.output_shapes) or 'no tensor'}\n"
                + (f"{alive} N×N-sized tensor{'' if alive == 1 else 's'} alive" if alive
                   else "no N×N-sized tensor alive"))
        right = p.index > 0.55 * xmax  # the label on the side with more room
        low = p.bytes < 0.55 * top  # below the middle: the label above the point, else below it
        ax.annotate(text, xy=(p.index, p.bytes), xytext=(-18 if right else 18, 28 if low else -14),
                    textcoords="offset points", ha="right" if right else "left", va="bottom" if low else "top",
                    fontsize=9, bbox={"boxstyle": "round,pad=0.35", "fc": "white", "ec": "0.6", "alpha": 0.95},
                    arrowprops={"arrowstyle": "->", "color": "0.3"}, zorder=6)
    ax.set_ylim(0, top)
    ax.set_xlim(-0.5, xmax + 0.5)
    ax.yaxis.set_major_locator(MultipleLocator(_binary_step(top)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p=None: "0" if v == 0 else tick_bytes(v)))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    ax.grid(True, alpha=0.3)
    ax.set_xlabel(f"op index (the {len(xs):,} aten ops of one call, in dispatch order)")
    ax.set_ylabel("live tracked tensor memory")
    ax.set_title(f"Memory timeline: {case_title(case)}", fontsize=11)
    ax.legend(loc="upper left", fontsize="small", frameon=True, framealpha=0.9)
    return result
