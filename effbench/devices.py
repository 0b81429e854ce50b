"""Device names: one spelling per device, so one GPU has one name (and one case key) however it was asked for."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda:<current>`` or ``cpu``; bare ``cuda`` -> ``cuda:<current>``; anything else as given."""
    import torch  # lazily: naming a device must not pay for importing torch where it is not needed

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    return device


def is_cuda(device: str) -> bool:
    """True for ``cuda`` and ``cuda:<index>``."""
    return device.startswith("cuda")
