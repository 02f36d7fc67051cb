"""One fused Triton kernel for a :class:`fp4train.optim.LowPrecisionAdamW` step of a parameter.

The eager step decodes m and sqrt(v), applies AdamW and re-encodes them in about twenty
PyTorch kernels per parameter (on the H100, a 1.3B model's optimizer step took ≈ 190 ms more
than torch's fused AdamW). Here one launch reads the parameter, its gradient and the stored
states once and writes the updated parameter and the new states once: ≈ 17 bytes per element
against fused float32 AdamW's 28.

Each program takes ``NB`` scale blocks of ``BLOCK`` elements (the optimizer's ``block_size``,
a power of two) as an [NB, BLOCK] tile, so a block's new absmax scale is a row reduction. The
arithmetic is the eager step's, in the same order and in float32 (``m.lerp_(g, 1 − β1)``;
``sqrt(r²·β2 + (1 − β2)·g·g)``; ``denom = r / sqrt(1 − β2ᵗ) + eps``; ``p·(1 − lr·wd) + step ·
(m / denom)``), divisions correctly rounded; the states are rounded to nearest-even on their
grids by explicit arithmetic (as the quantize kernels do), so the interpreter and the GPU give
the same bits. Against the eager step the results may differ in the last bit where torch
contracts a multiply-add or divides by a scalar through its reciprocal (CUDA does), which can
move a requantized state by one grid step; tests compare within that tolerance.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp4train import formats
from fp4train.kernels.launch import cdiv, launch
from fp4train.kernels.quantize import (
    _absmax_scale,
    _round_to_grid,
    _to_bf16_rne,
    format_constants,
    grid_constants,
)
from fp4train.optim import FUSED_STATES

__all__ = ["adamw_lp_step"]

_NB = 8  # scale blocks per program
_FP16_MIN_SUB = float(formats.get("e5m10").min_subnormal)  # a positive sqrt(v) stays >= it


@triton.jit
def _adamw_lp_kernel(
    p_ptr,  # [n] parameter (float32 or bf16), updated in place
    g_ptr,  # [n] gradient
    m_ptr,  # [n] float8_e4m3fn: exp_avg values (read)
    ms_ptr,  # [nb] float32 exp_avg block scales (read)
    r_ptr,  # [n] float16: sqrt(exp_avg_sq) values (read)
    rs_ptr,  # [nb] float32 block scales (read)
    m_out,  # the same four, written
    ms_out,
    r_out,
    rs_out,
    n,
    lerp_w,  # 1 - beta1
    beta2,
    one_minus_beta2,
    sqrt_bc2,  # sqrt(1 - beta2**t)
    eps,
    decay,  # 1 - lr * weight_decay
    step_size,  # -lr / (1 - beta1**t)
    LERP_SMALL: tl.constexpr,  # |lerp_w| < 0.5: torch's lerp formula for small weights
    P_BF16: tl.constexpr,  # a bf16 parameter: stored rounded to nearest-even
    M_FMAX: tl.constexpr,
    M_MBITS: tl.constexpr,
    M_MIN_EXP: tl.constexpr,
    M_EMAX: tl.constexpr,
    R_FMAX: tl.constexpr,
    R_MBITS: tl.constexpr,
    R_MIN_EXP: tl.constexpr,
    R_EMAX: tl.constexpr,
    R_MIN_SUB: tl.constexpr,
    BLOCK: tl.constexpr,
    NB: tl.constexpr,
):
    pid = tl.program_id(0)
    blk = pid * NB + tl.arange(0, NB)
    offs = blk.to(tl.int64)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < n
    bmask = blk < tl.cdiv(n, BLOCK)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ms = tl.load(ms_ptr + blk, mask=bmask, other=1.0)[:, None]
    rs = tl.load(rs_ptr + blk, mask=bmask, other=1.0)[:, None]
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32) * ms
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32) * rs
    if LERP_SMALL:
        m = m + lerp_w * (g - m)
    else:
        m = g - (g - m) * (1.0 - lerp_w)
    r = tl.sqrt_rn((r * r) * beta2 + (one_minus_beta2 * g) * g)
    denom = tl.math.div_rn(r, sqrt_bc2 + tl.zeros_like(r)) + eps
    p = p * decay
    p = p + step_size * tl.math.div_rn(m, denom)
    if P_BF16:
        tl.store(p_ptr + offs, _to_bf16_rne(p), mask=mask)
    else:
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    # re-encode: block absmax scales, values rounded to nearest-even on the grids
    s_m = _absmax_scale(tl.max(tl.abs(m), axis=1), M_FMAX)
    s_r = _absmax_scale(tl.max(tl.abs(r), axis=1), R_FMAX)
    q_m = tl.math.div_rn(m, s_m[:, None] + tl.zeros_like(m))
    q_r = tl.math.div_rn(r, s_r[:, None] + tl.zeros_like(r))
    q_r = tl.where(q_r > 0, tl.maximum(q_r, R_MIN_SUB), q_r)  # a positive sqrt(v) never -> 0
    q_m = _round_to_grid(q_m, M_MBITS, M_MIN_EXP, M_EMAX, M_FMAX)
    q_r = _round_to_grid(q_r, R_MBITS, R_MIN_EXP, R_EMAX, R_FMAX)
    tl.store(m_out + offs, q_m.to(m_out.dtype.element_ty), mask=mask)
    tl.store(r_out + offs, q_r.to(r_out.dtype.element_ty), mask=mask)
    tl.store(ms_out + blk, s_m, mask=bmask)
    tl.store(rs_out + blk, s_r, mask=bmask)


def adamw_lp_step(
    p: torch.Tensor,
    g: torch.Tensor,
    state: dict,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    block_size: int,
) -> None:
    """One AdamW step of ``p`` (contiguous, float32 or bf16; updated in place) with gradient
    ``g`` (same number of elements), the ``state`` of :class:`LowPrecisionAdamW` with E4M3
    ``exp_avg`` and FP16 ``sqrt_exp_avg_sq`` (replaced by new tensors, so a state dict taken
    before keeps its values), ``step`` the step number t after the increment. One launch."""
    n = p.numel()
    if g.numel() != n or not p.is_contiguous():
        raise ValueError(
            f"adamw_lp_step needs a contiguous parameter and a gradient of its size, got "
            f"{tuple(p.shape)} (contiguous={p.is_contiguous()}) and {tuple(g.shape)}"
        )
    if block_size & (block_size - 1):
        raise ValueError(f"the fused step needs a power-of-two block_size, got {block_size}")
    m, ms = state["exp_avg"], state["exp_avg_scale"]
    r, rs = state["sqrt_exp_avg_sq"], state["sqrt_exp_avg_sq_scale"]
    if p.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the fused step updates float32 or bf16 parameters, got {p.dtype}")
    if m.dtype != torch.float8_e4m3fn or r.dtype != torch.float16:
        raise ValueError(f"the fused step stores {FUSED_STATES}, got {m.dtype} and {r.dtype}")
    m_new, r_new = torch.empty_like(m), torch.empty_like(r)
    ms_new, rs_new = torch.empty_like(ms), torch.empty_like(rs)
    if n:
        cm, cr = format_constants("e4m3"), grid_constants("e5m10")
        lerp_w = 1.0 - beta1
        grid = (cdiv(cdiv(n, block_size), _NB),)
        launch(
            _adamw_lp_kernel, grid, p.view(-1), g.reshape(-1), m, ms, r, rs, m_new, ms_new, r_new,
            rs_new, n, lerp_w, beta2, 1.0 - beta2, (1.0 - beta2**step) ** 0.5, eps,
            1.0 - lr * weight_decay, -lr / (1.0 - beta1**step), LERP_SMALL=abs(lerp_w) < 0.5,
            P_BF16=p.dtype == torch.bfloat16, M_FMAX=cm["FMAX"], M_MBITS=cm["MBITS"],
            M_MIN_EXP=cm["MIN_EXP"], M_EMAX=cm["EMAX"], R_FMAX=cr["FMAX"], R_MBITS=cr["MBITS"],
            R_MIN_EXP=cr["MIN_EXP"], R_EMAX=cr["EMAX"], R_MIN_SUB=_FP16_MIN_SUB, BLOCK=block_size,
            NB=_NB, num_warps=4,
        )  # fmt: skip
    state["exp_avg"], state["exp_avg_scale"] = m_new, ms_new
    state["sqrt_exp_avg_sq"], state["sqrt_exp_avg_sq_scale"] = r_new, rs_new
