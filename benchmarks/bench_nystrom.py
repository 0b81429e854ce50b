"""Nyströmformer side by side with nystrom-attention (lucidrains), its attention core on the same q, k, v.

    python benchmarks/bench_nystrom.py --threads 1          # N=16384 table, N=1K..16K curve, outputs below
    python benchmarks/bench_nystrom.py --n 4096 --rounds 3 --curve "" --out-dir /tmp/ny   # quick look, no figure

B=1, H=8, D=64, m=256 landmarks, 6 pinv iterations, float32, forward under torch.no_grad() on the CPU. Rows:

- ours: effbench's `nystromformer` on q, k, v (B, H, N, D);
- nystrom-attention core: `NystromAttention(dim=H·D, dim_head=D, heads=H, num_landmarks=m, pinv_iterations=6,
  residual=False)` with its ``to_qkv`` replaced by a module that returns the prepared (B, N, 3·H·D) tensor of the
  same q, k, v (the layout its projection returns; zero-padded at the front when N is not a multiple of m, as
  its padded x would project) and ``to_out`` by the identity. So its own forward runs unchanged from the split
  into heads to the merge of heads, and the projections and the depthwise-conv residual (both absent from
  ours) are not timed at all: the core math is timed, nothing is subtracted.

Timing: the candidates run in interleaved rounds (one call of each per round, after one warm-up call each), so
load on the shared machine hits both alike; median, IQR and min over rounds of one call each
(effbench.measure.timing.time_cpu: perf_counter, no hidden warm-ups), and the median process CPU time of a call
(all threads). Memory: peak live tensor storage during one call (effbench.measure.memory.tracked_peak; inputs
made before the call are not counted, nor a C++ kernel's private scratch).

Outputs compared where the two are the same computation (N a multiple of m, B·H = 1 so its global-max Z₀ is
our per-matrix one) and where they differ by design (H = 8: its Z₀ scale is shared by the heads; N = 1000,
m = 64: it pads 24 zero positions at the front, with or without its mask), each against dense attention.

Writes results/benchmarks/nystrom.md (tables), nystrom.csv (every timed row) and nystrom.png (time and
memory against N, log-log).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import mechanisms
from effbench.measure.memory import tracked_peak
from effbench.measure.timing import time_cpu

MIB = 1024 ** 2
OURS, PEER = "ours nystromformer", "nystrom-attention core"


class Prepared(torch.nn.Module):
    """Stands in for ``to_qkv``: returns the prepared (B, N, 3·H·D) tensor, zero-padded at the front to the
    padded length of x (a bias-free projection of the zero rows the peer pads x with)."""

    def __init__(self, qkv: torch.Tensor):
        super().__init__()
        self.qkv = qkv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = x.shape[1] - self.qkv.shape[1]
        return F.pad(self.qkv, (0, 0, pad, 0)) if pad else self.qkv


def peer_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: int, iters: int,
              mask: bool = False) -> Callable[[], torch.Tensor]:
    """nystrom-attention's forward on our q, k, v (B, H, N, D): a call returning (B, H, N, D)."""
    from nystrom_attention import NystromAttention

    b, h, n, d = q.shape
    peer = NystromAttention(dim=h * d, dim_head=d, heads=h, num_landmarks=m, pinv_iterations=iters, residual=False)
    peer.to_qkv = Prepared(torch.cat([t.transpose(1, 2).reshape(b, n, h * d) for t in (q, k, v)], dim=-1))
    peer.to_out = torch.nn.Identity()
    x = torch.zeros(b, n, 1)  # only its length is read (and padded)
    keep = torch.ones(b, n, dtype=torch.bool) if mask else None

    def call() -> torch.Tensor:
        return peer(x, mask=keep).view(b, n, h, d).transpose(1, 2)  # (B, H, N, D) view

    return call


def ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: int, iters: int) -> Callable[[], torch.Tensor]:
    _, h, n, d = q.shape
    module = mechanisms.get("nystromformer").build(head_dim=d, heads=h, n=n, landmarks=m, pinv_iters=iters)
    return lambda: module(q, k, v)


def inputs(b: int, h: int, n: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen) for _ in range(3)]  # (B, H, N, D) each


@dataclass
class Timed:
    label: str
    n: int
    fn: Callable[[], object]
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per call (all threads)
    peak: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def iqr(self) -> float:
        if len(self.times) < 2:
            return 0.0
        qs = statistics.quantiles(self.times, n=4)
        return qs[2] - qs[0]


def run(cands: list[Timed], rounds: int, warmup: int) -> None:
    with torch.no_grad():
        for c in cands:
            for _ in range(warmup):
                c.fn()
        for _ in range(rounds):
            for c in cands:
                start = time.process_time()
                c.times.append(time_cpu(c.fn, warmup=0, repeats=1).samples_ms[0] / 1e3)  # one call
                c.cpu.append(time.process_time() - start)
        for c in cands:
            c.peak, _ = tracked_peak(c.fn)


def timed_pair(args, n: int, rounds: int) -> list[Timed]:
    q, k, v = inputs(args.batch, args.heads, n, args.head_dim)
    cands = [Timed(OURS, n, ours(q, k, v, args.landmarks, args.iters)),
             Timed(PEER, n, peer_core(q, k, v, args.landmarks, args.iters))]
    run(cands, rounds, args.warmup)
    return cands


def rel(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> float:
    """‖a − b‖/‖v‖ (verify's fidelity error), in float64."""
    return float((a.double() - b.double()).norm() / v.double().norm())


def compare(args) -> list[dict]:
    """Ours against the peer (and both against dense) in the settings that are, or are not, one computation."""
    rows = []
    settings = [
        (f"same computation: N={args.n}, m={args.landmarks}, H=1", 1, args.n, args.landmarks, False),
        (f"Z₀ scale shared by heads: N={args.n}, m={args.landmarks}, H={args.heads}", args.heads, args.n,
         args.landmarks, False),
        ("padding, no mask: N=1000, m=64, H=8 (24 zero positions in front)", args.heads, 1000, 64, False),
        ("padding, its mask: N=1000, m=64, H=8", args.heads, 1000, 64, True),
    ]
    with torch.no_grad():
        for label, h, n, m, mask in settings:
            q, k, v = inputs(args.batch, h, n, args.head_dim, seed=1)
            a = ours(q, k, v, m, args.iters)()
            b = peer_core(q, k, v, m, args.iters, mask=mask)()
            row = {"setting": label, "max_abs_diff": float((a - b).abs().max()), "rel_diff": rel(a, b, v)}
            if n <= args.dense_max_n:  # SDPA streams: no N×N tensor, only N² work
                dense = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
                row["ours_vs_dense"], row["peer_vs_dense"] = rel(a, dense, v), rel(b, dense, v)
            rows.append(row)
    return rows


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


def write_outputs(args, main: list[Timed], curve: list[Timed], comparisons: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = (f"B={args.batch} H={args.heads} D={args.head_dim} m={args.landmarks} pinv_iters={args.iters} "
           f"float32 forward (no_grad), CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    load = "load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
    with open(out / "nystrom.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["impl", "n", "batch", "heads", "head_dim", "landmarks", "pinv_iters", "threads", "rounds",
                    "median_ms", "iqr_ms", "min_ms", "cpu_median_ms", "peak_mib"])
        for c in main + [c for c in curve if all(c is not x for x in main)]:
            w.writerow([c.label, c.n, args.batch, args.heads, args.head_dim, args.landmarks, args.iters,
                        torch.get_num_threads(), len(c.times), f"{c.median * 1e3:.2f}", f"{c.iqr * 1e3:.2f}",
                        f"{min(c.times) * 1e3:.2f}", f"{statistics.median(c.cpu) * 1e3:.2f}", f"{c.peak / MIB:.2f}"])
    busy = os.getloadavg()[0] > 0.75 * (os.cpu_count() or 1)
    note = (f"{os.cpu_count()} cores, busy with other jobs ({load}): wall times are inflated and noisy, process "
            "CPU time (all threads) is the steadier column." if busy else f"{os.cpu_count()} cores ({load}).")
    lines = [f"# Nyströmformer: effbench vs nystrom-attention {_peer_version()}", "", f"{env}; {note}", "",
             "nystrom-attention core = its `NystromAttention.forward` with `to_qkv` returning the prepared "
             "q, k, v (B, N, 3·H·D), `to_out` = identity, `residual=False`: projections and the residual conv "
             "are not run (timed core, nothing subtracted). Interleaved rounds; peak = tracked tensor storage "
             "during one call.", "",
             f"## N = {args.n} ({len(main[0].times)} rounds)", "",
             "| implementation | median ms | IQR ms | min ms | CPU ms (median) | peak MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for c in main:
        lines.append(f"| {c.label} | {fmt_ms(c.median)} | {fmt_ms(c.iqr)} | {fmt_ms(min(c.times))} | "
                     f"{fmt_ms(statistics.median(c.cpu))} | {c.peak / MIB:.1f} |")
    a, b = main
    lines += ["", f"ours / peer: time ×{a.median / b.median:.2f} (median), ×{min(a.times) / min(b.times):.2f} "
                  f"(min), ×{statistics.median(a.cpu) / statistics.median(b.cpu):.2f} (CPU); "
                  f"memory ×{a.peak / max(1, b.peak):.3f}.", ""]
    if curve:
        lines += [f"## Against N ({len(curve[0].times)} rounds each; N = {args.n}: the table above)", "",
                  "| N | ours ms median (min) | peer ms median (min) | ours CPU ms | peer CPU ms "
                  "| ours MiB | peer MiB |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        by_n: dict[int, dict[str, Timed]] = {}
        for c in curve:
            by_n.setdefault(c.n, {})[c.label] = c
        for n, pair in sorted(by_n.items()):
            o, r = pair[OURS], pair[PEER]
            lines.append(f"| {n} | {fmt_ms(o.median)} ({fmt_ms(min(o.times))}) | "
                         f"{fmt_ms(r.median)} ({fmt_ms(min(r.times))}) | "
                         f"{fmt_ms(statistics.median(o.cpu))} | {fmt_ms(statistics.median(r.cpu))} | "
                         f"{pair[OURS].peak / MIB:.1f} | {pair[PEER].peak / MIB:.1f} |")
        lines += ["", "Figure: nystrom.png.", ""]
    lines += ["## Outputs compared (float32; errors ‖Δ‖/‖v‖, dense = float64 softmax attention)", "",
              "| setting | max abs ours−peer | ‖ours−peer‖/‖v‖ | ours vs dense | peer vs dense |",
              "|---|---:|---:|---:|---:|"]
    for r in comparisons:
        od = f"{r['ours_vs_dense']:.3g}" if "ours_vs_dense" in r else "—"
        pd_ = f"{r['peer_vs_dense']:.3g}" if "peer_vs_dense" in r else "—"
        lines.append(f"| {r['setting']} | {r['max_abs_diff']:.2e} | {r['rel_diff']:.2e} | {od} | {pd_} |")
    (out / "nystrom.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if curve:
        figure(curve, out / "nystrom.png", env)


def _peer_version() -> str:
    try:
        from importlib.metadata import version
        return version("nystrom-attention")
    except Exception:
        return ""


def figure(curve: list[Timed], path: Path, env: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for label, marker in ((OURS, "o"), (PEER, "s")):
        pts = sorted((c.n, c.median * 1e3, min(c.times) * 1e3, c.peak / MIB) for c in curve if c.label == label)
        ns = [p[0] for p in pts]
        line, = ax_t.plot(ns, [p[1] for p in pts], marker=marker, label=f"{label} (median)")
        ax_t.plot(ns, [p[2] for p in pts], linestyle="--", linewidth=0.8, color=line.get_color(),
                  label=f"{label} (min)")
        ax_m.plot(ns, [p[3] for p in pts], marker=marker, label=label)
    for ax, title in ((ax_t, "forward wall time (ms)"), (ax_m, "peak tensor memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(env, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"figure written to {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--landmarks", type=int, default=256)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--curve", default="1024,2048,4096,8192", help="N values of the curve (besides --n); '' for none")
    p.add_argument("--curve-rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--dense-max-n", type=int, default=4096, help="largest N compared with dense attention")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent.parent / "results" / "benchmarks"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import nystrom_attention  # noqa: F401
    except ImportError as exc:
        sys.exit(f"nystrom-attention is not importable ({exc}): pip install torch=={torch.__version__.split('+')[0]} "
                 "nystrom-attention")
    main_rows = timed_pair(args, args.n, args.rounds)
    curve: list[Timed] = []
    for n in [int(s) for s in args.curve.split(",") if s.strip()]:
        curve += timed_pair(args, n, args.curve_rounds)
    if curve:
        curve += main_rows  # the main N closes the curve
    comparisons = compare(args)
    write_outputs(args, main_rows, curve, comparisons, Path(args.out_dir))


if __name__ == "__main__":
    main()
