"""The registry of attention mechanisms (pure PyTorch; imports nothing from effbench).

Importing this package registers every built-in mechanism::

    import mechanisms
    spec = mechanisms.get("local")
    m = spec.build(head_dim=64, heads=8, n=4096, causal=False, seed=0, window=128)
    out = m(q, k, v)                 # (B, H, N, D) -> (B, H, N, D)
"""

from .base import (
    FAMILIES, KV_HEADS, REGISTRY, Fidelity, Knob, MechanismSpec, RegistryError, Trend, axis_knobs, decreasing,
    equals_dense_at, get, ratio_per_4x, register, resolve_length,
    causal_mask, mask_from_mod, masked_softmax_attention, positions, repeat_kv,
)

# One module per mechanism; each registers itself on import.
from . import dense, sdpa  # noqa: E402,F401  exact
from . import local, dilated, longformer, sinks, bigbird  # noqa: E402,F401  sparse patterns
from . import sparse_transformer  # noqa: E402,F401  fixed sparse patterns (Child et al.)
from . import linear, performer, linformer  # noqa: E402,F401  kernel and low-rank
from . import cosformer  # noqa: E402,F401  kernel with cos re-weighting
from . import nystromformer  # noqa: E402,F401  low-rank (Nyström)
from . import reformer, transformer_xl, compressive, axial, learned_pe  # noqa: E402,F401  hashing, recurrence, positions

__all__ = [
    "FAMILIES", "KV_HEADS", "REGISTRY", "Fidelity", "Knob", "MechanismSpec", "RegistryError", "Trend", "axis_knobs",
    "decreasing", "equals_dense_at", "get", "ratio_per_4x", "register", "resolve_length",
    "causal_mask", "mask_from_mod", "masked_softmax_attention", "positions", "repeat_kv",
]
