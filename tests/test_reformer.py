"""Reformer LSH attention: reference equality, dense limit, rounds, hashing, linear cost."""

from __future__ import annotations

import math

import pytest
import torch

import mechanisms
from tests.helpers import assert_linear, assert_matches_reference, growth

SPEC = mechanisms.get("reformer")
B, H, D = 2, 3, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def build(n: int, causal: bool, dtype=torch.float32, seed: int = 1, **knobs):
    return SPEC.build(head_dim=D, heads=H, n=n, causal=causal, seed=seed, **knobs).to(dtype)


def inputs(n: int, dtype=torch.float32, seed: int = 0, d: int = D, heads: int = H, batch: int = B):
    return SPEC.make_inputs(batch=batch, heads=heads, n=n, head_dim=d, dtype=dtype, seed=seed, requires_grad=True)


def dense_shared_qk(q: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """HF LSHSelfAttention on one chunk: keys q/|q| (HF's eps), score q·k̂, self −1e5, causal j ≤ i."""
    n, d = q.shape[-2], q.shape[-1]
    kn = q / torch.sqrt(q.pow(2).sum(-1, keepdim=True) + d * 1e-6)
    s = q @ kn.transpose(-1, -2)
    s = s.masked_fill(torch.eye(n, dtype=torch.bool), -1e5)
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


CASES = [
    dict(n=100, rounds=1, bucket=16),  # 7 chunks, padded to 112
    dict(n=100, rounds=3, bucket=16),
    dict(n=100, rounds=4, bucket=16, buckets=4),  # few buckets: keys seen in several rounds
    dict(n=70, rounds=2, bucket=32),  # 3 chunks, padded
    dict(n=64, rounds=2, bucket=32),  # 2 chunks: every key visible in every round
    dict(n=37, rounds=2, bucket=64),  # one chunk
]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_matches_reference_forward_and_grad(case, causal):
    knobs = dict(case)
    n = knobs.pop("n")
    m32 = build(n, causal, **knobs)
    m64 = build(n, causal, torch.float64, **knobs)
    q, k, v = inputs(n)
    assert q.shape == (B, H, n, D)
    (_, gk, _), (_, rk, _) = assert_matches_reference(m32, m64, q, k, v)
    assert gk is None and rk is None  # shared QK: k is ignored


def test_reference_counts_rounds():
    """softmax(s + log c): with 2 chunks every key is visible in every round, so c = R and it is dense."""
    q, k, v = inputs(64, torch.float64)
    m = build(64, False, torch.float64, rounds=3, bucket=32)
    torch.testing.assert_close(m.reference(q, k, v), dense_shared_qk(q, v, False), atol=1e-12, rtol=0)


def test_k_is_ignored():
    m = build(100, False, rounds=2, bucket=16)
    q, k, v = inputs(100)
    torch.testing.assert_close(m(q, k, v), m(q, torch.randn_like(k), v), atol=0, rtol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("n", [64, 50])
def test_one_chunk_one_round_is_dense_shared_qk(n, causal):
    m = build(n, causal, torch.float64, rounds=1, bucket=64)
    q, k, v = inputs(n, torch.float64)
    torch.testing.assert_close(m(q, k, v), dense_shared_qk(q, v, causal), atol=1e-12, rtol=0)


def test_self_only_when_nothing_else_visible():
    """Causal position 0 sees only itself: output v_0 exactly, in every round."""
    m = build(100, True, rounds=3, bucket=16)
    q, k, v = inputs(100)
    out = m(q, k, v)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0], atol=1e-6, rtol=0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_error_against_dense_falls_with_rounds(causal):
    n, d, heads = 256, 16, 4
    err = {}
    for rounds in (1, 2, 8):
        total = 0.0
        for seed in range(4):
            m = SPEC.build(head_dim=d, heads=heads, n=n, causal=causal, seed=seed, rounds=rounds, bucket=16).double()
            q, k, v = SPEC.make_inputs(batch=1, heads=heads, n=n, head_dim=d, dtype=torch.float64, seed=seed)
            with torch.no_grad():
                total += (m(q, k, v) - dense_shared_qk(q, v, causal)).abs().mean().item()
        err[rounds] = total / 4
    assert err[1] > err[2] > err[8], err
    assert err[8] < 0.6 * err[1], err


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("rounds", [1, 2])
def test_blocks_give_the_same_result(rounds, causal):
    """A tiny byte budget (one hashed row, one window per block) gives the one-block result, forward and gradients."""
    m = build(100, causal, rounds=rounds, bucket=16)
    q, k, v = inputs(100)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    whole = m(q, k, v)
    want = torch.autograd.grad(whole, (q, v), g)
    m.temp_bytes = 1  # instance attribute overrides the device budget
    out = m(q, k, v)
    torch.testing.assert_close(out, whole, atol=1e-6, rtol=0)
    for got, ref in zip(torch.autograd.grad(out, (q, v), g), want):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    with torch.no_grad():  # inference: the blocks share one score buffer
        torch.testing.assert_close(m(q, k, v), whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n_buckets", [4, 22, 300])
def test_hash_is_argmax_of_rotations_and_negations(n_buckets):
    m = SPEC.build(head_dim=D, heads=H, n=500, causal=False, seed=3, rounds=2, bucket=16, buckets=n_buckets)
    m.temp_bytes = 10_000  # several row blocks
    x = torch.randn(H, 500, D, generator=torch.Generator().manual_seed(0))
    x[0, 7] = 0.0  # all-zero projection: every column ties, argmax takes the first
    buckets = m.hash(x)
    assert buckets.shape == (H, 500, 2)
    for r in range(2):
        proj = x @ m.rotations[:, r, :]
        expected = torch.cat([proj, -proj], dim=-1).argmax(dim=-1)
        assert torch.equal(buckets[..., r], expected)


def test_rotations_from_seed_and_default_buckets():
    a = SPEC.build(head_dim=D, heads=H, n=1000, causal=False, seed=7, rounds=3, bucket=64)
    b = SPEC.build(head_dim=D, heads=H, n=1000, causal=False, seed=7, rounds=3, bucket=64)
    c = SPEC.build(head_dim=D, heads=H, n=1000, causal=False, seed=8, rounds=3, bucket=64)
    assert a.n_buckets == 16 and a.factors == (16,)  # 2·⌊1000/64⌋ = 30, down to a power of two
    assert a.rotations.shape == (D, 3, 8)
    assert torch.equal(a.rotations, b.rotations) and not torch.equal(a.rotations, c.rotations)
    assert "rotations" in dict(a.named_buffers())


@pytest.mark.parametrize("n,bucket,factors", [
    (4096, 64, (128,)),  # 2·64 = 128, not above the limit 2·max(8, 64) = 128
    (8192, 64, (16, 16)),  # 256 > 128: factorised
    (16384, 64, (16, 32)),  # HF at N = 16384, c = 64: num_buckets [16, 32]
    (1 << 20, 64, (128, 256)),  # 32768 buckets from 192 rotation columns
    (1000, 8, (8, 16)),  # 2·125 = 250 -> 128 > 2·max(11, 8) = 22
    (40, 64, (2,)),  # one chunk: never hashed, but a valid count
])
def test_default_bucket_count_is_huggingfaces(n, bucket, factors):
    from mechanisms.reformer import bucket_factors

    assert bucket_factors(n, bucket, 0) == factors
    assert bucket_factors(n, bucket, 22) == (22,)  # given: one rotation of 11 columns
    m = SPEC.build(head_dim=D, heads=H, n=n, causal=False, seed=0, rounds=2, bucket=bucket)
    assert m.rotations.shape == (D, 2, sum(f // 2 for f in factors))


def test_factorised_hash_is_b1_plus_f1_b2():
    m = SPEC.build(head_dim=D, heads=H, n=1000, causal=False, seed=3, rounds=2, bucket=8)
    assert m.factors == (8, 16)
    m.temp_bytes = 10_000  # several row blocks
    x = torch.randn(H, 1000, D, generator=torch.Generator().manual_seed(0))
    buckets = m.hash(x)
    assert buckets.shape == (H, 1000, 2) and int(buckets.max()) < 128
    for r in range(2):
        proj = x @ m.rotations[:, r, :]  # (H, N, 4 + 8)
        b1 = torch.cat([proj[..., :4], -proj[..., :4]], dim=-1).argmax(dim=-1)
        b2 = torch.cat([proj[..., 4:], -proj[..., 4:]], dim=-1).argmax(dim=-1)
        assert torch.equal(buckets[..., r], b1 + 8 * b2)


def test_check_refuses_odd_buckets():
    assert SPEC.unsupported(dict(n=256, causal=False, knobs={"buckets": 7}))
    assert SPEC.unsupported(dict(n=256, causal=False, knobs={"buckets": 1}))
    assert not SPEC.unsupported(dict(n=256, causal=True, knobs={"buckets": 8}))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_linear_memory_and_flops_fixed_buckets(causal):
    rows = growth("reformer", [512, 1024, 2048], knobs={"bucket": 32, "buckets": 16, "rounds": 2}, causal=causal)
    assert_linear(rows)


def test_linear_memory_and_flops_backward():
    rows = growth("reformer", [512, 1024, 2048], knobs={"bucket": 32, "buckets": 16, "rounds": 2}, mode="fwd+bwd")
    assert_linear(rows)


def test_default_buckets_memory_linear_hashing_flops_n_to_the_1_5():
    """Default n_b (HF's, factorised above its limit): hashing costs 2·G·N·D·R·(f1 + f2)/2 FLOPs, which grows as
    N^1.5 (the unfactorised 2N/c buckets would grow as N²), counted on fake tensors up to N = 1M; memory stays
    linear (hashing runs in blocks whose size does not grow with N)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from effbench.measure.flops import count_flops

    rows = growth("reformer", [1024, 2048, 4096], knobs={"bucket": 32, "rounds": 1})
    assert_linear([(n, m, 1) for n, m, _ in rows])
    flops = {}
    for n in (1 << 14, 1 << 16, 1 << 18, 1 << 20):
        m = SPEC.build(head_dim=64, heads=8, n=n, causal=False, seed=0, rounds=1, bucket=64)
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.empty(8, n, 64)
            flops[n], _ = count_flops(lambda: m.hash(x))
        assert flops[n] == 2 * 8 * n * 64 * sum(f // 2 for f in m.factors)
    assert [flops[4 * n] / flops[n] for n in (1 << 14, 1 << 16, 1 << 18)] == [8.0, 8.0, 8.0]  # (4N)^1.5 / N^1.5
