"""Nyströmformer (Xiong et al. 2021): softmax attention through m segment-mean landmarks and an iterative pinv."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import KV_HEADS, Fidelity, Knob, decreasing, register, repeat_kv

LOW_PRECISION = (torch.float16, torch.bfloat16)


def segment_sizes(n: int, m: int) -> list[int]:
    """The sizes of the m segments of N positions, in order: with N = s·m + r (0 <= r < m), the first r
    segments hold s + 1 = ⌈N/m⌉ positions and the other m − r hold s = ⌊N/m⌋ (``torch.tensor_split``'s
    split). Requires 1 <= m <= N, so no segment is empty."""
    s, r = divmod(n, m)
    return [s + 1] * r + [s] * (m - r)


def landmarks(x: torch.Tensor, m: int) -> torch.Tensor:
    """Segment means of x (B, H, N, D) over the segments of :func:`segment_sizes`: (B, H, m, D).

    Two views, no copy of x: the first r·(s+1) positions as (r, s+1) and the rest as (m − r, s)."""
    b, h, n, d = x.shape
    s, r = divmod(n, m)
    split = r * (s + 1)
    parts = []
    if r:
        parts.append(x[:, :, :split].reshape(b, h, r, s + 1, d).mean(dim=3))  # (B, H, r, D)
    if m - r:
        parts.append(x[:, :, split:].reshape(b, h, m - r, s, d).mean(dim=3))  # (B, H, m−r, D)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # (B, H, m, D)


def iterative_pinv(a: torch.Tensor, iters: int) -> torch.Tensor:
    """The Moore–Penrose pseudo-inverse of each m×m matrix of a (..., m, m) by the paper's iteration (eq. 16,
    Razavi et al. 2014): Z₀ = Aᵀ/(‖A‖₁‖A‖∞), Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ))), ``iters`` times.

    ‖A‖₁ (largest column sum of |A|) and ‖A‖∞ (largest row sum, 1 for a softmax) are taken per matrix.
    The identity terms are folded into fused products (baddbmm: β·C − X·Y), so an iteration is exactly
    four m×m products and no elementwise pass: P = AZ, P₁ = 7P − P², P₂ = 15P − P P₁,
    Z ← 3.25 Z − ¼ Z P₂; 8·m³ FLOPs per iteration."""
    shape = a.shape
    m = shape[-1]
    a3 = a.reshape(-1, m, m)  # (G, m, m), G = B·H
    norm_1 = a3.abs().sum(dim=-2).amax(dim=-1)  # (G,) largest column sum
    norm_inf = a3.abs().sum(dim=-1).amax(dim=-1)  # (G,) largest row sum
    z = a3.transpose(-1, -2) / (norm_1 * norm_inf)[:, None, None]  # (G, m, m)
    for _ in range(iters):
        az = torch.bmm(a3, z)  # (G, m, m) AZ
        inner = torch.baddbmm(az, az, az, beta=7.0, alpha=-1.0)  # (G, m, m) AZ (7I − AZ)
        inner = torch.baddbmm(az, az, inner, beta=15.0, alpha=-1.0)  # (G, m, m) AZ (15I − ·)
        z = torch.baddbmm(z, z, inner, beta=3.25, alpha=-0.25)  # (G, m, m) ¼ Z (13I − ·)
    return z.reshape(shape)


@register(name="nystromformer", family="low-rank", complexity="O(N·m·D + pinv_iters·m³)",
          memory="O(N·D + m²)",
          knobs=[Knob("landmarks", default=256, axis="landmarks", minimum=1, small=48, length=True,
                      help="m, the number of landmarks (segment means of Q and K)"),
                 Knob("pinv_iters", default=6, minimum=0,
                      help="iterations of the Moore–Penrose pseudo-inverse (the paper's 6)"),
                 KV_HEADS])
class NystromformerAttention(nn.Module):
    """Nyströmformer: softmax(Q K̃ᵀ/√D) · pinv(softmax(Q̃ K̃ᵀ/√D)) · softmax(Q̃ Kᵀ/√D) V, m landmarks.

    Landmarks Q̃, K̃ (m×D, m = `landmarks`) are segment means of Q and K. Segments are
    contiguous and cover all N positions with no padding: with N = s·m + r (0 <= r < m) the
    first r segments hold ⌈N/m⌉ = s + 1 positions and the last m − r hold ⌊N/m⌋ = s
    (``torch.tensor_split(x, m)``); e.g. N=1000, m=64: 40 segments of 16, then 24 of 15.
    m <= N is required (no empty segment). Scale 1/√D as in the paper. The default m = 256 is
    nystrom-attention's default (and its example's, at N = 16384).

    pinv is the paper's iterative Moore–Penrose pseudo-inverse, `pinv_iters` = 6 iterations from
    Z₀ = Aᵀ/(‖A‖₁‖A‖∞) (:func:`iterative_pinv`), not the exact one. A = softmax(Q̃ K̃ᵀ/√D) has
    nearly uniform rows (segment means shrink the scores), so it is close to rank one: each
    iteration multiplies a small singular value's share σ²/(‖A‖₁‖A‖∞) by ≈ 3.25, so after 6
    those below ≈ 0.03·√(‖A‖₁‖A‖∞) (≈ 0.03 for such a softmax) are still mostly uninverted.
    That truncation regularises: with the exact pinv the error against dense is larger at most
    m < N (verify's inputs, N=400, D=32: m=128 gives 0.039 against 0.008 with 6 iterations; of
    m = 4…200 only m=32 is better, 0.006 against 0.009), and at m = N (Q̃ = Q, K̃ = K, so
    A A⁺ A V is dense attention) 6 iterations are not dense (0.003 at N=400; dense to 1e-13 in
    float64 with the exact pinv, and with 30 or more iterations at N=64). More
    iterations are not safer in float32: they approach the inverse of an ill-conditioned matrix
    and amplify rounding (forward against the float64 reference at N=777, m=48: 8e-8 with 6
    iterations, 3e-3 with 20), and on an exactly singular matrix rounding outside its row space
    grows ×3.25 per iteration until it diverges.

    Computed right to left, no N×m or N×N tensor: W = softmax(Q̃ Kᵀ/√D) V (m×D) is
    scaled_dot_product_attention of the m landmark queries over all N keys (streaming over
    them), Z = pinv(softmax(Q̃ K̃ᵀ/√D)) (m×m), and out = softmax(Q K̃ᵀ/√D) (Z W) is SDPA of
    the N queries over the m landmark keys with values Z W.

    Cost: 4·B·H·m·N·D (W) + 4·B·H·N·m·D (out) + 2·B·H·m²·D (Q̃ K̃ᵀ) + 2·B·H·m²·D (Z W)
    + 8·pinv_iters·B·H·m³ (the pinv) FLOPs: 8·B·H·N·m·D + 4·B·H·m²·D + 8·iters·B·H·m³
    in all, linear in N for fixed m; the landmark means are B·(H + Hkv)·N·D additions.
    Memory O(B·H·(N·D + m·D + m²)): the output, the landmarks and a few m×m matrices
    (fwd+bwd: autograd keeps four m×m matrices per head and iteration).
    Bidirectional only (landmarks are means over segments that contain future positions).

    Grouped-query (``kv_heads`` = Hkv < H): K̃ is made once per kv head and repeated to the
    H query heads (m×D, small); W is SDPA with ``enable_gqa``, so K and V are never repeated.

    How it differs from nystrom-attention (lucidrains, 0.0.14): (1) N not a multiple of m: it
    pads the sequence at the front with zeros to m·⌈N/m⌉ positions and divides every segment sum
    by ⌈N/m⌉; without a mask the zero rows dilute the first landmarks and the padded keys (k = 0,
    score 0, v = 0) take part in softmax(Q̃ Kᵀ); here segments are uneven and nothing is padded
    (N=1000, m=64, H=8: outputs ‖Δ‖/‖v‖ = 3.7e-3 apart, with or without its mask, both 0.040
    from dense); (2) its Z₀ divides by the largest row and column sums over the whole batch and
    all heads, here per (batch, head) matrix, so one sequence's output does not depend on
    another's (the same when B·H = 1: 2e-8 apart at N=16384, m=256; 3e-7 with H=8);
    (3) it multiplies (A₁ Z)(A₃ V): N×m scores and probabilities materialised (711 MiB against
    our 39 MiB at N=16384, H=8, m=256) and 2·N·m² − 2·m²·D more FLOPs than A₁ (Z (A₃ V));
    (4) its NystromAttention includes the q, k, v and output projections and, by default, a
    depthwise-conv residual of V (kernel 33); this mechanism is the attention core only (as every
    mechanism here). The paper's own code (and HuggingFace's) reshapes N into m equal segments
    (N divisible by m), divides by ‖A‖₁ only (‖A‖∞ = 1 for a softmax) and switches to exact
    softmax attention when m = N; here m = N runs the same formula.
    """

    fidelity = (Fidelity("landmarks", (8, 32, 128, "N"), (decreasing(),),
                         why="more landmarks: finer segment means, a better Nyström approximation; not dense at "
                             "m = N with 6 iterations (the iterative pinv is not converged there)"),)

    supports_causal = False
    causal_reason = ("landmarks are means over segments that mix future positions (and every query row attends "
                     "through all m landmarks), so no causal mask can be applied")
    no_decode_reason = ("no causal form: the landmarks are segment means over the whole sequence, so there is no "
                        "prefix state a new token could extend")

    def __init__(self, *, head_dim: int, heads: int, n: int, causal: bool, seed: int, landmarks: int = 256,
                 pinv_iters: int = 6, kv_heads: int = 0):
        super().__init__()
        if causal:
            raise ValueError(f"nystromformer is not causal: {self.causal_reason}")
        self.heads = heads
        self.kv_heads = kv_heads or heads
        self.landmarks = int(landmarks)
        self.pinv_iters = int(pinv_iters)
        self.scale = 1.0 / math.sqrt(head_dim)

    @classmethod
    def check(cls, *, n: int, causal: bool, heads: int, head_dim: int, device: str, dtype: str, landmarks: int,
              pinv_iters: int, kv_heads: int = 0) -> list[str]:
        """m <= N: each of the m segments needs at least one position. Causal is refused by supports_causal."""
        if landmarks > n:
            return [(f"landmarks m={landmarks} exceeds N={n}: each of the m segments needs at least one position "
                     f"(choose landmarks <= {n})")]
        return []

    def _check_length(self, n: int) -> None:
        if self.landmarks > n:
            raise ValueError(f"nystromformer: landmarks m={self.landmarks} exceeds N={n}; "
                             "each segment needs at least one position")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h, n = q.shape[1], q.shape[2]
        self._check_length(n)
        gqa = k.shape[1] != h
        m = self.landmarks
        work = torch.float32 if q.dtype in LOW_PRECISION else q.dtype  # the m×m part
        q_l = landmarks(q, m)  # (B, H, m, D)
        k_l = repeat_kv(landmarks(k, m), h)  # (B, H, m, D)
        w = F.scaled_dot_product_attention(q_l, k, v, enable_gqa=gqa)  # (B, H, m, D) = softmax(Q̃Kᵀ/√D) V
        s = torch.matmul(q_l.to(work) * self.scale, k_l.to(work).transpose(-1, -2))  # (B, H, m, m)
        z = iterative_pinv(torch.softmax(s, dim=-1), self.pinv_iters)  # (B, H, m, m)
        zw = torch.matmul(z, w.to(work)).to(q.dtype)  # (B, H, m, D)
        return F.scaled_dot_product_attention(q, k_l, zw)  # (B, H, N, D) = softmax(QK̃ᵀ/√D) Z W

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The three kernels as explicit matrices, the paper's order (A₁ Z)(A₃ V); landmarks by
        ``torch.tensor_split``; the pinv iteration written out with matrix_norm for ‖A‖₁ and ‖A‖∞."""
        h, n, d = q.shape[1], q.shape[2], q.shape[3]
        self._check_length(n)
        k, v = repeat_kv(k, h), repeat_kv(v, h)  # (B, H, N, D)
        m = self.landmarks
        q_l = torch.stack([seg.mean(dim=2) for seg in torch.tensor_split(q, m, dim=2)], dim=2)  # (B, H, m, D)
        k_l = torch.stack([seg.mean(dim=2) for seg in torch.tensor_split(k, m, dim=2)], dim=2)  # (B, H, m, D)
        scale = 1.0 / math.sqrt(d)
        a1 = torch.softmax(q @ k_l.transpose(-1, -2) * scale, dim=-1)  # (B, H, N, m)
        a2 = torch.softmax(q_l @ k_l.transpose(-1, -2) * scale, dim=-1)  # (B, H, m, m)
        a3 = torch.softmax(q_l @ k.transpose(-1, -2) * scale, dim=-1)  # (B, H, m, N)
        eye = torch.eye(m, dtype=a2.dtype, device=a2.device)  # (m, m)
        norms = torch.linalg.matrix_norm(a2, ord=1) * torch.linalg.matrix_norm(a2, ord=float("inf"))  # (B, H)
        z = a2.transpose(-1, -2) / norms[..., None, None]  # (B, H, m, m)
        for _ in range(self.pinv_iters):
            az = a2 @ z
            z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))  # (B, H, m, m)
        return (a1 @ z) @ (a3 @ v)  # (B, H, N, D)

    @classmethod
    def analytic_flops(cls, *, batch: int, heads: int, n: int, head_dim: int, causal: bool, landmarks: int = 256,
                       pinv_iters: int = 6, kv_heads: int = 0) -> int:
        m = landmarks
        return batch * heads * (8 * n * m * head_dim + 4 * m * m * head_dim + 8 * pinv_iters * m ** 3)
