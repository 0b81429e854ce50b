"""`effbench doctor`: the environment, which readings a sweep will have on a device, and a self-test of them.

The self-test runs dense attention (B=1, H=2, D=32, fp32, forward) at N = 2048 and 4096, whose sizes are known in closed form through the sweep's own
code (:func:`effbench.runner.run_case`), so it proves the readings a sweep records; ``checks.py`` says how each
reading is compared and why its tolerance is what it is.

Each check is a :class:`Check` with a :class:`Verdict`: ``pass``, ``fail`` (with one sentence on what to do) or
``missing`` (with the reason: a reading this device does not have is not a failure). :attr:`DoctorReport.ok` is
False when any check fails. :func:`render_doctor` prints the report with rich.

Modules: ``probe`` (environment and readings), ``checks`` (closed forms, tolerances, verdicts), ``run``
(:func:`run_doctor`, :class:`DoctorReport`), ``render`` (:func:`render_doctor`).
"""

from .checks import SELF_TEST_NS, SELF_TEST_SIZES, TOLERANCES, Check, Tolerance, Verdict, dense_flops, dense_peak_bytes
from .probe import Gpu, Reading, installed_extras
from .render import render_doctor, verdict_line
from .run import DoctorReport, run_doctor

__all__ = ["Check", "DoctorReport", "Gpu", "Reading", "SELF_TEST_NS", "SELF_TEST_SIZES", "TOLERANCES", "Tolerance",
           "Verdict", "dense_flops", "dense_peak_bytes", "installed_extras", "render_doctor", "run_doctor",
           "verdict_line"]
