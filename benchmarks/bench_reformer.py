"""Side-by-side forward speed and memory: effbench `reformer` against public LSH attention implementations.

Run with the peers venv (it has reformer-pytorch and transformers; torch is the same version):

    python benchmarks/bench_reformer.py
    PYTHONPATH=. python benchmarks/bench_reformer.py --n 4096 --rounds 1 --repeats 3   # quick look

Rows (B=1, H=8, D=64, fp32, forward under no_grad, bucket = chunk length c = 64):

- ``effbench reformer``: our mechanism on (B, H, N, D) inputs, default buckets: HuggingFace's count
  (2N/c rounded down to a power of two, factorised when large: [16, 32] at N=16384).
- ``effbench reformer, n_b=N/c``: the same with reformer-pytorch's bucket count, one rotation of
  N/(2c) columns: the like-for-like hashing cost against reformer-pytorch.
- ``effbench reformer + proj``: our mechanism plus the two 512→512 projections (shared QK
  and V) that HuggingFace's LSHSelfAttention computes inside its forward.
- ``reformer-pytorch LSHAttention``: lucidrains' attention core on (B·H, N, D), n_b = N/c.
- ``HF LSHSelfAttention``: HuggingFace transformers, hidden (B, N, 512) in, projections
  included; its default bucket count (2N/c rounded to a power of two and factorised when
  large: at N=16384 buckets [16, 32], 24 rotation columns).

Each repeat runs every implementation once, in turn (interleaved, so load on the shared
machine hits all alike); we report the median and IQR of the wall-clock repeats and the
median process CPU time (all threads; on a busy machine the steadier of the two). Memory is the peak of
live tensor storage allocated during one call (effbench.measure.memory.tracked_peak):
inputs and parameters made before the call are not counted, nor are a C++ kernel's
private scratch buffers.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Callable

import torch

import mechanisms
from effbench.measure.memory import tracked_peak


def _peers_available() -> tuple[bool, bool]:
    try:
        import reformer_pytorch  # noqa: F401
        lucid = True
    except ImportError:
        lucid = False
    try:
        from transformers.models.reformer.modeling_reformer import LSHSelfAttention  # noqa: F401
        hf = True
    except ImportError:
        hf = False
    return lucid, hf


def build_calls(n: int, rounds: int, heads: int, head_dim: int, bucket: int, seed: int) -> dict[str, Callable[[], object]]:
    """name -> zero-argument forward call, everything built and inputs made beforehand."""
    calls: dict[str, Callable[[], object]] = {}
    spec = mechanisms.get("reformer")
    q, k, v = spec.make_inputs(batch=1, heads=heads, n=n, head_dim=head_dim, dtype=torch.float32, seed=seed)

    ours = spec.build(head_dim=head_dim, heads=heads, n=n, causal=False, seed=seed, rounds=rounds, bucket=bucket)
    calls["effbench reformer"] = lambda: ours(q, k, v)
    ours_half = spec.build(head_dim=head_dim, heads=heads, n=n, causal=False, seed=seed, rounds=rounds,
                           bucket=bucket, buckets=max(2, 2 * (n // bucket // 2)))
    calls["effbench reformer, n_b=N/c"] = lambda: ours_half(q, k, v)

    hidden = heads * head_dim
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, hidden, generator=g)
    proj_qk = torch.nn.Linear(hidden, hidden, bias=False)
    proj_v = torch.nn.Linear(hidden, hidden, bias=False)

    def ours_with_proj():
        qk = proj_qk(x).view(1, n, heads, head_dim).transpose(1, 2)  # (B, H, N, D)
        vv = proj_v(x).view(1, n, heads, head_dim).transpose(1, 2)
        return ours(qk, qk, vv).transpose(1, 2).reshape(1, n, hidden)

    calls["effbench reformer + proj"] = ours_with_proj

    lucid, hf = _peers_available()
    if lucid:
        from reformer_pytorch import LSHAttention
        lsh = LSHAttention(bucket_size=bucket, n_hashes=rounds, causal=False).eval()
        qk_l = q.reshape(heads, n, head_dim)  # (B·H, N, D)
        v_l = v.reshape(heads, n, head_dim)
        calls["reformer-pytorch LSHAttention"] = lambda: lsh(qk_l, v_l)[0]
    if hf:
        from transformers import ReformerConfig
        from transformers.utils import logging as hf_logging
        from transformers.models.reformer.modeling_reformer import LSHSelfAttention
        hf_logging.set_verbosity_error()
        cfg = ReformerConfig(hidden_size=hidden, num_attention_heads=heads, attention_head_size=head_dim,
                             num_hashes=rounds, lsh_attn_chunk_length=bucket, attn_layers=["lsh"],
                             lsh_attention_probs_dropout_prob=0.0, hash_seed=seed, is_decoder=False)
        hf_attn = LSHSelfAttention(cfg).eval()
        calls["HF LSHSelfAttention (incl. proj)"] = lambda: hf_attn(x).hidden_states
    return calls


def measure(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    out: dict[str, dict] = {name: {"times": [], "cpu": []} for name in calls}
    with torch.no_grad():
        for fn in calls.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in calls.items():
                gc.collect()
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                out[name]["times"].append(time.perf_counter() - t0)
                out[name]["cpu"].append(time.process_time() - c0)
        for name, fn in calls.items():  # memory in a separate pass
            out[name]["peak"], _ = tracked_peak(fn)
    for row in out.values():
        ts = sorted(row["times"])
        row["median_ms"] = statistics.median(ts) * 1e3
        qs = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        row["iqr_ms"] = (qs[2] - qs[0]) * 1e3
        row["cpu_ms"] = statistics.median(row["cpu"]) * 1e3
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--rounds", default="1,4", help="comma-separated hash rounds")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--bucket", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    lucid, hf = _peers_available()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, N={args.n}, B=1, H={args.heads}, "
          f"D={args.head_dim}, bucket={args.bucket}, fp32 forward; peers: reformer-pytorch={'yes' if lucid else 'missing'}, "
          f"transformers={'yes' if hf else 'missing'}")
    for rounds in [int(r) for r in args.rounds.split(",")]:
        calls = build_calls(args.n, rounds, args.heads, args.head_dim, args.bucket, args.seed)
        res = measure(calls, args.repeats)
        print(f"\nrounds={rounds}")
        print(f"  {'implementation':36s} {'median ms':>10s} {'IQR ms':>8s} {'CPU ms':>8s} {'peak MiB':>9s}")
        for name, row in res.items():
            print(f"  {name:36s} {row['median_ms']:10.1f} {row['iqr_ms']:8.1f} {row['cpu_ms']:8.0f} "
                  f"{row['peak'] / 2**20:9.1f}")
        peers = {k: v for k, v in res.items() if not k.startswith("effbench")}
        for name, row in peers.items():  # like for like: HF's bucket count and projections; lucidrains' N/c
            label = "effbench reformer + proj" if "HF" in name else "effbench reformer, n_b=N/c"
            mine = res[label]
            print(f"  {label} vs {name}: {mine['median_ms'] / row['median_ms']:.2f}x time, "
                  f"{mine['peak'] / max(1, row['peak']):.2f}x memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
