"""OCC on the GPU: exact quantile thresholds by radix selection, and the compensation GEMMs.

**Thresholds.** :func:`fp4train.occ.quantile_thresholds` takes the order statistics of ranks
``round((1 − α)(n − 1))`` and ``round(α(n − 1))`` of each group (the tensor, or a row), from a
strided sample when the group is large. We select the same elements without sorting: a bf16
value's bits map to a 16-bit key that orders like the value, so a 256-bin histogram of the
key's high byte finds the bin holding each rank, and a second histogram of the low byte within
that bin finds the value. Two passes over the (sampled) data, four small launches, and the
result is exact: the same float32 thresholds as the reference, bit for bit.

**Compensation.** R = X − clamp(X, lo, hi) is nonzero on about 2(1 − α) of the entries. The
forward's quantize kernel writes R (dense, bf16) in the pass that quantizes the clamped X, and
the compensation terms are dense bf16 GEMMs on the tensor cores with float32 accumulation:
Y += R · Wᵀ and dW += dYᵀ · R. Nothing depends on the data's outlier pattern, so there is no
host sync and a step with OCC can be captured in a CUDA graph. (An earlier version gathered
the columns holding an outlier, which syncs for their count: at α = 0.99 nearly every column
holds one, so it cost a gather on top of the same dense GEMM. cuSPARSE's CSR product at 1%
density measured 2.7× slower than the dense GEMM on an H100: benchmarks/NOTES.md.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp4train import occ as _occ
from fp4train.kernels import quantize as _q

__all__ = ["occ_thresholds", "occ_compensate", "occ_compensate_wgrad"]

_CHUNK = 4096  # elements per program of the histogram passes


@triton.jit
def _key16(x):
    """bf16 bits -> 16-bit key (int32) that orders like the values (-0 just below +0)."""
    b = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return tl.where(b >= 0x8000, b ^ 0xFFFF, b | 0x8000)


@triton.jit
def _hist_high_kernel(x_ptr, n, hist_ptr, CHUNK: tl.constexpr):
    """hist[g, key >> 8] += 1 over group g = program_id(1), elements [c*CHUNK, (c+1)*CHUNK)."""
    c = tl.program_id(0)
    g = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    x = tl.load(x_ptr + g.to(tl.int64) * n + offs, mask=mask, other=0.0)
    # masked lanes land in bin 0 and are taken back out
    high = tl.where(mask, _key16(x) >> 8, 0)
    h = tl.histogram(high, 256)
    bins = tl.arange(0, 256)
    h = h - tl.where(bins == 0, tl.sum((~mask).to(tl.int32)), 0)
    tl.atomic_add(hist_ptr + g * 256 + bins, h)


@triton.jit
def _select_bin(hist, rank):
    """The bin holding the element of 0-based ``rank`` and that element's rank inside it."""
    cum = tl.cumsum(hist, axis=0)
    b = tl.sum((cum <= rank).to(tl.int32))
    below = tl.sum(tl.where(tl.arange(0, 256) < b, hist, 0))
    return b, rank - below


@triton.jit
def _select_high_kernel(hist_ptr, state_ptr, rank_lo, rank_hi):
    g = tl.program_id(0)
    hist = tl.load(hist_ptr + g * 256 + tl.arange(0, 256))
    b_lo, r_lo = _select_bin(hist, rank_lo)
    b_hi, r_hi = _select_bin(hist, rank_hi)
    tl.store(state_ptr + g * 4 + 0, b_lo)
    tl.store(state_ptr + g * 4 + 1, r_lo)
    tl.store(state_ptr + g * 4 + 2, b_hi)
    tl.store(state_ptr + g * 4 + 3, r_hi)


@triton.jit
def _hist_low_kernel(x_ptr, n, state_ptr, hist_ptr, CHUNK: tl.constexpr):
    """hist[g, j, key & 255] += 1 for elements whose high byte is the selected bin j (lo, hi)."""
    c = tl.program_id(0)
    g = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    x = tl.load(x_ptr + g.to(tl.int64) * n + offs, mask=mask, other=0.0)
    key = _key16(x)
    bins = tl.arange(0, 256)
    for j in tl.static_range(2):
        sel = mask & ((key >> 8) == tl.load(state_ptr + g * 4 + 2 * j))
        h = tl.histogram(tl.where(sel, key & 0xFF, 0), 256)
        h = h - tl.where(bins == 0, tl.sum((~sel).to(tl.int32)), 0)
        tl.atomic_add(hist_ptr + (g * 2 + j) * 256 + bins, h)


@triton.jit
def _select_low_kernel(hist_ptr, state_ptr, lo_ptr, hi_ptr):
    g = tl.program_id(0)
    for j in tl.static_range(2):
        hist = tl.load(hist_ptr + (g * 2 + j) * 256 + tl.arange(0, 256))
        b, _ = _select_bin(hist, tl.load(state_ptr + g * 4 + 2 * j + 1))
        key = (tl.load(state_ptr + g * 4 + 2 * j) << 8) | b
        bits = tl.where(key >= 0x8000, key ^ 0x8000, key ^ 0xFFFF)
        # bf16 bits are the high half of the float32 bits
        value = (bits << 16).to(tl.float32, bitcast=True)
        if j == 0:
            tl.store(lo_ptr + g, value)
        else:
            tl.store(hi_ptr + g, value)


def _groups(x: torch.Tensor, granularity: str, exact_max_numel: int, sample_size: int):
    """The groups [G, n] (contiguous) whose quantiles the reference takes; shape of lo/hi."""
    if granularity == "tensor":
        v = x.reshape(1, -1)
    else:
        v = x.reshape(-1, x.shape[-1])
    n = v.shape[-1]
    if n > exact_max_numel:
        period = x.shape[-1] if granularity == "tensor" and x.ndim else 1
        s = _occ._stride(n, sample_size, period)
        v = v[:, s // 2 :: s]
    return v.contiguous()


@_q.custom_op("fp4train::occ_thresholds")
def occ_thresholds(
    x: torch.Tensor,
    alpha: float,
    granularity: str,
    exact_max_numel: int = 2**22,
    sample_size: int = 2**20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp4train.occ.quantile_thresholds`` for bf16 ``x`` [M, K], without a sort.

    Returns float32 ``(lo, hi)``: shape [1] for ``granularity="tensor"``, [M] for ``"row"``;
    equal bit for bit to the reference's thresholds (same sample, same ranks, exact selection).
    Does not check for NaN/Inf (that needs a host sync); NaN sorts above +Inf here.
    """
    if x.dtype != torch.bfloat16 or x.ndim != 2:
        raise ValueError(f"occ_thresholds needs a 2-D bf16 tensor, got {x.dtype} {tuple(x.shape)}")
    if granularity not in _occ.GRANULARITIES:
        raise ValueError(f"granularity must be one of {_occ.GRANULARITIES}, got {granularity!r}")
    if x.numel() == 0:
        raise ValueError("cannot take quantiles of an empty tensor")
    v = _groups(x, granularity, exact_max_numel, sample_size)  # [G, n]
    g, n = v.shape
    dev = x.device
    hist_high = torch.zeros(g, 256, dtype=torch.int32, device=dev)
    hist_low = torch.zeros(g, 2, 256, dtype=torch.int32, device=dev)
    state = torch.empty(g, 4, dtype=torch.int32, device=dev)
    lo = _q.empty_output(g, torch.float32, dev)
    hi = _q.empty_output(g, torch.float32, dev)
    grid = (triton.cdiv(n, _CHUNK), g)
    _hist_high_kernel[grid](v, n, hist_high, CHUNK=_CHUNK, num_warps=8)
    _select_high_kernel[(g,)](
        hist_high, state, _occ._rank(1 - alpha, n), _occ._rank(alpha, n), num_warps=1
    )
    _hist_low_kernel[grid](v, n, state, hist_low, CHUNK=_CHUNK, num_warps=8)
    _select_low_kernel[(g,)](hist_low, state, lo, hi, num_warps=1)
    return lo, hi


@occ_thresholds.op.register_fake
def _(x, alpha, granularity, exact_max_numel=2**22, sample_size=2**20):
    g = 1 if granularity == "tensor" else x.shape[0]
    return x.new_empty(g, dtype=torch.float32), x.new_empty(g, dtype=torch.float32)


def occ_compensate(y: torch.Tensor, resid: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Forward compensation ``Y + R · Wᵀ``: y [M, N] bf16 (the quantized GEMM's output),
    ``resid`` [M, K] bf16 from ``quantize_rows(x, lo=lo, hi=hi)``, weight [N, K] (cast to bf16);
    one bf16 GEMM with float32 accumulation."""
    return torch.addmm(y, resid, weight.to(torch.bfloat16).t())


def occ_compensate_wgrad(dw: torch.Tensor, dy: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """Weight-gradient compensation ``dW += dYᵀ · R`` in place on the float32 ``dw`` [N, K];
    dy [M, N], ``resid`` [M, K] bf16. Returns ``dw``."""
    return dw.add_(dy.to(torch.bfloat16).t() @ resid)
