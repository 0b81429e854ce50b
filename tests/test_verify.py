"""`effbench verify`: implementation and fidelity checks, planted failures, CSV schema, rendering."""

from __future__ import annotations

import csv
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

import mechanisms
from effbench import plugins, verify
from effbench.render import print_verify, summary_line
from effbench.units import UsageError
from effbench.verify import CheckResult, check_trend, run_verify, small_value, write_csv
from mechanisms import Fidelity, Knob, register

PLUGINS = Path(__file__).parent / "plugins"
LEAKY = str(PLUGINS / "leaky.py")
FAULTY = str(PLUGINS / "faulty.py")
N = 200  # small: every test here runs in about a second


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def leaky(monkeypatch):
    before = dict(mechanisms.REGISTRY)
    plugins.load_plugin(LEAKY)
    added = {k: v for k, v in mechanisms.REGISTRY.items() if k not in before}
    yield "leaky"
    for k in added:
        mechanisms.REGISTRY.pop(k, None)
    plugins._LOADED.pop(str(Path(LEAKY).resolve()), None)


@pytest.fixture
def faulty():
    before = dict(mechanisms.REGISTRY)
    plugins.load_plugin(FAULTY)
    added = [k for k in mechanisms.REGISTRY if k not in before]
    yield
    for k in added:
        mechanisms.REGISTRY.pop(k, None)
    plugins._LOADED.pop(str(Path(FAULTY).resolve()), None)


def temporary(monkeypatch, cls, **kw):
    """Register ``cls`` in the real registry for one test only."""
    reg: dict = {}
    register(registry=reg, **kw)(cls)
    spec = reg[kw["name"]]
    monkeypatch.setitem(mechanisms.REGISTRY, spec.name, spec)
    return spec


def rendered(report) -> str:
    buf = io.StringIO()
    print_verify(report, Console(file=buf, width=200, color_system=None))
    return buf.getvalue()


# ------------------------------------------------------------------ the planted leak

def test_leaky_window_fails_and_is_named(leaky):
    report = run_verify(["dense", "leaky"], N, "cpu", "float32", 0, None)
    assert report.passed is False
    assert report.failing_mechanisms == ["leaky"]
    out = [r for r in report.rows if r.mechanism == "leaky" and r.check == "impl-output"]
    assert {r.causal for r in out} == {False, True}
    for r in out:
        assert r.passed is False and r.max_abs_err > r.tolerance  # one extra key: error ~0.1, not 1e-6
        assert "window=" in r.detail
    text = rendered(report)
    assert "leaky" in text and "FAIL" in text
    line = summary_line(report)
    assert line.startswith("verify failed for 1 of 2") and "leaky" in line and "tolerance" in line
    assert "dense" not in line.split(":", 1)[1]


def test_cli_verify_exits_nonzero_on_leak(tmp_path):
    """Through the real command line (in a child process: the registry here stays clean)."""
    from effbench.cli import app

    if "verify" not in {c.name or c.callback.__name__ for c in app.registered_commands}:
        pytest.skip("the verify command is not wired into effbench.cli yet")
    out = tmp_path / "v.csv"
    r = subprocess.run([sys.executable, "-m", "effbench", "verify", "--plugin", LEAKY, "--mech", "dense,leaky",
                        "--n", str(N), "--out", str(out)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    text = r.stdout + r.stderr
    assert "leaky" in text and "Traceback" not in text
    assert out.exists()


# ------------------------------------------------------------------ what passes

def test_exact_mechanisms_pass_with_all_rows():
    report = run_verify(["dense", "sdpa"], N, "cpu", "float32", 0, None)
    assert report.passed, summary_line(report)
    for name in ("dense", "sdpa"):
        rows = [r for r in report.rows if r.mechanism == name]
        checks = {(r.check, r.causal) for r in rows}
        assert checks == {(c, m) for c in ("impl-output", "impl-grad", "fidelity") for m in (False, True)} | {("decode", True)}
        assert len([r for r in rows if r.check == "decode"]) == 3  # kv_heads 4, 2 and 1
        for r in rows:
            assert r.passed is True and r.max_abs_err < 1e-5
    assert summary_line(report).startswith("all 2 mechanism(s) pass")


def test_deterministic_under_seed(monkeypatch):
    class Noisy(nn.Module):
        """Random projection of keys drawn from seed: a seed-dependent approximation."""

        def __init__(self, *, head_dim, heads, n, causal, seed, features):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.causal = causal
            self.register_buffer("w", torch.eye(head_dim) + 0.1 * torch.randn(head_dim, head_dim, generator=g))

        def forward(self, q, k, v):
            mask = mechanisms.causal_mask(q.shape[-2], q.device) if self.causal else None
            return mechanisms.masked_softmax_attention(q, k @ self.w, v, mask)

        reference = forward

    temporary(monkeypatch, Noisy, name="t-noisy", family="kernel", complexity="O(N²)",
              knobs=[Knob("features", 8, axis="features", minimum=1)])
    a = run_verify(["t-noisy"], 64, "cpu", "float32", 3, None)
    b = run_verify(["t-noisy"], 64, "cpu", "float32", 3, None)
    c = run_verify(["t-noisy"], 64, "cpu", "float32", 4, None)
    assert a.passed
    assert [r.as_row() for r in a.rows] == [r.as_row() for r in b.rows]
    assert [r.as_row() for r in a.rows] != [r.as_row() for r in c.rows]
    fid = [r for r in a.rows if r.check == "fidelity"]
    assert fid and all("mean of 3 seeds" in r.detail for r in fid)  # seed-dependent: averaged


# ------------------------------------------------------------------ failures are rows, never crashes

def test_exception_is_a_failed_row_with_one_line(faulty):
    report = run_verify(["plant-error"], 64, "cpu", "float32", 0, None)
    assert not report.passed and report.failing_mechanisms == ["plant-error"]
    bad = [r for r in report.rows if r.passed is False]
    assert bad and all("ValueError: something" in r.detail and "\n" not in r.detail for r in bad)
    assert "went wrong" not in summary_line(report)  # only the first line of the message
    assert "plant-error" in summary_line(report)


def test_nan_output_fails(monkeypatch):
    class NaNs(nn.Module):
        """Correct except for one NaN."""

        def __init__(self, *, head_dim, heads, n, causal, seed):
            super().__init__()

        def forward(self, q, k, v):
            out = v * 1.0
            return out.index_fill(-2, torch.tensor([0]), float("nan"))

        def reference(self, q, k, v):
            return v * 1.0

    temporary(monkeypatch, NaNs, name="t-nan", family="sparse", complexity="O(N)")
    report = run_verify(["t-nan"], 64, "cpu", "float32", 0, None)
    assert not report.passed
    r = next(r for r in report.rows if r.check == "impl-output")
    assert r.passed is False and "NaN/Inf" in r.detail
    assert any(r.check == "fidelity" and r.passed is False and "NaN" in r.detail for r in report.rows)


def test_wrong_gradient_fails_even_when_output_matches(monkeypatch):
    class Detached(nn.Module):
        """Right output, but k gets no gradient (forward detaches it)."""

        def __init__(self, *, head_dim, heads, n, causal, seed):
            super().__init__()
            self.causal = causal

        def forward(self, q, k, v):
            mask = mechanisms.causal_mask(q.shape[-2], q.device) if self.causal else None
            return mechanisms.masked_softmax_attention(q, k.detach(), v, mask)

        def reference(self, q, k, v):
            mask = mechanisms.causal_mask(q.shape[-2], q.device) if self.causal else None
            return mechanisms.masked_softmax_attention(q, k, v, mask)

    temporary(monkeypatch, Detached, name="t-detached", family="exact", complexity="O(N²)")
    report = run_verify(["t-detached"], 64, "cpu", "float32", 0, None)
    assert [r.passed for r in report.rows if r.check == "impl-output"] == [True, True]
    grads = [r for r in report.rows if r.check == "impl-grad"]
    assert grads and all(r.passed is False and "no gradient to k" in r.detail for r in grads)


def test_unsupported_case_is_skipped_with_reason(monkeypatch):
    class Bidir(nn.Module):
        """Exact attention, bidirectional only."""

        supports_causal = False
        causal_reason = "planted: no causal form"

        def __init__(self, *, head_dim, heads, n, causal, seed):
            super().__init__()

        def forward(self, q, k, v):
            return mechanisms.masked_softmax_attention(q, k, v)

        reference = forward

    temporary(monkeypatch, Bidir, name="t-bidir", family="exact", complexity="O(N²)")
    report = run_verify(["t-bidir"], 64, "cpu", "float32", 0, None)
    assert report.passed
    skipped = [r for r in report.rows if r.causal is True and r.check != "decode"]
    assert len(skipped) == 1 and skipped[0].passed is None and "planted: no causal form" in skipped[0].detail
    decode = [r for r in report.rows if r.check == "decode"]
    assert len(decode) == 1 and decode[0].applicable is False and decode[0].reason == "it declares no decode form"
    assert "skip" in rendered(report)


def test_position_encoding_layer_one_only(monkeypatch):
    class Table(nn.Module):
        """Learned N×(H·D) table added to x: declared, not inferred from its family."""

        inputs = "x"
        comparable = "position"
        causal_applies = False
        fidelity = None
        no_fidelity_reason = "not attention"

        def __init__(self, *, head_dim, heads, n, causal, seed):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.table = nn.Parameter(torch.randn(n, heads * head_dim, generator=g))

        def forward(self, x):
            return x + self.table[: x.shape[1]]

        def reference(self, x):
            return x + self.table[: x.shape[1]]

    temporary(monkeypatch, Table, name="t-table", family="low-rank", complexity="O(N·D)")
    report = run_verify(["t-table"], 64, "cpu", "float32", 0, None)
    assert report.passed
    grads = [r for r in report.rows if r.check == "impl-grad"]
    assert grads and all("x " in r.detail and "table" in r.detail for r in grads)  # input and parameter
    fid = [r for r in report.rows if r.check == "fidelity"]
    assert len(fid) == 1 and fid[0].passed is None and fid[0].detail.startswith("n/a")
    assert fid[0].applicable is False and fid[0].reason == "not attention" and fid[0].result == "n/a"
    assert "n/a" in rendered(report)


# ------------------------------------------------------------------ fidelity sweeps and trends

def _window_mech(monkeypatch, *, leak_at_full: bool = False, fidelity=None):
    class Window(nn.Module):
        """Exact sliding window (dense mask), a stand-in for a sparse mechanism with a window knob."""

        def __init__(self, *, head_dim, heads, n, causal, seed, window):
            super().__init__()
            self.causal, self.window = causal, window

        def forward(self, q, k, v):
            i, j = mechanisms.positions(q.shape[-2], q.device)
            w = self.window - 1 if leak_at_full and self.window >= q.shape[-2] - 1 else self.window
            mask = ((i - j) <= w) & ((i - j) >= (0 if self.causal else -w))
            return mechanisms.masked_softmax_attention(q, k, v, mask)

        def reference(self, q, k, v):
            i, j = mechanisms.positions(q.shape[-2], q.device)
            w = self.window - 1 if leak_at_full and self.window >= q.shape[-2] - 1 else self.window
            mask = ((i - j) <= w) & ((i - j) >= (0 if self.causal else -w))
            return mechanisms.masked_softmax_attention(q, k, v, mask)

    if fidelity is not None:
        Window.fidelity = fidelity
    return temporary(monkeypatch, Window, name="t-window", family="sparse", complexity="O(N·W)",
                     knobs=[Knob("window", 16, axis="window", minimum=1)])


def test_declared_trends_are_checked(monkeypatch):
    _window_mech(monkeypatch, fidelity=(Fidelity("window", (4, 16, "N-1"),
                                                 ("decreasing", ("equals_dense_at", "N-1"))),))
    report = run_verify(["t-window"], 100, "cpu", "float32", 0, None)
    assert report.passed, summary_line(report)
    fid = [r for r in report.rows if r.check == "fidelity" and r.causal is False]
    assert [r.knob_value for r in fid] == [4, 16, 99] and all(r.knob == "window" for r in fid)
    errs = [r.error_rel for r in fid]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-6
    trends = [r for r in report.rows if r.check == "trend"]
    assert len(trends) == 4 and all(r.passed for r in trends)  # 2 expectations × (bidirectional, causal)


def test_broken_promise_fails_the_trend(monkeypatch):
    _window_mech(monkeypatch, leak_at_full=True,  # window N-1 quietly drops the farthest key
                 fidelity=[("window", (4, "N-1"), (("equals_dense_at", "N-1"),))])  # the older tuple form
    report = run_verify(["t-window"], 100, "cpu", "float32", 0, None)
    assert not report.passed
    bad = [r for r in report.rows if r.passed is False]
    assert bad and all(r.check == "trend" and r.knob_value == 99 and r.trend == "equals_dense_at" for r in bad)
    assert "t-window" in summary_line(report)


def test_trend_expectations_on_synthetic_rows():
    def rows(errs, values):
        return {v: CheckResult("m", "fidelity", 100, False, "k", v, error_rel=e, max_abs_err=e)
                for v, e in zip(values, errs)}

    spec = mechanisms.get("dense")
    vals = [16, 64, 256, 1024]

    def trend(points, expect):
        return check_trend(spec, "k", vals, points, expect, n=100, causal=False, tol=1e-5)

    ok = trend(rows([0.4, 0.2, 0.1, 0.05], vals), mechanisms.ratio_per_4x(0.35, 0.65))
    assert ok.passed and ok.error_rel == pytest.approx(0.5) and ok.expected == "0.35–0.65"
    assert trend(rows([0.4, 0.39, 0.4, 0.38], vals), ("ratio_per_4x", 0.35, 0.65)).passed is False
    assert trend(rows([0.1, 0.2, 0.15, 0.05], vals), mechanisms.decreasing()).passed is False
    na = trend({}, "decreasing")
    assert na.passed is None and "n/a" in na.detail and na.applicable is False and na.result == "n/a"


# ------------------------------------------------------------------ knobs, arguments, CSV

@pytest.mark.parametrize("n", [200, 777, 1000, 64])
def test_small_values_are_awkward(n):
    length_axes = {k.axis for spec in mechanisms.REGISTRY.values() for k in spec.knobs if k.length}
    assert {"window", "block", "bucket", "segment", "memory"} <= length_axes
    for axis in length_axes:
        knob = Knob("x", 8, axis=axis, minimum=1)  # declares nothing: its axis' declaration applies
        v = small_value(knob, n)
        assert 1 <= v <= max(1, n // 4) + 64 and (v == 1 or n % v != 0), (axis, n, v)
    assert small_value(Knob("x", 64, axis="window", minimum=50), 200) >= 50
    assert small_value(Knob("x", 4, axis="block", maximum=5), 200) <= 5
    assert small_value(Knob("x", 16, axis="block", choices=(16, 64)), 200) == 16
    assert small_value(Knob("impl", "eager", type=str, choices=("eager", "flex")), 200) == "eager"
    assert small_value(Knob("x", 8, axis="brand_new_axis", small=5, length=True), 200) == 6  # off 200's divisors
    assert small_value(Knob("x", 8, axis="brand_new_axis"), 200) == 8  # nothing declared: the default


def test_bad_arguments_are_domain_errors():
    with pytest.raises(mechanisms.RegistryError, match="unknown mechanism"):
        run_verify(["nope"], N, "cpu", "float32", 0, None)
    with pytest.raises(UsageError, match="dtype"):
        run_verify(["dense"], N, "cpu", "float8", 0, None)
    with pytest.raises(UsageError, match="tolerance"):
        run_verify(["dense"], N, "cpu", "float32", 0, -1.0)


def test_csv_schema_and_progress(tmp_path):
    calls = []
    report = run_verify(["dense"], 64, "cpu", "float32", 0, 1e-4, progress=lambda d, t, l: calls.append((d, t, l)))
    assert calls == [(0, 1, "dense"), (1, 1, "done")]
    assert all(r.tolerance in (None, 1e-4) or r.tolerance >= 1e-4 for r in report.rows)
    path = write_csv(report, tmp_path / "sub" / "verify.csv")
    with path.open() as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == verify.COLUMNS
        assert verify.COLUMNS[:12] == (  # the columns of earlier versions come first, in their order
            "mechanism", "check", "knob", "knob_value", "n", "causal", "error_rel", "cosine", "max_abs_err",
            "tolerance", "passed", "detail")
        rows = list(reader)
    assert len(rows) == len(report.rows)
    assert {r["check"] for r in rows} == {"impl-output", "impl-grad", "fidelity", "decode"}
    assert all(r["passed"] == "True" and r["n"] == "64" and not math.isnan(float(r["max_abs_err"])) for r in rows)
    assert {r["result"] for r in rows} == {"pass"} and {r["mode"] for r in rows} == {"causal", "bidirectional"}
    back = verify.read_csv(path)
    assert len(back) == len(rows) and list(back.columns) == list(verify.COLUMNS)


def test_fidelity_rows_plot_ready(monkeypatch, tmp_path):
    """check == fidelity rows with a knob carry error_rel against knob_value (what `effbench plot` draws)."""
    _window_mech(monkeypatch)
    report = run_verify(["t-window"], 80, "cpu", "float32", 0, None)
    path = write_csv(report, tmp_path / "v.csv")
    import pandas as pd

    df = pd.read_csv(path)
    fid = df[(df.check == "fidelity") & df.knob.notna()]
    assert len(fid) >= 3 and set(fid.knob) == {"window"}
    assert fid.knob_value.dtype.kind in "if" and fid.error_rel.notna().all() and fid.cosine.notna().all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_passes_for_hashing_and_causal_kernels(dtype):
    # regressions: Reformer hashed fp16 rounding into other buckets; causal Performer gave NaN gradients
    report = run_verify(["reformer", "performer", "linear"], N, dtype=dtype)
    assert report.passed, summary_line(report)


def test_csv_keeps_the_na_outcome(tmp_path):
    """A check that does not apply reads back as "n/a", not as a missing value (pandas' default NA strings)."""
    report = run_verify(["linformer"], 64, "cpu", "float32", 0, None)
    back = verify.read_csv(write_csv(report, tmp_path / "v.csv"))
    assert "n/a" in set(back["result"]) and back["result"].notna().all()
