"""4-bit block-wise weight quantization for linears y = x @ W.T + b, W (N, K): the math only.

Three algorithms, one output format (`Int4Weight`, the layout ORT's MatMulNBits packs):
- `quantize_rtn`: round to nearest, per block of `block_size` input columns (the baseline);
- `quantize_gptq`: GPTQ (Frantar et al. 2022), error feedback through the inverse Hessian;
- `quantize_awq`: AWQ (Lin et al. 2023), per-input-channel scales searched on activations,
  plus a per-block clipping search.

Every block's range holds 0, as in ORT's and GPTQ's quantizers: the zero point is then an exact
integer in [0, 15], a zero weight dequantizes to exactly 0 and zero-padding a partial last block
changes nothing.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

MAXQ = 15  # 4-bit codes 0..15


@dataclass
class Int4Weight:
    """Codes and per-block parameters: w[n, k] = (q[n, k] - zp[n, k // bs]) * scale[n, k // bs]."""

    q: torch.Tensor  # (N, K) uint8 in [0, 15]
    scales: torch.Tensor  # (N, n_blocks) float32, > 0
    zero_points: torch.Tensor  # (N, n_blocks) uint8 in [0, 15]
    block_size: int

    def __post_init__(self) -> None:
        n, k = self.q.shape
        nb = math.ceil(k / self.block_size)
        if self.q.dtype != torch.uint8 or self.zero_points.dtype != torch.uint8:
            raise TypeError("Int4Weight: q and zero_points must be uint8")
        if self.scales.dtype != torch.float32:
            raise TypeError("Int4Weight: scales must be float32")
        if self.scales.shape != (n, nb) or self.zero_points.shape != (n, nb):
            raise ValueError(f"Int4Weight: scales/zero_points must be ({n}, {nb})")

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        block = torch.arange(self.q.shape[1], device=self.q.device) // self.block_size  # (K,)
        zp = self.zero_points[:, block].float()  # (N, K)
        return (self.q.float() - zp) * self.scales[:, block]

    def split(self, sizes: list[int]) -> list[Int4Weight]:
        """Split along N, e.g. a fused q/k/v weight quantized as one back into three."""
        parts = zip(
            self.q.split(sizes),
            self.scales.split(sizes),
            self.zero_points.split(sizes),
            strict=True,
        )
        return [Int4Weight(q, s, z, self.block_size) for q, s, z in parts]


# ---------------------------------------------------------------------------------------------
# Shared block quantizer


def _group_params(
    w: torch.Tensor, symmetric: bool, shrink: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (both float) of each group of the last dim: (..., g) -> (...), (...).

    Asymmetric: range [min(w, 0), max(w, 0)] mapped onto 0..15.
    Symmetric: zp = 8 and scale = absmax / 7, so codes 1..15 cover [-absmax, absmax] exactly and
    nothing clips; code 0 (-8) is unused. ORT's own symmetric quantizer reaches -8 by letting the
    scale go negative; we keep scales positive so no consumer is surprised.
    `shrink` (broadcast to (...)) narrows the range for the clipping search; values outside clamp.
    """
    wmin = w.amin(-1).clamp(max=0) * shrink
    wmax = w.amax(-1).clamp(min=0) * shrink
    if symmetric:
        scale = torch.maximum(-wmin, wmax) / 7
    else:
        scale = (wmax - wmin) / MAXQ
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale
    if symmetric:
        zp = torch.full_like(scale, 8.0)
    else:
        zp = torch.round(-wmin / scale)  # in [0, 15] because wmin <= 0 <= wmax
    return scale, zp


def _codes(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """Float codes in [0, 15]; scale and zp broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zp, 0, MAXQ)


def _blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """(N, K) -> (N, n_blocks, block_size), zero-padded (harmless: every range holds 0)."""
    n, k = w.shape
    nb = math.ceil(k / block_size)
    return torch.nn.functional.pad(w, (0, nb * block_size - k)).reshape(n, nb, block_size)


def _pack(wb: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, k: int, bs: int) -> Int4Weight:
    """Quantize blocked weights (N, nb, bs) with per-block (N, nb) parameters."""
    q = _codes(wb, scale[..., None], zp[..., None]).reshape(wb.shape[0], -1)[:, :k]  # (N, K)
    return Int4Weight(q.to(torch.uint8), scale.float(), zp.to(torch.uint8), bs)


def _check_weight(w: torch.Tensor, block_size: int) -> torch.Tensor:
    if w.dim() != 2:
        raise ValueError(f"expected a (N, K) weight, got shape {tuple(w.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return w.detach().float()


# ---------------------------------------------------------------------------------------------
# RTN


def quantize_rtn(w: torch.Tensor, block_size: int = 32, symmetric: bool = False) -> Int4Weight:
    """Round to nearest with min/max (or absmax) per block of `block_size` input columns."""
    w = _check_weight(w, block_size)
    wb = _blocks(w, block_size)  # (N, nb, bs)
    scale, zp = _group_params(wb, symmetric)  # (N, nb)
    return _pack(wb, scale, zp, w.shape[1], block_size)


# ---------------------------------------------------------------------------------------------
# GPTQ


class HessianAccumulator:
    """Running GPTQ Hessian H = 2/n * X^T X over every row (token) x of shape (K,) seen.

    Sums in float64 so long calibration runs lose nothing; `hessian()` returns float32 (K, K).
    """

    def __init__(self) -> None:
        self._xtx: torch.Tensor | None = None  # (K, K) float64
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # (T, K)
        if self._xtx is None:
            self._xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        elif x.shape[1] != self._xtx.shape[0]:
            raise ValueError(f"expected {self._xtx.shape[0]} input features, got {x.shape[1]}")
        self._xtx.addmm_(x.T, x)
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self._xtx is None or self.n == 0:
            raise ValueError("HessianAccumulator: no activations were added")
        return (self._xtx * (2.0 / self.n)).float()


def inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (float64 in, float32 out).

    GPTQ only needs the rows of U: U[i, i:] / U[i, i] spreads column i's error over the columns
    after it. If H is not positive definite (too few calibration tokens, float error) the
    damping grows tenfold up to 100% of the mean diagonal before giving up.
    """
    mean_diag = h.diagonal().mean()
    tries = [damp * 10**i for i in range(8) if i == 0 or damp * 10**i <= 1.0]
    for d in tries:
        hd = h.clone()
        hd.diagonal().add_(d * mean_diag)
        lower, info = torch.linalg.cholesky_ex(hd)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0 and torch.isfinite(upper).all():
                if d != damp:
                    warnings.warn(
                        f"GPTQ: Hessian needed damping {d:g} (asked {damp:g})", stacklevel=3
                    )
                return upper.float()
    raise ValueError(
        f"GPTQ: Hessian is not positive definite even with damping {tries[-1]:g} of its mean "
        "diagonal; calibrate on more tokens or check the activations"
    )


def quantize_gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    block_size: int = 32,
    damp: float = 0.01,
    act_order: bool = False,
    lazy_batch: int = 128,
    symmetric: bool = False,
) -> Int4Weight:
    """GPTQ: quantize columns one by one, pushing each column's error onto the unquantized ones.

    `hessian` is 2/n X^T X (K, K) of the layer's calibration inputs (see HessianAccumulator).
    Block scales come from the weights as updated by the error feedback when the block's first
    column is reached (the reference `groupsize` handling). With `act_order` columns go in order
    of decreasing H[i, i], but each column keeps the block of its natural position, and block
    parameters are fixed beforehand from the original weights (the reference `static_groups`),
    because a block's columns are then quantized far apart.
    """
    w = _check_weight(w, block_size).clone()  # (N, K)
    n, k = w.shape
    h = hessian.detach().to(device=w.device, dtype=torch.float64).clone()  # (K, K)
    if h.shape != (k, k):
        raise ValueError(f"hessian must be ({k}, {k}), got {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise ValueError("GPTQ: hessian has non-finite entries")

    # Dead inputs (always zero) carry no information: their weights are free, set them to 0
    # (which quantizes exactly) and give H a unit diagonal there so it stays invertible.
    dead = torch.nonzero(h.diagonal() == 0).flatten()
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    nb = math.ceil(k / block_size)
    scales = torch.ones(n, nb, device=w.device)  # (N, nb)
    zps = torch.zeros(n, nb, device=w.device)  # (N, nb), float until packed
    codes = torch.zeros(n, k, device=w.device)  # (N, K), natural column order

    if act_order:
        scales, zps = _group_params(_blocks(w, block_size), symmetric)  # static groups
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        lazy = max(1, lazy_batch)
    else:
        perm = torch.arange(k, device=w.device)
        # whole blocks per lazy batch, so a block's columns are fully updated when it starts
        lazy = max(1, math.ceil(lazy_batch / block_size)) * block_size
    block_of = (perm // block_size).tolist()  # processing position -> natural block
    col_of = perm.tolist()
    hinv = inverse_hessian_cholesky(h, damp)  # (K, K) upper

    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1 = w[:, i1:i2].clone()  # (N, B), updated within the batch
        err1 = torch.zeros_like(w1)  # (N, B)
        hinv1 = hinv[i1:i2, i1:i2]  # (B, B)
        for i in range(i2 - i1):
            g = block_of[i1 + i]
            if not act_order and (i1 + i) % block_size == 0:
                scales[:, g], zps[:, g] = _group_params(w1[:, i : i + block_size], symmetric)
            col = w1[:, i]  # (N,)
            q = _codes(col, scales[:, g], zps[:, g])  # (N,)
            codes[:, col_of[i1 + i]] = q
            err = (col - (q - zps[:, g]) * scales[:, g]) / hinv1[i, i]  # (N,)
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]  # the deferred (lazy) update of later columns

    return Int4Weight(codes.to(torch.uint8), scales.float(), zps.to(torch.uint8), block_size)


# ---------------------------------------------------------------------------------------------
# AWQ


def _awq_clip(
    wb: torch.Tensor, xb: torch.Tensor, symmetric: bool, grid: int, max_shrink: float
) -> torch.Tensor:
    """Per-block range shrink factor (N, nb) minimising each block's partial-output error.

    wb (N, nb, bs) weights, xb (T, nb, bs) inputs. Like the reference, blocks are scored
    independently (the cross terms between blocks' errors are ignored).
    """
    n, nb, _ = wb.shape
    factors = [1 - i / grid for i in range(int(max_shrink * grid) + 1)]
    best = torch.ones(n, nb, device=wb.device)
    rows = max(1, 2**24 // max(1, xb.shape[0] * nb))  # bound the (rows, T, nb) temporaries
    for r0 in range(0, n, rows):
        w = wb[r0 : r0 + rows]  # (R, nb, bs)
        ref = torch.einsum("tgb,rgb->rtg", xb, w)  # (R, T, nb)
        best_err = torch.full(w.shape[:2], math.inf, device=wb.device)  # (R, nb)
        for f in factors:
            scale, zp = _group_params(w, symmetric, f)  # (R, nb)
            deq = (_codes(w, scale[..., None], zp[..., None]) - zp[..., None]) * scale[..., None]
            err = (torch.einsum("tgb,rgb->rtg", xb, deq) - ref).pow(2).mean(1)  # (R, nb)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[r0 : r0 + rows][better] = f
    return best


def quantize_awq(
    w: torch.Tensor,
    x_calib: torch.Tensor,
    block_size: int = 32,
    grid: int = 20,
    symmetric: bool = False,
    clip: bool = True,
    max_shrink: float = 0.5,
    clip_tokens: int = 512,
) -> tuple[Int4Weight, torch.Tensor]:
    """AWQ: scale input channels by s = mean|x|^alpha before quantizing, alpha in {0, 1/grid, .. 1}.

    Returns (quantized W * s, s (K,)): the layer computes (x / s) @ dequant.T, so the caller folds
    1/s into the op producing x (LayerNorm weight and bias, previous linear's rows) or scales x.
    alpha = 0 gives s = 1, plain RTN, so the search never does worse than RTN on `x_calib`.
    Linears sharing one input (q/k/v) must share s: pass their weights concatenated along N and
    `Int4Weight.split` the result. `x_calib` (..., K) should be a few thousand tokens at most.
    With `clip`, each block's range is then shrunk by up to `max_shrink`, scored on `clip_tokens`
    evenly spaced tokens.
    """
    w = _check_weight(w, block_size)  # (N, K)
    k = w.shape[1]
    x = x_calib.detach().reshape(-1, k).to(w)  # (T, K)
    ref = x @ w.T  # (T, N)
    x_mean = x.abs().mean(0)  # (K,)

    best_err, best_s = math.inf, torch.ones_like(x_mean)
    for i in range(grid + 1):
        s = x_mean.pow(i / grid).clamp(min=1e-4)  # (K,); dead channels stay representable
        s = s / (s.max() * s.min()).sqrt()  # centre around 1: neither W*s nor x/s blows up
        wq = quantize_rtn(w * s, block_size, symmetric).dequantize()  # (N, K)
        err = ((x / s) @ wq.T - ref).pow(2).mean().item()
        if err < best_err:
            best_err, best_s = err, s

    wb = _blocks(w * best_s, block_size)  # (N, nb, bs)
    shrink: torch.Tensor | float = 1.0
    if clip:
        xs = x[:: max(1, x.shape[0] // clip_tokens)] / best_s  # (T', K)
        shrink = _awq_clip(wb, _blocks(xs, block_size), symmetric, grid, max_shrink)
    scale, zp = _group_params(wb, symmetric, shrink)  # (N, nb)
    return _pack(wb, scale, zp, k, block_size), best_s
