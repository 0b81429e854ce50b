"""Blocks sized by the byte budget (issue 18) for the kernel mechanisms `linear`, `performer`, `cosformer`.

- (the op bound with GPU-sized blocks is the contract's ``test_ops_per_call_do_not_grow_with_n``)
- the predicted peak at N = 16,384 (64 MiB CPU budget) is the output plus at most the budget and the O(F·D)
  states: the row costs the mechanisms state are upper bounds of what a block keeps alive;
- one block of many chunks (the causal prefixes by one cumulative sum; the Performer's two-level prefix with
  more groups than chunks per group, huge keys planted) equals reference() in float64, with and without
  autograd.
"""

from __future__ import annotations

import pytest
import torch

import mechanisms
from effbench.cases import Case
from effbench.runner import predict
from mechanisms import _budget, _prefix
from mechanisms.performer import chunk_group

pytestmark = pytest.mark.usefixtures("one_thread")

KERNELS = [(name, causal) for name in ("linear", "performer", "cosformer") for causal in (False, True)]
IDS = [f"{name}-{'causal' if causal else 'bidir'}" for name, causal in KERNELS]


@pytest.mark.parametrize("name,causal", KERNELS, ids=IDS)
def test_peak_is_output_plus_at_most_the_budget(name, causal):
    n, b, h, d = 16384, 1, 8, 64
    pred = predict(Case(mechanism=name, n=n, batch=b, heads=h, head_dim=d, causal=causal))
    assert pred.error is None, pred.error
    output = b * h * n * d * 4
    states = 2 * b * h * 256 * (d + 1) * 4  # the key state and the carried state, F <= 256
    assert pred.predicted_bytes <= output + _budget.CPU_TEMP_BYTES + states, pred.predicted_bytes - output


def _plant(k: torch.Tensor) -> torch.Tensor:
    k = k.clone()
    for pos in (5, 200, 201, 611):
        k[:, :, pos] *= 40.0  # the prefix max jumps by hundreds (base 2) inside a block
    return k


@pytest.mark.parametrize("name,knobs", [("linear", {"chunk": 4}), ("cosformer", {"chunk": 4}),
                                        ("performer", {"features": 16, "chunk": 4})])
def test_one_block_of_many_chunks_equals_reference(name, knobs, monkeypatch):
    """N = 701 in one block of 176 chunks of 4; the Performer groups them by t = 8 (22 groups > t)."""
    n = 701
    monkeypatch.setattr(_prefix, "BLOCK_ELEMENTS", 1 << 24)
    assert chunk_group(176) == 8
    spec = mechanisms.get(name)
    m = spec.build(head_dim=8, heads=2, n=n, causal=True, seed=0, **knobs).double()
    q, k, v = spec.make_inputs(batch=2, heads=2, n=n, head_dim=8, dtype=torch.float64, seed=3, knobs={})
    k = _plant(k) if name == "performer" else k
    with torch.no_grad():
        ref = m.reference(q, k, v)
        torch.testing.assert_close(m(q, k, v), ref, atol=1e-12, rtol=0)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(m(qg, kg, vg), (qg, kg, vg), up)
    want = torch.autograd.grad(m.reference(qg, kg, vg), (qg, kg, vg), up)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
