"""Shared test helpers: a mechanism against its float64 reference; how peak memory and counted FLOPs grow with N."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from effbench.cases import Case
from effbench.measure.flops import count_flops
from effbench.measure.memory import tracked_peak
from effbench.workload import prepare


def growth(mechanism: str, ns: Sequence[int], *, knobs: dict[str, Any] | None = None, causal: bool = False,
           mode: str = "fwd", batch: int = 1, heads: int = 2, head_dim: int = 32) -> list[tuple[int, int, int]]:
    """[(n, peak tensor bytes, counted FLOPs)] for each n, measured for real on the CPU."""
    rows = []
    for n in ns:
        case = Case(mechanism=mechanism, n=n, batch=batch, heads=heads, head_dim=head_dim,
                    mode=mode, causal=causal, knobs=tuple((knobs or {}).items()))
        w = prepare(case)
        w.call()  # warm: lazy buffers are not part of the peak
        peak, _ = tracked_peak(w.call)
        flops, uncounted = count_flops(w.call)
        assert not uncounted, f"{mechanism}: FlopCounterMode cannot count {uncounted}"
        rows.append((n, peak, flops))
    return rows


def assert_linear(rows: list[tuple[int, int, int]], max_ratio: float = 2.3, flops: bool = True) -> None:
    """Each doubling of N at most ``max_ratio``× more peak memory and (with ``flops``) FLOPs. A workload
    with no matmul-like op at all (a position encoding's additions) counts 0 FLOPs at every N: nothing to grow."""
    no_flops = all(f == 0 for _, _, f in rows)
    for (n0, m0, f0), (n1, m1, f1) in zip(rows, rows[1:]):
        assert n1 == 2 * n0, "growth rows must double N"
        assert m0 > 0, f"nothing measured at n={n0}: peak={m0}"
        assert m1 / m0 <= max_ratio, f"memory ×{m1 / m0:.2f} from n={n0} to {n1} ({m0} -> {m1} bytes)"
        if flops and not no_flops:
            assert f0 > 0, f"no FLOPs counted at n={n0}"
            assert f1 / f0 <= max_ratio, f"FLOPs ×{f1 / f0:.2f} from n={n0} to {n1} ({f0} -> {f1})"


def assert_matches_reference(m32, m64, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, atol: float = 1e-5):
    """forward of the float32 module ``m32`` equals ``m64.reference`` in float64 to ``atol`` (and m64's own forward
    to 1e-10), and so do the gradients for a fixed upstream gradient. q, k, v (B, H, N, D) float32 leaves with
    requires_grad. Returns the float32 and float64 gradients (None where an input is unused, e.g. shared-QK k)."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = m32(q, k, v)
    ref = m64.reference(q64, k64, v64)
    assert out.shape == q.shape[:-1] + v.shape[-1:]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
    torch.testing.assert_close(m64(q64, k64, v64), ref, atol=1e-10, rtol=0)

    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(out, (q, k, v), g, allow_unused=True)
    refs = torch.autograd.grad(ref, (q64, k64, v64), g.double(), allow_unused=True)
    for got, want in zip(grads, refs):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)
    return grads, refs


def cli_fails(args: Sequence[str], *needles: str) -> str:
    """``effbench ARGS`` exits 2 with one clean message (no traceback) holding every needle; the message, one line."""
    from typer.testing import CliRunner

    from effbench.cli import app

    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert "Traceback" not in r.output
    text = " ".join(r.output.split())
    for needle in needles:
        assert needle in text, text
    return text
