"""The prefill scaling figures in panels by family when a file holds many attention configurations (synthetic
rows; nothing runs, nothing is saved)."""

from __future__ import annotations

from effbench import analysis, figures, results
from effbench.cases import Case
from effbench.sweep import case_row

MECHS = ["dense", "sdpa", "local", "longformer", "bigbird", "linear", "performer", "linformer", "reformer",
         "nystromformer"]
NS = [256, 512, 1024]


def _analysis(tmp_path, mechs):
    writer = results.ResultsWriter(tmp_path / "r.csv")
    for i, mech in enumerate(mechs):
        for n in NS:
            row = case_row(Case(mechanism=mech, n=n))
            row.update(status="ok", run_id="synthetic", time_ms_median=(i + 1) * 1e-3 * n,
                       peak_tensor_bytes=(n * n if mech == "dense" else (i + 1) * 100 * n))
            writer.append(row)
    return analysis.analyse(results.read_results(tmp_path / "r.csv"))


def test_many_configurations_are_drawn_in_family_panels(tmp_path):
    an = _analysis(tmp_path, MECHS)
    mem = figures.scaling_figure(an, "memory")
    titles = [ax.get_title() for ax in mem.figure.axes if ax.get_visible()]
    assert titles == ["exact: dense and SDPA", "sparse patterns", "kernel and low-rank",
                      "hashing, recurrent and others"]
    assert sorted(label.split("[")[0] for label in mem.lines) == sorted(MECHS)  # each drawn once, in its panel
    for ax in mem.figure.axes[1:]:  # dense and sdpa repeated as references, on the same axes limits
        gids = {line.get_gid() for line in ax.get_lines()}
        assert {"baseline:dense", "baseline:sdpa"} <= gids
        assert ax.get_ylim() == mem.figure.axes[0].get_ylim()
    drawn = {(line.get_gid() or "").split("[")[0] for line in mem.figure.axes[1].get_lines()}
    assert {"data:local", "data:longformer", "data:bigbird"} <= drawn and not {"data:linear", "data:reformer"} & drawn


def test_a_few_configurations_stay_in_one_panel(tmp_path):
    an = _analysis(tmp_path, MECHS[:5])
    assert len(figures.scaling_figure(an, "time").figure.axes) == 1
