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
from mechanisms.base import kv_heads_error

DTYPES = {
    "float32": torch.float32, "float64": torch.float64,
    "float16": torch.float16, "bfloat16": torch.bfloat16,
}
MODES = ("fwd", "fwd+bwd")
PHASES = ("prefill", "decode")
DEFAULT_DECODE_STEPS = 32
# Case fields that joined after rows were first written: left out of the key at these values, so every row written
# before they existed keeps its key (and ``--resume`` still recognises it).
_KEY_DEFAULTS = {"phase": "prefill"}
_PREFILL_ONLY_IGNORED = ("decode_steps",)
DECODE_EXTRA_STEPS = 4  # one warm-up step, one tracked step, one RSS or CUDA-allocator step, one counted for FLOPs


class CaseError(ValueError):
    """A case or sweep that cannot be formed (bad size, unknown dtype, ...)."""


def _canonical_knobs(mechanism: str, knobs: Iterable[tuple[str, Any]],
                     fields: Mapping[str, Any] | None = None) -> tuple[tuple[str, Any], ...]:
    """Sorted, with every knob set to its default left out: ``--window 256`` (local's default) and no
    ``--window`` are one case with one key, so ``--resume`` never runs it twice; a knob whose default is a
    case field (``kv_heads``: ``heads``) is left out at that field's value too. A mechanism not (yet)
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
            if knob is not None and knob.default_from and knob.parse(value) == (fields or {}).get(knob.default_from):
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
    phase: str = "prefill"  # prefill: one call over N tokens; decode: decode_steps single tokens after N
    decode_steps: int = DEFAULT_DECODE_STEPS

    def __post_init__(self):
        for name in ("n", "batch", "heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CaseError(f"{name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPES:
            raise CaseError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.mode not in MODES:
            raise CaseError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.phase not in PHASES:
            raise CaseError(f"unknown phase {self.phase!r}; choose from {', '.join(PHASES)}")
        if not isinstance(self.decode_steps, int) or isinstance(self.decode_steps, bool) or self.decode_steps < 1:
            raise CaseError(f"decode_steps must be a positive integer, got {self.decode_steps!r}")
        if self.phase == "decode" and self.mode != "fwd":
            raise CaseError(f"decode is inference, one token at a time: mode {self.mode!r} does not apply (use fwd)")
        object.__setattr__(self, "knobs", _canonical_knobs(self.mechanism, self.knobs, {"heads": self.heads}))

    @property
    def knob_dict(self) -> dict[str, Any]:
        return dict(self.knobs)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def key(self) -> str:
        """Stable identity of the case (same on every machine and run): 16 hex digits."""
        fields = asdict(self)
        for name, default in _KEY_DEFAULTS.items():
            if fields[name] == default:
                del fields[name]
        if self.phase == "prefill":
            for name in _PREFILL_ONLY_IGNORED:
                del fields[name]
        payload = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def config(self) -> tuple:
        """Everything but ``n``: cases of one configuration form one line on a plot."""
        return (self.mechanism, self.batch, self.heads, self.head_dim, self.dtype, self.device,
                self.mode, self.causal, self.knobs, self.seed, self.phase, self.decode_steps)

    @property
    def capacity(self) -> int:
        """Positions a decode case's state must hold: the context N, the timed steps and the harness' extra steps
        (warm-up and the memory and FLOP passes, one each)."""
        return self.n + self.decode_steps + DECODE_EXTRA_STEPS if self.phase == "decode" else self.n

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
    phase: str = "prefill", decode_steps: int = DEFAULT_DECODE_STEPS,
) -> list[Case]:
    """The cross product of sizes and each mechanism's own knob axes.

    ``axes`` maps a sweep axis (``window``, ``rounds``, ...) to values; a mechanism
    is crossed only with the axes its knobs declare. ``knob_values`` maps a knob
    name to values (``--knob name=a,b``) and applies to every mechanism having it.
    Values are parsed and range-checked by the knob; a value no mechanism takes is an error, and so is a
    ``kv_heads`` that does not divide ``heads``. Decode cases are causal (a token sees only the past).
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
        own_causal = causal or not spec.supports_bidirectional or (phase == "decode" and spec.causal_applies)
        for combo in itertools.product(*[g[1] for g in grid]):
            knobs = tuple(zip(names, combo))
            why = kv_heads_error(heads, spec.kv_heads_of(heads, dict(knobs)))
            if why:
                raise CaseError(f"{name}: {why}")
            for n in ns:
                cases.append(Case(mechanism=name, n=n, batch=batch, heads=heads, head_dim=head_dim,
                                  dtype=dtype, device=device, mode=mode, causal=own_causal,
                                  knobs=knobs, seed=seed, phase=phase, decode_steps=decode_steps))
    unused = [f"--{a}" for a in axes if a not in used_axes] + [f"--knob {k}" for k in knob_values if k not in used_knobs]
    if unused:
        raise CaseError(f"{', '.join(unused)} given but no selected mechanism takes it")
    return cases
