"""``plot --against``: measured rows beside a preset's published numbers, from small synthetic results files
(ratios, exponents, ratios against the baseline, statuses, published-only methods, notes, files). Nothing runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from rich.console import Console

from effbench import against, plot, results
from effbench.cases import Case
from effbench.fits import fit_loglog
from effbench.presets import load_preset
from effbench.sweep import case_row

NY = "nystromformer-2021"
FA = "flashattention-2022"
MB = 2**20


def _row(mech, n, status="ok", *, knobs=(), batch=1, heads=12, dtype="float32", mode="fwd", **values):
    row = case_row(Case(mechanism=mech, n=n, knobs=tuple(knobs), batch=batch, heads=heads, dtype=dtype, mode=mode))
    row.update(status=status, run_id="synthetic", **values)
    return row


def _write(path: Path, rows) -> Path:
    writer = results.ResultsWriter(path)
    for r in rows:
        writer.append(r)
    return path


def _published(preset: str, method: str, metric: str, mode: str = "fwd") -> dict[int, float]:
    pub = load_preset(preset).published()
    pub = pub[pub["method"].eq(method) & pub["metric"].eq(metric) & pub["mode"].eq(mode)]
    return dict(zip(pub["n"], pub["value"]))


@pytest.fixture(scope="module")
def ny_file(tmp_path_factory):
    """Nyströmformer Table 1 setting: dense at exactly 2× the published time and the published memory; Nyström-64 at
    3× the published time; Nyström-32 only at N = 512; Longformer with other knobs; a predicted_oom dense at 16k;
    Linformer at another batch size; a performer row (not in the preset)."""
    t_dense, m_dense = _published(NY, "Transformer", "time"), _published(NY, "Transformer", "memory")
    t_ny, m_ny = _published(NY, "Nyströmformer-64", "time"), _published(NY, "Nyströmformer-64", "memory")
    rows = []
    for n in (512, 1024, 2048, 4096, 8192):
        rows.append(_row("dense", n, time_ms_median=2 * t_dense[n], peak_tensor_bytes=int(m_dense[n] * MB)))
        rows.append(_row("nystromformer", n, knobs=[("landmarks", 64)], time_ms_median=3 * t_ny[n],
                         peak_tensor_bytes=int(m_ny[n] * MB)))
        rows.append(_row("linformer", n, batch=4, time_ms_median=1.0 * n, peak_tensor_bytes=1000 * n))
        rows.append(_row("longformer", n, knobs=[("window", 64)], time_ms_median=0.01 * n, peak_tensor_bytes=100 * n))
    rows.append(_row("nystromformer", 512, knobs=[("landmarks", 32)], time_ms_median=1.2, peak_tensor_bytes=MB))
    rows.append(_row("dense", 16384, "predicted_oom", predicted_bytes=40 * 2**30, error="predicted 40 GiB > budget"))
    rows.append(_row("performer", 512, time_ms_median=1.0, peak_tensor_bytes=MB))
    return _write(tmp_path_factory.mktemp("against") / "results.csv", rows)


@pytest.fixture(scope="module")
def ny(ny_file, tmp_path_factory):
    return against.make_against(ny_file, NY, tmp_path_factory.mktemp("out"))


def _point(rep, method, metric, n, mode="fwd"):
    p = rep.points
    return p[p["method"].eq(method) & p["metric"].eq(metric) & p["n"].eq(n) & p["mode"].eq(mode)].iloc[0]


def _exponent(rep, method, metric, mode="fwd"):
    e = rep.exponents
    return e[e["method"].eq(method) & e["metric"].eq(metric) & e["mode"].eq(mode)].iloc[0]


def test_ratios_are_measured_over_published(ny):
    for n in (512, 2048, 8192):
        assert _point(ny, "Transformer", "time", n)["ratio"] == pytest.approx(2.0)
        assert _point(ny, "Transformer", "memory", n)["ratio"] == pytest.approx(1.0, rel=1e-6)
        assert _point(ny, "Nyströmformer-64", "time", n)["ratio"] == pytest.approx(3.0)
    p = _point(ny, "Nyströmformer-64", "time", 8192)  # against the baseline: measured 3·12.3/(2·155.4), published 12.3/155.4
    assert p["measured_vs_baseline"] == pytest.approx(3 * 12.3 / (2 * 155.4))
    assert p["published_vs_baseline"] == pytest.approx(12.3 / 155.4)


def test_exponents_of_both_are_fitted_on_the_same_n(ny):
    pub = _published(NY, "Transformer", "time")
    ns = sorted(pub)
    expected = fit_loglog(ns, [pub[n] for n in ns]).slope
    e = _exponent(ny, "Transformer", "time")
    assert e["n_common"] == 5 and e["published_slope"] == pytest.approx(expected)
    assert e["measured_slope"] == pytest.approx(expected)  # 2 × published: the same exponent
    assert e["ratio_median"] == pytest.approx(2.0) and e["published_all_slope"] == pytest.approx(expected)
    lone = _exponent(ny, "Nyströmformer-32", "time")  # one measured point: no fit, but a ratio
    assert lone["n_common"] == 1 and math.isnan(lone["measured_slope"])
    assert lone["ratio_median"] == pytest.approx(1.2 / 0.6)


def test_statuses_methods_and_notes(ny):
    assert _point(ny, "Transformer", "time", 16384)["status"] == "predicted_oom"
    assert math.isnan(_point(ny, "Transformer", "time", 16384)["published"])
    assert _point(ny, "Longformer-257", "time", 1024)["ratio"] == pytest.approx(0.01 * 1024 / 4.6)
    notes = " ".join(ny.notes)
    assert "performer" in notes and "not part of preset" in notes
    assert "Longformer-257: some rows have other knobs" in notes
    assert "Linformer-256: no row at the preset's setting" in notes and "B=4" in notes
    assert "NVIDIA GTX 1080 Ti" in notes and "exponents and the ratios between mechanisms" in notes
    shown = ny.points_display
    assert "predicted_oom" in set(shown["measured"]) and "2×" in set(shown["measured / published"])


def test_files_and_figure(ny):
    names = {p.name for p in ny.files}
    assert names == {f"against_{NY}.png", f"against_{NY}.csv", f"against_{NY}.md"}
    assert all(p.exists() and p.stat().st_size > 0 for p in ny.files)
    fig = ny.figure
    assert {ax.get_title() for ax in fig.figure.axes} == {"memory — fwd", "time — fwd"}
    line = fig.lines["measured:time:fwd:Transformer"]
    assert list(line.get_xdata()) == [512, 1024, 2048, 4096, 8192] and line.get_linestyle() == "-"
    assert fig.lines["published:time:fwd:Transformer"].get_linestyle() == "--"
    md = (ny.files[0].parent / f"against_{NY}.md").read_text()
    assert "## Exponents and ratios" in md and "Longformer-257" in md and "mlpen/Nystromformer" in md


def test_published_only_methods_and_an_empty_file(tmp_path):
    path = _write(tmp_path / "r.csv", [_row("dense", n, batch=16, heads=8, dtype="float16", mode="fwd+bwd",
                                            time_ms_median=float(n), peak_tensor_bytes=n * n) for n in (128, 256)])
    rep = against.make_against(path, FA, tmp_path / "out", formats=())  # no figure file: faster
    megatron = _exponent(rep, "Megatron", "memory", "fwd+bwd")
    assert megatron["mechanism"] == "" and megatron["n_common"] == 0
    assert math.isnan(megatron["published_slope"]) and megatron["published_all_slope"] > 1.5  # 36 … 4416 MB
    shown = rep.exponent_display
    assert "published only" in set(shown[shown["method"].eq("Megatron")]["exponent measured"])
    assert _point(rep, "PyTorch Attention", "time", 128, "fwd+bwd")["ratio"] == pytest.approx(128 / 0.67)  # Table 20
    assert _point(rep, "PyTorch Attention", "memory", 256, "fwd+bwd")["ratio"] == pytest.approx(256**2 / MB / 104)
    assert "not measured in this file" in " ".join(rep.notes)
    other = _write(tmp_path / "other.csv", [_row("performer", 512, time_ms_median=1.0, peak_tensor_bytes=MB)])
    empty = against.make_against(other, FA, tmp_path / "out2", formats=())
    assert empty.points["status"].eq("").all() and "no row of other.csv belongs to preset" in " ".join(empty.notes)


def test_plot_against_writes_and_prints(ny_file, tmp_path):
    rep = plot.make_report(ny_file, out_dir=tmp_path / "p", against=NY)
    assert rep.against is not None and (tmp_path / "p" / f"against_{NY}.md").exists()
    assert f"against_{NY}.png" in {p.name for p in rep.files}
    console = Console(record=True, width=200)
    plot.render_report(rep, console)
    text = console.export_text()
    assert "Measured here vs published" in text and "Nyströmformer-64" in text
