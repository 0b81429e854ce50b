"""BigBird block-sparse attention: neighbouring blocks, global blocks and random blocks."""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from ._banded import Band, Extra, Layout, additive_bias, band_attention, band_plan
from ._decode import StaticKV, attend_one
from ._flex import PatternAttention, count_tiles, flex_reasons
from .base import KV_HEADS, Fidelity, Knob, decreasing, register


def random_blocks(nb: int, r: int, causal: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each middle block i = 1..nb−2, up to r distinct random key blocks drawn from ``seed``.

    Bidirectional: drawn from the middle blocks other than i−1, i, i+1 (so no key is counted
    twice); causal: from the earlier blocks 1..i−2. Uniform without replacement (Floyd's
    algorithm, vectorised over rows): O(nb·r²) work, no nb×nb table.
    Returns (index (nb−2, r) long, valid (nb−2, r) bool); unused slots have index 1, valid False.
    """
    rows = max(nb - 2, 0)
    i = torch.arange(1, rows + 1)  # middle block ids
    if causal:
        m = (i - 2).clamp(min=0)  # candidates 1..i−2
        lo_ex, n_ex = torch.full_like(i, nb), torch.zeros_like(i)
    else:
        lo_ex = (i - 1).clamp(min=1)
        hi_ex = (i + 1).clamp(max=nb - 2)
        n_ex = hi_ex - lo_ex + 1
        m = (nb - 2) - n_ex  # middle blocks minus the (clipped) neighbourhood
    gen = torch.Generator(device="cpu").manual_seed(seed)
    chosen = torch.full((rows, r), -1, dtype=torch.long)
    for s in range(r):
        j = m - r + s  # Floyd: for j in m−r .. m−1, pick t in [0, j]; if taken, take j
        u = torch.rand(rows, generator=gen, dtype=torch.float64)
        t = torch.minimum((u * (j + 1).clamp(min=1)).long(), j.clamp(min=0))
        taken = (chosen[:, :s] == t[:, None]).any(1)
        chosen[:, s] = torch.where(j >= 0, torch.where(taken, j, t), torch.full_like(j, -1))
    valid = chosen >= 0
    blk = 1 + chosen.clamp(min=0)
    blk = torch.where(blk >= lo_ex[:, None], blk + n_ex[:, None], blk)  # skip the neighbourhood
    blk = torch.where(valid, blk, torch.ones_like(blk))
    order = torch.argsort(torch.where(valid, blk, torch.full_like(blk, nb)), dim=1)
    return blk.gather(1, order), valid.gather(1, order)


def bigbird_pattern(n: int, block: int, causal: bool, table: torch.Tensor):
    """(i, j) mask; ``table`` (rows, r) holds each query block's random key blocks (−1: none),
    with rows covering every block index a padded position can reach."""
    nb = -(-n // block)
    r = table.shape[1]

    def pattern(i, j):
        qb, kb = i // block, j // block
        vis = (qb == 0) | (qb == nb - 1) | (kb == 0) | (kb == nb - 1) | (((qb - kb) <= 1) & ((kb - qb) <= 1))
        for s in range(r):
            vis = vis | (table[qb, s] == kb)
        return vis & (j <= i) if causal else vis

    return pattern


@register(
    name="bigbird", family="sparse", complexity="O(N·b·(5+r)·D)", memory="O(N·D) inference, O(N·b·(5+r)) with grad",
    knobs=[
        Knob("block", default=64, axis="block", minimum=1, small=16, length=True,
             help="block size b"),
        Knob("random_blocks", default=3, minimum=0, help="random key blocks r per middle query block"),
        Knob("impl", default="eager", type=str, choices=("eager", "flex"),
             help="eager: blocked matmuls with gathered random blocks; flex: compiled FlexAttention"),
        KV_HEADS,
    ],
)
class BigBirdAttention(PatternAttention):
    """BigBird (ITC): blocks of b; first and last blocks global; each middle block sees its
    neighbours, the global blocks and r random blocks drawn from ``seed``.

    With nb = ⌈N/b⌉ blocks (the last one possibly partial), query block I sees key blocks
    J ∈ {I−1, I, I+1} ∪ {0, nb−1} ∪ R(I); blocks 0 and nb−1 attend to everything. R(I) holds
    r distinct blocks drawn uniformly from the middle blocks outside I's neighbourhood (fewer
    when fewer exist), so every key is counted once. out_i = Σ_{j visible} softmax_j(q_i·k_j/√D) v_j.

    Causal (a choice: the original BigBird is an encoder): the same pattern intersected with
    j ≤ i, with R(I) drawn from the earlier blocks 1..I−2 so that no random block is wasted on
    the future; the last block then sees everything before it, and no middle row sees it.

    eager: global rows are dense SDPA (2 blocks × N keys). Middle blocks are chunks of b
    rows (:func:`._banded.band_attention`, the B·H sequences end to end): their three neighbours are an
    ``unfold`` view of K/V (global neighbours masked there because they are counted among the global
    keys); the global blocks and the r random blocks are extra keys gathered per block (``embedding``
    with an index of (nb − 2, (2 + r)·b) positions; causal (1 + r)·b) — scores of the parts are
    concatenated before one softmax. Row blocks: as many rows of all B·H sequences as ``temp_budget``
    allows at 4·(2·(3b + X) + 2·X·D/b) bytes per fp32 row, X = (2 + r)·b extra keys (causal: span 2b,
    X = (1 + r)·b): its scores and probabilities, its gathered extra keys and values. A call dispatches a
    constant (~110 ops) plus ~18 per group, B·H·N·row bytes / budget groups.
    Cost: 4·B·H·D·(2b·N + N·b·(3 + 2 + r)) FLOPs (causal 4·B·H·D·(b² + b·N + N·b·(2 + 1 + r))), plus the
    blocks computed twice (the 2 global blocks of each sequence and its first and last middle block, and
    causal its first ≤ r + 1 blocks, whose random blocks are missing; ``analytic_flops`` counts them
    exactly); memory O(B·H·N·D) inference plus the budget, O(B·H·N·b·(5 + r)) saved for the backward.

    flex: ``flex_attention`` with the same mask, tiles of b×b (when b is a multiple of 16;
    128×128 otherwise), so the tile structure is the block structure.

    Decode (causal), for the length n the module was built for (its random table covers every block up
    to n; the harness builds it for context + steps). Query i in block I = ⌊i/b⌋ (nb = ⌈n/b⌉) sees, exactly
    as the causal pattern above:
    - I = 0 or I = nb − 1 (a global row), or I = 1 (its neighbours and the global block 0 are blocks 0
      and 1): every j ≤ i;
    - a middle block 2 ≤ I ≤ nb − 2: block 0, block I − 1, block I up to i and R(I) (min(r, I − 2) blocks,
      all in 1 … I − 2): 2b + (i − I·b + 1) + min(r, I − 2)·b keys, at most (3 + r)·b.
    The state keeps every position, a :class:`StaticKV` of the whole capacity (like dense: 2·B·kv_heads·n·D
    elements, O(N)): a later block's random blocks may be any earlier block, and a token of the last block
    attends to everything before it. A middle step gathers its ≤ (3 + r)·b keys with ``index_select`` and
    reads 2·B·kv_heads·(≤ (3 + r)·b)·D elements, ≤ 4·B·H·(3 + r)·b·D FLOPs, constant in N; a global step
    (the last block) reads the whole filled cache, 4·B·H·(i + 1)·D FLOPs, like dense. With the context a
    multiple of b and no more than b new tokens, every new token is in the last block (n = N0 + T puts block
    nb − 1 at N0): each step is then a dense step. ``decode_read_bytes`` declares the median over the
    steps N0 … capacity − 1 of what a step reads.
    HuggingFace's BigBird has no block-sparse decode form at all: block-sparse attention is its encoder
    path (no past_key_values), and ``BigBirdForCausalLM`` switches to ``attention_type="original_full"``,
    dense attention with an ordinary KV cache. This causal pattern and its decode are our own.
    """

    decode_form = ("KV cache of every position (random blocks reach any earlier block): 2·B·kv_heads·N·D; "
                   "a step reads ≤ (3+r)·b gathered keys, the whole cache in a global (last-block) row")

    fidelity = (Fidelity("block", (8, 16, 32, 64), (decreasing(),), why="(5 + r)·b keys per query: more with b"),)

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, block: int,
                 random_blocks: int, impl: str = "eager", kv_heads: int = 0):
        super().__init__()
        self.block, self.random_blocks = block, random_blocks
        self.nb = -(-n // block)
        idx, valid = _draw(n, block, random_blocks, causal, seed)
        self.register_buffer("rand_index", idx, persistent=False)  # (nb−2, r) key block ids
        self.register_buffer("rand_valid", valid, persistent=False)  # (nb−2, r)
        self.flex_tile = self.tile_for(block)
        self._setup(head_dim=head_dim, heads=heads, n=n, causal=causal, impl=impl)

    @staticmethod
    def tile_for(block: int) -> int:
        return block if block % 16 == 0 else 128

    # -- the pattern ---------------------------------------------------------------------
    def pattern_on(self, device: torch.device | str | None = None):
        return bigbird_pattern(self.n, self.block, self.causal,
                               _table(self.n, self.block, self.rand_index, self.rand_valid, self.flex_tile).to(device))

    @classmethod
    def _candidates(cls, n: int, block: int, tile: int, index: torch.Tensor, valid: torch.Tensor,
                    causal: bool) -> torch.Tensor:
        """Tiles touched by a visible (query block, key block) pair: O(nb·(5 + r)) pairs, no N×N."""
        nb = -(-n // block)
        nt = -(-n // tile)
        mid = torch.arange(1, nb - 1)
        pairs = [torch.stack([mid, mid + o], 1) for o in (-1, 0, 1)]
        pairs += [torch.stack([mid, torch.full_like(mid, e)], 1) for e in (0, nb - 1)]
        rq = mid[:, None].expand_as(index)
        pairs.append(torch.stack([rq[valid], index[valid]], 1))
        every = torch.arange(nb)
        for e in {0, nb - 1}:
            pairs.append(torch.stack([torch.full_like(every, e), every], 1))
        qb, kb = torch.cat(pairs).unbind(1)
        cand = torch.zeros(nt, nt, dtype=torch.bool)
        span = -(-block // tile) + 1  # tiles one block can touch
        for dq in range(span):
            for dk in range(span):
                a = ((qb * block) // tile + dq).clamp(max=nt - 1)
                b = ((kb * block) // tile + dk).clamp(max=nt - 1)
                ok = (a * tile < torch.clamp((qb + 1) * block, max=n)) & (b * tile < torch.clamp((kb + 1) * block, max=n))
                cand[a[ok], b[ok]] = True
        if causal:
            cand &= torch.ones(nt, nt, dtype=torch.bool).tril()
        return cand

    def flex_candidates(self, n: int, tile: int) -> torch.Tensor:
        return self._candidates(n, self.block, tile, self.rand_index, self.rand_valid, self.causal)

    @staticmethod
    def band_for(N: int, block: int, causal: bool) -> Band | None:
        nb = -(-N // block)
        if nb <= 2:
            return None
        last = (nb - 1) * block
        ok = (lambda d: d >= 0) if causal else (lambda d: torch.ones_like(d, dtype=torch.bool))
        return Band.make(L=N, q_start=block, q_stop=last, c=block, left=block, right=0 if causal else block,
                         kv_lo=block, kv_hi=(last,), offset_ok=ok)

    # -- eager ---------------------------------------------------------------------------
    @staticmethod
    def extra_for(n: int, block: int, causal: bool, index: torch.Tensor, valid: torch.Tensor) -> Extra:
        """The extra keys of middle block I = t + 1: block 0, the last block (bidirectional; its positions
        past n unused) and the r random blocks ``index[t]`` (missing ones unused): (nb − 2, X) positions."""
        nb = -(-n // block)
        nc, last = nb - 2, (nb - 1) * block
        y = torch.arange(block)
        pos, ok = [y.expand(nc, block)], [torch.ones(nc, block, dtype=torch.bool)]
        if not causal:
            pos.append((last + y).expand(nc, block))
            ok.append((last + y < n).expand(nc, block))
        if index.shape[1] > 0:
            pos.append((index.cpu()[..., None] * block + y).flatten(1))  # (nc, r·b)
            ok.append(valid.cpu().repeat_interleave(block, dim=1))  # (nc, r·b)
        return Extra(torch.cat(pos, 1), torch.cat(ok, 1))

    def _make_plan(self, N: int, device: torch.device, dtype: torch.dtype) -> dict:
        if N != self.n:
            raise ValueError(f"bigbird was built for n={self.n} (its random blocks depend on it), got N={N}")
        band = self.band_for(N, self.block, self.causal)
        plan: dict = {"band": band}
        if band is None:
            return plan
        extra = self.extra_for(N, self.block, self.causal, self.rand_index[:, :self.random_blocks], self.rand_valid)
        plan["kernel"] = band_plan(band, extra, device, dtype)
        last = (self.nb - 1) * self.block
        plan["global_rows"] = torch.cat([torch.arange(self.block), torch.arange(last, N)]).to(device)  # (b + N − last,)
        if self.causal:  # last block rows see every key j <= i: (N − last, N) bias, linear in N
            i = torch.arange(last, N, device=device)[:, None]  # (N − last, 1)
            j = torch.arange(N, device=device)[None, :]  # (1, N)
            plan["last_bias"] = additive_bias(j <= i, dtype, float("-inf"))
        return plan

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: dict) -> torch.Tensor:
        B, H, N, D = q.shape
        band, b = plan["band"], self.block
        sdpa = F.scaled_dot_product_attention  # on 4-D tensors: the fused kernel
        if band is None:  # one or two blocks: every block is global, dense attention
            return sdpa(q, k, v, is_causal=self.causal, scale=self.scale)
        last = (self.nb - 1) * b
        qf, kf, vf = (t.reshape(B * H, N, D) for t in (q, k, v))  # (B·H, N, D)
        out = band_attention(qf, kf, vf, plan["kernel"], self.scale)  # (B·H, Lp, D), rows b … last − 1 set
        if self.causal:
            first = sdpa(q.narrow(2, 0, b), k.narrow(2, 0, b), v.narrow(2, 0, b), is_causal=True,
                         scale=self.scale)  # (B, H, b, D)
            final = sdpa(q.narrow(2, last, N - last), k, v, attn_mask=plan["last_bias"],
                         scale=self.scale)  # (B, H, N − last, D)
            og = torch.cat([first, final], dim=2)  # (B, H, b + N − last, D)
        else:  # both global blocks see every key: one SDPA
            rows_g = torch.cat([q.narrow(2, 0, b), q.narrow(2, last, N - last)], dim=2)  # (B, H, b + N − last, D)
            og = sdpa(rows_g, k, v, scale=self.scale)  # (B, H, b + N − last, D)
        out.index_copy_(1, plan["global_rows"], og.flatten(0, 1))  # block 0 and the last block
        return out.narrow(1, 0, N).unflatten(0, (B, H))  # (B, H, N, D)

    # -- decode --------------------------------------------------------------------------
    def decode_init(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> StaticKV:
        if capacity > self.n:
            raise ValueError(f"bigbird was built for n={self.n} (its random blocks depend on it); "
                             f"a decode capacity of {capacity} positions needs a module built for it")
        return StaticKV(k, v, capacity)  # (B, Hkv, capacity, D) twice

    def decode_step(self, state: StaticKV, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        state.append(k, v)
        i, b = state.length - 1, self.block
        I = i // b
        if I <= 1 or I >= self.nb - 1:  # global row (or block 1, whose neighbours are blocks 0 and 1): all j <= i
            keys, values = state.keys()  # (B, Hkv, i + 1, D)
            return attend_one(q, keys, values, self.scale)  # (B, H, 1, D)
        dev = state.k.device
        nr = min(self.random_blocks, I - 2)  # valid random blocks, sorted first in the table row
        blocks = torch.cat([torch.zeros(1, dtype=torch.long, device=dev),
                            self.rand_index[I - 1, :nr].to(dev)])  # (1 + nr,) block 0 and R(I), all < I − 1
        full = (blocks[:, None] * b + torch.arange(b, device=dev)).flatten()  # ((1 + nr)·b,)
        near = torch.arange((I - 1) * b, i + 1, device=dev)  # (b + i − I·b + 1,) block I − 1, block I up to i
        idx = torch.cat([full, near])  # (L,) L ≤ (3 + r)·b distinct positions
        keys = state.k.index_select(2, idx)  # (B, Hkv, L, D)
        values = state.v.index_select(2, idx)  # (B, Hkv, L, D)
        return attend_one(q, keys, values, self.scale)  # (B, H, 1, D)

    @staticmethod
    def _keys_seen(i: int, n: int, block: int, random_blocks: int) -> int:
        """Keys query i sees in the causal pattern built for length n (the count a decode step reads)."""
        I, nb = i // block, -(-n // block)
        if I <= 1 or I >= nb - 1:
            return i + 1
        return 2 * block + (i - I * block + 1) + min(random_blocks, I - 2) * block

    @classmethod
    def state_bytes(cls, *, batch: int, heads: int, kv_heads: int, head_dim: int, n: int, capacity: int,
                    itemsize: int, block: int, random_blocks: int, impl: str = "eager") -> int:
        return StaticKV.nbytes(batch=batch, kv_heads=kv_heads, capacity=capacity, head_dim=head_dim,
                               itemsize=itemsize)

    @classmethod
    def decode_read_bytes(cls, *, batch: int, heads: int, kv_heads: int, head_dim: int, n: int, capacity: int,
                          itemsize: int, block: int, random_blocks: int, impl: str = "eager") -> int:
        """The median over the steps at positions n … capacity − 1 (module built for capacity) of the keys and
        values a step reads: ≤ (3 + r)·b positions in a middle block, i + 1 in a global (last-block) row."""
        seen = [cls._keys_seen(i, capacity, block, random_blocks) for i in range(n, max(capacity, n + 1))]
        return 2 * batch * kv_heads * statistics.median_low(seen) * head_dim * itemsize

    # -- declarations --------------------------------------------------------------------
    @classmethod
    def check(cls, *, n: int, causal: bool, heads: int, head_dim: int, device: str, dtype: str,
              block: int, random_blocks: int, impl: str = "eager", mode: str | None = None, **_) -> list[str]:
        reasons = []
        if -(-n // block) < 3:
            reasons.append(f"n {n} gives fewer than 3 blocks of {block}: every block is global, this is dense attention")
        if impl == "flex":
            reasons += flex_reasons(device, dtype, mode)
        return reasons

    @classmethod
    def analytic_flops(cls, *, batch: int, heads: int, n: int, head_dim: int, causal: bool, block: int,
                       random_blocks: int, impl: str = "eager", kv_heads: int = 0) -> int:
        """Exact for eager (what FlopCounterMode counts); for flex, the non-empty tiles (drawn with seed 0:
        with b×b tiles their number does not depend on the seed)."""
        nb = -(-n // block)
        index, valid = _draw(n, block, random_blocks, causal, 0)
        if impl == "flex":
            tile = cls.tile_for(block)
            table = _table(n, block, index, valid, tile)
            pairs = count_tiles(bigbird_pattern(n, block, causal, table), n,
                                cls._candidates(n, block, tile, index, valid, causal), tile)
        else:
            band = cls.band_for(n, block, causal)
            sb = batch * heads
            if band is None:
                pairs = sb * n * n
            else:
                last = (nb - 1) * block
                pairs = sb * ((block * block if causal else block * n) + (n - last) * n)
                extra = cls.extra_for(n, block, causal, index[:, :random_blocks], valid)
                pairs += Layout.make(band, extra.ok).scored_keys(sb)
            return 4 * head_dim * pairs
        return 4 * batch * heads * head_dim * pairs


def _draw(n: int, block: int, r: int, causal: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    nb = -(-n // block)
    return random_blocks(nb, r, causal, seed)


def _table(n: int, block: int, index: torch.Tensor, valid: torch.Tensor, tile: int) -> torch.Tensor:
    """(rows, r) random key blocks per query block (−1 none), rows covering padded tile positions too."""
    nb = -(-n // block)
    r = index.shape[1]
    rows = -(-(-(-n // tile) * tile) // block) + 1
    table = torch.full((rows, max(r, 1)), -1, dtype=torch.long)
    if nb > 2 and r > 0:
        table[1:nb - 1, :r] = torch.where(valid.cpu(), index.cpu(), torch.full_like(index.cpu(), -1))
    return table
