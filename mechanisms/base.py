"""The mechanism contract: `Knob`, `MechanismSpec`, the registry and shared reference helpers.

A mechanism is a ``torch.nn.Module`` registered with :func:`register`::

    @register(name="local", family="sparse", complexity="O(N·W·D)",
              knobs=[Knob("window", default=256, axis="window", minimum=1)])
    class LocalAttention(nn.Module):
        def __init__(self, *, head_dim, heads, n, causal, seed, window): ...
        def forward(self, q, k, v): ...      # (B, H, N, D) -> (B, H, N, D)
        def reference(self, q, k, v): ...    # same mathematics, the obvious O(N^2) way

Optional declarations a mechanism class may make (class attributes; every one has a default, so
a plugin written with none of them works unchanged). The harness reads these and never a
mechanism's name:

- ``supports_causal`` / ``supports_bidirectional`` (default True), with ``causal_reason`` /
  ``bidirectional_reason`` saying why one is refused;
- ``inputs``: ``"qkv"`` (default: ``forward(q, k, v)``, each (B, H, N, D)) or ``"x"``
  (``forward(x)``, x (B, N, H·D): a position encoding);
- ``comparable``: what its rows are compared with: ``"attention"`` (default: figures, crossovers
  and highlights against dense attention) or ``"position"`` (position encodings: their own
  figure and table, never an attention crossover);
- ``causal_applies`` (default True): False for a mechanism with no notion of causality (a
  position encoding), checked once instead of once per causal mode;
- ``fidelity``: a tuple of :class:`Fidelity` sweeps (knob, values, the :class:`Trend` s theory
  promises), or None for no fidelity layer (then ``no_fidelity_reason``); by default one
  informational sweep per knob that declares ``sweep`` values (or whose axis another knob does);
- ``exact_at``: knobs at which ``reference()`` is the exact attention the mechanism approximates
  (the fidelity target; default: plain softmax attention), with ``exact_label`` naming it;
- ``linear_at``: knobs at which the linear cost holds (Reformer: a fixed bucket count); ``linear_memory``
  / ``linear_flops`` override what is read off the ``memory`` and ``complexity`` strings (no "N²");
- ``exact`` (default: family "exact"): the output is exact softmax attention, held to the tolerance;
- ``data_dependent`` (default False): True when peak memory depends on the input values, so a
  fake-tensor prediction cannot equal the measured peak;
- ``check(*, n, causal, heads, head_dim, device, dtype, **knobs) -> list[str]``
  (a classmethod or staticmethod): reasons a case cannot run, empty if it can;
  it also receives ``mode`` ("fwd" | "fwd+bwd") when its signature accepts it;
- ``analytic_flops(*, batch, heads, n, head_dim, causal, **knobs) -> int``
  (classmethod): the FLOP count to report where FlopCounterMode cannot count;
- ``build_info(self) -> dict``: extra facts reported in the row (e.g. ``impl``).

Decode (one new token at a time after a context; see ``mechanisms/_decode.py``). A mechanism with a causal
decode form declares ``decode_form`` (one line: what its cache or state holds) and defines

- ``decode_init(self, k, v, capacity) -> state``: the cache or state after a context whose keys and values are
  ``k``, ``v`` (B, kv_heads, N0, D), sized so ``capacity`` positions in all fit; it copies what it keeps;
- ``decode_step(self, state, q, k, v) -> out``: one token, q (B, H, 1, D), k and v (B, kv_heads, 1, D) ->
  (B, H, 1, D); the state is updated in place. T steps after a context of N0 equal the causal forward over
  N0 + T at its last T positions;
- ``state_bytes(cls, *, batch, heads, kv_heads, head_dim, n, capacity, itemsize, **knobs) -> int``
  (classmethod): the declared size of that state (the harness measures the real one beside it);
- optionally ``decode_read_bytes(...)`` (same arguments): bytes one step reads, when it is not the whole state.

A mechanism without one declares ``no_decode_reason``; its decode rows are ``skipped`` with it.
Grouped-query attention: a mechanism taking the shared :data:`KV_HEADS` knob gets K and V with ``kv_heads``
heads (query head h uses kv head h // (H / kv_heads), as :func:`repeat_kv`).

Nothing in this package imports the harness (``effbench``).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .declare import (  # noqa: F401  re-exported: the declarations a mechanism file uses
    TREND_KINDS, DeclarationError, Fidelity, Trend, decreasing, equals_dense_at, ratio_per_4x, resolve_length,
)
from .axes import axis_help, axis_knobs, is_length, small_value_of, sweep_values_of  # noqa: F401  re-exported
from .masks import causal_mask, mask_from_mod, masked_softmax_attention, positions  # noqa: F401  re-exported

FAMILIES = ("exact", "sparse", "kernel", "low-rank", "hashing", "recurrent", "position")

_AXIS_NAME = re.compile(r"[a-z][a-z0-9_]*")

REGISTRY: dict[str, "MechanismSpec"] = {}


class RegistryError(DeclarationError):
    """A registration or lookup problem (duplicate or unknown name, bad knob)."""


@dataclass(frozen=True)
class Knob:
    """One tunable of a mechanism.

    ``axis`` names the sweep axis (``--window``, ``--rounds``, ...) that feeds it; ``None`` means it
    is set with ``--knob name=value`` only. The axis is declared here and nowhere else: the CLI's
    ``--<axis>`` options, verify's awkward values and the contract tests derive from the knobs.

    ``small``: the small, awkward value ``effbench verify`` and the contract suite use (default: the
    one another knob on the same axis declares, else ``default``); ``length``: the knob is a length
    in positions (verify keeps it ≤ N/4 and moves it off divisors of N, so no window, block, bucket
    or segment tiles N); ``sweep``: values of an informational fidelity sweep when the mechanism
    declares none (strings ``"N"``, ``"N-1"``, ``"N/4"`` resolve at the verify length).
    ``default_from``: the default is the case field of that name (``kv_heads``: ``heads``); the stored
    ``default`` (0) and a value equal to that field are the same case.
    """

    name: str
    default: Any
    axis: str | None = None
    type: type = int
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    help: str = ""
    small: Any = None
    length: bool | None = None
    sweep: tuple = ()
    default_from: str | None = None

    def __post_init__(self):
        if self.axis is not None and not _AXIS_NAME.fullmatch(self.axis):
            raise RegistryError(f"knob {self.name!r}: sweep axis {self.axis!r} must be a lower-case name "
                                "(letters, digits, _), e.g. 'window'")
        object.__setattr__(self, "sweep", tuple(self.sweep))
        if self.default is not None:
            object.__setattr__(self, "default", self.parse(self.default))

    def parse(self, value: Any) -> Any:
        """Convert a value (possibly a string from the command line) to this knob's type, checked."""
        try:
            if self.type is bool and isinstance(value, str):
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                out = low in ("1", "true", "yes")
            elif self.type is int and isinstance(value, str):
                out = int(value.strip())
            elif self.type is int and isinstance(value, float):
                if value != int(value):
                    raise ValueError
                out = int(value)
            else:
                out = self.type(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise RegistryError(f"knob {self.name!r} expects {self.type.__name__}, got {value!r}") from None
        if self.choices is not None and out not in self.choices:
            raise RegistryError(f"knob {self.name!r} must be one of {', '.join(map(str, self.choices))}, got {out!r}")
        if self.minimum is not None and out < self.minimum:
            raise RegistryError(f"knob {self.name!r} must be >= {self.minimum}, got {out!r}")
        if self.maximum is not None and out > self.maximum:
            raise RegistryError(f"knob {self.name!r} must be <= {self.maximum}, got {out!r}")
        return out

    def describe(self) -> str:
        flag = f" (--{self.axis.replace('_', '-')})" if self.axis else ""
        default = f"{self.default_from}" if self.default_from else self.default
        return f"{self.name}={default}{flag}"

    def effective(self, value: Any, fields: Mapping[str, Any]) -> Any:
        """The value in force: for a ``default_from`` knob, the default (or nothing) means that case field."""
        if self.default_from and (value is None or value == self.default):
            return fields.get(self.default_from, value)
        return value


KV_HEADS = Knob("kv_heads", default=0, axis="kv_heads", minimum=0, default_from="heads",
                help="key/value heads for grouped-query (1 = multi-query) attention; default: --heads")


def repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, N, D) -> (B, H, N, D): each kv head serves H/Hkv consecutive query heads (as HuggingFace's
    ``repeat_kv``); the tensor itself when Hkv == H."""
    B, Hkv, N, D = t.shape
    if Hkv == heads:
        return t
    return t[:, :, None].expand(B, Hkv, heads // Hkv, N, D).reshape(B, heads, N, D)  # (B, H, N, D)


def _case_get(case: Any, name: str, default: Any = None) -> Any:
    if isinstance(case, Mapping):
        return case.get(name, default)
    return getattr(case, name, default)


def _declared(cls: type) -> set[str]:
    """Attribute names set on ``cls`` or a base class below ``nn.Module``."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        names |= set(vars(klass))
    return names


@dataclass
class MechanismSpec:
    """What the registry knows about one mechanism."""

    name: str
    family: str
    complexity: str
    knobs: tuple[Knob, ...]
    cls: type
    summary: str = ""
    memory_complexity: str = ""

    @property
    def supports_causal(self) -> bool:
        return bool(getattr(self.cls, "supports_causal", True))

    @property
    def supports_bidirectional(self) -> bool:
        return bool(getattr(self.cls, "supports_bidirectional", True))

    # -- declarations (class attributes with defaults; see the module docstring) --------------
    @property
    def inputs(self) -> str:
        """``"qkv"``: forward(q, k, v); ``"x"``: forward(x) with x (B, N, H·D)."""
        return str(getattr(self.cls, "inputs", "qkv"))

    @property
    def comparable(self) -> str:
        """``"attention"``: compared with dense attention; ``"position"``: a position encoding."""
        return str(getattr(self.cls, "comparable", "attention"))

    @property
    def causal_applies(self) -> bool:
        """False for a mechanism with no notion of causality (a position encoding)."""
        return bool(getattr(self.cls, "causal_applies", True))

    @property
    def causal_modes(self) -> list[bool]:
        """The causal settings to check: both (each subject to ``unsupported``), or one where causality
        does not apply (a position encoding)."""
        if self.causal_applies:
            return [False, True]
        return [False] if self.supports_bidirectional else [True]

    @property
    def fidelity(self) -> tuple[Fidelity, ...] | None:
        """Declared fidelity sweeps (``fidelity``, or the older ``verify_sweep``); None: no fidelity layer.
        Undeclared: one informational sweep per int knob with ``sweep`` values (its own or its axis')."""
        cls = self.cls
        if "fidelity" in _declared(cls):
            declared = getattr(cls, "fidelity")
            return None if declared is None else tuple(Fidelity.of(f) for f in declared)
        legacy = getattr(cls, "verify_sweep", None)
        if legacy is not None:
            return (Fidelity.of(legacy),)
        return tuple(Fidelity(k.name, sweep_values_of(k)) for k in self.knobs
                     if k.type is int and sweep_values_of(k))

    @property
    def no_fidelity_reason(self) -> str:
        return str(getattr(self.cls, "no_fidelity_reason", "") or "it declares no fidelity layer")

    @property
    def exact_at(self) -> dict[str, Any] | None:
        """Knobs at which ``reference()`` is the exact attention approximated (None: plain softmax attention)."""
        declared = getattr(self.cls, "exact_at", None)
        if declared is None:
            declared = getattr(self.cls, "verify_target_knobs", None)
        return None if declared is None else dict(declared)

    @property
    def exact_label(self) -> str:
        label = getattr(self.cls, "exact_label", "")
        if label:
            return str(label)
        at = self.exact_at
        if at is None:
            return "dense softmax"
        return f"{self.name} reference at " + ", ".join(f"{k}={v}" for k, v in at.items())

    @property
    def linear_at(self) -> dict[str, Any]:
        """Knobs at which the declared linear cost holds (default: its defaults); e.g. Reformer's fixed
        bucket count, since its default n_b ≈ 2N/c makes hashing FLOPs quadratic."""
        return dict(getattr(self.cls, "linear_at", None) or {})

    @property
    def linear_memory(self) -> bool:
        """Peak memory grows linearly in N (declared ``linear_memory``, else: ``memory`` has no N²)."""
        declared = getattr(self.cls, "linear_memory", None)
        return bool(declared) if declared is not None else "N²" not in (self.memory_complexity or self.complexity)

    @property
    def linear_flops(self) -> bool:
        """Work grows linearly in N (declared ``linear_flops``, else: ``complexity`` has no N²)."""
        declared = getattr(self.cls, "linear_flops", None)
        return bool(declared) if declared is not None else "N²" not in self.complexity

    @property
    def exact(self) -> bool:
        """Computes exact softmax attention (declared ``exact``; default: the "exact" family): its fidelity
        row must equal dense attention to the tolerance, not merely be reported."""
        declared = getattr(self.cls, "exact", None)
        return bool(declared) if declared is not None else self.family == "exact"

    @property
    def data_dependent(self) -> bool:
        return bool(getattr(self.cls, "data_dependent", False))

    # -- decode ----------------------------------------------------------------------------
    @property
    def decodes(self) -> bool:
        """It has a causal decode form (``decode_form``, ``decode_init``, ``decode_step``, ``state_bytes``)."""
        cls = self.cls
        return bool(getattr(cls, "decode_form", "")) and all(
            callable(getattr(cls, name, None)) for name in ("decode_init", "decode_step", "state_bytes"))

    @property
    def decode_form(self) -> str:
        return str(getattr(self.cls, "decode_form", "") or "")

    @property
    def no_decode_reason(self) -> str:
        return str(getattr(self.cls, "no_decode_reason", "") or "it declares no decode form")

    def kv_heads_of(self, heads: int, knobs: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None) -> int:
        """The number of key/value heads of a case (``heads`` unless it takes a ``kv_heads`` knob set below it)."""
        given = dict(knobs or {})
        if "kv_heads" not in self.knob_names:
            return heads
        return int(self.knob("kv_heads").effective(given.get("kv_heads"), {"heads": heads}) or heads)

    def state_bytes(self, *, batch: int, heads: int, head_dim: int, n: int, capacity: int, itemsize: int,
                    knobs: Mapping[str, Any] | None = None) -> int | None:
        """The declared bytes of the decode state after a context of ``n`` sized for ``capacity`` positions."""
        return self._decode_formula("state_bytes", batch=batch, heads=heads, head_dim=head_dim, n=n,
                                    capacity=capacity, itemsize=itemsize, knobs=knobs)

    def decode_read_bytes(self, *, batch: int, heads: int, head_dim: int, n: int, capacity: int, itemsize: int,
                          knobs: Mapping[str, Any] | None = None) -> int | None:
        """Bytes one decode step reads from its state (declared ``decode_read_bytes``; default: all of it)."""
        return self._decode_formula("decode_read_bytes", batch=batch, heads=heads, head_dim=head_dim, n=n,
                                    capacity=capacity, itemsize=itemsize, knobs=knobs)

    def _decode_formula(self, name: str, *, heads: int, knobs: Mapping[str, Any] | None, **sizes: int) -> int | None:
        """The mechanism's declared decode formula ``name`` for these sizes, its knobs resolved and kv_heads in force
        (None when it has no decode form or does not declare it)."""
        fn = getattr(self.cls, name, None)
        if fn is None or not self.decodes:
            return None
        values = self.resolve_knobs(knobs)
        values.pop("kv_heads", None)
        return int(fn(heads=heads, kv_heads=self.kv_heads_of(heads, knobs), **sizes, **values))

    @property
    def knob_names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.knobs)

    def knob(self, name: str) -> Knob:
        for k in self.knobs:
            if k.name == name:
                return k
        raise RegistryError(f"{self.name} has no knob {name!r}; its knobs: {', '.join(self.knob_names) or 'none'}")

    def resolve_knobs(self, knobs: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None) -> dict[str, Any]:
        """Defaults overlaid with ``knobs``, each parsed and range-checked; unknown names refused."""
        given = dict(knobs or {})
        out = {}
        for k in self.knobs:
            out[k.name] = k.parse(given.pop(k.name)) if k.name in given else k.default
        if given:
            self.knob(next(iter(given)))  # raises with the valid names
        return out

    def effective_knobs(self, knobs: Mapping[str, Any] | Iterable[tuple[str, Any]] | None,
                        fields: Mapping[str, Any]) -> dict[str, Any]:
        """:meth:`resolve_knobs` with each ``default_from`` knob at the value in force (``kv_heads`` = heads)."""
        return {name: self.knob(name).effective(value, fields) for name, value in self.resolve_knobs(knobs).items()}

    def build(self, *, head_dim: int, heads: int, n: int, causal: bool = False, seed: int = 0, **knobs) -> nn.Module:
        """Instantiate the module; random state is drawn here from ``seed``."""
        values = self.resolve_knobs(knobs)
        return self.cls(head_dim=head_dim, heads=heads, n=n, causal=causal, seed=seed, **values)

    def unsupported(self, case: Any) -> list[str]:
        """Why ``case`` cannot run (empty list: it can).

        ``case`` is anything with attributes (or keys) ``n``, ``causal``, ``heads``,
        ``head_dim`` and ``knobs`` (a mapping or a tuple of (name, value) pairs),
        and optionally ``device`` and ``dtype``.
        """
        reasons: list[str] = []
        causal = bool(_case_get(case, "causal", False))
        if _case_get(case, "phase", "prefill") == "decode" and not self.decodes:
            return [f"{self.name} has no decode form: {self.no_decode_reason}"]
        if causal and not self.supports_causal:
            reasons.append(f"{self.name} is not causal: {getattr(self.cls, 'causal_reason', 'no causal form')}")
        if not causal and not self.supports_bidirectional:
            reasons.append(f"{self.name} is causal only: {getattr(self.cls, 'bidirectional_reason', 'no bidirectional form')}")
        try:
            values = self.resolve_knobs(_case_get(case, "knobs", ()) or ())
        except RegistryError as exc:
            return reasons + [str(exc)]
        if "kv_heads" in values:
            heads = int(_case_get(case, "heads", 1))
            why = kv_heads_error(heads, self.kv_heads_of(heads, values))
            if why:
                reasons.append(why)
        check = getattr(self.cls, "check", None)
        if check is not None:
            extra = {}
            params = inspect.signature(check).parameters
            if "mode" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                extra["mode"] = str(_case_get(case, "mode", "fwd"))
            reasons += list(check(
                n=int(_case_get(case, "n")), causal=causal,
                heads=int(_case_get(case, "heads", 1)), head_dim=int(_case_get(case, "head_dim", 64)),
                device=str(_case_get(case, "device", "cpu")), dtype=str(_case_get(case, "dtype", "float32")),
                **extra, **values,
            ))
        return reasons

    def analytic_flops(self, *, batch: int, heads: int, n: int, head_dim: int, causal: bool, **knobs) -> int | None:
        fn = getattr(self.cls, "analytic_flops", None)
        if fn is None:
            return None
        return int(fn(batch=batch, heads=heads, n=n, head_dim=head_dim, causal=causal, **self.resolve_knobs(knobs)))

    def make_inputs(self, *, batch: int, heads: int, n: int, head_dim: int, dtype: torch.dtype,
                    device: str | torch.device = "cpu", seed: int = 0, requires_grad: bool = False,
                    knobs: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, ...]:
        """Inputs for ``forward``: q (B, H, N, D) and k, v (B, kv_heads, N, D), or (x,) of shape (B, N, H·D)
        when ``inputs == "x"``. With kv_heads = heads the tensors are the same as before GQA existed."""
        gen = torch.Generator(device="cpu").manual_seed(seed + 1_000_003)
        if self.inputs == "x":
            shapes = [(batch, n, heads * head_dim)]
        else:
            kv = self.kv_heads_of(heads, knobs)
            shapes = [(batch, heads, n, head_dim)] + [(batch, kv, n, head_dim)] * 2
        out = []
        for shape in shapes:
            t = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
            out.append(t.requires_grad_(requires_grad))
        return tuple(out)


def kv_heads_error(heads: int, kv_heads: int) -> str | None:
    """Why ``kv_heads`` cannot serve ``heads`` query heads (None when it divides them)."""
    if kv_heads <= heads and heads % kv_heads == 0:
        return None
    return (f"heads {heads} is not a multiple of kv_heads {kv_heads}: each kv head must serve the same number "
            "of query heads (choose kv_heads dividing heads)")


def register(*, name: str, family: str, complexity: str, knobs: Iterable[Knob] = (),
             memory: str = "", registry: dict[str, MechanismSpec] | None = None) -> Callable[[type], type]:
    """Class decorator adding a mechanism to the registry; duplicate names are refused."""
    target = REGISTRY if registry is None else registry

    def deco(cls: type) -> type:
        if not name or not isinstance(name, str):
            raise RegistryError("a mechanism needs a non-empty name")
        if name in target:
            raise RegistryError(f"mechanism {name!r} is already registered (by {target[name].cls.__module__}.{target[name].cls.__qualname__})")
        if family not in FAMILIES:
            raise RegistryError(f"mechanism {name!r}: family must be one of {', '.join(FAMILIES)}, got {family!r}")
        knob_list = tuple(knobs)
        seen = set()
        for k in knob_list:
            if k.name in seen:
                raise RegistryError(f"mechanism {name!r}: knob {k.name!r} declared twice")
            seen.add(k.name)
        params = inspect.signature(cls.__init__).parameters
        missing = [k.name for k in knob_list if k.name not in params and not any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())]
        if missing:
            raise RegistryError(f"mechanism {name!r}: __init__ does not accept knob(s) {', '.join(missing)}")
        doc = inspect.getdoc(cls) or ""
        summary = doc.strip().splitlines()[0] if doc.strip() else ""
        target[name] = MechanismSpec(name=name, family=family, complexity=complexity, knobs=knob_list,
                                     cls=cls, summary=summary, memory_complexity=memory)
        cls.spec_name = name
        return cls

    return deco


def get(name: str) -> MechanismSpec:
    """The spec of a registered mechanism; unknown names raise with the valid choices."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise RegistryError(f"unknown mechanism {name!r}; choose from: {', '.join(sorted(REGISTRY))}") from None
