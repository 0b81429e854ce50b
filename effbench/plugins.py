"""``--plugin PATH``: import a user's file that registers mechanisms with the decorator of DESIGN.md."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from .errors import one_line

_LOADED: dict[str, str] = {}


class PluginError(ValueError):
    """A plugin file that is missing or fails to import."""


def load_plugin(path: str | Path) -> str:
    """Import ``path`` once per process (it registers its mechanisms); return the module name."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PluginError(f"plugin file not found: {path}")
    key = str(p.resolve())
    if key in _LOADED:
        return _LOADED[key]
    name = "effbench_plugin_" + hashlib.sha1(key.encode()).hexdigest()[:10]
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot import plugin {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise PluginError(f"plugin {path} failed to import: {one_line(exc)}") from None
    _LOADED[key] = name
    return name


def load_plugins(paths) -> None:
    for p in paths or ():
        load_plugin(p)
