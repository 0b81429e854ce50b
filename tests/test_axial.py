"""Axial and learned position encodings: reference equality, gradients, parameter counts, knobs."""

from __future__ import annotations

import math

import pytest
import torch

import mechanisms
from effbench.cases import Case
from effbench.workload import prepare

B, H, D = 2, 3, 8


def build(name: str, n: int, dtype=torch.float32, seed: int = 0, heads: int = H, head_dim: int = D, **knobs):
    return mechanisms.get(name).build(head_dim=head_dim, heads=heads, n=n, causal=False, seed=seed, **knobs).to(dtype)


def inputs(n: int, dtype=torch.float32):
    return mechanisms.get("axial-pe").make_inputs(batch=B, heads=H, n=n, head_dim=D, dtype=dtype, requires_grad=True)[0]


@pytest.mark.parametrize("name,knobs", [
    ("axial-pe", {}),  # n=101: 11 x 10, last row partial
    ("axial-pe", {"shape1": 7}),  # 7 x 15
    ("axial-pe", {"shape2": 9, "split": 5}),  # 12 x 9, d = 5 + 19
    ("axial-pe", {"shape1": 4, "shape2": 30}),  # more room than needed
    ("learned-pe", {}),
])
def test_matches_reference_forward_and_grad(name, knobs):
    n = 101
    m32 = build(name, n, **knobs)
    m64 = build(name, n, torch.float64, **knobs)
    x = inputs(n)
    x64 = x.detach().double().requires_grad_()
    out = m32(x)
    ref = m64.reference(x64)
    assert out.shape == (B, n, H * D)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(m64(x64), ref, atol=0, rtol=0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    params32, params64 = list(m32.parameters()), list(m64.parameters())
    got = torch.autograd.grad(out, [x, *params32], g)
    want = torch.autograd.grad(ref, [x64, *params64], g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=0)


def test_axial_encoding_is_concat_of_row_and_column_tables():
    m = build("axial-pe", 20, torch.float64, shape1=4, shape2=5)
    x = torch.zeros(1, 20, H * D, dtype=torch.float64)
    enc = m(x)[0]
    for p in (0, 4, 5, 13, 19):
        torch.testing.assert_close(enc[p], torch.cat([m.e1[p // 5], m.e2[p % 5]]), atol=0, rtol=0)


def test_auto_shape_and_split():
    m = build("axial-pe", 1000)
    assert (m.n1, m.n2) == (32, 32) and m.n1 * m.n2 >= 1000
    assert m.e1.shape == (32, H * D // 2) and m.e2.shape == (32, H * D - H * D // 2)
    m = build("axial-pe", 101)
    assert (m.n1, m.n2) == (11, 10)


def test_parameters_from_seed():
    a, b, c = build("axial-pe", 50, seed=1), build("axial-pe", 50, seed=1), build("axial-pe", 50, seed=2)
    assert torch.equal(a.e1, b.e1) and torch.equal(a.e2, b.e2) and not torch.equal(a.e1, c.e1)
    assert torch.equal(build("learned-pe", 50, seed=1).table, build("learned-pe", 50, seed=1).table)


def test_parameter_bytes_at_64k_positions():
    """N = 65,536, D = 512: axial holds at most 4·√N·D parameters, the learned table N·D."""
    n, heads, head_dim = 65_536, 8, 64
    d = heads * head_dim
    axial = sum(p.numel() for p in build("axial-pe", n, heads=heads, head_dim=head_dim).parameters())
    learned = sum(p.numel() for p in build("learned-pe", n, heads=heads, head_dim=head_dim).parameters())
    assert axial <= 4 * math.isqrt(n) * d
    assert axial == 256 * 256 + 256 * 256
    assert learned == n * d
    # the harness reports parameter bytes from the module
    w = prepare(Case(mechanism="axial-pe", n=n, heads=heads, head_dim=head_dim))
    assert w.param_bytes == axial * 4


def test_check_reasons():
    spec = mechanisms.get("axial-pe")
    assert spec.unsupported(dict(n=101, heads=H, head_dim=D, knobs={"shape1": 3, "shape2": 3}))
    assert spec.unsupported(dict(n=101, heads=H, head_dim=D, knobs={"split": H * D}))
    assert not spec.unsupported(dict(n=101, heads=H, head_dim=D, knobs={"shape1": 11}))
    assert not spec.unsupported(dict(n=101, causal=True, heads=H, head_dim=D, knobs={}))


@pytest.mark.parametrize("name", ["axial-pe", "learned-pe"])
def test_longer_input_than_built_is_refused(name):
    m = build(name, 20, shape1=4, shape2=5) if name == "axial-pe" else build(name, 20)
    with pytest.raises(ValueError):
        m(torch.zeros(1, 21, H * D))
