"""Presets: named, versioned case sets that reproduce a published efficiency table (``effbench presets``,
``sweep --preset``, ``estimate --preset``, ``plot --against``).

A preset is a JSON file in ``effbench/data/presets/`` (``<name>.json``): the sizes (N list, B, H, D), dtype,
modes and causality of the table, and its *entries*: each a registered mechanism under the paper's name for it
(``method``), with the paper's knob choices (``knobs``, a value or a rule of N, see :func:`knob_value`) and,
where the paper ran it differently, its own dtype. ``"mechanisms": "all"`` takes every registered mechanism at
its default knobs. Methods of the paper without a registered mechanism are listed as ``published_only``.

The published numbers ship beside it as ``<name>.csv`` (:data:`PUBLISHED_COLUMNS`): one row per method, N,
mode and metric, with the value as printed (empty where the table has none: out of memory, unsupported), its
unit and its source (paper, arXiv id, table, hardware, dtype) and whether it was checked against the paper.

Expanding a preset (:func:`expand_preset`) gives :class:`effbench.cases.Case` objects, exactly as a sweep's own
options do; an option given on the command line narrows (``--mech``) or overrides (``--n``, ``--batch``,
``--dtype``, ``--mode``, a knob axis such as ``--window``, ...) the preset's value.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .units import UsageError

PRESET_DIR = Path(__file__).parent / "data" / "presets"
PUBLISHED_COLUMNS = ["method", "mechanism", "n", "mode", "metric", "value", "unit", "paper", "arxiv", "table",
                     "hardware", "dtype", "checked", "note"]
# A published unit -> (its metric, bytes or milliseconds per unit). The papers' "MB" are 2^20 bytes: what
# torch.cuda.max_memory_allocated() / 2**20 prints (FlashAttention's Table 21 adds up exactly in MiB).
UNITS = {"ms": ("time", 1.0), "MB": ("memory", float(2**20)), "MiB": ("memory", float(2**20))}
METRICS = ("time", "memory")
MODES = ("fwd", "fwd+bwd")  # effbench.cases.MODES; this module imports torch (through cases) only to expand
DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16")  # effbench.cases.DTYPES
_RULE = re.compile(r"\s*c\s*(?:/\s*(\d+)\s*)?")


class PresetError(UsageError):
    """An unknown preset or version, an option that does not fit the preset, or a preset file that does not parse."""


@dataclass(frozen=True)
class Entry:
    """One mechanism of a preset under the paper's name for it, with the paper's knob choices."""

    mechanism: str
    method: str
    knobs: Mapping[str, Any] = field(default_factory=dict)  # knob -> value, or a rule of N ("c", "c/2")
    dtype: str | None = None  # the paper ran this one in another dtype than the preset's
    note: str = ""


@dataclass(frozen=True)
class Preset:
    """A named, versioned case set and where its published numbers come from."""

    name: str
    version: int
    description: str
    source: Mapping[str, str]
    n: tuple[int, ...]
    batch: int
    heads: int
    head_dim: int
    dtype: str
    modes: tuple[str, ...]
    causal: bool
    entries: tuple[Entry, ...] | None  # None: every registered mechanism ("all")
    published_only: tuple[Mapping[str, str], ...] = ()
    compressed: Mapping[str, Any] | None = None  # {"ratio": 8, "cap": 256}: c = min(N / ratio, cap)
    baseline: str | None = None  # the method the ratios between mechanisms are taken against
    notes: tuple[str, ...] = ()
    checked: str = ""
    published_file: str | None = None

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    def all_entries(self) -> list[Entry]:
        """The entries; for ``"all"``, every mechanism registered now (plugins included) at its default knobs."""
        if self.entries is None:
            import mechanisms

            return [Entry(mechanism=name, method=name) for name in mechanisms.REGISTRY]
        return list(self.entries)

    def compressed_length(self, n: int) -> int:
        """The paper's compressed sequence length c at ``n``: min(N / ratio, cap)."""
        if not self.compressed:
            raise PresetError(f"preset {self.ref}: a knob rule uses c but the preset defines no 'compressed' length")
        return max(1, min(n // int(self.compressed["ratio"]), int(self.compressed["cap"])))

    def knobs_at(self, entry: Entry, n: int) -> dict[str, Any]:
        """The entry's knobs at sequence length ``n`` (rules evaluated)."""
        return {name: knob_value(value, self, n) for name, value in entry.knobs.items()}

    def published(self) -> pd.DataFrame | None:
        """The published numbers (:data:`PUBLISHED_COLUMNS`; ``value`` float, NaN where the table has none), or
        None for a preset without a published table."""
        if not self.published_file:
            return None
        return read_published(PRESET_DIR / self.published_file, self)

    def method_of(self, mechanism: str, knobs: Mapping[str, Any], n: int) -> tuple[str | None, bool]:
        """The method a measured row belongs to: the entry of ``mechanism`` whose knobs (at ``n``) all equal the
        row's; else, when the mechanism has one entry only, that entry with ``False`` (its knobs differ)."""
        mine = [e for e in self.all_entries() if e.mechanism == mechanism]
        for e in mine:
            wanted = self.knobs_at(e, n)
            if all(_same(knobs.get(k), v) for k, v in wanted.items()):
                return e.method, True
        if len(mine) == 1:
            return mine[0].method, False
        return None, False


def _same(a: Any, b: Any) -> bool:
    """Knob values equal as text (``64.0`` == ``64``; ``True`` == ``true``)."""
    def text(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, float) and not math.isnan(v) and v.is_integer():
            return str(int(v))
        return str(v).strip().lower()
    return a is not None and not (isinstance(a, float) and math.isnan(a)) and text(a) == text(b)


def knob_value(value: Any, preset: Preset, n: int) -> Any:
    """A preset knob at ``n``: a plain value as is, or a rule of the compressed length c = min(N/ratio, cap):
    ``"c"`` or ``"c/K"`` (whole, at least 1)."""
    if isinstance(value, str):
        m = _RULE.fullmatch(value)
        if m:
            return max(1, preset.compressed_length(n) // int(m.group(1) or 1))
    return value


# --------------------------------------------------------------------------- loading

def names() -> list[str]:
    """The shipped presets' names, sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def split_ref(ref: str) -> tuple[str, int | None]:
    """``"flashattention-2022@1"`` -> ("flashattention-2022", 1); no ``@``: version None (the shipped one)."""
    name, _, version = str(ref).strip().partition("@")
    if not version:
        return name.strip(), None
    if not version.strip().isdigit():
        raise PresetError(f"preset {ref!r}: write NAME or NAME@VERSION with a whole version, e.g. textbook@1")
    return name.strip(), int(version)


def load_preset(ref: str) -> Preset:
    """The preset ``NAME`` or ``NAME@VERSION``; PresetError for an unknown name or version or a broken file."""
    name, version = split_ref(ref)
    path = PRESET_DIR / f"{name}.json"
    if not name or not path.is_file():
        raise PresetError(f"unknown preset {name!r}; choose from: {', '.join(names())} (see `effbench presets`)")
    preset = _parse(path)
    if version is not None and version != preset.version:
        raise PresetError(f"preset {name!r} has version {preset.version} only, not {version} (use {preset.ref})")
    return preset


def available() -> list[Preset]:
    """Every shipped preset."""
    return [load_preset(name) for name in names()]


def _parse(path: Path) -> Preset:
    """A preset file as a Preset; PresetError naming the file when it does not parse."""
    try:
        data = json.loads(path.read_text())
        raw = data["mechanisms"]
        entries = None if raw == "all" else tuple(
            Entry(mechanism=str(e["mechanism"]), method=str(e.get("method") or e["mechanism"]),
                  knobs=dict(e.get("knobs") or {}), dtype=e.get("dtype"), note=str(e.get("note", ""))) for e in raw)
        preset = Preset(
            name=str(data["name"]), version=int(data["version"]), description=str(data["description"]),
            source=dict(data.get("source") or {}), n=tuple(int(x) for x in data["n"]), batch=int(data["batch"]),
            heads=int(data["heads"]), head_dim=int(data["head_dim"]), dtype=str(data["dtype"]),
            modes=tuple(str(m) for m in data["modes"]), causal=bool(data["causal"]), entries=entries,
            published_only=tuple(dict(p) for p in data.get("published_only") or ()), compressed=data.get("compressed"),
            baseline=data.get("baseline"), notes=tuple(str(x) for x in data.get("notes") or ()),
            checked=str(data.get("checked", "")), published_file=data.get("published"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PresetError(f"preset file {path.name} does not parse: {type(exc).__name__}: {exc}") from None
    if preset.name != path.stem:
        raise PresetError(f"preset file {path.name} names itself {preset.name!r}")
    bad = [d for d in [preset.dtype, *(e.dtype for e in entries or () if e.dtype)] if d not in DTYPE_NAMES]
    bad += [m for m in preset.modes if m not in MODES]
    if bad:
        raise PresetError(f"preset file {path.name}: unknown dtype or mode {', '.join(map(str, bad))}")
    return preset


def read_published(path: Path, preset: Preset | None = None) -> pd.DataFrame:
    """A published-numbers CSV, checked: the columns, known units and metrics, whole N, numbers (empty allowed);
    PresetError naming the file and row otherwise."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise PresetError(f"published table {path.name} does not parse: {exc}") from None
    missing = [c for c in PUBLISHED_COLUMNS if c not in df.columns]
    if missing:
        raise PresetError(f"published table {path.name} lacks column(s) {', '.join(missing)}")
    for i, row in df.iterrows():
        where = f"published table {path.name}, row {i + 2}"
        if row["unit"] not in UNITS or UNITS[row["unit"]][0] != row["metric"]:
            raise PresetError(f"{where}: unit {row['unit']!r} does not fit metric {row['metric']!r}")
        if row["mode"] not in MODES or not row["n"].isdigit():
            raise PresetError(f"{where}: mode {row['mode']!r} or N {row['n']!r} is not valid")
        try:
            float(row["value"] or "nan")
        except ValueError:
            raise PresetError(f"{where}: value {row['value']!r} is not a number") from None
    df["n"] = df["n"].astype(int)
    df["value"] = pd.to_numeric(df["value"].replace("", "nan"), errors="coerce")
    df["scale"] = df["unit"].map(lambda u: UNITS[u][1])
    return df


# --------------------------------------------------------------------------- expansion

def expand_preset(preset: Preset, *, mechs: Sequence[str] | None = None, ns: Sequence[int] | None = None,
                  batch: int | None = None, heads: int | None = None, head_dim: int | None = None,
                  dtype: str | None = None, modes: Sequence[str] | None = None, causal: bool | None = None,
                  device: str = "cpu", seed: int = 0, phase: str = "prefill", decode_steps: int | None = None,
                  axes: Mapping[str, Sequence[Any]] | None = None,
                  knob_values: Mapping[str, Sequence[Any]] | None = None) -> list:
    """The preset's cases, an argument that is not None overriding the preset's value: ``mechs`` narrows its
    mechanisms (a name outside the preset is an error), ``ns``/``batch``/... replace its sizes, ``dtype`` every
    entry's dtype, ``axes`` (``--window 64,128``) and ``knob_values`` (``--knob rank=64``) the preset's knobs of
    every mechanism that takes them (an axis no selected mechanism takes is an error, as in a sweep). Returns
    :class:`effbench.cases.Case` objects."""
    import mechanisms

    from .cases import DEFAULT_DECODE_STEPS, CaseError, expand

    decode_steps = DEFAULT_DECODE_STEPS if decode_steps is None else decode_steps
    entries = preset.all_entries()
    if mechs is not None:
        inside = {e.mechanism for e in entries}
        outside = [m for m in mechs if m not in inside]
        if outside:
            raise PresetError(f"--mech {', '.join(outside)}: not in preset {preset.ref} (its mechanisms: "
                              f"{', '.join(dict.fromkeys(e.mechanism for e in entries))})")
        entries = [e for e in entries if e.mechanism in set(mechs)]
    axes = {a: list(v) for a, v in (axes or {}).items() if v}
    knob_values = {k: list(v) for k, v in (knob_values or {}).items() if v}
    used: set[str] = set()
    cases: list = []
    seen: set[str] = set()
    for mode in modes or preset.modes:
        for entry in entries:
            spec = mechanisms.get(entry.mechanism)
            own_axes = {k.axis: axes[k.axis] for k in spec.knobs if k.axis in axes}
            own_knobs = {k.name: knob_values[k.name] for k in spec.knobs if k.name in knob_values}
            used |= {f"--{a}" for a in own_axes} | {f"--knob {k}" for k in own_knobs}
            overridden = set(own_knobs) | {k.name for k in spec.knobs if k.axis in own_axes}
            for n in ns or preset.n:
                fixed = {k: [v] for k, v in preset.knobs_at(entry, n).items() if k not in overridden}
                try:
                    found = expand([entry.mechanism], [n], axes=own_axes, knob_values={**fixed, **own_knobs},
                                   batch=preset.batch if batch is None else batch,
                                   heads=preset.heads if heads is None else heads,
                                   head_dim=preset.head_dim if head_dim is None else head_dim,
                                   dtype=dtype or entry.dtype or preset.dtype, device=device, mode=mode,
                                   causal=preset.causal if causal is None else causal, seed=seed, phase=phase,
                                   decode_steps=decode_steps)
                except CaseError as exc:
                    raise CaseError(f"preset {preset.ref}: {exc}") from None
                for case in found:
                    if case.key not in seen:
                        seen.add(case.key)
                        cases.append(case)
    unused = [f"--{a}" for a in axes if f"--{a}" not in used] + [f"--knob {k}" for k in knob_values
                                                                  if f"--knob {k}" not in used]
    if unused:
        raise CaseError(f"{', '.join(unused)} given but no mechanism of preset {preset.ref} takes it")
    return cases


def case_count(preset: Preset) -> int:
    """How many cases the preset expands to as shipped (on this registry; 0 when it cannot be expanded here)."""
    import mechanisms

    from .cases import CaseError

    try:
        return len(expand_preset(preset))
    except (CaseError, UsageError, mechanisms.RegistryError):
        return 0


def published_summary(preset: Preset) -> str:
    """``"282 values (all checked)"`` for the listing, or ``"—"`` without a published table."""
    pub = preset.published()
    if pub is None:
        return "—"
    values = pub[pub["value"].notna()]
    checked = values["checked"].str.lower().eq("yes").sum()
    return f"{len(values)} values ({'all' if checked == len(values) else checked} checked)"


def entries_table(preset: Preset) -> Iterable[dict[str, str]]:
    """Each entry as display strings (method, mechanism, knobs, dtype, note), then each published-only method."""
    for e in preset.all_entries():
        knobs = ", ".join(f"{k}={v}" for k, v in e.knobs.items())
        yield {"method": e.method, "mechanism": e.mechanism, "knobs": knobs, "dtype": e.dtype or preset.dtype,
               "note": e.note}
    for p in preset.published_only:
        yield {"method": p.get("method", ""), "mechanism": "(published only)", "knobs": "", "dtype": "",
               "note": p.get("why", "")}
