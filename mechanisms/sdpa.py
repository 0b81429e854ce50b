"""PyTorch's fused scaled_dot_product_attention (exact attention), with a choice of SDPA backend.

The ``backend`` knob restricts torch's kernel choice with ``torch.nn.attention.sdpa_kernel``:

- ``auto``: no restriction, torch picks (on the CPU: flash for nearly every shape, else math);
- ``math``: the composite reference path (``aten::_scaled_dot_product_attention_math``): it forms the
  N×N scores and probabilities, O(N²) memory, on any device;
- ``flash``: FlashAttention: the CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``), or on CUDA
  the FlashAttention-2 kernel (float16/bfloat16, sm80 or newer);
- ``efficient``: the memory-efficient (xFormers/cutlass) kernel: CUDA only, float32 included;
- ``cudnn``: cuDNN's fused attention: CUDA only, a recent NVIDIA GPU, float16/bfloat16.

Where a backend runs is declared in :data:`RUNS_ON`. Whether it can run a case is asked of torch itself:
on CUDA through ``torch.backends.cuda.can_use_{flash,efficient,cudnn}_attention(SDPAParams(...), debug=True)``
(torch's debug warning is the reason), on the CPU by letting torch select under the restriction on fake
tensors of the case's shapes (nothing of size N is allocated). The kernel a built module actually runs
is recorded the same way (:func:`probe_kernel`: the aten ops dispatched by one fake call) and reported
by ``build_info`` as ``kernel=...``.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ._decode import StaticKV
from .base import KV_HEADS, Knob, kv_heads_error, register
from .dense import DenseAttention

BACKENDS = ("auto", "math", "flash", "efficient", "cudnn")

# knob value -> torch.nn.attention.SDPBackend member ("auto": no restriction)
SDP_BACKEND = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
               "cudnn": "CUDNN_ATTENTION"}

# Where each backend has a kernel (device types); None: every device (math is the composite fallback).
RUNS_ON: dict[str, tuple[str, ...] | None] = {
    "auto": None,
    "math": None,
    "flash": ("cpu", "cuda"),  # CUDA: float16/bfloat16 on sm80+ (torch's can_use_flash_attention decides)
    "efficient": ("cuda",),  # float32 too (can_use_efficient_attention)
    "cudnn": ("cuda",),  # a recent GPU, float16/bfloat16 (can_use_cudnn_attention)
}
_DESCRIBE = {"flash": "FlashAttention", "efficient": "memory-efficient attention", "cudnn": "cuDNN attention"}
_CUDA_CHECK = {"flash": "can_use_flash_attention", "efficient": "can_use_efficient_attention",
               "cudnn": "can_use_cudnn_attention"}
MATH_KERNEL = "_scaled_dot_product_attention_math"

BACKEND = Knob("backend", default="auto", type=str, choices=BACKENDS,
               help="SDPA kernel (torch.nn.attention.sdpa_kernel): auto (torch picks), math (N×N scores), "
                    "flash, efficient (CUDA), cudnn (CUDA)")


def backend_context(backend: str):
    """``sdpa_kernel(SDPBackend.X)`` for a restricted backend, a no-op context for ``auto``."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDP_BACKEND[backend]))


def _sentence(messages: list[str]) -> str:
    """torch's debug warnings as one clause: the "(Triggered internally at ...)" suffixes, the "... not used
    because:" headers and line breaks dropped, sentences joined with semicolons, no final period."""
    parts = []
    for m in messages:
        m = re.sub(r"\s*\(Triggered internally at [^)]*\)\s*", " ", m)
        m = " ".join(m.split()).strip().rstrip(".")
        if m and not m.endswith("because:") and m not in parts:
            parts.append(m)
    text = "; ".join(parts)
    return re.sub(r"\.\s+", "; ", text)


@contextlib.contextmanager
def _torch_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


class _OpTrace(TorchDispatchMode):
    """Names of the aten ops dispatched inside (``_scaled_dot_product_flash_attention_for_cpu``, ``bmm``, ...)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if not name.startswith("prim::"):
            self.ops.append(name.removeprefix("aten::"))
        return func(*args, **(kwargs or {}))


def kernel_of(ops: list[str]) -> str:
    """The SDPA kernel a dispatch trace shows: the fused op by its name, else the math path (which
    decomposes, below autograd, into batched matmuls and a softmax), else ``unknown``."""
    fused = [op for op in ops if "scaled_dot_product" in op]
    if fused:
        return fused[0]
    if any(op in ("bmm", "mm", "matmul", "baddbmm") for op in ops) and any("softmax" in op for op in ops):
        return MATH_KERNEL
    return "unknown"


@functools.lru_cache(maxsize=256)
def probe_kernel(backend: str, *, heads: int, kv_heads: int, n_q: int, n_k: int, head_dim: int, causal: bool,
                 device: str, dtype: str, requires_grad: bool = False) -> tuple[str | None, str]:
    """Run one SDPA call of these shapes (batch 1) on fake tensors under the backend's restriction and read
    which kernel torch dispatched: ``(kernel name, "")``, or ``(None, torch's reason)`` when torch finds no
    kernel. Fake tensors take torch's real selection path (sizes, dtype, strides, device), allocate nothing."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    trace = _OpTrace()
    with FakeTensorMode(), _torch_warnings() as caught:
        dt = getattr(torch, dtype)
        q = torch.empty(1, heads, n_q, head_dim, dtype=dt, device=device, requires_grad=requires_grad)
        k = torch.empty(1, kv_heads, n_k, head_dim, dtype=dt, device=device, requires_grad=requires_grad)
        v = torch.empty(1, kv_heads, n_k, head_dim, dtype=dt, device=device, requires_grad=requires_grad)
        try:
            with torch.set_grad_enabled(requires_grad), backend_context(backend), trace:
                F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=kv_heads != heads)
        except RuntimeError as exc:  # "No available kernel. Aborting execution." after torch's debug warnings
            return None, _sentence([str(w.message) for w in caught]) or _sentence([str(exc)])
    return kernel_of(trace.ops), ""


def _cuda_probe_inputs(*, heads: int, kv_heads: int, n: int, head_dim: int, device: str, dtype: str,
                       requires_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of the case's shapes (batch 1) on ``device``, as fake tensors: torch's checks read sizes,
    strides, dtype and device, never the data, so nothing is allocated on the GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dt = getattr(torch, dtype)
    with FakeTensorMode():
        q = torch.empty(1, heads, n, head_dim, dtype=dt, device=device, requires_grad=requires_grad)
        k = torch.empty(1, kv_heads, n, head_dim, dtype=dt, device=device, requires_grad=requires_grad)
        v = torch.empty(1, kv_heads, n, head_dim, dtype=dt, device=device, requires_grad=requires_grad)
    return q, k, v


def cuda_reasons(backend: str, *, n: int, causal: bool, heads: int, kv_heads: int, head_dim: int, device: str,
                 dtype: str, requires_grad: bool) -> list[str]:
    """Why torch cannot run ``backend`` (flash, efficient, cudnn) for this case on a CUDA device, as PyTorch
    documents the check: ``torch.backends.cuda.can_use_<kernel>(SDPAParams(q, k, v, attn_mask, dropout,
    is_causal, enable_gqa), debug=True)``, under the same ``sdpa_kernel`` restriction the forward uses; torch's
    debug warning is the reason. Empty when it can."""
    if not torch.cuda.is_available():
        return [f"backend={backend} needs a CUDA device and torch.cuda.is_available() is False here"]
    name = _CUDA_CHECK[backend]
    can_use = getattr(torch.backends.cuda, name, None)
    if can_use is None:
        return [f"backend={backend} cannot be checked: torch {torch.__version__} has no torch.backends.cuda.{name}"]
    q, k, v = _cuda_probe_inputs(heads=heads, kv_heads=kv_heads, n=n, head_dim=head_dim, device=device,
                                 dtype=dtype, requires_grad=requires_grad)
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, causal, kv_heads != heads)
    index = torch.device(device).index
    on_device = torch.cuda.device(index) if index is not None else contextlib.nullcontext()
    with on_device, backend_context(backend), _torch_warnings() as caught:
        ok = bool(can_use(params, True))
    if ok:
        return []
    why = _sentence([str(w.message) for w in caught]) or f"torch.backends.cuda.{name} returned False without a reason"
    return [f"backend={backend} ({_DESCRIBE[backend]}) cannot run this case on {device} in {dtype}: {why}"]


def backend_reasons(backend: str, *, n: int, causal: bool, heads: int, kv_heads: int, head_dim: int, device: str,
                    dtype: str, mode: str = "fwd") -> list[str]:
    """Why ``backend`` cannot run this case here (empty: it can)."""
    runs_on = RUNS_ON[backend]
    if runs_on is None:
        return []  # auto and math: every device has the math fallback
    kind = torch.device(device).type
    if kind not in runs_on:
        where = " and ".join(runs_on).replace("cpu", "CPU").replace("cuda", "CUDA")
        if kind == "cpu":
            reason = (f"backend={backend} ({_DESCRIBE[backend]}) is a {where}-only kernel: on the CPU, SDPA has only "
                      "the flash and math kernels")
        else:
            reason = f"backend={backend} ({_DESCRIBE[backend]}) has kernels on {where} only, not on {kind}"
        return [reason]
    requires_grad = "bwd" in mode
    if kind == "cuda":
        return cuda_reasons(backend, n=n, causal=causal, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                            device=device, dtype=dtype, requires_grad=requires_grad)
    kernel, why = probe_kernel(backend, heads=heads, kv_heads=kv_heads, n_q=n, n_k=n, head_dim=head_dim,
                               causal=causal, device=device, dtype=dtype, requires_grad=requires_grad)
    if kernel is None:
        reason = (f"backend={backend} ({_DESCRIBE[backend]}) cannot run this case on the CPU in {dtype}: "
                  f"{why or 'torch found no kernel'}")
        return [reason]
    return []


@register(name="sdpa", family="exact", complexity="O(N²·D)", memory="O(N) (fused kernels); O(N²) with backend=math",
          knobs=[KV_HEADS, BACKEND])
class SDPAAttention(DenseAttention):
    """torch.nn.functional.scaled_dot_product_attention(Q, K, V, is_causal=causal), backend chosen by a knob.

    Same mathematics as `dense` (and the same reference and FLOP count), computed by a
    fused kernel (flash attention on the CPU and on recent GPUs) that streams over key
    blocks with an online softmax, so the N×N scores never exist: FLOPs stay
    4·B·H·N²·D, memory is O(B·H·N·D). Causal goes through ``is_causal`` (top-left
    aligned), never a mask tensor. Grouped-query through ``enable_gqa`` (no repeated K/V).
    ``backend`` (auto, math, flash, efficient, cudnn) restricts the kernel with
    ``torch.nn.attention.sdpa_kernel``; ``backend=math`` forms the N×N scores (O(N²) memory, the
    cost the fused kernels avoid); ``build_info`` names the kernel that runs (``kernel=...``).

    Decode: dense's KV cache; a step is one SDPA call of one query against the filled cache, under the same backend.
    """

    # Linear at the default (auto: a fused kernel); backend=math is O(N²) (tests/test_sdpa_backends.py): the
    # declaration is per mechanism and the contract's growth test runs it at the defaults.
    linear_memory = True

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, kv_heads: int = 0,
                 backend: str = "auto"):
        super().__init__(head_dim=head_dim, heads=heads, n=n, causal=causal, seed=seed, kv_heads=kv_heads)
        self.backend = backend
        self.n = n
        self.head_dim = head_dim
        self.register_buffer("_probe", torch.empty(0), persistent=False)  # follows .to(device, dtype)
        self._info: dict = {}

    @classmethod
    def check(cls, *, n: int, causal: bool, heads: int, head_dim: int, device: str, dtype: str, mode: str = "fwd",
              kv_heads: int = 0, backend: str = "auto") -> list[str]:
        kv = kv_heads or heads
        if kv_heads_error(heads, kv) or n < 1:
            return []  # the kv_heads reason is the registry's; nothing to probe
        return backend_reasons(backend, n=n, causal=causal, heads=heads, kv_heads=kv, head_dim=head_dim,
                               device=device, dtype=dtype, mode=mode)

    def build_info(self) -> dict:
        """``kernel``: the aten kernel one forward of the built shapes (batch 1) dispatches on this module's
        device and dtype, read off a fake call (no allocation, not in any timed call); ``decode_kernel`` too
        when a decode step (one query against N keys) dispatches another."""
        device, dtype = str(self._probe.device), str(self._probe.dtype).removeprefix("torch.")
        key = (device, dtype)
        if key not in self._info:
            shape = dict(heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim, device=device, dtype=dtype)
            kernel, why = probe_kernel(self.backend, n_q=self.n, n_k=self.n, causal=self.causal, **shape)
            info = {"kernel": kernel or f"none ({why})"}
            step, _ = probe_kernel(self.backend, n_q=1, n_k=self.n, causal=False, **shape)
            if step is not None and step != kernel:
                info["decode_kernel"] = step
            self._info[key] = info
        return dict(self._info[key])

    # dense's counts, whatever the backend (every kernel does the same two N×N×D products; the KV cache is one)
    @classmethod
    def state_bytes(cls, *, backend: str = "auto", **sizes) -> int:
        return super().state_bytes(**sizes)

    @classmethod
    def decode_read_bytes(cls, *, backend: str = "auto", **sizes) -> int:
        return super().decode_read_bytes(**sizes)

    @classmethod
    def analytic_flops(cls, *, backend: str = "auto", **sizes) -> int:
        return super().analytic_flops(**sizes)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        gqa = k.shape[1] != q.shape[1]
        with backend_context(self.backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=gqa)  # (B, H, N, D)

    def decode_step(self, state: StaticKV, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        state.append(k, v)
        keys, values = state.keys()  # (B, Hkv, L, D)
        gqa = keys.shape[1] != q.shape[1]
        with backend_context(self.backend):
            return F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)  # (B, H, 1, D)
