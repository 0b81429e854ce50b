"""Presets: the shipped files and their published tables, expansion, narrowing and overrides, and the CLI's
refusals (one red line, exit 2). Nothing is measured: every CLI call here stops before a case runs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from helpers import cli_fails
from typer.testing import CliRunner

import mechanisms
from effbench import presets
from effbench.cases import CaseError
from effbench.cli import app
from effbench.options import explicit_options, make_cases
from effbench.presets import PresetError, expand_preset, load_preset

runner = CliRunner()
_fails = cli_fails
FA = "flashattention-2022"
FA_MECHS = ["dense", "sdpa", "reformer", "local", "linformer", "sparse-transformer", "longformer", "bigbird"]


# ------------------------------------------------------------------------------ the shipped files

def test_every_shipped_preset_loads_with_its_version():
    assert {"textbook", FA, "nystromformer-2021"} <= set(presets.names())
    for name in presets.names():
        p = load_preset(name)
        assert p.name == name and load_preset(p.ref) == p and p.version >= 1
        assert p.description and p.n and p.modes


@pytest.mark.parametrize("name", [n for n in presets.names() if load_preset(n).published_file])
def test_published_table_schema(name):
    p = load_preset(name)
    pub = p.published()
    assert list(pub.columns[:len(presets.PUBLISHED_COLUMNS)]) == presets.PUBLISHED_COLUMNS
    entries = {e.method: e for e in p.all_entries()}
    only = {o["method"] for o in p.published_only}
    for row in pub.itertuples(index=False):
        assert row.unit in presets.UNITS and presets.UNITS[row.unit][0] == row.metric
        assert row.mode in p.modes and row.checked == "yes"
        assert row.arxiv.startswith(p.source["arxiv"]) and row.paper and row.table and row.hardware
        if row.mechanism:  # registered, and the preset runs it under this method's name
            assert row.mechanism in mechanisms.REGISTRY and entries[row.method].mechanism == row.mechanism
        else:
            assert row.method in only, row.method
        if math.isnan(row.value):  # the table has no number there: the note says why
            assert row.note.startswith(("out of memory", "not run")), row
        else:
            assert row.value > 0
    assert set(pub["method"]) == set(entries) | only
    assert p.baseline in entries


def test_flashattention_values_spot_checked_against_the_paper():
    """Three cells of each table, as printed in arXiv 2205.14135v2 (Tables 18, 20, 21)."""
    pub = load_preset(FA).published().set_index(["method", "metric", "mode", "n"])["value"]
    assert pub[("PyTorch Attention", "time", "fwd", 4096)] == 16.47
    assert pub[("FlashAttention", "time", "fwd", 8192)] == 33.54
    assert pub[("FlashAttention", "time", "fwd+bwd", 65536)] == 7492.85
    assert pub[("PyTorch Attention", "memory", "fwd+bwd", 4096)] == 17024
    assert pub[("FlashAttention", "memory", "fwd+bwd", 4096)] == 836
    assert math.isnan(pub[("PyTorch Attention", "memory", "fwd+bwd", 8192)])  # out of memory on the A100
    assert len(pub) == 360 and pub.notna().sum() == 282


def test_a_partial_or_broken_published_table_is_handled(tmp_path):
    good = presets.PRESET_DIR / "nystromformer-2021.csv"
    lines = good.read_text().splitlines()
    partial = tmp_path / "partial.csv"
    partial.write_text("\n".join(lines[:4]) + "\n")
    assert len(presets.read_published(partial)) == 3
    bad = tmp_path / "bad.csv"
    bad.write_text(lines[0] + "\n" + lines[1].replace(",MB,", ",furlongs,") + "\n")
    with pytest.raises(PresetError, match="unit 'furlongs'"):
        presets.read_published(bad)


# ------------------------------------------------------------------------------ expansion

def test_textbook_is_every_mechanism_at_the_readme_sizes():
    cases = expand_preset(load_preset("textbook"))
    assert {c.mechanism for c in cases} == set(mechanisms.REGISTRY)
    assert {c.n for c in cases} == {512, 4096, 32768}
    assert {(c.batch, c.heads, c.head_dim, c.dtype, c.mode, c.causal) for c in cases
            if mechanisms.get(c.mechanism).supports_bidirectional} == {(1, 8, 64, "float32", "fwd", False)}


def test_flashattention_expansion_follows_the_paper():
    p = load_preset(FA)
    cases = expand_preset(p)
    assert len(cases) == len(FA_MECHS) * 8 * 2
    assert {c.mode for c in cases} == {"fwd", "fwd+bwd"} and {c.batch for c in cases} == {16}
    by = {(c.mechanism, c.n, c.mode): c for c in cases}
    assert by[("linformer", 128, "fwd")].knob_dict == {"rank": 16}  # c = 128/8
    assert by[("linformer", 4096, "fwd")].knob_dict == {}  # c = 256 = the default rank
    assert by[("local", 1024, "fwd")].knob_dict == {"window": 64} and by[("local", 1024, "fwd")].dtype == "float32"
    assert by[("bigbird", 16384, "fwd")].knob_dict == {"block": 32}
    assert by[("reformer", 512, "fwd")].knob_dict == {"bucket": 32}
    assert by[("dense", 512, "fwd")].dtype == "float16"
    assert p.compressed_length(128) == 16 and p.compressed_length(65536) == 256


def test_options_narrow_and_override_the_preset():
    p = load_preset(FA)
    cases = expand_preset(p, mechs=["dense", "local"], ns=[64, 96], dtype="bfloat16", modes=["fwd"], batch=2)
    assert {(c.mechanism, c.n, c.dtype, c.mode, c.batch) for c in cases} == {
        (m, n, "bfloat16", "fwd", 2) for m in ("dense", "local") for n in (64, 96)}
    windows = expand_preset(p, mechs=["local", "longformer", "dense"], ns=[4096], modes=["fwd"],
                            axes={"window": ["16", "32"]})
    assert sorted(c.knob_dict.get("window") for c in windows if c.mechanism != "dense") == [16, 16, 32, 32]
    ranked = expand_preset(p, mechs=["linformer"], ns=[128], modes=["fwd"], knob_values={"rank": ["8"]})
    assert [c.knob_dict for c in ranked] == [{"rank": 8}]
    with pytest.raises(PresetError, match="not in preset flashattention-2022@1"):
        expand_preset(p, mechs=["performer"])
    with pytest.raises(CaseError, match="--rank given but no mechanism of preset"):
        expand_preset(p, mechs=["dense"], axes={"rank": ["8"]})


def test_make_cases_takes_only_the_explicit_options():
    common = {"plugin": None, "mech": "dense", "n": "12345", "batch": 3, "heads": 8, "head_dim": 64,
              "dtype": "float32", "device": "cpu", "mode": "fwd", "causal": False, "seed": 0, "knob": None,
              "axes": {}, "preset": FA}
    cases = make_cases(**common, explicit={"mech"})  # the other values are defaults: the preset's stand
    assert {(c.n, c.batch, c.dtype) for c in cases} == {(n, 16, "float16") for n in load_preset(FA).n}
    cases = make_cases(**common, explicit={"mech", "n", "batch", "mode"})
    assert [(c.n, c.batch, c.mode) for c in cases] == [(12345, 3, "fwd")]


def test_explicit_options_reads_the_parameter_source():
    sources = {"mech": "COMMANDLINE", "n": "DEFAULT", "batch": "ENVIRONMENT", "dtype": "DEFAULT_MAP"}
    ctx = SimpleNamespace(params=dict.fromkeys(sources),
                          get_parameter_source=lambda name: SimpleNamespace(name=sources[name]))
    assert explicit_options(ctx) == {"mech", "batch"}


# ------------------------------------------------------------------------------ the CLI

def test_presets_command_lists_them():
    r = runner.invoke(app, ["presets"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert all(name in text for name in ("textbook", FA, "nystromformer-2021"))
    assert "282 values (all checked)" in text and "@1" in text


@pytest.mark.parametrize("args,needles", [
    (["sweep", "--preset", "nope"], ["unknown preset 'nope'", "textbook"]),
    (["estimate", "--preset", "textbook@7"], ["has version 1 only, not 7"]),
    (["sweep", "--preset", "textbook@x"], ["NAME@VERSION"]),
    (["sweep", "--preset", FA, "--mech", "performer"], ["--mech performer: not in preset"]),
    (["sweep", "--preset", FA, "--mech", "dense", "--rank", "8"], ["--rank given but no mechanism of preset"]),
    (["estimate", "--preset", "textbook", "--n", "12x"], ["--n", "'12x' is not a whole number"]),
    (["sweep", "--preset", FA, "--dtype", "float8"], ["--dtype 'float8' is not one of"]),
    (["sweep", "--preset", FA, "--phase", "decode"], ["add --mode fwd"]),
    (["plot", "results.csv", "--against", "textbook"], ["ships no published numbers"]),
    (["plot", "results.csv", "--against", "nope"], ["unknown preset 'nope'"]),
])
def test_bad_preset_input_is_one_line_exit_2(args, needles):
    _fails(args, *needles)
