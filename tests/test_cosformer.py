"""cosFormer (`cosformer`): the cos re-weighting as two linear-attention terms, causal by chunked prefix sums.

- the decomposition: ReLU(q_i)·ReLU(k_j)·cos(π/2·(i−j)/M) computed directly equals φ(q_i)·φ(k_j) with the 2D
  features [ReLU(x) cos a, ReLU(x) sin a] (float64, M = N and M > N);
- forward equals an O(N²) masked version written here (not the module's reference()), causal on N not a
  multiple of the chunk and with tiny blocks so the carried state and padding run, bidirectional with GQA;
- the paper's property: for |i − j| < M the re-weighting and every weight s_ij are non-negative; M < N is
  refused (check() and the build) since keys M apart would get cos ≤ 0;
- the paper's eps: the denominator is clamped at 1e-6 (a row seeing no overlapping ReLU support gives 0);
- decode past M raises; FlopCounterMode counts exactly analytic_flops; build_info states M.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mechanisms
from effbench.cases import Case
from effbench.measure.flops import count_flops
from effbench.workload import prepare
from mechanisms import _prefix
from mechanisms.cosformer import EPS, cos_features, trig_table

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = mechanisms.get("cosformer")


def direct_weights(q: torch.Tensor, k: torch.Tensor, m: int) -> torch.Tensor:
    """s_ij = ReLU(q_i)·ReLU(k_j) · cos(π/2·(i−j)/M), the re-weighting taken directly: (..., N, N)."""
    n = q.shape[-2]
    i = torch.arange(n, dtype=torch.float64)
    cos = torch.cos(math.pi / 2 * (i[:, None] - i[None, :]) / m)  # (N, N)
    return (F.relu(q) @ F.relu(k).transpose(-1, -2)) * cos


def masked_cosformer(q, k, v, m: int, causal: bool) -> torch.Tensor:
    """The O(N²) form with an explicit mask and the paper's clamp: out_i = Σ_j s_ij v_j / max(Σ_j s_ij, eps)."""
    h = q.shape[1]
    k, v = (t.repeat_interleave(h // t.shape[1], dim=1) for t in (k, v))
    s = direct_weights(q, k, m)
    if causal:
        n = q.shape[-2]
        s = s * torch.ones(n, n, dtype=s.dtype).tril()
    return (s @ v) / s.sum(-1, keepdim=True).clamp_min(EPS)


def inputs(b, h, hkv, n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("n,m", [(37, 37), (37, 100), (200, 200)])
def test_two_term_decomposition_equals_direct_reweighting(n, m):
    q, k, _ = inputs(2, 3, 3, n, 8)
    trig = trig_table(0, n, m, torch.float64, "cpu")  # (N, 2, 1)
    two_terms = cos_features(q, trig) @ cos_features(k, trig).transpose(-1, -2)  # φ(q_i)·φ(k_j), width 2D
    torch.testing.assert_close(two_terms, direct_weights(q, k, m), atol=1e-12, rtol=0)
    # the features are the two terms side by side: cos part first, sin part second
    a = math.pi / 2 * 5 / m
    torch.testing.assert_close(cos_features(q, trig)[..., 5, :], torch.cat([F.relu(q[..., 5, :]) * math.cos(a),
                                                                             F.relu(q[..., 5, :]) * math.sin(a)], -1))


@pytest.mark.parametrize("n,chunk,blocks", [(777, 64, None), (1111, 16, 1 << 12), (203, 7, 1 << 10), (5, 64, None)])
def test_causal_prefix_form_equals_masked_quadratic(n, chunk, blocks, monkeypatch):
    """N a multiple of no chunk; with tiny blocks the carried state crosses several blocks."""
    if blocks:
        monkeypatch.setattr(_prefix, "BLOCK_ELEMENTS", blocks)
    q, k, v = inputs(2, 2, 2, n, 8, seed=n)
    m = SPEC.build(head_dim=8, heads=2, n=n, causal=True, seed=0, chunk=chunk).to(torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(q, k, v), masked_cosformer(q, k, v, n, causal=True), atol=1e-12, rtol=0)
    q.requires_grad_(True)  # the autograd path concatenates blocks instead of writing into the output
    torch.testing.assert_close(m(q, k, v), masked_cosformer(q, k, v, n, causal=True), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_bidirectional_and_grouped_query_equal_masked_quadratic(kv_heads, monkeypatch):
    monkeypatch.setattr(_prefix, "BLOCK_ELEMENTS", 1 << 12)  # several blocks of keys and of queries
    n = 301
    q, k, v = inputs(2, 4, kv_heads, n, 8, seed=kv_heads)
    for causal in (False, True):
        m = SPEC.build(head_dim=8, heads=4, n=n, causal=causal, seed=0, chunk=16, kv_heads=kv_heads).double()
        with torch.no_grad():
            torch.testing.assert_close(m(q, k, v), masked_cosformer(q, k, v, n, causal), atol=1e-12, rtol=0)


def test_explicit_m_larger_than_n():
    n, big = 150, 1000
    q, k, v = inputs(1, 2, 2, n, 8)
    for causal in (False, True):
        m = SPEC.build(head_dim=8, heads=2, n=n, causal=causal, seed=0, reweight=big).double()
        assert m.build_info() == {"M": big, "M_from": "reweight"}
        with torch.no_grad():
            torch.testing.assert_close(m(q, k, v), masked_cosformer(q, k, v, big, causal), atol=1e-12, rtol=0)
    assert SPEC.build(head_dim=8, heads=2, n=n, causal=False, seed=0).build_info() == {"M": n, "M_from": "built n"}


def test_weights_are_non_negative_for_distances_below_m():
    """The paper's property: with i, j in [0, M) the re-weighting cos(π/2·(i−j)/M) > 0, every feature is ≥ 0,
    so every s_ij ≥ 0 (no cancellation in the sums); at M < N distant keys would get negative weights."""
    n = 257
    i = torch.arange(n, dtype=torch.float64)
    cos = torch.cos(math.pi / 2 * (i[:, None] - i[None, :]) / n)
    assert cos.min() > 0  # |i − j| ≤ N − 1 < M = N
    q, k, _ = inputs(2, 2, 2, n, 16)
    trig = trig_table(0, n, n, torch.float64, "cpu")
    fq, fk = cos_features(q, trig), cos_features(k, trig)
    assert fq.min() >= 0 and fk.min() >= 0
    assert (fq @ fk.transpose(-1, -2)).min() >= 0
    assert direct_weights(q, k, n).min() >= 0
    # M < N: some pair is M or more apart and its re-weighting is ≤ 0, so the case is refused
    assert torch.cos(math.pi / 2 * (i[:, None] - i[None, :]) / (n // 2)).min() < 0
    case = {"n": n, "causal": False, "heads": 2, "head_dim": 16}
    reasons = SPEC.unsupported({**case, "knobs": (("reweight", n // 2),)})
    assert reasons and "negative" in reasons[0]
    assert not SPEC.unsupported({**case, "causal": True, "knobs": (("reweight", n),)})
    with pytest.raises(ValueError, match="negative"):
        SPEC.build(head_dim=16, heads=2, n=n, causal=False, seed=0, reweight=n // 2)
    m = SPEC.build(head_dim=16, heads=2, n=100, causal=False, seed=0)
    with pytest.raises(ValueError, match="N=257 > M"):
        m(*inputs(1, 2, 2, n, 16))


def test_denominator_clamped_at_eps():
    """A causal row whose query shares no positive coordinate with any visible key: Σ_j s_ij = 0, output 0."""
    n, d = 6, 4
    q, k, v = inputs(1, 1, 1, n, d)
    q[..., 0, :] = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    k[..., 0, :] = torch.tensor([-1.0, -1.0, 2.0, 2.0], dtype=torch.float64)
    m = SPEC.build(head_dim=d, heads=1, n=n, causal=True, seed=0).double()
    with torch.no_grad():
        out = m(q, k, v)
    assert torch.equal(out[0, 0, 0], torch.zeros(d, dtype=torch.float64))
    torch.testing.assert_close(out, m.reference(q, k, v), atol=1e-12, rtol=0)


def test_decode_needs_m_in_advance():
    n0, total, d = 20, 24, 8
    q, k, v = inputs(1, 2, 1, total, d)
    m = SPEC.build(head_dim=d, heads=2, n=total, causal=True, seed=0, kv_heads=1).double()
    with torch.no_grad():
        ref = m.reference(q, k, v)
        state = m.decode_init(k[:, :, :n0], v[:, :, :n0], total)
        for t in range(n0, total):
            out = m.decode_step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
            torch.testing.assert_close(out, ref[:, :, t:t + 1], atol=1e-12, rtol=0)
        with pytest.raises(ValueError, match="position 24 >= M=24"):
            m.decode_step(state, q[:, :, :1], k[:, :, :1], v[:, :, :1])
        with pytest.raises(ValueError, match="capacity 25 > M=24"):
            m.decode_init(k[:, :, :n0], v[:, :, :n0], total + 1)


@pytest.mark.parametrize("causal,knobs", [(False, {}), (False, {"kv_heads": 1}), (True, {}), (True, {"chunk": 48})])
def test_counted_flops_equal_analytic(causal, knobs):
    n, heads, dim = 3000, 2, 32
    case = Case(mechanism="cosformer", n=n, heads=heads, head_dim=dim, causal=causal, knobs=tuple(knobs.items()))
    counted, uncounted = count_flops(prepare(case).call)
    assert not uncounted
    assert counted == SPEC.analytic_flops(batch=1, heads=heads, n=n, head_dim=dim, causal=causal, **knobs)
