"""The mechanism contract: `Knob`, `MechanismSpec`, the registry and shared reference helpers.

A mechanism is a ``torch.nn.Module`` registered with :func:`register`::

    @register(name="local", family="sparse", complexity="O(N·W·D)",
              knobs=[Knob("window", default=256, axis="window", minimum=1)])
    class LocalAttention(nn.Module):
        def __init__(self, *, head_dim, heads, n, causal, seed, window): ...
        def forward(self, q, k, v): ...      # (B, H, N, D) -> (B, H, N, D)
        def reference(self, q, k, v): ...    # same mathematics, the obvious O(N^2) way

Optional hooks a mechanism class may define:

- ``supports_causal`` / ``supports_bidirectional`` (class attributes, default True);
- ``check(*, n, causal, heads, head_dim, device, dtype, **knobs) -> list[str]``
  (a classmethod or staticmethod): reasons a case cannot run, empty if it can;
  it also receives ``mode`` ("fwd" | "fwd+bwd") when its signature accepts it;
- ``analytic_flops(*, batch, heads, n, head_dim, causal, **knobs) -> int``
  (classmethod): the FLOP count to report where FlopCounterMode cannot count;
- ``build_info(self) -> dict``: extra facts reported in the row (e.g. ``impl``).

Nothing in this package imports the harness (``effbench``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

FAMILIES = ("exact", "sparse", "kernel", "low-rank", "hashing", "recurrent", "position")

# Sweep axes a knob may be fed from (CLI flag ``--<axis>``).
AXES = (
    "window", "dilation", "globals", "block", "rounds", "bucket", "features",
    "rank", "segment", "memory", "compress",
)

REGISTRY: dict[str, "MechanismSpec"] = {}


class RegistryError(ValueError):
    """A registration or lookup problem (duplicate or unknown name, bad knob)."""


@dataclass(frozen=True)
class Knob:
    """One tunable of a mechanism.

    ``axis`` names the sweep axis (``--window``, ``--rounds``, ...) that feeds it;
    ``None`` means it is set with ``--knob name=value`` only.
    """

    name: str
    default: Any
    axis: str | None = None
    type: type = int
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    help: str = ""

    def __post_init__(self):
        if self.axis is not None and self.axis not in AXES:
            raise RegistryError(f"knob {self.name!r}: unknown sweep axis {self.axis!r}; choose from {', '.join(AXES)}")
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
        flag = f" (--{self.axis})" if self.axis else ""
        return f"{self.name}={self.default}{flag}"


def _case_get(case: Any, name: str, default: Any = None) -> Any:
    if isinstance(case, Mapping):
        return case.get(name, default)
    return getattr(case, name, default)


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
        if causal and not self.supports_causal:
            reasons.append(f"{self.name} is not causal: {getattr(self.cls, 'causal_reason', 'no causal form')}")
        if not causal and not self.supports_bidirectional:
            reasons.append(f"{self.name} is causal only: {getattr(self.cls, 'bidirectional_reason', 'no bidirectional form')}")
        try:
            values = self.resolve_knobs(_case_get(case, "knobs", ()) or ())
        except RegistryError as exc:
            return reasons + [str(exc)]
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
                    device: str | torch.device = "cpu", seed: int = 0, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
        """Inputs for ``forward``: (q, k, v) of shape (B, H, N, D), or (x,) of shape (B, N, H·D) for "position"."""
        gen = torch.Generator(device="cpu").manual_seed(seed + 1_000_003)
        if self.family == "position":
            shapes = [(batch, n, heads * head_dim)]
        else:
            shapes = [(batch, heads, n, head_dim)] * 3
        out = []
        for shape in shapes:
            t = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
            out.append(t.requires_grad_(requires_grad))
        return tuple(out)


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


# --------------------------------------------------------------------------------------
# Shared helpers for references (small N only: these DO form N x N tensors).
# --------------------------------------------------------------------------------------

def positions(n: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key index grids for building dense masks: i (N, 1), j (1, N)."""
    idx = torch.arange(n, device=device)
    return idx[:, None], idx[None, :]


def mask_from_mod(mask_mod: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n_q: int, n_k: int | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Dense (Nq, Nk) boolean mask from ``mask_mod(q_idx, kv_idx)`` (attention-gym style, no batch/head args)."""
    n_k = n_q if n_k is None else n_k
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return mask_mod(i, j).expand(n_q, n_k)


def masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                             scale: float | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ·scale + bias, masked) v, the obvious O(N²) way; fully masked rows give 0, never NaN.

    q (..., Nq, D), k and v (..., Nk, D); mask broadcastable to (..., Nq, Nk), True = visible.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (..., Nq, Nk)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)  # (..., Nq, 1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)  # (..., Nq, Nk); exp(-inf) = 0 on masked entries
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(p, v)  # (..., Nq, D)


def causal_mask(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(N, N) boolean mask j <= i (top-left aligned)."""
    i, j = positions(n, device)
    return j <= i
