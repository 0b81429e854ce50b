"""Transformer-XL and compressive memory: reference equality, detached memory, special cases, linear cost."""

from __future__ import annotations

import pytest
import torch

import mechanisms
from tests.helpers import assert_linear, assert_matches_reference, growth

B, H, D, N = 2, 3, 8, 100


pytestmark = pytest.mark.usefixtures("one_thread")


def build(name: str, dtype=torch.float32, n: int = N, **knobs):
    return mechanisms.get(name).build(head_dim=D, heads=H, n=n, causal=True, seed=0, **knobs).to(dtype)


def inputs(n: int = N, dtype=torch.float32, seed: int = 0):
    return mechanisms.get("transformer-xl").make_inputs(batch=B, heads=H, n=n, head_dim=D, dtype=dtype, seed=seed,
                                                       requires_grad=True)


CASES = [
    ("transformer-xl", dict(segment=16, memory=24)),  # memory spans two segments; N = 6·16 + 4
    ("transformer-xl", dict(segment=16, memory=0)),  # segments alone
    ("transformer-xl", dict(segment=8, memory=5)),  # memory shorter than a segment
    ("transformer-xl", dict(segment=128, memory=64)),  # one (padded) segment
    ("compressive", dict(segment=16, memory=24, compress=3, compressed=4)),
    ("compressive", dict(segment=10, memory=7, compress=4, compressed=3)),
    ("compressive", dict(segment=16, memory=0, compress=2, compressed=5)),  # compressed memory only
    ("compressive", dict(segment=12, memory=12, compress=5, compressed=0)),
]


@pytest.mark.parametrize("name,knobs", CASES, ids=[f"{n}-" + "-".join(f"{k}{v}" for k, v in kn.items()) for n, kn in CASES])
def test_matches_reference_forward_and_grad(name, knobs):
    m32 = build(name, **knobs)
    m64 = build(name, torch.float64, **knobs)
    q, k, v = inputs()
    assert q.shape == (B, H, N, D)
    assert_matches_reference(m32, m64, q, k, v)


def test_reference_mask_is_the_transformer_xl_window():
    """Forward of the reference equals plain masked attention under j <= i, j >= floor(i/L)·L − M."""
    L, M = 16, 24
    q, k, v = (t.detach().double() for t in inputs())
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    mask = (j <= i) & (j >= (i // L) * L - M)
    want = mechanisms.masked_softmax_attention(q, k, v, mask)
    torch.testing.assert_close(build("transformer-xl", torch.float64, segment=L, memory=M)(q, k, v), want,
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("name,knobs", [("transformer-xl", dict(segment=16, memory=40)),
                                        ("compressive", dict(segment=16, memory=16, compress=4, compressed=4))])
def test_no_gradient_into_memory(name, knobs):
    """d out(segment s) / d (k, v) of earlier segments is exactly zero; into its own segment it is not."""
    m = build(name, **knobs)
    q, k, v = inputs()
    L = knobs["segment"]
    for s in (1, 3, 5):
        seg = m(q, k, v)[:, :, s * L:(s + 1) * L]
        gq, gk, gv = torch.autograd.grad(seg.square().sum(), (q, k, v))
        assert torch.count_nonzero(gk[:, :, :s * L]) == 0 and torch.count_nonzero(gv[:, :, :s * L]) == 0
        assert gk[:, :, s * L:(s + 1) * L].abs().sum() > 0 and gv[:, :, s * L:(s + 1) * L].abs().sum() > 0
        assert torch.count_nonzero(gq[:, :, :s * L]) == 0  # earlier queries do not shape this segment
    # ... yet the memory is used: the forward depends on earlier values
    v2 = v.detach().clone()
    v2[:, :, :L] += 1.0
    assert not torch.allclose(m(q, k, v)[:, :, L:2 * L], m(q, k, v2)[:, :, L:2 * L])


def test_compressive_rate_one_without_compressed_memory_is_transformer_xl():
    q, k, v = inputs()
    xl = build("transformer-xl", segment=16, memory=24)(q, k, v)
    cp = build("compressive", segment=16, memory=24, compress=1, compressed=0)(q, k, v)
    torch.testing.assert_close(cp, xl, atol=0, rtol=0)
    # rate 1 with Mc slots: Transformer-XL with memory M + Mc
    cp2 = build("compressive", segment=16, memory=10, compress=1, compressed=14)(q, k, v)
    torch.testing.assert_close(cp2, xl, atol=1e-6, rtol=0)


def test_compressed_memory_is_the_mean_of_evicted_keys():
    """A query of segment 2 (L=16, M=16, c=4, Mc=2) sees keys mean(k[8:12]), mean(k[12:16]) and raw k[16:32]."""
    L, M, c, Mc = 16, 16, 4, 2
    q, k, v = (t.detach().double() for t in inputs())
    out = build("compressive", torch.float64, segment=L, memory=M, compress=c, compressed=Mc)(q, k, v)
    i = 2 * L + 5
    keys = torch.cat([k[:, :, 8:12].mean(2, keepdim=True), k[:, :, 12:16].mean(2, keepdim=True), k[:, :, 16:i + 1]], 2)
    vals = torch.cat([v[:, :, 8:12].mean(2, keepdim=True), v[:, :, 12:16].mean(2, keepdim=True), v[:, :, 16:i + 1]], 2)
    want = mechanisms.masked_softmax_attention(q[:, :, i:i + 1], keys, vals)
    torch.testing.assert_close(out[:, :, i:i + 1], want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["transformer-xl", "compressive"])
def test_causal_only(name):
    spec = mechanisms.get(name)
    assert not spec.supports_bidirectional
    assert spec.unsupported(dict(n=256, causal=False, knobs={}))
    assert not spec.unsupported(dict(n=256, causal=True, knobs={}))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_transformer_xl_linear_memory_and_flops(mode):
    rows = growth("transformer-xl", [512, 1024, 2048], knobs={"segment": 32, "memory": 48}, causal=True, mode=mode)
    assert_linear(rows)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_compressive_linear_memory_and_flops(mode):
    rows = growth("compressive", [512, 1024, 2048], knobs={"segment": 32, "memory": 48, "compress": 4, "compressed": 8},
                  causal=True, mode=mode)
    assert_linear(rows)
