"""The contract suite runs on a plugin's mechanisms with no edit anywhere (``--plugin FILE``).

A correct plugin written in the README's form (tests/plugins/blocklocal.py, no new-style
declaration) passes the whole suite; the planted plugin whose forward sees one key too many
(tests/plugins/leaky.py) fails it, with its name in the report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def contract(*plugins: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "pytest", str(TESTS / "test_contract.py"), "-q", "-p", "no:cacheprovider",
            "-o", "addopts="]
    for p in plugins:
        args += ["--plugin", str(TESTS / "plugins" / p)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, cwd=TESTS.parent, env=env, timeout=600)


def test_a_correct_plugin_passes_the_whole_contract():
    run = contract("blocklocal.py")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    tail = run.stdout.strip().splitlines()[-1]
    assert "passed" in tail and "failed" not in tail, tail


def test_a_plugin_that_sees_one_key_too_many_fails_with_its_name():
    run = contract("leaky.py")
    assert run.returncode == 1, run.stdout[-3000:]
    failed = [line for line in run.stdout.splitlines() if line.startswith("FAILED")]
    assert failed and all("leaky" in line for line in failed), failed
    assert any("test_forward_and_gradients_equal_own_reference[leaky" in line for line in failed), failed
