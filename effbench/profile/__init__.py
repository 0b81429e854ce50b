"""`effbench profile`: where one case's time and memory go (see :mod:`effbench.profile.run`).

:func:`run_profile` runs one case in the runner's isolated child and writes ``trace.json`` (torch.profiler,
Chrome/Perfetto), ``ops.md`` (top ops by self time and by memory), ``memory_timeline.csv``/``.png``/``.svg``
(live tracked bytes after every op of one call) and, on CUDA, ``memory_snapshot.pickle``; it returns a
:class:`ProfileReport` holding the same tables and the peak.
"""

from .opstats import OpCounter, count_ops
from .report import PeakOp, ProfileOptions, ProfileReport, fmt_shape, fmt_shapes
from .run import memory_snapshot, profile_in_process, run_profile
from .timeline import Timeline, nn_bytes, read_csv, record_timeline

__all__ = ["OpCounter", "PeakOp", "ProfileOptions", "ProfileReport", "Timeline", "count_ops", "fmt_shape",
           "fmt_shapes", "memory_snapshot", "nn_bytes", "profile_in_process", "read_csv", "record_timeline",
           "run_profile"]
