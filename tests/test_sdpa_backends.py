"""sdpa's ``backend`` knob (auto, math, flash, efficient, cudnn) through torch.nn.attention.sdpa_kernel.

- every CPU backend equals dense attention (float32 against float64, 1e-5), causal and bidirectional, with
  grouped-query K/V, forward and gradients; decode steps run under the same backend and equal the prefill;
- the CUDA-only backends are ``skipped`` rows on the CPU, their reason one sentence, through the runner;
- ``build_info`` names the kernel that runs, and torch's profiler agrees on a real call;
- math forms the N×N scores (tracked peak ×4 per doubling of N), flash does not (≤ ×2.3);
- the CUDA checks (torch.backends.cuda.can_use_*_attention with SDPAParams) are exercised with fakes in place
  of torch's functions: no GPU is needed.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import mechanisms
import mechanisms.sdpa as sdpa_mod
from effbench.cases import Case
from effbench.runner import RunOptions, measure_in_process
from effbench.status import Status
from effbench.verify.decode import run_decode
from helpers import growth

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = mechanisms.get("sdpa")
DENSE = mechanisms.get("dense")
CPU_BACKENDS = ("auto", "math", "flash")
FLASH_CPU = "_scaled_dot_product_flash_attention_for_cpu"
TOL = 1e-5


def _one_sentence(reason: str) -> None:
    assert reason.strip() and "\n" not in reason and ". " not in reason and not reason.endswith("."), reason


# ------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_cpu_backend_equals_dense_attention(backend, causal, kv_heads):
    """float32 forward and gradients under the backend equal dense attention (the N×N textbook) in float64."""
    n, heads, d = 97, 4, 32
    knobs = {"kv_heads": kv_heads, "backend": backend}
    assert not SPEC.unsupported(dict(n=n, causal=causal, heads=heads, head_dim=d, knobs=tuple(knobs.items())))
    m = SPEC.build(head_dim=d, heads=heads, n=n, causal=causal, seed=0, **knobs)
    dense = DENSE.build(head_dim=d, heads=heads, n=n, causal=causal, seed=0, kv_heads=kv_heads).double()
    q, k, v = SPEC.make_inputs(batch=2, heads=heads, n=n, head_dim=d, dtype=torch.float32, requires_grad=True,
                               knobs=knobs)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, ref = m(q, k, v), dense(q64, k64, v64)
    torch.testing.assert_close(out.double(), ref, atol=TOL, rtol=0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(out, (q, k, v), g)
    refs = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    for got, want in zip(grads, refs):
        torch.testing.assert_close(got.double(), want, atol=TOL * max(1.0, float(want.abs().max())), rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decode_runs_under_the_backend_and_equals_prefill(backend):
    """T steps after N0 equal the causal reference at the last T rows, and a step dispatches the backend's kernel."""
    for kv in (4, 2):
        o = run_decode(SPEC, n0=61, steps=5, knobs={"backend": backend}, kv_heads=kv)
        assert o.max_abs_err <= TOL * o.scale, (backend, kv, o.max_abs_err)
    m = SPEC.build(head_dim=16, heads=4, n=40, causal=True, seed=0, backend=backend, kv_heads=2)
    q, k, v = SPEC.make_inputs(batch=1, heads=4, n=40, head_dim=16, dtype=torch.float32, knobs={"kv_heads": 2})
    state = m.decode_init(k[:, :, :39], v[:, :, :39], 40)
    trace = sdpa_mod._OpTrace()
    with torch.no_grad(), trace:
        m.decode_step(state, q[:, :, 39:], k[:, :, 39:], v[:, :, 39:])
    want = sdpa_mod.MATH_KERNEL if backend == "math" else FLASH_CPU
    assert sdpa_mod.kernel_of(trace.ops) == want, trace.ops


# ------------------------------------------------------------------------------ availability

@pytest.mark.parametrize("backend", ["efficient", "cudnn"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_cuda_only_backends_are_skipped_on_the_cpu_with_a_reason(backend, mode):
    case = Case(mechanism="sdpa", n=64, heads=2, head_dim=16, mode=mode, knobs=(("backend", backend),))
    reasons = SPEC.unsupported(case)
    assert len(reasons) == 1
    _one_sentence(reasons[0])
    assert f"backend={backend}" in reasons[0] and "CUDA" in reasons[0] and "flash and math" in reasons[0]
    row = measure_in_process(case, RunOptions(repeats=1, warmup=0))
    assert row.status == Status.SKIPPED and row.error == reasons[0]


def test_cpu_backends_are_supported_every_dtype_and_mode():
    for backend in CPU_BACKENDS:
        for dtype in ("float32", "float64", "bfloat16", "float16"):
            for mode in ("fwd", "fwd+bwd"):
                for causal in (False, True):
                    case = dict(n=33, causal=causal, heads=4, head_dim=16, dtype=dtype, mode=mode,
                                knobs=(("backend", backend), ("kv_heads", 2)))
                    assert SPEC.unsupported(case) == [], (backend, dtype, mode, causal)


def test_an_unknown_backend_is_refused():
    reasons = SPEC.unsupported(dict(n=64, causal=False, heads=2, head_dim=16, knobs=(("backend", "triton"),)))
    assert reasons and "must be one of auto, math, flash, efficient, cudnn" in reasons[0]


def test_a_cpu_flash_refusal_carries_torchs_reason(monkeypatch):
    """When torch finds no kernel under the restriction, the reason is torch's, as one sentence."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa_mod.probe_kernel.cache_clear()
    monkeypatch.setattr(sdpa_mod, "backend_context", lambda b: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION))
    try:
        reasons = SPEC.unsupported(dict(n=64, causal=False, heads=2, head_dim=16, knobs=(("backend", "flash"),)))
    finally:
        sdpa_mod.probe_kernel.cache_clear()
    assert len(reasons) == 1 and reasons[0].startswith("backend=flash (FlashAttention) cannot run this case on the CPU")
    assert "No viable backend" in reasons[0]
    _one_sentence(reasons[0])


def test_torch_debug_warnings_become_one_sentence():
    got = sdpa_mod._sentence([
        "Flash attention kernel not used because: (Triggered internally at /pytorch/sdp_utils_cpp.cpp:99.)",
        "Flash attention only supports gpu architectures in the range [sm80, sm121]. Attempting to run on a sm 7.5 "
        "gpu. (Triggered internally at /pytorch/aten/src/ATen/native/transformers/cuda/sdp_utils.cpp:240.)",
    ])
    assert got == ("Flash attention only supports gpu architectures in the range [sm80, sm121]; Attempting to run "
                   "on a sm 7.5 gpu")


# ------------------------------------------------------------------------------ build_info

@pytest.mark.parametrize("backend,kernel", [("auto", FLASH_CPU), ("flash", FLASH_CPU),
                                            ("math", sdpa_mod.MATH_KERNEL)])
def test_build_info_names_the_kernel_torch_runs(backend, kernel):
    """The row's build_info, and torch's profiler on one real call of the same module, name the same kernel."""
    row = measure_in_process(Case(mechanism="sdpa", n=128, heads=4, head_dim=16, causal=True,
                                  knobs=(("backend", backend), ("kv_heads", 2))),
                             RunOptions(repeats=1, warmup=0, measure_flops=False))
    assert row.status == Status.OK, row.error
    assert row.build_info == f"kernel={kernel}"

    from torch.profiler import ProfilerActivity, profile

    for dtype in (torch.float32, torch.float64):
        m = SPEC.build(head_dim=16, heads=4, n=128, causal=True, seed=0, backend=backend, kv_heads=2).to(dtype)
        assert m.build_info() == {"kernel": kernel}
        q, k, v = SPEC.make_inputs(batch=1, heads=4, n=128, head_dim=16, dtype=dtype, knobs={"kv_heads": 2})
        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
            m(q, k, v)
        names = {e.name for e in prof.events()}
        assert f"aten::{kernel}" in names, sorted(n for n in names if "scaled_dot" in n)
        others = {n for n in names if "scaled_dot_product" in n} - {f"aten::{kernel}", "aten::scaled_dot_product_attention"}
        assert not others, others


def test_kernel_probe_allocates_nothing_at_large_n():
    """build_info probes on fake tensors: a math kernel at N = 2^20 (4 TiB of scores) is named, not run."""
    m = SPEC.build(head_dim=64, heads=8, n=1 << 20, causal=True, seed=0, backend="math")
    assert m.build_info() == {"kernel": sdpa_mod.MATH_KERNEL}


# ------------------------------------------------------------------------------ memory

@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_math_memory_is_quadratic_flash_linear(causal, mode):
    """Tracked peak per doubling of N (512 -> 1024): math forms the N×N scores (≥ ×3.5), flash streams (≤ ×2.3)."""
    math = growth("sdpa", (512, 1024), knobs={"backend": "math"}, causal=causal, mode=mode, heads=2, head_dim=32)
    flash = growth("sdpa", (512, 1024), knobs={"backend": "flash"}, causal=causal, mode=mode, heads=2, head_dim=32)
    (_, m0, f0), (_, m1, f1) = math
    assert m1 / m0 >= 3.5, f"math memory ×{m1 / m0:.2f}"
    assert m1 >= 2 * 1024 * 1024 * 4, "math holds at least the scores of both heads at N=1024"
    (_, l0, g0), (_, l1, g1) = flash
    assert l1 / l0 <= 2.3, f"flash memory ×{l1 / l0:.2f}"
    fwd = [4 * 1 * 2 * n * n * 32 for n in (512, 1024)]  # 4·B·H·N²·D: the two N×N×D products
    if mode == "fwd":
        assert [f0, f1] == [g0, g1] == fwd, "both backends count dense's forward FLOPs"
    else:  # math's backward: 4 products (2× forward); flash's recomputes the scores: 5 (2.5×, torch's formula)
        assert [f0, f1] == [3 * f for f in fwd] and [g0, g1] == [7 * f // 2 for f in fwd]


# ------------------------------------------------------------------------------ CUDA checks, faked

class FakeCanUse:
    """Stands in for torch.backends.cuda.can_use_*_attention: records what it was asked, warns like torch."""

    def __init__(self, ok: bool, message: str = ""):
        self.ok, self.message, self.calls = ok, message, []

    def __call__(self, params, debug=False):
        self.calls.append(dict(
            q=tuple(params.query.shape), k=tuple(params.key.shape), device=str(params.query.device),
            dtype=params.query.dtype, causal=params.is_causal, gqa=params.enable_gqa, debug=debug,
            grad=params.query.requires_grad, mask=params.attn_mask, dropout=params.dropout,
            enabled=(torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                     torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())))
        if self.message and debug:
            warnings.warn(self.message + " (Triggered internally at /pytorch/aten/src/ATen/native/transformers/"
                          "cuda/sdp_utils.cpp:240.)")
        return self.ok


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda.is_available() True, torch.cuda.device a recorder; each can_use_* replaced by a FakeCanUse."""
    entered = []

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", Device)
    fakes = {}

    def install(name, ok, message=""):
        fakes[name] = FakeCanUse(ok, message)
        monkeypatch.setattr(torch.backends.cuda, f"can_use_{name}_attention", fakes[name])
        return fakes[name]

    install.entered = entered
    return install


FLASH_DTYPE = ("Expected query, key and value to all be of dtype: {Half, BFloat16}. Got Query dtype: float, "
               "Key dtype: float, and Value dtype: float instead.")


def test_cuda_flash_reason_is_torchs_debug_warning(fake_cuda):
    can = fake_cuda("flash", False, FLASH_DTYPE)
    case = dict(n=1000, causal=True, heads=8, head_dim=64, device="cuda", dtype="float32",
                knobs=(("backend", "flash"), ("kv_heads", 2)))
    reasons = SPEC.unsupported(case)
    assert reasons == ["backend=flash (FlashAttention) cannot run this case on cuda in float32: Expected query, key "
                       "and value to all be of dtype: {Half, BFloat16}; Got Query dtype: float, Key dtype: float, "
                       "and Value dtype: float instead"]
    _one_sentence(reasons[0])
    (call,) = can.calls
    # the case's shapes at batch 1 (fake tensors: nothing allocated), as the forward calls SDPA
    assert call["q"] == (1, 8, 1000, 64) and call["k"] == (1, 2, 1000, 64) and call["device"].startswith("cuda")
    assert call["dtype"] == torch.float32 and call["causal"] and call["gqa"] and call["debug"]
    assert call["mask"] is None and call["dropout"] == 0.0 and not call["grad"]
    assert call["enabled"] == (True, False, False, False), "checked under sdpa_kernel(FLASH_ATTENTION) alone"


@pytest.mark.parametrize("backend,torch_name,enabled", [
    ("flash", "flash", (True, False, False, False)),
    ("efficient", "efficient", (False, True, False, False)),
    ("cudnn", "cudnn", (False, False, True, False)),
])
def test_cuda_backend_asks_its_own_torch_check(fake_cuda, backend, torch_name, enabled):
    can = fake_cuda(torch_name, True)
    case = dict(n=256, causal=False, heads=4, head_dim=64, device="cuda:1", dtype="float16", mode="fwd+bwd",
                knobs=(("backend", backend),))
    assert SPEC.unsupported(case) == []
    (call,) = can.calls
    assert call["grad"], "fwd+bwd is checked with inputs requiring grad (some kernels refuse a backward)"
    assert not call["causal"] and not call["gqa"] and call["enabled"] == enabled
    assert fake_cuda.entered == [1], "checked on the case's device"


def test_cuda_cudnn_and_efficient_refusals(fake_cuda):
    fake_cuda("cudnn", False, "cuDNN MHA only supports SM80 and newer GPUs. Got sm75.")
    fake_cuda("efficient", False, "")
    base = dict(n=128, causal=True, heads=4, head_dim=64, device="cuda", dtype="float16")
    (cudnn,) = SPEC.unsupported({**base, "knobs": (("backend", "cudnn"),)})
    assert cudnn == ("backend=cudnn (cuDNN attention) cannot run this case on cuda in float16: "
                     "cuDNN MHA only supports SM80 and newer GPUs; Got sm75")
    (eff,) = SPEC.unsupported({**base, "knobs": (("backend", "efficient"),)})
    assert eff.endswith("torch.backends.cuda.can_use_efficient_attention returned False without a reason")
    for r in (cudnn, eff):
        _one_sentence(r)


def test_cuda_auto_and_math_need_no_check(fake_cuda):
    can = fake_cuda("flash", False, FLASH_DTYPE)
    for backend in ("auto", "math"):
        assert SPEC.unsupported(dict(n=128, causal=True, heads=4, head_dim=64, device="cuda", dtype="float32",
                                     knobs=(("backend", backend),))) == []
    assert not can.calls


def test_cuda_backend_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (reason,) = SPEC.unsupported(dict(n=128, causal=True, heads=4, head_dim=64, device="cuda", dtype="float16",
                                      knobs=(("backend", "flash"),)))
    assert reason == "backend=flash needs a CUDA device and torch.cuda.is_available() is False here"
    _one_sentence(reason)


def test_other_devices_get_the_declared_reason():
    (reason,) = SPEC.unsupported(dict(n=128, causal=True, heads=4, head_dim=64, device="mps", dtype="float16",
                                      knobs=(("backend", "cudnn"),)))
    assert reason == "backend=cudnn (cuDNN attention) has kernels on CUDA only, not on mps"
    assert sdpa_mod.RUNS_ON["flash"] == ("cpu", "cuda") and sdpa_mod.RUNS_ON["efficient"] == ("cuda",)
