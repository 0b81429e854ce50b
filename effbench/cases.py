"""A `Case` is one measurement: a mechanism at one size, dtype, device, mode and knob setting.

`expand()` turns sweep axes into cases, feeding each mechanism only the axes its
knobs declare (dense is never swept over windows).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

import mechanisms

DTYPES = {
    "float32": torch.float32, "float64": torch.float64,
    "float16": torch.float16, "bfloat16": torch.bfloat16,
}
MODES = ("fwd", "fwd+bwd")


class CaseError(ValueError):
    """A case or sweep that cannot be formed (bad size, unknown dtype, ...)."""


def _canonical_knobs(mechanism: str, knobs: Iterable[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """Sorted, with every knob set to its default left out: ``--window 256`` (local's default) and no
    ``--window`` are one case with one key, so ``--resume`` never runs it twice. A mechanism not (yet)
    registered keeps its knobs as given."""
    given = dict(knobs)
    try:
        spec = mechanisms.get(mechanism)
    except mechanisms.RegistryError:
        return tuple(sorted(given.items()))
    defaults = {k.name: k for k in spec.knobs}
    out = {}
    for name, value in given.items():
        knob = defaults.get(name)
        try:
            if knob is not None and knob.parse(value) == knob.default:
                continue
        except mechanisms.RegistryError:
            pass  # an invalid value is refused later, with the knob's own message
        out[name] = value
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class Case:
    mechanism: str
    n: int
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    mode: str = "fwd"
    causal: bool = False
    knobs: tuple[tuple[str, Any], ...] = ()
    seed: int = 0

    def __post_init__(self):
        for name in ("n", "batch", "heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CaseError(f"{name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPES:
            raise CaseError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.mode not in MODES:
            raise CaseError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        object.__setattr__(self, "knobs", _canonical_knobs(self.mechanism, self.knobs))

    @property
    def knob_dict(self) -> dict[str, Any]:
        return dict(self.knobs)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def key(self) -> str:
        """Stable identity of the case (same on every machine and run): 16 hex digits."""
        payload = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def config(self) -> tuple:
        """Everything but ``n``: cases of one configuration form one line on a plot."""
        return (self.mechanism, self.batch, self.heads, self.head_dim, self.dtype, self.device,
                self.mode, self.causal, self.knobs, self.seed)

    def label(self) -> str:
        knobs = ",".join(f"{k}={v}" for k, v in self.knobs)
        return f"{self.mechanism}[{knobs}]" if knobs else self.mechanism

    def spec(self) -> mechanisms.MechanismSpec:
        return mechanisms.get(self.mechanism)


def expand(
    mechs: Sequence[str],
    ns: Sequence[int],
    *,
    axes: Mapping[str, Sequence[Any]] | None = None,
    knob_values: Mapping[str, Sequence[Any]] | None = None,
    batch: int = 1, heads: int = 8, head_dim: int = 64, dtype: str = "float32",
    device: str = "cpu", mode: str = "fwd", causal: bool = False, seed: int = 0,
) -> list[Case]:
    """The cross product of sizes and each mechanism's own knob axes.

    ``axes`` maps a sweep axis (``window``, ``rounds``, ...) to values; a mechanism
    is crossed only with the axes its knobs declare. ``knob_values`` maps a knob
    name to values (``--knob name=a,b``) and applies to every mechanism having it.
    Values are parsed and range-checked by the knob; a value no mechanism takes is an error.
    """
    axes = {a: list(v) for a, v in (axes or {}).items() if v}
    knob_values = {k: list(v) for k, v in (knob_values or {}).items() if v}
    used_axes: set[str] = set()
    used_knobs: set[str] = set()
    cases: list[Case] = []
    for name in mechs:
        spec = mechanisms.get(name)
        grid: list[tuple[str, list[Any]]] = []
        for knob in spec.knobs:
            if knob.name in knob_values:
                values = knob_values[knob.name]
                used_knobs.add(knob.name)
            elif knob.axis in axes:
                values = axes[knob.axis]
                used_axes.add(knob.axis)
            else:
                continue
            parsed = []
            for v in values:
                try:
                    parsed.append(knob.parse(v))
                except mechanisms.RegistryError as exc:
                    raise CaseError(f"{name}: {exc}") from None
            grid.append((knob.name, list(dict.fromkeys(parsed))))
        names = [g[0] for g in grid]
        # A causal-only mechanism (Transformer-XL) is causal by construction: in a
        # bidirectional sweep it runs, and its rows say causal=true.
        own_causal = causal or not spec.supports_bidirectional
        for combo in itertools.product(*[g[1] for g in grid]):
            for n in ns:
                cases.append(Case(mechanism=name, n=n, batch=batch, heads=heads, head_dim=head_dim,
                                  dtype=dtype, device=device, mode=mode, causal=own_causal,
                                  knobs=tuple(zip(names, combo)), seed=seed))
    unused = [f"--{a}" for a in axes if a not in used_axes] + [f"--knob {k}" for k in knob_values if k not in used_knobs]
    if unused:
        raise CaseError(f"{', '.join(unused)} given but no selected mechanism takes it")
    return cases
