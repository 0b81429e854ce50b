"""Kernel and low-rank attention side by side with public implementations (issue 4).

    python benchmarks/bench_kernel.py            # N=16384
    python benchmarks/bench_kernel.py --n 4096 --rounds 5

B=1, H=8, D=64, float32, forward under torch.no_grad() on the CPU. Rows:

- ours: effbench's `linear` (bidirectional and causal), `performer` (m=256), `linformer` (k=256);
- fast-transformers LinearAttention / CausalLinearAttention, if the package is importable;
  otherwise the same formula written with einsum as fast-transformers does (labelled so);
- performer-pytorch FastAttention(nb_features=256) (bidirectional; its causal CPU fallback with --causal-peers);
- lucidrains linformer LinformerSelfAttention(dim=512, k=256, heads=8) on x (1, N, 512), which
  includes its to_q/to_k/to_v/to_out projections, and those projections alone, so that
  "attention part = full − projections" can be set against ours (which has no projections).

Timing: all candidates run in interleaved rounds (one call of each per round) so that a
noisy machine slows them alike; median, IQR and min over rounds via
torch.utils.benchmark.Timer. Memory (a separate pass): peak live tensor storage during one
call, from effbench.measure.memory.tracked_peak (a C++ kernel's private scratch is not seen).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils import benchmark as tb

import mechanisms
from effbench.measure.memory import tracked_peak

MIB = 1024 ** 2


@dataclass
class Candidate:
    label: str
    group: str
    fn: Callable[[], object]
    times: list[float] = field(default_factory=list)
    peak: int | None = None
    note: str = ""


def einsum_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fast-transformers' LinearAttention formula written out (layout (B, N, H, D)): φ = elu + 1."""
    fq = torch.nn.functional.elu(q) + 1
    fk = torch.nn.functional.elu(k) + 1
    kv = torch.einsum("nshd,nshm->nhmd", fk, v)
    z = 1 / (torch.einsum("nlhd,nhd->nlh", fq, fk.sum(dim=1)) + eps)
    return torch.einsum("nlhd,nhmd,nlh->nlhm", fq, kv, z)


def build(args: argparse.Namespace) -> list[Candidate]:
    b, h, n, d = args.batch, args.heads, args.n, args.head_dim
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))  # (B, H, N, D)
    out: list[Candidate] = []

    def ours(name: str, causal: bool, **knobs) -> Callable[[], object]:
        m = mechanisms.get(name).build(head_dim=d, heads=h, n=n, causal=causal, seed=0, **knobs)
        return lambda: m(q, k, v)

    want = set(args.only.split(",")) if args.only else {"linear", "performer", "linformer"}

    if "linear" in want:
        out.append(Candidate("ours linear", "linear", ours("linear", False)))
        out.append(Candidate("ours linear causal", "linear causal", ours("linear", True)))
        try:
            from fast_transformers.attention import CausalLinearAttention, LinearAttention
            from fast_transformers.masking import LengthMask, TriangularCausalMask
            qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, N, H, D)
            lengths = LengthMask(torch.full((b,), n, dtype=torch.long))
            full = LinearAttention(d)
            causal_la = CausalLinearAttention(d)
            out.append(Candidate("fast-transformers LinearAttention", "linear",
                                 lambda: full(qt, kt, vt, None, lengths, lengths)))
            tri = TriangularCausalMask(n)
            out.append(Candidate("fast-transformers CausalLinearAttention", "linear causal",
                                 lambda: causal_la(qt, kt, vt, tri, lengths, lengths)))
        except ImportError as exc:
            qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, N, H, D)
            out.append(Candidate("einsum formula (fast-transformers' math)", "linear",
                                 lambda: einsum_linear_attention(qt, kt, vt),
                                 note=f"pytorch-fast-transformers not importable ({exc.__class__.__name__}); "
                                      "its LinearAttention formula re-typed with einsum"))

    if "performer" in want:
        out.append(Candidate(f"ours performer m={args.features}", "performer",
                             ours("performer", False, features=args.features)))
        out.append(Candidate(f"ours performer causal m={args.features}", "performer causal",
                             ours("performer", True, features=args.features)))
        try:
            from performer_pytorch import FastAttention
            torch.manual_seed(0)
            fa = FastAttention(dim_heads=d, nb_features=args.features, causal=False)
            out.append(Candidate(f"performer-pytorch FastAttention m={args.features}", "performer",
                                 lambda: fa(q, k, v)))
            if args.causal_peers:
                fac = FastAttention(dim_heads=d, nb_features=args.features, causal=True)
                out.append(Candidate(f"performer-pytorch causal (CPU fallback) m={args.features}",
                                     "performer causal", lambda: fac(q, k, v)))
        except ImportError as exc:
            print(f"performer-pytorch not importable: {exc}", file=sys.stderr)

    if "linformer" in want:
        out.append(Candidate(f"ours linformer k={args.rank}", "linformer", ours("linformer", False, rank=args.rank)))
        try:
            from linformer import LinformerSelfAttention
            torch.manual_seed(0)
            lf = LinformerSelfAttention(dim=h * d, seq_len=n, k=args.rank, heads=h)
            x = torch.randn(b, n, h * d, generator=gen)  # (B, N, H·D)

            def projections_only():
                lf.to_q(x), lf.to_k(x), lf.to_v(x)
                return lf.to_out(x)

            out.append(Candidate(f"linformer LinformerSelfAttention k={args.rank} (incl. projections)",
                                 "linformer", lambda: lf(x)))
            out.append(Candidate("linformer projections alone (to_q, to_k, to_v, to_out)", "linformer",
                                 projections_only))
        except ImportError as exc:
            print(f"linformer not importable: {exc}", file=sys.stderr)
    return out


def run(cands: list[Candidate], rounds: int, warmup: int) -> None:
    with torch.no_grad():
        for c in cands:
            for _ in range(warmup):
                c.fn()
        for _ in range(rounds):
            for c in cands:
                timer = tb.Timer("fn()", globals={"fn": c.fn}, num_threads=torch.get_num_threads())
                c.times.append(timer.timeit(1).median)
        for c in cands:
            c.peak, _ = tracked_peak(c.fn)


def _median(c: Candidate) -> float:
    return statistics.median(c.times)


def report(cands: list[Candidate], args: argparse.Namespace) -> None:
    print(f"\nB={args.batch} H={args.heads} N={args.n} D={args.head_dim} float32 forward, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.rounds} interleaved rounds\n")
    print(f"{'candidate':66s} {'median ms':>10s} {'IQR ms':>8s} {'min ms':>8s} {'peak MiB':>9s}")
    groups: dict[str, list[Candidate]] = {}
    for c in cands:
        groups.setdefault(c.group, []).append(c)
    for group, items in groups.items():
        print(f"-- {group}")
        for c in items:
            qs = statistics.quantiles(c.times, n=4) if len(c.times) >= 2 else [c.times[0]] * 3
            print(f"{c.label:66s} {_median(c) * 1e3:10.1f} {(qs[2] - qs[0]) * 1e3:8.1f} "
                  f"{min(c.times) * 1e3:8.1f} {c.peak / MIB:9.1f}")
            if c.note:
                print(f"   note: {c.note}")
        ours = [c for c in items if c.label.startswith("ours")]
        peers = [c for c in items if not c.label.startswith("ours") and "projections alone" not in c.label]
        for mine in ours:
            for peer in peers:
                print(f"   {mine.label} vs {peer.label}: time ×{_median(mine) / _median(peer):.2f} (median), "
                      f"×{min(mine.times) / min(peer.times):.2f} (min); memory ×{mine.peak / max(1, peer.peak):.2f}")
        full = [c for c in items if "incl. projections" in c.label]
        proj = [c for c in items if "projections alone" in c.label]
        if ours and full and proj:
            part = _median(full[0]) - _median(proj[0])
            part_min = min(full[0].times) - min(proj[0].times)
            print(f"   linformer's attention part (full − projections): {part * 1e3:.1f} ms median, "
                  f"{part_min * 1e3:.1f} ms min; ours {_median(ours[0]) * 1e3:.1f} ms median, "
                  f"{min(ours[0].times) * 1e3:.1f} ms min")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated subset of linear,performer,linformer")
    p.add_argument("--causal-peers", action="store_true",
                   help="also time performer-pytorch's causal CPU fallback (slow, memory hungry)")
    args = p.parse_args(argv)
    cands = build(args)
    run(cands, args.rounds, args.warmup)
    report(cands, args)


if __name__ == "__main__":
    main()
