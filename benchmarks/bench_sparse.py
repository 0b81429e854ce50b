"""Side by side: effbench's sparse-pattern mechanisms against public implementations.

Forward pass, fp32, B=1, H=8, D=64, N=16,384 (the sizes of issue 3), no autograd:

- ``local`` (W=256, 513 keys per row) against lucidrains ``local-attention`` (exact window),
  HuggingFace ``LongformerSelfAttention`` without globals (it includes the Q/K/V projections,
  timed separately so they can be subtracted), ``pytorch-fast-transformers``'s local kernel
  when it is installed, and compiled ``flex_attention`` called directly with a
  ``create_block_mask`` sliding-window mask ("raw FlexAttention");
- ``longformer`` (W=256, 16 globals) against HF ``LongformerSelfAttention`` with 16 global tokens;
- ``bigbird`` (b=64, r=3) against HF ``BigBirdBlockSparseAttention`` (incl. projections);
- ``dilated`` (W=256, δ=2), no public peer.

Time: ``torch.utils.benchmark.Timer.blocked_autorange`` in several interleaved rounds
(implementations alternate, so drift from other load on the machine hits all alike), merged:
median and IQR over all blocks. Memory: peak live tensor storage during one call
(``effbench.measure.memory.tracked_peak``; a fused kernel's private scratch space is
invisible to it; compiled code cannot run under its dispatch mode — dynamo falls back to
the unfused path and the compiled function is left unusable — hence "n/a" for raw
FlexAttention, while effbench's impl=flex wraps the compiled call in an opaque custom op) and the process's peak-RSS growth during one call (``rss_pass``; allocator
reuse makes this a lower bound).

Run with the peers venv (it has the public packages)::

    python benchmarks/bench_sparse.py
    python benchmarks/bench_sparse.py --only local --rounds 5

Implementations that are not installed are reported and skipped. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils import benchmark

import mechanisms
from effbench.measure.memory import rss_pass, tracked_peak

MiB = 2 ** 20


@dataclass
class Impl:
    name: str
    group: str
    fn: Callable[[], object]
    build_s: float
    note: str = ""
    eager: bool = True  # plain PyTorch (not compiled)
    trackable: bool = True  # can run under the storage tracker (a TorchDispatchMode)
    measurements: list = field(default_factory=list)
    peak: int | None = None
    rss: int | None = None


def _inputs(n: int, heads: int, head_dim: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    spec = mechanisms.get("local")
    return spec.make_inputs(batch=1, heads=heads, n=n, head_dim=head_dim, dtype=torch.float32, seed=seed)


def _timed_build(make: Callable[[], Callable[[], object]]) -> tuple[Callable[[], object], float]:
    t0 = time.perf_counter()
    fn = make()
    return fn, time.perf_counter() - t0


# ----------------------------------------------------------------------------- builders

def ours(name: str, qkv, *, n: int, heads: int, head_dim: int, **knobs) -> Callable[[], object]:
    spec = mechanisms.get(name)
    module = spec.build(head_dim=head_dim, heads=heads, n=n, causal=False, seed=0, **knobs)
    q, k, v = qkv
    fn = lambda: module(q, k, v)  # noqa: E731
    fn.module = module
    return fn


def lucid_local(qkv, *, window: int) -> Callable[[], object]:
    from local_attention import LocalAttention

    attn = LocalAttention(window_size=window, causal=False, look_backward=1, look_forward=1,
                          exact_windowsize=True, use_rotary_pos_emb=False, autopad=True)
    q, k, v = qkv
    return lambda: attn(q, k, v)


def fast_transformers_local(qkv, *, window: int) -> Callable[[], object]:
    from fast_transformers.attention import LocalAttention  # noqa: F401  (import error -> skipped)
    from fast_transformers.masking import FullMask, LengthMask

    q, k, v = (t.transpose(1, 2).contiguous() for t in qkv)  # (B, N, H, D)
    b, n = q.shape[:2]
    attn = LocalAttention(local_context=2 * window + 1)
    mask, lengths = FullMask(n, n), LengthMask(torch.full((b,), n, dtype=torch.long))
    return lambda: attn(q, k, v, mask, lengths, lengths)


def hf_longformer(x: torch.Tensor, *, heads: int, window: int, globals_: int, identity: bool = False):
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    hidden = x.shape[-1]
    cfg = LongformerConfig(hidden_size=hidden, num_attention_heads=heads, attention_window=[2 * window],
                           attention_probs_dropout_prob=0.0)
    layer = LongformerSelfAttention(cfg, layer_id=0).eval()
    if identity:  # projections = identity so the output can be compared with ours on q = k = v
        with torch.no_grad():
            for lin in (layer.query, layer.key, layer.value, layer.query_global, layer.key_global, layer.value_global):
                lin.weight.copy_(torch.eye(hidden))
                lin.bias.zero_()
    n = x.shape[1]
    mask = torch.zeros(1, n)
    mask[:, :globals_] = 10000.0  # HF convention inside the layer: 0 local, +10000 global, -10000 padding
    kwargs = dict(attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                  is_global_attn=globals_ > 0)
    return lambda: layer(x, **kwargs)[0]


def hf_projections(x: torch.Tensor, *, count: int = 3) -> Callable[[], object]:
    lins = [torch.nn.Linear(x.shape[-1], x.shape[-1]) for _ in range(count)]
    return lambda: [lin(x) for lin in lins]


def hf_bigbird(x: torch.Tensor, *, heads: int, block: int, random_blocks: int) -> Callable[[], object]:
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel

    cfg = BigBirdConfig(hidden_size=x.shape[-1], num_attention_heads=heads, attention_type="block_sparse",
                        block_size=block, num_random_blocks=random_blocks, max_position_embeddings=x.shape[1])
    layer = BigBirdBlockSparseAttention(cfg, seed=0).eval()
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
        torch.ones(1, x.shape[1]), block)
    return lambda: layer(x, band_mask=band, from_mask=from_mask, to_mask=to_mask, from_blocked_mask=blocked,
                         to_blocked_mask=blocked)[0]


def raw_flex_local(qkv, *, window: int) -> Callable[[], object]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v = qkv
    n = q.shape[-2]
    block_mask = create_block_mask(lambda b, h, i, j: (i - j).abs() <= window, None, None, n, n, device="cpu")
    compiled = torch.compile(flex_attention, dynamic=False)
    fn = lambda: compiled(q, k, v, block_mask=block_mask)  # noqa: E731
    with torch.no_grad():
        fn()  # compile now
    return fn


# ---------------------------------------------------------------------------- measuring

def measure(impls: list[Impl], *, rounds: int, min_run_time: float) -> None:
    with torch.no_grad():
        for impl in impls:
            impl.fn()  # warm
            impl.fn()
        for _ in range(rounds):
            for impl in impls:
                t = benchmark.Timer("fn()", globals={"fn": impl.fn}, label=impl.group, sub_label=impl.name)
                impl.measurements.append(t.blocked_autorange(min_run_time=min_run_time))
        for impl in impls:
            gc.collect()
            impl.rss, _ = rss_pass(impl.fn)
            if impl.trackable:
                impl.peak, _ = tracked_peak(impl.fn)


def stats(impl: Impl) -> tuple[float, float]:
    times = [t for m in impl.measurements for t in m.times]
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times) * 1e3, (q[2] - q[0]) * 1e3


def fmt_mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / MiB:8.1f}"


def report(title: str, impls: list[Impl]) -> None:
    print(f"\n## {title}\n")
    print(f"| {'implementation':50s} | time ms (median) | IQR ms   | peak tensors MiB | peak RSS +MiB | build s | note")
    print(f"|{'-' * 52}|------------------|----------|------------------|---------------|---------|-----")
    for impl in impls:
        med, iqr = stats(impl)
        flag = " !" if iqr > 0.25 * med else "  "
        print(f"| {impl.name:50s} | {med:16.1f} | {iqr:6.1f}{flag} | {fmt_mib(impl.peak):>16s} | "
              f"{fmt_mib(impl.rss):>13s} | {impl.build_s:7.1f} | {impl.note}")


def add(impls: list[Impl], name: str, group: str, make: Callable[[], Callable[[], object]], *, note: str = "",
        eager: bool = True, trackable: bool = True) -> Impl | None:
    try:
        fn, build_s = _timed_build(make)
    except ImportError as exc:
        print(f"- skipped {name}: not installed ({exc})")
        return None
    except Exception as exc:  # a peer that fails to build is reported, not fatal
        print(f"- skipped {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return None
    impl = Impl(name, group, fn, build_s, note, eager, trackable)
    impls.append(impl)
    return impl


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# --------------------------------------------------------------------------------- main

def section_local(args) -> None:
    n, heads, d, w = args.n, args.heads, args.head_dim, args.window
    qkv = _inputs(n, heads, d)
    x = qkv[0].transpose(1, 2).reshape(1, n, heads * d).contiguous()  # (B, N, H·D) for HF
    impls: list[Impl] = []
    e = add(impls, f"effbench local eager (W={w})", "local", lambda: ours("local", qkv, n=n, heads=heads, head_dim=d,
                                                                          window=w, impl="eager"))
    f = add(impls, f"effbench local impl=flex (W={w})", "local",
            lambda: ours("local", qkv, n=n, heads=heads, head_dim=d, window=w, impl="flex"), eager=False)
    raw = add(impls, "raw FlexAttention (compiled, create_block_mask)", "local",
              lambda: raw_flex_local(qkv, window=w), eager=False, trackable=False,
              note="compiled code cannot run under the tracker's dispatch mode")
    lucid = add(impls, "lucidrains local-attention 1.11 (exact window)", "local",
                lambda: lucid_local(qkv, window=w))
    add(impls, "fast-transformers LocalAttention", "local", lambda: fast_transformers_local(qkv, window=w))
    hf = add(impls, "HF LongformerSelfAttention (incl. projections)", "local",
             lambda: hf_longformer(x, heads=heads, window=w, globals_=0))
    proj = add(impls, "  (its Q/K/V projections alone)", "local", lambda: hf_projections(x))

    with torch.no_grad():
        if e is not None:
            ref = e.fn()
            if lucid is not None:
                print(f"- max |ours − lucidrains| = {max_diff(ref, lucid.fn()):.2e}")
            if f is not None:
                print(f"- max |ours eager − ours flex| = {max_diff(ref, f.fn()):.2e}")
            if raw is not None:
                print(f"- max |ours − raw flex| = {max_diff(ref, raw.fn()):.2e}")
            hf_id = hf_longformer(x, heads=heads, window=w, globals_=0, identity=True)
            xq = x.view(1, n, heads, d).transpose(1, 2)
            mine = mechanisms.get("local").build(head_dim=d, heads=heads, n=n, causal=False, window=w)(xq, xq, xq)
            print(f"- max |ours − HF Longformer (identity projections, q=k=v)| = "
                  f"{max_diff(mine, hf_id().view(1, n, heads, d).transpose(1, 2)):.2e}")
    measure(impls, rounds=args.rounds, min_run_time=args.min_run_time)
    report(f"local: N={n}, W={w} ({2 * w + 1} keys), B=1, H={heads}, D={d}, fp32, forward", impls)

    if e is not None:
        peers = [i for i in impls if i.eager and i not in (e, proj) and not i.name.startswith("effbench")]
        if peers:
            best_t = min(peers, key=lambda i: stats(i)[0])
            best_m = min((i for i in peers if i.peak is not None), key=lambda i: i.peak, default=None)
            print(f"\n- eager local vs the fastest eager peer ({best_t.name}): "
                  f"{stats(e)[0] / stats(best_t)[0]:.2f}× its time (goal <= 0.8×)")
            if best_m is not None and e.peak is not None:
                print(f"- eager local vs the leanest eager peer ({best_m.name}): "
                      f"{e.peak / best_m.peak:.2f}× its peak tensor memory (goal <= 0.6×)")
            if hf is not None and proj is not None:
                print(f"- HF Longformer minus its projections ≈ {stats(hf)[0] - stats(proj)[0]:.0f} ms")
        if f is not None and raw is not None:
            print(f"- impl=flex vs raw FlexAttention: {stats(f)[0] / stats(raw)[0]:.2f}× its time (goal <= 1.2×)")
        if f is not None:
            print(f"- impl=flex build: {f.fn.module.build_info()}")


def section_others(args) -> None:
    n, heads, d, w = args.n, args.heads, args.head_dim, args.window
    qkv = _inputs(n, heads, d)
    x = qkv[0].transpose(1, 2).reshape(1, n, heads * d).contiguous()
    g, b, r = args.globals, args.block, args.random_blocks

    impls: list[Impl] = []
    add(impls, f"effbench longformer eager (W={w}, g={g})", "longformer",
        lambda: ours("longformer", qkv, n=n, heads=heads, head_dim=d, window=w, globals=g))
    add(impls, f"effbench longformer impl=flex (W={w}, g={g})", "longformer",
        lambda: ours("longformer", qkv, n=n, heads=heads, head_dim=d, window=w, globals=g, impl="flex"), eager=False)
    add(impls, f"HF LongformerSelfAttention, {g} globals (incl. proj)", "longformer",
        lambda: hf_longformer(x, heads=heads, window=w, globals_=g))
    add(impls, "  (its projections alone, local + global)", "longformer", lambda: hf_projections(x, count=6))
    measure(impls, rounds=args.rounds, min_run_time=args.min_run_time)
    report(f"longformer: N={n}, W={w}, {g} global positions", impls)

    impls = []
    add(impls, f"effbench bigbird eager (b={b}, r={r})", "bigbird",
        lambda: ours("bigbird", qkv, n=n, heads=heads, head_dim=d, block=b, random_blocks=r))
    add(impls, f"effbench bigbird impl=flex (b={b}, r={r})", "bigbird",
        lambda: ours("bigbird", qkv, n=n, heads=heads, head_dim=d, block=b, random_blocks=r, impl="flex"),
        eager=False)
    add(impls, "HF BigBirdBlockSparseAttention (incl. proj.)", "bigbird",
        lambda: hf_bigbird(x, heads=heads, block=b, random_blocks=r))
    add(impls, "  (its Q/K/V projections alone)", "bigbird", lambda: hf_projections(x))
    measure(impls, rounds=args.rounds, min_run_time=args.min_run_time)
    report(f"bigbird: N={n}, block {b}, {r} random blocks", impls)

    impls = []
    add(impls, f"effbench dilated eager (W={w}, δ={args.dilation})", "dilated",
        lambda: ours("dilated", qkv, n=n, heads=heads, head_dim=d, window=w, dilation=args.dilation))
    add(impls, f"effbench dilated impl=flex (W={w}, δ={args.dilation})", "dilated",
        lambda: ours("dilated", qkv, n=n, heads=heads, head_dim=d, window=w, dilation=args.dilation, impl="flex"),
        eager=False)
    add(impls, f"effbench local eager (W={w}) for scale", "dilated",
        lambda: ours("local", qkv, n=n, heads=heads, head_dim=d, window=w))
    measure(impls, rounds=args.rounds, min_run_time=args.min_run_time)
    report(f"dilated: N={n}, W={w}, δ={args.dilation} (no public peer)", impls)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--globals", type=int, default=16)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--random-blocks", type=int, default=3)
    p.add_argument("--dilation", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of blocked_autorange per implementation")
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds per blocked_autorange")
    p.add_argument("--only", choices=("local", "others", "all"), default="all")
    args = p.parse_args(argv)
    print(f"# bench_sparse — torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, python {sys.version.split()[0]}")
    if args.only in ("local", "all"):
        section_local(args)
    if args.only in ("others", "all"):
        section_others(args)


if __name__ == "__main__":
    main()
