"""The fork server every case's child is forked from, and starting it early (no torch imported here).

A child per case keeps a crash, a timeout or the OS OOM killer to that case's row. The children come from a
fork server (``multiprocessing``'s ``forkserver``): a clean process that imports torch and the harness once
(:data:`PRELOAD`) and forks a child per case, so a child starts warm without inheriting the parent's threads.

Starting that server costs as much as importing torch (~3 s here). :func:`start_early` starts it from the
console script *before* the command imports torch, so the two imports run side by side on two cores; a
one-case ``effbench estimate`` pays torch's start once, not twice in a row.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any, Sequence

# Imported once by the fork server, so each case's child starts with them loaded.
PRELOAD = ["torch", "torch._subclasses.fake_tensor", "torch.utils.flop_counter", "torch.utils.benchmark",
           "mechanisms", "effbench.runner", "effbench.workload", "effbench.measure.memory",
           "effbench.measure.flops", "effbench.measure.timing", "effbench._forkserver_warm"]
# Commands whose cases run in children of the fork server on this machine.
COMMANDS = ("sweep", "estimate", "profile", "doctor")

_CTX: Any = None


def context():
    """The multiprocessing context children are started from: the fork server (preloading :data:`PRELOAD`) where
    the platform has one, else spawn."""
    global _CTX
    if _CTX is None:
        if "forkserver" in mp.get_all_start_methods():
            _CTX = mp.get_context("forkserver")
            _CTX.set_forkserver_preload(PRELOAD)
        else:  # pragma: no cover - macOS/Windows
            _CTX = mp.get_context("spawn")
    return _CTX


def wants_children(argv: Sequence[str]) -> bool:
    """Whether the command line runs cases in local children: one of :data:`COMMANDS`, not a ``--help``, not a
    Ray sweep (its cases run in children on the Ray workers)."""
    args = list(argv)
    if not args or args[0] not in COMMANDS or "--help" in args or "-h" in args:
        return False
    return not any(a == "--executor=ray" or (a == "--executor" and nxt == "ray") for a, nxt in zip(args, args[1:] + [""]))


def start_early(argv: Sequence[str]) -> bool:
    """Start the fork server now if the command will need it (see :func:`wants_children`); returns whether it did.
    ``ensure_running`` only launches the server: it imports :data:`PRELOAD` while the caller goes on."""
    if not wants_children(argv) or context().get_start_method() != "forkserver":
        return False
    from multiprocessing import forkserver

    forkserver.ensure_running()
    return True


def main() -> None:
    """The ``effbench`` console script: start the fork server if the command needs it, then run the CLI."""
    import sys

    try:
        start_early(sys.argv[1:])
    except Exception:  # noqa: BLE001 - an early start is an optimisation: the runner starts it when needed
        pass
    from .cli import main as cli_main

    cli_main()
