"""The decode phase through the harness: case keys, kv_heads, the runner's decode readings, estimate, the CLI.

Every assertion is on deterministic quantities (bytes counted by the storage tracker, declared formulas, statuses,
shapes), never on a timing. Decode equals prefill for each mechanism in tests/test_contract.py.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mechanisms
from effbench import results
from effbench.cases import DECODE_EXTRA_STEPS, Case, CaseError, expand
from effbench.cli import app
from effbench.measure.bandwidth import bandwidth_fields, copy_bandwidth
from effbench.measure.timing import Timing
from effbench.runner import RunOptions, run_case
from effbench.status import Status

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference.csv"
cli = CliRunner()
OPTS = RunOptions(repeats=2)


def decode(mech: str, n: int, heads: int = 8, head_dim: int = 64, steps: int = 4, **knobs) -> Case:
    return Case(mechanism=mech, n=n, heads=heads, head_dim=head_dim, causal=True, phase="decode",
                decode_steps=steps, knobs=tuple(knobs.items()))


# ------------------------------------------------------------------------------ case keys

def test_prefill_case_keys_are_those_of_the_committed_rows():
    """Adding phase, decode_steps and kv_heads changed no prefill row's key: every row of the reference results,
    rebuilt as a Case from its columns, has the key it was written with (so --resume still recognises it)."""
    with open(REFERENCE, newline="") as fh:
        rows = list(csv.DictReader(fh))
    checked = 0
    for row in rows:
        spec = mechanisms.REGISTRY.get(row["mechanism"])
        if spec is None:
            continue
        knobs = tuple((k.name, row[k.name]) for k in spec.knobs if row.get(k.name, "") != "")
        case = Case(mechanism=row["mechanism"], n=int(row["n"]), batch=int(row["batch"]), heads=int(row["heads"]),
                    head_dim=int(row["head_dim"]), dtype=row["dtype"], device=row["device"], mode=row["mode"],
                    causal=row["causal"] == "true", knobs=tuple((k, spec.knob(k).parse(v)) for k, v in knobs),
                    seed=int(row["seed"]))
        assert case.key == row["case_key"], (row["mechanism"], row["n"], knobs)
        checked += 1
    assert checked > 100


def test_kv_heads_equal_to_heads_is_the_default_case():
    plain = Case(mechanism="dense", n=512, heads=8)
    assert Case(mechanism="dense", n=512, heads=8, knobs=(("kv_heads", 8),)).key == plain.key
    assert Case(mechanism="dense", n=512, heads=8, knobs=(("kv_heads", 0),)).key == plain.key
    assert Case(mechanism="dense", n=512, heads=8, knobs=(("kv_heads", 2),)).key != plain.key
    assert Case(mechanism="dense", n=512, decode_steps=5).key == plain.key  # ignored by a prefill case
    d = Case(mechanism="dense", n=512, phase="decode", causal=True)
    assert d.key != Case(mechanism="dense", n=512, causal=True).key
    assert d.key != Case(mechanism="dense", n=512, phase="decode", causal=True, decode_steps=8).key


def test_kv_heads_must_divide_heads():
    with pytest.raises(CaseError, match="heads 8 is not a multiple of kv_heads 3"):
        expand(["dense"], [512], axes={"kv_heads": [3]}, heads=8)
    case = Case(mechanism="local", n=512, heads=8, knobs=(("kv_heads", 3),))
    assert any("not a multiple of kv_heads 3" in r for r in case.spec().unsupported(case))


def test_decode_is_causal_and_forward_only():
    cases = expand(["local", "dense"], [512], phase="decode", causal=False)
    assert all(c.causal and c.phase == "decode" for c in cases)
    with pytest.raises(CaseError, match="decode is inference"):
        Case(mechanism="dense", n=512, phase="decode", mode="fwd+bwd")


def test_kv_heads_shapes_inputs():
    spec = mechanisms.get("sdpa")
    import torch
    q, k, v = spec.make_inputs(batch=2, heads=8, n=16, head_dim=4, dtype=torch.float32, knobs={"kv_heads": 2})
    assert q.shape == (2, 8, 16, 4) and k.shape == v.shape == (2, 2, 16, 4)
    same = spec.make_inputs(batch=2, heads=8, n=16, head_dim=4, dtype=torch.float32)
    plain = spec.make_inputs(batch=2, heads=8, n=16, head_dim=4, dtype=torch.float32, knobs={"kv_heads": 8})
    assert all(torch.equal(a, b) for a, b in zip(same, plain))


def test_a_gqa_prefill_case_runs_with_fewer_kv_heads():
    """A sweep row with kv_heads < heads gets K and V of kv_heads heads (its inputs shrink, its FLOPs do not)."""
    from effbench.workload import prepare
    w = prepare(Case(mechanism="sdpa", n=64, heads=8, head_dim=16, knobs=(("kv_heads", 2),)))
    assert [tuple(t.shape) for t in w.inputs] == [(1, 8, 64, 16), (1, 2, 64, 16), (1, 2, 64, 16)]
    assert w.call().shape == (1, 8, 64, 16)


# ------------------------------------------------------------------------------ the runner

@pytest.fixture(scope="module")
def dense_rows():
    return {n: run_case(decode("dense", n), OPTS) for n in (3200, 6400)}


def test_dense_cache_is_measured_and_doubles(dense_rows):
    for n, r in dense_rows.items():
        assert r.status == Status.OK, r.error
        capacity = n + 4 + DECODE_EXTRA_STEPS
        assert r.state_bytes == r.state_bytes_analytic == 2 * 1 * 8 * capacity * 64 * 4
        assert abs(r.state_bytes / (2 * 8 * n * 64 * 4) - 1) < 0.01  # 2·B·kv_heads·N·D·bytes within 1%
        assert r.predicted_state_bytes == r.state_bytes
        assert r.predicted_bytes == r.peak_tensor_bytes  # one step's peak, predicted on fake tensors
        assert r.read_bytes == 2 * 8 * n * 64 * 4  # the filled part of the cache
        assert r.time_ms_per_token is not None and r.repeats == 4
        assert "state" in r.readings and "tracker" in r.readings
    ratio = dense_rows[6400].state_bytes / dense_rows[3200].state_bytes
    assert 1.99 <= ratio <= 2.0


def test_kv_heads_one_divides_the_dense_cache_by_heads(dense_rows):
    mqa = run_case(decode("dense", 3200, kv_heads=1), OPTS)
    assert mqa.status == Status.OK, mqa.error
    assert mqa.state_bytes * 8 == dense_rows[3200].state_bytes


@pytest.mark.parametrize("mech,knobs", [("local", {"window": 64}), ("sinks", {"window": 64, "sinks": 4})])
def test_window_states_are_constant_in_n(mech, knobs):
    rows = [run_case(decode(mech, n, **knobs), OPTS) for n in (1000, 2000, 4000)]
    for r in rows:
        assert r.status == Status.OK, r.error
        assert r.state_bytes == r.state_bytes_analytic == r.predicted_state_bytes
    assert rows[0].state_bytes == rows[1].state_bytes == rows[2].state_bytes
    assert rows[0].peak_tensor_bytes == rows[2].peak_tensor_bytes  # a step's work does not see N either


def test_mechanism_without_decode_form_is_skipped_with_its_reason():
    r = run_case(decode("linformer", 512), OPTS)
    assert r.status == Status.SKIPPED
    assert "no decode form" in r.error and mechanisms.get("linformer").no_decode_reason in r.error


# ------------------------------------------------------------------------------ the CLI

def test_estimate_decode_at_a_million_allocates_nothing():
    r = cli.invoke(app, ["estimate", "--phase", "decode", "--mech", "dense,local", "--n", "1048576",
                         "--window", "128", "--decode-steps", "4"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "decode: predicted state" in text
    assert "4.0 GiB" in text  # dense: 2·8·(2²⁰ + 8)·64·4 B


def test_estimate_decode_rows(tmp_path):
    out = tmp_path / "e.csv"
    r = cli.invoke(app, ["estimate", "--phase", "decode", "--mech", "dense", "--n", "65536", "--decode-steps", "4",
                         "--kv-heads", "2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    df = results.read_results(out)
    row = df.iloc[0]
    assert row["phase"] == "decode" and row["decode_steps"] == 4 and row["kv_heads"] == 2
    assert row["predicted_state_bytes"] == row["state_bytes_analytic"] == 2 * 2 * (65536 + 8) * 64 * 4


def test_sweep_decode_writes_decode_rows_and_the_copy_bandwidth(tmp_path):
    out = tmp_path / "d.csv"
    r = cli.invoke(app, ["sweep", "--phase", "decode", "--mech", "local,linformer", "--n", "600", "--window", "32",
                         "--decode-steps", "3", "-o", str(out)])
    assert r.exit_code == 0, r.output
    df = results.read_results(out)
    assert set(df["phase"]) == {"decode"}
    by = df.set_index("mechanism")
    assert by.loc["local", "status"] == "ok" and by.loc["linformer", "status"] == "skipped"
    assert by.loc["local", "state_bytes"] == by.loc["local", "state_bytes_analytic"]
    run = __import__("json").loads(results.sidecar_path(out).read_text())["runs"][0]
    assert run["copy_gbps"] > 0 and run["copy_bytes"] == 256 * 2**20


@pytest.mark.parametrize("args,needle", [
    (["sweep", "--phase", "generate"], "--phase"),
    (["sweep", "--phase", "decode", "--mode", "fwd+bwd", "--mech", "dense"], "--phase decode is inference"),
    (["sweep", "--phase", "decode", "--decode-steps", "0", "--mech", "dense"], "--decode-steps"),
    (["sweep", "--mech", "dense", "--heads", "8", "--kv-heads", "3"], "not a multiple of kv_heads 3"),
])
def test_bad_decode_options_are_one_line(args, needle):
    r = cli.invoke(app, args)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert needle in " ".join(r.output.split())


def test_options_keep_their_help_and_short_flags():
    """Typer reads the axis wrapper's __signature__; its annotations must be evaluated or every option loses its
    help text and its short flag (-o, -m)."""
    r = cli.invoke(app, ["sweep", "--help"], terminal_width=200)
    import re
    assert re.search(r"--out\s+-o\b", r.output) and re.search(r"--mech\s+-m\b", r.output), r.output
    text = " ".join(r.output.split())
    assert "Results CSV" in text and "decode" in text


def test_old_files_without_a_phase_read_as_prefill(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("case_key,mechanism,n,status\nabc,dense,512,ok\n")
    df = results.read_results(path)
    assert list(df["phase"]) == ["prefill"]


# ------------------------------------------------------------------------------ copy bandwidth

def test_copy_bandwidth_on_cpu():
    found = copy_bandwidth("cpu", nbytes=2**20, repeats=3)
    assert found["copy_gbps"] > 0 and found["copy_timer"] == "perf_counter" and found["copy_repeats"] == 3
    assert found["copy_bytes"] == 2**20


def test_copy_bandwidth_counts_bytes_read_and_written():
    """1 MiB copied in 0.5 ms (the median) is 2 MiB of traffic per 0.5 ms."""
    t = Timing(median_ms=0.5, iqr_ms=0.0, repeats=3, samples_ms=[0.5] * 3, timer="cuda-events")
    fields = bandwidth_fields(2**20, t, "cuda:0")
    assert fields["copy_gbps"] == round(2 * 2**20 / 0.5e-3 / 1e9, 3)
    assert fields["copy_timer"] == "cuda-events" and fields["copy_repeats"] == 3
