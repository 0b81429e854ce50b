"""The fork server the cases' children come from is started by the console script before it imports torch."""

import subprocess
import sys

import pytest

from effbench.workers import wants_children


@pytest.mark.parametrize("argv,wanted", [
    (["estimate", "--mech", "dense"], True),
    (["sweep", "--preset", "textbook"], True),
    (["profile", "--mech", "local"], True),
    (["sweep", "--executor", "local"], True),
    (["sweep", "--executor", "ray"], False),  # the cases run in children on the Ray workers
    (["sweep", "--executor=ray"], False),
    (["sweep", "--help"], False),
    (["plot", "results.csv"], False),
    (["verify"], False),
    ([], False),
])
def test_which_commands_start_the_fork_server_early(argv, wanted):
    assert wants_children(argv) is wanted


def test_fork_server_starts_before_torch_is_imported():
    """In a fresh interpreter: start_early launches the server (its pid is known) and returns at once, with torch
    not yet imported by the caller, so the two imports run side by side."""
    code = ("import sys; from effbench.workers import start_early; "
            "from multiprocessing import forkserver; "
            "started = start_early(['estimate', '--mech', 'dense']); "
            "print(started, forkserver._forkserver._forkserver_pid is not None, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "False"]
