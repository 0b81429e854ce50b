"""The Ray executor on a real local Ray instance (no mock; no other host): the same rows as the local executor,
fault rows, a worker killed mid-case, a case past its timeout cancelled, kill/Ctrl-C and resume through the CLI,
one GPU per task, and the one-line errors. Needs the `ray` extra (skipped without it)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from effbench import results  # noqa: E402
from effbench.cases import Case, expand  # noqa: E402
from effbench.cli import app  # noqa: E402
from effbench.executors import INSTALL_HINT, LocalExecutor  # noqa: E402
from effbench.ray_executor import RayExecutor  # noqa: E402
from effbench.measure.env import cpu_name  # noqa: E402
from effbench.plugins import load_plugin  # noqa: E402
from effbench.runner import RunOptions  # noqa: E402
from effbench.status import Status  # noqa: E402
from effbench.sweep import run_sweep  # noqa: E402

PLUGIN = str(Path(__file__).parent / "plugins" / "faulty.py")
DETERMINISTIC = ["case_key", "status", "peak_tensor_bytes", "predicted_bytes", "flops", "param_bytes", "phase",
                 "state_bytes", "predicted_state_bytes"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance for this module: 2 CPUs and 2 (pretend) GPUs; yields its GCS address."""
    load_plugin(PLUGIN)
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _opts(**kw):
    return RunOptions(**{"warmup": 0, "repeats": 1, "timeout": 60, "plugins": (PLUGIN,), **kw})


def _ray(**kw):
    return RayExecutor(**{"device": "cpu", "cpus_per_case": 1, **kw})


def _hang(heads=1):
    return Case(mechanism="plant-hang", n=16, heads=heads, head_dim=8)


def test_ray_rows_equal_local_rows(cluster, tmp_path):
    cases = expand(["dense", "sdpa", "local"], [64, 256], axes={"window": [16]}, heads=2, head_dim=16)
    cases += expand(["dense", "local"], [64, 256], axes={"window": [16]}, heads=2, head_dim=16, phase="decode",
                    decode_steps=3)  # decode rows too: state bytes are deterministic
    local = run_sweep(cases, _opts(), tmp_path / "local.csv", executor=LocalExecutor())
    with _ray() as ex:
        through_ray = run_sweep(cases, _opts(), tmp_path / "ray.csv", executor=ex)
    assert len(local.rows) == len(through_ray.rows) == 10
    a, b = (results.read_results(tmp_path / f"{name}.csv").sort_values("case_key").reset_index(drop=True)
            for name in ("local", "ray"))
    assert (a["status"] == "ok").all()
    assert a[DETERMINISTIC].equals(b[DETERMINISTIC])
    assert set(b["host"]) == {socket.gethostname()} and set(b["device_name"]) == {cpu_name()}
    assert b["device_uuid"].isna().all()  # a CPU has no UUID
    run = json.loads(results.sidecar_path(tmp_path / "ray.csv").read_text())["runs"][-1]["executor"]
    assert run["name"] == "ray" and run["ray"] == ray.__version__
    assert run["task_options"] == {"num_cpus": 1, "num_gpus": 0, "max_retries": 0, "max_calls": 0}
    assert [n["resources"]["CPU"] for n in run["nodes"]] == [2.0] and run["resources"]["GPU"] == 2.0


def test_planted_faults_give_their_rows_under_ray(cluster, tmp_path):
    cases = [Case(mechanism=m, n=n, heads=2, head_dim=16) for m, n in
             (("plant-killed", 64), ("plant-hang", 64), ("plant-oom", 64), ("plant-oom", 128), ("sdpa", 64))]
    with _ray() as ex:
        report = run_sweep(cases, _opts(timeout=4), tmp_path / "r.csv", executor=ex)
    rows = {(r.mechanism, r.n): r for r in report.rows}
    assert rows["plant-killed", 64].status is Status.KILLED and "SIGKILL" in rows["plant-killed", 64]["error"]
    assert rows["plant-hang", 64].status is Status.TIMEOUT and "4 s timeout" in rows["plant-hang", 64]["error"]
    assert rows["plant-oom", 64].status is Status.OOM and "OutOfMemoryError" in rows["plant-oom", 64]["error"]
    frontier = rows["plant-oom", 128]  # the next N of an OOM configuration is not run
    assert frontier.status is Status.PREDICTED_OOM and "OOM frontier" in frontier["error"] and frontier["host"] is None
    assert rows["sdpa", 64].status is Status.OK and rows["sdpa", 64]["flops"] == 4 * 2 * 64 * 64 * 16
    df = results.read_results(tmp_path / "r.csv")
    assert len(df) == 5 and df["case_key"].is_unique
    assert (df[df["status"] != "predicted_oom"]["host"] == socket.gethostname()).all()


def test_a_worker_killed_mid_case_gives_a_killed_row_naming_it(cluster, tmp_path):
    killed = []

    def kill_worker(case, placement):  # the worker has said it started the case, which hangs for 600 s
        if case.mechanism == "plant-hang":
            killed.append(placement)
            os.kill(placement.pid, signal.SIGKILL)

    with _ray(on_placed=kill_worker) as ex:
        report = run_sweep([_hang(), Case(mechanism="sdpa", n=32, heads=1, head_dim=8)], _opts(), tmp_path / "r.csv",
                           executor=ex)
    rows = {r.mechanism: r for r in report.rows}
    (victim,) = killed
    hang = rows["plant-hang"]
    assert hang.status is Status.KILLED and hang["host"] == socket.gethostname()
    assert "the Ray worker running this case died" in hang["error"] and f"pid {victim.pid}" in hang["error"]
    assert rows["sdpa"].status is Status.OK  # the sweep went on


def test_a_case_past_its_timeout_is_cancelled_by_the_driver(cluster, tmp_path):
    # grace_s = 1 - timeout: the driver's deadline (1 s after the task started) comes long before the runner's own
    # 60 s timeout inside the task, so it is the driver that cancels (ray.cancel(force=True))
    with _ray(grace_s=-59) as ex:
        report = run_sweep([_hang()], _opts(timeout=60), tmp_path / "r.csv", executor=ex)
    (row,) = report.rows
    assert row.status is Status.TIMEOUT and "cancelled" in row["error"] and row["host"] == socket.gethostname()


def test_concurrent_gpu_tasks_get_different_gpus(cluster, tmp_path):
    seen = {}

    class BothRunning(Exception):
        pass

    def placed(case, placement):
        seen[case.heads] = placement
        if len(seen) == 2:
            raise BothRunning  # both tasks hold their GPU at once: neither has finished (each hangs for 600 s)

    with RayExecutor(device="cpu", cpus_per_case=1, gpus_per_case=1, on_placed=placed) as ex:
        assert ex.task_options() == {"num_cpus": 1, "num_gpus": 1, "max_retries": 0, "max_calls": 1}
        with pytest.raises(BothRunning):  # the executor cancels both on the way out
            run_sweep([_hang(1), _hang(2)], _opts(), tmp_path / "r.csv", executor=ex)
    assert len(results.read_results(tmp_path / "r.csv")) == 0
    a, b = seen.values()
    assert {a.cuda_visible_devices, b.cuda_visible_devices} == {"0", "1"}
    assert {a.gpu_ids, b.gpu_ids} == {("0",), ("1",)} and a.pid != b.pid


def _rows_in(out: Path) -> int:
    return out.read_text().count("\n") - 1 if out.exists() else 0  # header + rows


def test_killed_and_interrupted_sweeps_resume_through_ray_to_every_case_once(cluster, tmp_path):
    out = tmp_path / "r.csv"
    args = ["sweep", "--executor", "ray", "--cpus-per-case", "1", "--plugin", PLUGIN, "--mech", "plant-slow,sdpa",
            "--n", "16,32,64", "--heads", "1", "--head-dim", "8", "--repeats", "1", "--warmup", "0",
            "--device", "cpu", "--out", str(out)]
    # 1. a driver process of its own on this cluster, SIGKILLed mid-way
    proc = subprocess.Popen([sys.executable, "-m", "effbench", *args, "--address", cluster],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while _rows_in(out) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = results.read_results(out)
    assert 2 <= len(before) < 6

    # 2. resumed (in this process, on the same cluster) and interrupted by Ctrl-C right after it has written one
    # more row: the KeyboardInterrupt is raised where a real Ctrl-C lands, in the driver's loop, just after the
    # row's fsync (a thread calling interrupt_main could arrive after the sweep had finished on a busy machine)
    real_append = results.ResultsWriter.append
    appended = []

    def append_then_ctrl_c(self, row):
        real_append(self, row)
        appended.append(row)
        if len(appended) == 1:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(results.ResultsWriter, "append", append_then_ctrl_c)
        r = CliRunner().invoke(app, args + ["--resume"])
    assert r.exit_code == 130, r.output
    text = " ".join(r.output.split())
    assert "outstanding cases cancelled" in text and "with --resume to run the rest" in text
    middle = results.read_results(out)
    assert len(before) < len(middle) < 6 and middle["case_key"].is_unique

    # 3. resumed to the end: every case exactly once, the rows written before the kill untouched
    r = CliRunner().invoke(app, args + ["--resume"])
    assert r.exit_code == 0, r.output
    after = results.read_results(out)
    assert len(after) == 6 and after["case_key"].is_unique and (after["status"] == "ok").all()
    assert after.iloc[: len(before)].equals(before)


@pytest.mark.parametrize("args, needle", [
    (["--executor", "ray", "--address", "127.0.0.1:1"], "no Ray cluster answers at 127.0.0.1:1"),
    (["--executor", "ray", "--address", "nowhere"], "give host:port"),
    (["--address", "auto"], "--address: only with --executor ray"),
    (["--executor", "ray", "--cpus-per-case", "0"], "--cpus-per-case must be positive"),
    (["--executor", "dask"], "--executor 'dask' is not one of: local, ray"),
])
def test_executor_options_fail_in_one_line(args, needle):
    r = CliRunner().invoke(app, ["sweep", "--mech", "sdpa", "--n", "16", *args])
    assert r.exit_code == 2, r.output
    assert needle in " ".join(r.output.split()) and len(r.output.strip().splitlines()) == 1, r.output


def test_without_ray_the_ray_executor_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    r = CliRunner().invoke(app, ["sweep", "--executor", "ray", "--mech", "sdpa", "--n", "16"])
    assert r.exit_code == 2 and "pip install" in r.output and "Traceback" not in r.output, r.output
    assert " ".join(r.output.split()).endswith(" ".join(INSTALL_HINT.split()))
