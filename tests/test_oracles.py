"""Independent oracles: expected values written here from each docstring's formula, never from the mechanism's code.

A mechanism's ``reference()`` builds its mask with the mechanism's own pattern code, so comparing ``forward``
with ``reference`` cannot catch a wrong pattern (a window one wider in both passes). Here:

- every sparse / recurrent / hashing pattern is a dense boolean mask built in this file from the formula of its
  docstring (random block tables and hash rotations are read from the module: they are data), attention is a
  float64 masked softmax written here, and ``forward`` must match it in float32 (1e-5) and float64 (1e-10) on
  B=2, H=3, N=1000 (no window, block, chunk or segment divides it), both causal modes where supported;
- Performer's output must equal attention through a FAVOR+ φ written here from its docstring (own ω and a small
  fixed ω), bidirectional and in causal prefix form (row i's keys stabilised by the prefix max over j ≤ i), and
  scaling a key up changes no earlier causal row (no leak through the key stabiliser);
- mutations prove the oracles sensitive: a local window one wider in forward *and* reference, Performer's
  FEATURE_EPS 1e-2 instead of 1e-4 (both still agree with their own ``reference()``);
- the results writer fsyncs every appended row after writing it and every file before renaming it over
  another (``os.fsync`` / ``os.replace`` recorded); removing either fsync is shown to fail.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

import mechanisms
from effbench import results

pytestmark = pytest.mark.usefixtures("one_thread")

B, H, D = 2, 3, 16
N = 1000  # not a multiple of 37, 3, 16, 48 (windows, dilation, blocks, segment, bucket) nor of the 64-row chunks
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["fp32", "fp64"]


def qkv(n: int = N, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))


def build(name: str, causal: bool, dtype: torch.dtype, n: int = N, **knobs):
    m = mechanisms.get(name).build(head_dim=D, heads=H, n=n, causal=causal, seed=0, **knobs)
    return m.double() if dtype == torch.float64 else m


def softmax_attention(s: torch.Tensor, visible: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float64 softmax of scores ``s`` over the visible keys, times v; a row with no visible key gives 0."""
    s = s.double().masked_fill(~visible, -math.inf)
    m = s.amax(-1, keepdim=True).nan_to_num(neginf=0.0)  # (.., N, 1); fully masked rows: shift 0
    e = (s - m).exp()  # exp(-inf) = 0
    z = e.sum(-1, keepdim=True)
    return (e @ v.double()) / torch.where(z > 0, z, torch.ones_like(z))


def dot_attention(q, k, v, visible):
    return softmax_attention(q.double() @ k.double().transpose(-1, -2) / math.sqrt(D), visible, v)


def grid(n: int = N):
    return torch.arange(n)[:, None], torch.arange(n)[None, :]  # i (queries) down, j (keys) across


# --------------------------------------------------------------------------- masks from the docstrings

def local_mask(kn, causal, m):
    """|i − j| ≤ w; causal 0 ≤ i − j ≤ w (w: the knob the test built with, never read back from the module)."""
    i, j = grid()
    w = kn["window"]
    return ((i - j >= 0) & (i - j <= w)) if causal else ((i - j).abs() <= w)


def dilated_mask(kn, causal, m):
    """keys j = i + δ·t with |t| ≤ w (causal −w ≤ t ≤ 0): enumerate t, set those entries."""
    w, delta = kn["window"], kn["dilation"]
    mask = torch.zeros(N, N, dtype=torch.bool)
    rows = torch.arange(N)
    for t in range(-w, (0 if causal else w) + 1):
        cols = rows + delta * t
        ok = (cols >= 0) & (cols < N)
        mask[rows[ok], cols[ok]] = True
    return mask


def longformer_mask(kn, causal, m):
    """S(i) = {|i − j| ≤ w} ∪ {j < g} ∪ (all j if i < g); causal S(i) ∩ {j ≤ i}."""
    w, g = kn["window"], kn["globals"]
    i, j = grid()
    mask = ((i - j).abs() <= w) | (j < g) | (i < g)
    return mask & (j <= i) if causal else mask


def bigbird_mask(kn, causal, m):
    """Blocks of b (nb = ⌈N/b⌉, the last partial); block I sees J ∈ {I−1, I, I+1} ∪ {0, nb−1} ∪ R(I); blocks 0
    and nb−1 see everything; causal ∩ {j ≤ i}. R(I) is data: the module's ``rand_index``/``rand_valid``."""
    b = kn["block"]
    nb = -(-N // b)
    i, j = grid()
    qb, kb = i // b, j // b
    rand = torch.zeros(nb, nb, dtype=torch.bool)
    index, valid = m.rand_index.cpu(), m.rand_valid.cpu()
    for row in range(1, nb - 1):
        rand[row, index[row - 1][valid[row - 1]]] = True
    mask = (qb == 0) | (qb == nb - 1) | (kb == 0) | (kb == nb - 1) | ((qb - kb).abs() <= 1) | rand[qb, kb]
    return mask & (j <= i) if causal else mask


def transformer_xl_mask(kn, causal, m):
    """j ≤ i and j ≥ ⌊i/L⌋·L − M."""
    L, M = kn["segment"], kn["memory"]
    i, j = grid()
    return (j <= i) & (j >= (i // L) * L - M)


PATTERNS = [  # name, knobs, causal modes, oracle mask
    ("local", {"window": 37}, (False, True), local_mask),
    ("dilated", {"window": 37, "dilation": 3}, (False, True), dilated_mask),
    ("longformer", {"window": 37, "globals": 5}, (False, True), longformer_mask),
    ("bigbird", {"block": 16, "random_blocks": 3}, (False, True), bigbird_mask),
    ("transformer-xl", {"segment": 48, "memory": 40}, (True,), transformer_xl_mask),
]
PATTERN_CASES = [pytest.param(name, knobs, causal, fn, id=f"{name}-{'causal' if causal else 'bidir'}")
                 for name, knobs, modes, fn in PATTERNS for causal in modes]


def pattern_error(name, knobs, causal, mask_fn, dtype) -> float:
    """max |forward − oracle| of a freshly built module (whatever the current monkeypatches make of it)."""
    m = build(name, causal, dtype, **knobs)
    q, k, v = qkv(dtype=dtype)
    with torch.no_grad():
        out = m(q, k, v)
    assert out.shape == (B, H, N, D) and out.dtype == dtype
    return float((out.double() - dot_attention(q, k, v, mask_fn(knobs, causal, m))).abs().max())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name,knobs,causal,mask_fn", PATTERN_CASES)
def test_pattern_matches_docstring_mask(name, knobs, causal, mask_fn, dtype):
    err = pattern_error(name, knobs, causal, mask_fn, dtype)
    assert err <= ATOL[dtype], f"{name} causal={causal} {dtype}: forward differs from the docstring mask by {err:.3g}"


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_bigbird_random_table_follows_docstring(causal):
    """R(I): r distinct middle blocks outside {I−1, I, I+1} (causal: from 1..I−2), fewer only when fewer exist."""
    b, r = 16, 3
    nb = -(-N // b)
    m = build("bigbird", causal, torch.float32, block=b, random_blocks=r)
    assert tuple(m.rand_index.shape) == (nb - 2, r) == tuple(m.rand_valid.shape)
    for row in range(1, nb - 1):
        got = m.rand_index[row - 1][m.rand_valid[row - 1]].tolist()
        allowed = set(range(1, row - 1)) if causal else set(range(1, nb - 1)) - {row - 1, row, row + 1}
        assert len(set(got)) == len(got) == min(r, len(allowed)), (row, got)
        assert set(got) <= allowed, (row, got)


# --------------------------------------------------------------------------- Reformer: buckets from the docstring

def reformer_oracle(m, q, v, causal, rounds, c):
    """softmax(s + log count) v with s_ij = q_i·k̂_j, k̂ = q·rsqrt(mean(q²) + 1e-6)/√D, s_ii = −1e5; count_ij =
    rounds in which j's chunk is i's or the one before (cyclically) in the order sorted by (bucket, position),
    bucket = argmax([qR_r; −qR_r]) with R_r the module's rotations (data); causal: j ≤ i."""
    x = q  # hashed in the input's own precision (a float64 re-hash could flip a near tie)
    n_chunks = -(-N // c)
    pos = torch.arange(N)
    count = torch.zeros(B, H, N, N, dtype=torch.float64)
    for r in range(rounds):
        proj = x @ m.rotations[:, r, :].to(x.dtype)  # (B, H, N, Σ f/2)
        bucket, start, scale = 0, 0, 1
        for f in m.factors:  # HF: factor f's f/2 columns hash into argmax([p; −p]); bucket = b1 + f1·b2
            part = proj[..., start:start + f // 2]
            bucket = bucket + scale * torch.cat([part, -part], -1).argmax(-1)  # (B, H, N)
            start, scale = start + f // 2, scale * f
        slot = (bucket * N + pos).argsort(-1).argsort(-1)  # rank of (bucket, position)
        chunk = slot // c
        ci, cj = chunk[..., :, None], chunk[..., None, :]
        count += ((cj == ci) | (cj == (ci - 1) % n_chunks)).double()
    q64 = q.double()
    khat = q64 * torch.rsqrt(q64.square().mean(-1, keepdim=True) + 1e-6) / math.sqrt(D)
    s = q64 @ khat.transpose(-1, -2)
    s = s.masked_fill(torch.eye(N, dtype=torch.bool), -1e5)
    i, j = grid()
    visible = (count > 0) & (j <= i) if causal else count > 0
    return softmax_attention(s + count.clamp(min=1).log(), visible, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("c", [48, 8], ids=["one-rotation", "factorised"])
def test_reformer_matches_docstring_buckets(causal, dtype, c):
    rounds = 2
    m = build("reformer", causal, dtype, rounds=rounds, bucket=c, buckets=0)
    assert len(m.factors) == (2 if c == 8 else 1)
    q, k, v = qkv(dtype=dtype)
    with torch.no_grad():
        out = m(q, k, v)
    err = float((out.double() - reformer_oracle(m, q, v, causal, rounds, c)).abs().max())
    assert err <= ATOL[dtype], f"reformer causal={causal} {dtype}: differs from the docstring oracle by {err:.3g}"


# --------------------------------------------------------------------------- mutation: a window one wider

@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_window_one_wider_passes_reference_but_fails_oracle(monkeypatch, causal):
    """A window one wider, consistently in forward and reference (the built module's window is w + 1): its own
    reference() still agrees, the docstring oracle does not."""
    cls = mechanisms.get("local").cls
    init = cls.__init__

    def wider(self, *args, window, **kw):
        init(self, *args, window=window + 1, **kw)

    monkeypatch.setattr(cls, "__init__", wider)
    m = build("local", causal, torch.float64, window=37)
    assert m.window == 38
    q, k, v = qkv(dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(q, k, v), m.reference(q, k, v), atol=1e-10, rtol=0)  # self-consistent
    err = pattern_error("local", {"window": 37}, causal, local_mask, torch.float64)
    assert err > 1e-3, f"the oracle missed a window one wider (error {err:.3g})"


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_wider_pattern_code_fails_oracle(monkeypatch, causal):
    """The pattern helper itself one wider (forward's band and reference's mask both come from it)."""
    import mechanisms.local as local_mod

    offsets = local_mod.local_offsets
    monkeypatch.setattr(local_mod, "local_offsets", lambda window, causal: offsets(window + 1, causal))
    for dtype in DTYPES:
        err = pattern_error("local", {"window": 37}, causal, local_mask, dtype)
        assert err > 1e-3, f"the oracle missed a one-wider local_offsets in {dtype} (error {err:.3g})"


# --------------------------------------------------------------------------- Performer: FAVOR+ φ from the docstring

PN = 777  # not a multiple of the 64-position causal chunk


def favor_oracle(q, k, v, omega, causal):
    """φ(x) = (exp(ω x' − |x'|²/2 − c) + 1e-4)/√m, x' = x·D^-¼; c: per query the max of its ω q'. Bidirectional:
    for keys one max over all positions and features of the (batch, head), out = φ(q)(φ(k)ᵀv) / φ(q)·Σφ(k).
    Causal: row i's keys use c = M_i = max of ω k'_j over j ≤ i and all features (the prefix max), out_i =
    Σ_{j≤i} φ(q_i)·φ_i(k_j) v_j / Σ_{j≤i} φ(q_i)·φ_i(k_j), every φ_i(k_j) made literally for its row."""
    q, k, v, omega = (t.double() for t in (q, k, v, omega))
    feats = omega.shape[0]

    def parts(x):
        xp = x * D ** -0.25
        return xp @ omega.T, xp.square().sum(-1, keepdim=True) / 2  # (B, H, N, m), (B, H, N, 1)

    def phi(x, c_dims):
        proj, half = parts(x)
        c = proj.amax(dim=c_dims, keepdim=True)
        return (torch.exp(proj - half - c) + 1e-4) / math.sqrt(feats)

    fq = phi(q, (-1,))
    if not causal:
        fk = phi(k, (-2, -1))
        return (fq @ (fk.transpose(-1, -2) @ v)) / (fq @ fk.sum(-2)[..., None])
    n = q.shape[-2]
    proj, half = parts(k)  # (B, H, N, m), (B, H, N, 1)
    i, j = grid(n)
    visible = j <= i  # (N, N)
    # M_i: the max of ω k'_j over the visible keys j ≤ i and all m features
    prefix_max = proj.amax(-1)[..., None, :].masked_fill(~visible, -math.inf).amax(-1)  # (B, H, N)
    out = torch.empty_like(q)
    for s in range(0, n, 16):  # rows s..s+15, each with its own φ_i(k_j) for every key j ≤ i
        rows = slice(s, s + 16)
        vis = visible[rows][:, :, None]  # (R, N, 1)
        expo = (proj[..., None, :, :] - half[..., None, :, :] - prefix_max[..., rows, None, None])  # (B, H, R, N, m)
        fk_i = (torch.exp(expo.masked_fill(~vis, -math.inf)) + 1e-4) / math.sqrt(feats)  # (B, H, R, N, m)
        weights = torch.einsum("bhrm,bhrnm->bhrn", fq[..., rows, :], fk_i).masked_fill(~visible[rows], 0.0)
        out[..., rows, :] = (weights @ v) / weights.sum(-1, keepdim=True)  # (B, H, R, D)
    return out


def fixed_omega(m: int = 8) -> torch.Tensor:
    """A small fixed ω (m × D), not drawn by the module."""
    rows = torch.arange(m, dtype=torch.float64)[:, None]
    cols = torch.arange(D, dtype=torch.float64)[None, :]
    return torch.sin(1.3 * rows + 0.7 * cols) * (1 + rows / m)


def performer_error(causal, dtype, omega_kind) -> tuple[float, object, tuple]:
    features = 8 if omega_kind == "fixed" else 48
    m = build("performer", causal, dtype, n=PN, features=features)
    if omega_kind == "fixed":
        m.omega = fixed_omega(features).to(m.omega.dtype)
    q, k, v = qkv(n=PN, dtype=dtype, seed=1)
    with torch.no_grad():
        out = m(q, k, v)
    want = favor_oracle(q, k, v, m.omega, causal)
    return float((out.double() - want).abs().max()), m, (q, k, v)


@pytest.mark.parametrize("omega_kind", ["module", "fixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_performer_matches_independent_favor(causal, dtype, omega_kind):
    err, _, _ = performer_error(causal, dtype, omega_kind)
    assert err <= ATOL[dtype], f"performer causal={causal} {dtype} ω={omega_kind}: differs from FAVOR+ by {err:.3g}"


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_performer_feature_eps_mutation_fails_oracle(monkeypatch, causal):
    """FEATURE_EPS 1e-2 instead of 1e-4: forward and reference() still agree, the FAVOR+ oracle does not."""
    import mechanisms.performer as performer_mod

    monkeypatch.setattr(performer_mod, "FEATURE_EPS", 1e-2)
    for omega_kind in ("module", "fixed"):
        err, m, (q, k, v) = performer_error(causal, torch.float64, omega_kind)
        with torch.no_grad():
            torch.testing.assert_close(m(q, k, v), m.reference(q, k, v), atol=1e-10, rtol=0)  # self-consistent
        assert err > 1e-4, f"the oracle missed FEATURE_EPS = 1e-2 (ω={omega_kind}, error {err:.3g})"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_performer_causal_rows_before_a_key_ignore_it(dtype):
    """No causal leak through the key stabiliser: scaling the key at position t up (so that it holds the largest
    projection ω k' of the whole sequence in every (batch, head)) leaves the rows < t of forward and reference()
    unchanged, and changes rows ≥ t. A stabiliser that is one max over all N keys (performer-pytorch's causal
    choice, and this mechanism's before the prefix max) moves every earlier row through the 1e-4 floor."""
    m = build("performer", True, dtype, n=PN, features=48)
    q, k, v = qkv(n=PN, dtype=dtype, seed=1)
    t = 500  # inside a 64-position chunk (500 = 7·64 + 52)
    planted = k.clone()
    planted[:, :, t] *= 5
    proj = lambda x: (x.double() * D ** -0.25) @ m.omega.double().T  # (B, H, N, m)
    others = torch.cat([proj(planted)[:, :, :t], proj(planted)[:, :, t + 1:]], dim=2)
    assert (proj(planted)[:, :, t].amax(-1) > others.amax(dim=(-2, -1))).all(), "the planted key must hold the max"
    with torch.no_grad():
        for fn in (m, m.reference):
            before, after = fn(q, k, v), fn(q, planted, v)
            torch.testing.assert_close(after[:, :, :t], before[:, :, :t], atol=ATOL[dtype] / 10, rtol=0)
            assert float((after[:, :, t:] - before[:, :, t:]).abs().max()) > 1e-3  # the key itself does count


# --------------------------------------------------------------------------- the results writer fsyncs

_REAL_FSYNC, _REAL_REPLACE, _REAL_RENAME = os.fsync, os.replace, os.rename


class DiskLog:
    """Records os.fsync (with the path and size of the synced file) and os.replace / os.rename calls.

    ``drop(frame) -> bool`` simulates a removed fsync: a matching call is neither made nor recorded.
    """

    def __init__(self, drop=None):
        self.events: list[tuple] = []
        self.drop = drop

    def install(self, monkeypatch):
        monkeypatch.setattr(results.os, "fsync", self.fsync)
        monkeypatch.setattr(results.os, "replace", self.replace)
        monkeypatch.setattr(results.os, "rename", self.rename)

    def fsync(self, fd):
        if self.drop is not None and self.drop(sys._getframe(1)):
            return None
        fd = fd if isinstance(fd, int) else fd.fileno()
        path = os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))
        self.events.append(("fsync", path, os.fstat(fd).st_size))
        return _REAL_FSYNC(fd)

    def _move(self, real, src, dst, *a, **kw):
        self.events.append(("replace", os.path.realpath(src), os.path.realpath(dst), os.stat(src).st_size))
        return real(src, dst, *a, **kw)

    def replace(self, src, dst, *a, **kw):
        return self._move(_REAL_REPLACE, src, dst, *a, **kw)

    def rename(self, src, dst, *a, **kw):
        return self._move(_REAL_RENAME, src, dst, *a, **kw)

    def mark(self) -> int:
        return len(self.events)

    def check_renames(self, since: int = 0) -> None:
        """Every rename was preceded by an fsync of the renamed file at the size it was renamed with."""
        for n, ev in enumerate(self.events[since:], since):
            if ev[0] == "replace":
                _, src, dst, size = ev
                synced = [e for e in self.events[since:n] if e[0] == "fsync" and e[1] == src and e[2] == size]
                assert synced, f"{src} renamed over {dst} without an fsync of its final {size} bytes first"

    def check_durable(self, path, since: int = 0) -> None:
        """The file now at ``path`` was fsynced with its final content: directly, or before being renamed there."""
        path, size = os.path.realpath(path), os.stat(path).st_size
        evs = self.events[since:]
        for n in range(len(evs) - 1, -1, -1):
            ev = evs[n]
            if ev[0] == "fsync" and ev[1] == path and ev[2] == size:
                return
            if ev[0] == "replace" and ev[2] == path:
                assert any(e[0] == "fsync" and e[1] == ev[1] and e[2] == ev[3] for e in evs[:n]), (
                    f"{path} came from {ev[1]}, renamed without an fsync of its final content")
                return
        raise AssertionError(f"{path} ({size} bytes) was never fsynced with its final content")


def make_row(i: int) -> dict:
    row = {"case_key": f"key{i:04d}", "mechanism": "dense", "n": 512 + i, "status": "ok", "time_ms_median": 1.5 + i}
    cols = set(results.columns())
    return {k: v for k, v in row.items() if k in cols}


def scenario_rows(tmp_path, log: DiskLog, count: int = 5) -> None:
    """N appended rows: each append ends with an fsync of the results file holding that row."""
    path = tmp_path / "results.csv"
    writer = results.ResultsWriter(path)
    for i in range(count):
        start = log.mark()
        writer.append(make_row(i))
        size = os.stat(path).st_size
        synced = [e for e in log.events[start:] if e[0] == "fsync" and e[1] == os.path.realpath(path)]
        assert synced, f"row {i} appended without an fsync of {path.name}"
        assert synced[-1][2] == size, f"row {i}: fsync saw {synced[-1][2]} bytes, the row ends at {size}"
        log.check_renames(start)
    assert sum(1 for e in log.events if e[0] == "fsync" and e[1] == os.path.realpath(path)) >= count


def scenario_header(tmp_path, log: DiskLog) -> None:
    """A new results file: its header is durable, and any rename was of an fsynced file."""
    path = tmp_path / "new.csv"
    start = log.mark()
    results.ResultsWriter(path)
    assert path.read_text().startswith("case_key,")
    log.check_renames(start)
    log.check_durable(path, start)


def scenario_widen(tmp_path, log: DiskLog) -> None:
    """A plugin knob widens the header by a rewrite: renamed only after an fsync, rows kept."""
    path = tmp_path / "widen.csv"
    results.ResultsWriter(path).append(make_row(0))
    start = log.mark()
    writer = results.ResultsWriter(path, extra_knobs=("zz_plugin_knob",))
    assert "zz_plugin_knob" in path.read_text().splitlines()[0]
    assert any(e[0] == "replace" and e[2] == os.path.realpath(path) for e in log.events[start:]), \
        "widening did not rewrite the file atomically (no rename)"
    log.check_renames(start)
    log.check_durable(path, start)
    assert len(results.read_results(path)) == 1
    writer.append(make_row(1))


def scenario_sidecar(tmp_path, log: DiskLog) -> None:
    """append_run: created, then updated; each rewrite fsynced before its rename."""
    csv_path = tmp_path / "run.csv"
    side = results.sidecar_path(csv_path)
    for i in range(2):
        start = log.mark()
        results.append_run(csv_path, {"run_id": f"r{i}", "command": "effbench sweep"})
        assert side.exists()
        log.check_renames(start)
        log.check_durable(side, start)


SCENARIOS = {"rows": scenario_rows, "header": scenario_header, "widen": scenario_widen, "sidecar": scenario_sidecar}
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="fd -> path through /proc/self/fd (Linux)")


@needs_proc
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_results_writer_fsyncs(tmp_path, monkeypatch, scenario):
    log = DiskLog()
    log.install(monkeypatch)
    SCENARIOS[scenario](tmp_path, log)


def _inside_append(frame) -> bool:
    code = results.ResultsWriter.append.__code__
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


MUTANTS = {  # name: (which fsync calls are removed, the scenarios that must then fail)
    "no-fsync-in-append": (_inside_append, ("rows",)),
    "no-fsync-before-rename": (lambda frame: not _inside_append(frame), ("header", "widen", "sidecar")),
}


@needs_proc
@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_results_fsync_checks_catch_removed_fsync(tmp_path, monkeypatch, mutant):
    drop, must_fail = MUTANTS[mutant]
    for scenario in must_fail:
        log = DiskLog(drop=drop)
        log.install(monkeypatch)
        d = tmp_path / scenario
        d.mkdir()
        with pytest.raises(AssertionError):
            SCENARIOS[scenario](d, log)
