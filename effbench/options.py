"""Validating the command line's values and turning them into cases (the CLI's commands stay thin).

Every function raises a domain error (UsageError, CaseError, RegistryError, PluginError) with one
clear sentence; ``cli.domain_errors`` turns it into one red line and exit code 2.
"""

from __future__ import annotations

import functools
import inspect
from typing import Annotated, Callable, Collection, Optional

import typer

import mechanisms

from .cases import DEFAULT_DECODE_STEPS, DTYPES, MODES, PHASES, expand
from .plugins import load_plugins
from .units import UsageError, parse_bytes, parse_int_list, parse_list


def select_mechanisms(text: str) -> list[str]:
    names = parse_list(text)
    if not names:
        raise UsageError("--mech: no mechanism given; use 'all' or a comma list")
    if names == ["all"]:
        return list(mechanisms.REGISTRY)
    for name in names:
        mechanisms.get(name)  # raises with the valid choices
    return list(dict.fromkeys(names))


def check_device(device: str) -> str:
    import torch

    from .devices import resolve_device

    if device in ("auto", "cpu"):
        return resolve_device(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA GPU is available here (torch {torch.__version__}); use --device cpu")
        return resolve_device(device)
    raise UsageError(f"--device {device!r}: choose auto, cpu or cuda[:index]")


def check_at_least(name: str, value: float | None, minimum: float, strict: bool = False) -> None:
    """``value`` (when given) ≥ ``minimum`` (> with ``strict``), else one clear line."""
    if value is None or (value > minimum if strict else value >= minimum):
        return
    word = "positive" if strict and minimum == 0 else f"at least {minimum:g}" if minimum else "0 or more"
    raise UsageError(f"{name} must be {word}, got {value:g}")


def check_choice(value: str, choices, what: str) -> str:
    if value not in choices:
        raise UsageError(f"{what} {value!r} is not one of: {', '.join(choices)}")
    return value


def parse_knob_options(items: list[str] | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--knob {item!r}: write NAME=V1,V2 (e.g. --knob impl=eager,flex)")
        name, values = item.split("=", 1)
        vals = parse_list(values)
        if not name.strip() or not vals:
            raise UsageError(f"--knob {item!r}: write NAME=V1,V2")
        out[name.strip()] = vals
    return out


def make_cases(*, plugin, mech: str, n: str, batch: int, heads: int, head_dim: int, dtype: str, device: str,
               mode: str, causal: bool, seed: int, knob: list[str] | None, axes: dict[str, str | None] | None = None,
               phase: str = "prefill", decode_steps: int = DEFAULT_DECODE_STEPS, preset: str | None = None,
               explicit: Collection[str] = ()):
    """Load plugins, validate every sweep option and expand the cases (raises domain errors). With ``preset``,
    the preset's cases, narrowed or overridden by the options named in ``explicit`` (see :func:`preset_cases`)."""
    load_plugins(plugin)
    if preset is not None:
        return preset_cases(preset, explicit, mech=mech, n=n, batch=batch, heads=heads, head_dim=head_dim,
                            dtype=dtype, device=device, mode=mode, causal=causal, seed=seed, knob=knob, axes=axes,
                            phase=phase, decode_steps=decode_steps)
    names = select_mechanisms(mech)
    ns = parse_int_list(n, "--n")
    check_choice(dtype, DTYPES, "--dtype")
    check_choice(mode, MODES, "--mode")
    check_choice(phase, PHASES, "--phase")
    check_at_least("--decode-steps", decode_steps, 1)
    if phase == "decode" and mode != "fwd":
        raise UsageError(f"--phase decode is inference, one token at a time: --mode {mode} does not apply")
    for name, value in (("--batch", batch), ("--heads", heads), ("--head-dim", head_dim)):
        if value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value}")
    parsed_axes = {a: parse_list(v) for a, v in (axes or {}).items() if v is not None}
    return expand(names, ns, axes=parsed_axes, knob_values=parse_knob_options(knob), batch=batch, heads=heads,
                  head_dim=head_dim, dtype=dtype, device=device, mode=mode, causal=causal, seed=seed,
                  phase=phase, decode_steps=decode_steps)


def explicit_options(ctx) -> set[str]:
    """The parameters of the command ``ctx`` that were given (on the command line or from the environment), not
    left at their defaults: what narrows or overrides a ``--preset``."""
    return {name for name in ctx.params
            if (source := ctx.get_parameter_source(name)) is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")}


def preset_cases(ref: str, explicit: Collection[str], *, mech: str, n: str, batch: int, heads: int, head_dim: int,
                 dtype: str, device: str, mode: str, causal: bool, seed: int, knob: list[str] | None,
                 axes: dict[str, str | None] | None, phase: str, decode_steps: int):
    """The cases of preset ``ref`` (``NAME`` or ``NAME@VERSION``): each option named in ``explicit`` is validated
    and narrows (``--mech``: the preset's mechanisms among those given) or overrides (``--n``, ``--batch``,
    ``--heads``, ``--head-dim``, ``--dtype``, ``--mode``, ``--causal``, a knob axis, ``--knob``) the preset's value;
    ``--device``, ``--seed``, ``--phase`` and ``--decode-steps`` apply as in any sweep."""
    from .presets import expand_preset, load_preset

    preset = load_preset(ref)
    given = set(explicit)
    mechs = None
    if "mech" in given and parse_list(mech) != ["all"]:
        mechs = select_mechanisms(mech)
    for name, value in (("--batch", batch), ("--heads", heads), ("--head-dim", head_dim)):
        if name.lstrip("-").replace("-", "_") in given and value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value}")
    if "dtype" in given:
        check_choice(dtype, DTYPES, "--dtype")
    if "mode" in given:
        check_choice(mode, MODES, "--mode")
    check_choice(phase, PHASES, "--phase")
    check_at_least("--decode-steps", decode_steps, 1)
    modes = [mode] if "mode" in given else None
    if phase == "decode" and list(modes or preset.modes) != ["fwd"]:
        raise UsageError(f"--phase decode is inference, one token at a time: preset {preset.ref} has --mode "
                         f"{','.join(modes or preset.modes)}; add --mode fwd")
    parsed_axes = {a: parse_list(v) for a, v in (axes or {}).items() if v is not None}
    return expand_preset(preset, mechs=mechs, ns=parse_int_list(n, "--n") if "n" in given else None,
                         batch=batch if "batch" in given else None, heads=heads if "heads" in given else None,
                         head_dim=head_dim if "head_dim" in given else None,
                         dtype=dtype if "dtype" in given else None, modes=modes,
                         causal=causal if "causal" in given else None, device=device, seed=seed, phase=phase,
                         decode_steps=decode_steps, axes=parsed_axes, knob_values=parse_knob_options(knob))


def memory_budget(text: str | None, device: str) -> int | None:
    """``--mem-budget``: a size, 'none', or by default a safe share of what is free (80% of available
    RAM, 90% of free GPU memory)."""
    from .executors import default_budget

    if text is not None:
        return None if text.strip().lower() == "none" else parse_bytes(text, "--mem-budget")
    if device.startswith("cuda"):
        import torch
        return default_budget(device, torch.cuda.mem_get_info(torch.device(device))[0])
    return default_budget(device, None)


AXIS_PREFIX = "axis_"


def with_axis_options(command: Callable) -> Callable:
    """Give ``command`` one ``--<axis>`` option per sweep axis declared by a registered knob; the command
    receives them as one dict ``axes`` (axis -> comma-list text or None). Axes added by a plugin are
    set with ``--knob NAME=...`` (the plugin is loaded after the options are parsed).

    The annotations are evaluated here (``eval_str``): the wrapper's ``__signature__`` is what Typer reads, and
    Typer does not evaluate a ``__signature__``'s string annotations, so with ``from __future__ import annotations``
    every option would lose its help and short flags."""
    sig = inspect.signature(command, eval_str=True)
    taken = {p.name for p in sig.parameters.values()} | {"help"}
    params = [p for p in sig.parameters.values() if p.name != "axes"]
    at = next(i for i, p in enumerate(params) if p.name == "knob")
    axes = [a for a in sorted(mechanisms.axis_knobs()) if a not in taken]
    for offset, axis in enumerate(axes):
        flag = "--" + axis.replace("_", "-")
        help_ = f"Comma list for the {axis} axis ({mechanisms.base.axis_help(axis)}); fed only to mechanisms with a knob on it."
        params.insert(at + offset, inspect.Parameter(AXIS_PREFIX + axis, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                                     annotation=Annotated[Optional[str], typer.Option(flag, help=help_)]))

    @functools.wraps(command)
    def wrapper(**kwargs):
        given = {k[len(AXIS_PREFIX):]: kwargs.pop(k) for k in list(kwargs) if k.startswith(AXIS_PREFIX)}
        return command(axes=given, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)
    return wrapper
