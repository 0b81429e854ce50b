"""Sweep axes, declared once on the knobs that take them (``Knob.axis``), and what an axis declares:
verify's awkward value (``small``), whether it is a length, and its informational fidelity sweep. A knob
that declares none of these takes them from another knob on the same axis."""

from __future__ import annotations

from typing import Any, Mapping


def axis_knobs(registry: Mapping | None = None) -> dict[str, list]:
    """Every sweep axis in the registry -> the knobs that declare it (in registration order)."""
    from .base import REGISTRY

    out: dict[str, list] = {}
    for spec in (REGISTRY if registry is None else registry).values():
        for k in spec.knobs:
            if k.axis is not None:
                out.setdefault(k.axis, []).append(k)
    return out


def axis_help(axis: str) -> str:
    """Help for the ``--<axis>`` option: the knobs it feeds."""
    knobs = axis_knobs().get(axis, [])
    helps = sorted({k.help for k in knobs if k.help})
    return "; ".join(helps) if helps else axis


def _axis_attr(knob, attr: str, empty: Any) -> Any:
    """``knob.<attr>`` if declared, else the first declaration of another knob on the same axis."""
    own = getattr(knob, attr)
    if own != empty or knob.axis is None:
        return own
    for other in axis_knobs().get(knob.axis, []):
        value = getattr(other, attr)
        if value != empty:
            return value
    return own


def small_value_of(knob) -> Any:
    """The knob's declared awkward value (or its axis'), None when neither declares one."""
    return _axis_attr(knob, "small", None)


def is_length(knob) -> bool:
    return bool(_axis_attr(knob, "length", None))


def sweep_values_of(knob) -> tuple:
    """Values of an informational fidelity sweep for ``knob``: its own ``sweep``, else another knob's on the
    same axis, else the values of a fidelity sweep a registered mechanism declares on a knob of that axis."""
    values = tuple(_axis_attr(knob, "sweep", ()))
    if values or knob.axis is None:
        return values
    from .base import REGISTRY, _declared

    for spec in REGISTRY.values():
        if "fidelity" not in _declared(spec.cls) and getattr(spec.cls, "verify_sweep", None) is None:
            continue  # only declared sweeps (a default one would come back here)
        axis_of = {k.name: k.axis for k in spec.knobs}
        for sweep in spec.fidelity or ():
            if axis_of.get(sweep.knob) == knob.axis:
                return tuple(sweep.values)
    return ()
