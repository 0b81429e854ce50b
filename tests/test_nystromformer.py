"""Nyströmformer beyond the contract suite: the documented uneven segments, the iterative pseudo-inverse against
torch.linalg.pinv, the Nyström formula with an exact pinv, dense attention at m = N, and nystrom-attention's core."""

from __future__ import annotations

import math

import pytest
import torch

import mechanisms
from mechanisms.nystromformer import iterative_pinv, landmarks, segment_sizes

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(n: int, **knobs):
    return mechanisms.get("nystromformer").build(head_dim=16, heads=2, n=n, **knobs)


def _nystrom_exact_pinv(q, k, v, m):
    """softmax(QK̃ᵀ/√D) pinv(softmax(Q̃K̃ᵀ/√D)) softmax(Q̃Kᵀ/√D) V with torch.linalg.pinv (float64)."""
    scale = q.shape[-1] ** -0.5
    ql, kl = landmarks(q, m), landmarks(k, m)
    a1 = torch.softmax(q @ kl.mT * scale, -1)  # (B, H, N, m)
    a2 = torch.softmax(ql @ kl.mT * scale, -1)  # (B, H, m, m)
    a3 = torch.softmax(ql @ k.mT * scale, -1)  # (B, H, m, N)
    return a1 @ torch.linalg.pinv(a2) @ (a3 @ v)


def _inputs(n, *, b=1, h=2, d=16, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) * s for s in (scale, scale, 1.0)]


def test_uneven_segments_are_the_documented_means():
    """N=1000, m=64: the first N mod m = 40 segments hold ⌈N/m⌉ = 16 positions, the other 24 hold ⌊N/m⌋ = 15,
    contiguous and in order, no padding; each landmark is the plain mean of its segment."""
    n, m = 1000, 64
    sizes = segment_sizes(n, m)
    assert sizes == [16] * 40 + [15] * 24 and sum(sizes) == n
    x = torch.randn(2, 3, n, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    want = torch.stack([x[:, :, lo:hi].mean(dim=2) for lo, hi in zip(bounds, bounds[1:])], dim=2)  # (B, H, m, D)
    torch.testing.assert_close(landmarks(x, m), want, atol=1e-14, rtol=0)
    # the same split as torch.tensor_split, which the reference uses
    assert [t.shape[2] for t in torch.tensor_split(x, m, dim=2)] == sizes
    # and the float32 views give the same means
    torch.testing.assert_close(landmarks(x.float(), m).double(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n,m", [(64, 64), (777, 48), (1031, 256), (5, 1), (7, 7)])
def test_segments_cover_every_position(n, m):
    sizes = segment_sizes(n, m)
    assert len(sizes) == m and sum(sizes) == n and min(sizes) >= 1
    assert set(sizes) <= {n // m, math.ceil(n / m)}
    assert landmarks(torch.randn(1, 1, n, 4), m).shape == (1, 1, m, 4)


def test_iterative_pinv_converges_to_linalg_pinv():
    """With many iterations the paper's iteration reaches the Moore–Penrose pseudo-inverse (torch.linalg.pinv),
    for softmax matrices and for a rank-deficient one (Z₀ ∝ Aᵀ starts in A's row space)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(3, 32, 32, generator=gen, dtype=torch.float64) * 2.0, dim=-1)  # (3, m, m)
    want = torch.linalg.pinv(a)
    got = iterative_pinv(a, 60)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-9
    # rank 10 of 32: a true pseudo-inverse, not an inverse
    low = torch.randn(32, 10, generator=gen, dtype=torch.float64) @ torch.randn(10, 32, generator=gen,
                                                                                  dtype=torch.float64)
    want = torch.linalg.pinv(low)
    got = iterative_pinv(low, 10)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-10
    torch.testing.assert_close(low @ got @ low, low, atol=1e-9, rtol=0)  # Penrose: A Z A = A
    torch.testing.assert_close(got @ low @ got, got, atol=1e-9, rtol=0)  # Z A Z = Z
    # 6 iterations are not converged on such a matrix: the truncation the docstring describes
    assert float((iterative_pinv(low, 6) - want).abs().max() / want.abs().max()) > 1e-3
    # and on an exactly singular matrix rounding outside A's row space grows ×3.25 per iteration (docstring)
    assert float((iterative_pinv(low, 40) - want).abs().max() / want.abs().max()) > 1.0


def test_forward_with_converged_pinv_is_the_nystrom_formula():
    """forward (float64, 60 iterations) = A₁ pinv(A₂) A₃ V with torch.linalg.pinv, N=300 and m=20 (uneven segments)."""
    n, m = 300, 20
    q, k, v = _inputs(n, scale=2.0)
    out = _build(n, landmarks=m, pinv_iters=60).double()(q, k, v)
    want = _nystrom_exact_pinv(q, k, v, m)
    assert float((out - want).abs().max()) < 1e-8


def test_dense_at_m_equals_n_only_with_a_converged_pinv():
    """m = N (one position per segment, Q̃ = Q, K̃ = K) and 60 iterations: A A⁺ A V = softmax(QKᵀ/√D) V, dense.
    The default 6 iterations are not dense there, which is why the fidelity sweep declares no equals_dense_at."""
    n = 64
    q, k, v = _inputs(n, scale=16 ** -0.25)  # as verify's fidelity inputs: |q|²/√D ≈ 1
    dense = mechanisms.masked_softmax_attention(q, k, v)
    converged = _build(n, landmarks=n, pinv_iters=60).double()(q, k, v)
    assert float((converged - dense).abs().max()) < 1e-10
    default = _build(n, landmarks=n).double()(q, k, v)
    assert float((default - dense).abs().max()) > 1e-3


def test_causal_and_too_many_landmarks_are_refused():
    spec = mechanisms.get("nystromformer")
    base = dict(heads=2, head_dim=16)
    (why,) = spec.unsupported(dict(n=64, causal=True, knobs=(("landmarks", 8),), **base))
    assert "future positions" in why
    (why,) = spec.unsupported(dict(n=64, causal=False, knobs=(), **base))  # default m = 256 > N
    assert "landmarks m=256 exceeds N=64" in why
    assert spec.unsupported(dict(n=256, causal=False, knobs=(), **base)) == []
    with pytest.raises(ValueError, match="not causal"):
        spec.build(head_dim=16, heads=2, n=64, causal=True)
    with pytest.raises(ValueError, match="exceeds N"):
        _build(64)(*(t.float() for t in _inputs(64)))


def test_float32_forward_equals_reference_at_default_settings():
    """N=16384-like defaults at a small N: m=256, 6 iterations, B=1, H=8, D=64 against the float64 reference."""
    n = 1000
    mod = mechanisms.get("nystromformer").build(head_dim=64, heads=8, n=n)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 8, n, 64, generator=gen) for _ in range(3))
    with torch.no_grad():
        out = mod(q, k, v)
        ref = mod.double().reference(q.double(), k.double(), v.double())
    assert float((out.double() - ref).abs().max()) < 1e-5


class Prepared(torch.nn.Module):
    """Stands in for a projection: returns the prepared tensor, zero-padded at the front as the peer pads x."""

    def __init__(self, t: torch.Tensor):
        super().__init__()
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(self.t, (0, 0, x.shape[1] - self.t.shape[1], 0))


def test_matches_nystrom_attention_core():
    """nystrom-attention (if installed), its forward with q, k, v handed in (to_qkv replaced by the prepared tensor,
    no residual conv, no output projection): equal to ours where the two are the same computation, i.e. N a
    multiple of m (no padding) and B·H = 1 (its global-max Z₀ is then our per-matrix one)."""
    nys = pytest.importorskip("nystrom_attention")
    n, m, d = 512, 32, 16
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, n, d, generator=gen) for _ in range(3))  # (1, 1, N, D)
    peer = nys.NystromAttention(dim=d, dim_head=d, heads=1, num_landmarks=m, pinv_iterations=6, residual=False)
    qkv = torch.cat([q, k, v], dim=-1)[:, 0]  # (1, N, 3D): the layout to_qkv returns
    peer.to_qkv = Prepared(qkv)
    peer.to_out = torch.nn.Identity()
    with torch.no_grad():
        theirs = peer(torch.zeros(1, n, d))  # (1, N, D)
        ours = mechanisms.get("nystromformer").build(head_dim=d, heads=1, n=n, landmarks=m)(q, k, v)[:, 0]
    assert float((ours - theirs).abs().max()) < 1e-5
    # their pinv on our matrix equals ours
    a = torch.softmax(torch.randn(1, m, m, generator=gen, dtype=torch.float64), -1)
    torch.testing.assert_close(nys.nystrom_attention.moore_penrose_iter_pinv(a, 6), iterative_pinv(a, 6),
                               atol=1e-10, rtol=0)
