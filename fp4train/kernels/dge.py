"""Fused DGE weight-gradient pass: ``dW_master = dW ⊙ correction(W / s_w)`` in one kernel.

The factor is :func:`fp4train.dge.correction` of the scaled weight w / s (IEEE division): t is
the position of |w / s| inside its grid interval [a, a + δ] (δ the grid step of its binade, so
0.5 on [0, 2), 1 on [2, 4), 2 on [4, 6] for E2M1), f'(t) = (1/k)·|2t − 1|^(1/k − 1) clipped at
``clip``, and 0 beyond the format's max. The kernel reads dW (any float dtype, e.g. the
wgrad GEMM's bf16 output), W (float32) and s_w once and writes float32: one pass instead of
the reference's several. The power is computed as exp2(p·log2(·)), within a few float32 ulps
of ``torch.pow`` (the only place the kernels are not bit-exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp4train.kernels import quantize as _q
from fp4train.kernels.launch import cdiv, launch

__all__ = ["dge_weight_grad"]


@triton.jit
def _dge_weight_grad_kernel(
    dw_ptr,  # [N, K] weight gradient of the dequantized weight
    w_ptr,  # [N, K] master weight
    s_ptr,  # [N] float32 per-row scale of W's quantization
    out_ptr,  # [N, K] float32
    N,
    K,
    P: tl.constexpr,  # 1/k - 1
    DGE_K: tl.constexpr,  # k: the factor is divided by it, as the reference does
    CLIP: tl.constexpr,
    FMAX: tl.constexpr,
    MBITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m2 = (rows < N)[:, None] & (cols < K)[None, :]
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    dw = tl.load(dw_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=m2, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + rows, mask=rows < N, other=1.0)
    mag = tl.abs(_q.div_by_scale(w, s[:, None], _q.reciprocal(s)[:, None]))
    # absmax scaling puts |w/s| <= max; the rounded scale can push a row's largest weight an
    # ulp past it, which must not count as saturated (the reference clamps the same way)
    mag = tl.where(mag > FMAX, FMAX, mag)
    # interval width: the grid step of mag's binade (binades below the smallest normal share it)
    e = tl.maximum(((mag.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, MIN_EXP)
    inv_delta = ((127 + MBITS - e) << 23).to(tl.float32, bitcast=True)
    y = mag * inv_delta  # exact
    t = y - tl.floor(y)  # at ±max t is 0 here and 1 in the reference: the same factor 1/k
    u = tl.abs(2.0 * t - 1.0)
    d = tl.math.exp2(P * tl.math.log2(u))  # u == 0 gives +inf, clipped below
    d = tl.math.div_rn(d, tl.full(d.shape, DGE_K, tl.float32))
    d = tl.minimum(d, CLIP)
    d = tl.where(mag != mag, mag, d)
    tl.store(out_ptr + offs, dw * d, mask=m2)


@_q.custom_op("fp4train::dge_weight_grad")
def dge_weight_grad(
    dw: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, fmt: str, k: float, clip: float
) -> torch.Tensor:
    """``dw.float() * fp4train.dge.correction(weight / w_scale[:, None], fmt, k, clip)``.

    dw, weight: [N, K] (dw any float dtype, contiguous); w_scale: [N] float32 row scales of
    the forward's quantization of ``weight`` to ``fmt``. Returns float32 [N, K].
    """
    if dw.shape != weight.shape or dw.ndim != 2:
        raise ValueError(
            f"dw and weight must be 2-D of one shape, got {tuple(dw.shape)}, {tuple(weight.shape)}"
        )
    n, kk = weight.shape
    if w_scale.numel() != n:
        raise ValueError(f"w_scale must hold {n} values, got {tuple(w_scale.shape)}")
    c = _q.format_constants(fmt)
    out = _q.empty_output((n, kk), torch.float32, dw.device)
    block_n, block_k = 16, 256
    grid = (cdiv(kk, block_k), cdiv(n, block_n))
    launch(
        _dge_weight_grad_kernel, grid, dw.contiguous(), weight.contiguous(),
        w_scale.reshape(-1).float().contiguous(), out, n, kk, P=float(1.0 / k - 1.0),
        DGE_K=float(k), CLIP=float(clip), FMAX=c["FMAX"], MBITS=c["MBITS"], MIN_EXP=c["MIN_EXP"],
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8,
    )  # fmt: skip
    return out


@dge_weight_grad.op.register_fake
def _(dw, weight, w_scale, fmt, k, clip):
    return weight.new_empty(weight.shape, dtype=torch.float32)
