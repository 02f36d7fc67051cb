"""FP4Linear: a drop-in ``nn.Linear`` whose three GEMMs run in FP4/FP8 as a Recipe says.

A linear layer Y = X Wᵀ + b (X [M, K] tokens × in-features, W [N, K]) has three GEMMs::

    fwd:   Y  = X  · Wᵀ    [M,K] @ [K,N] -> [M,N]   reduce over K
    dgrad: dX = dY · W     [M,N] @ [N,K] -> [M,K]   reduce over N
    wgrad: dW = dYᵀ · X    [N,M] @ [M,K] -> [N,K]   reduce over M

Each operand is quantized per the recipe (``fp4train.recipe``). In the paper's setting
(``"fp4-paper"``) X is clamped at its α-quantiles (OCC), X_c and W are quantized to E2M1 with
one absmax scale per token / per output channel, and the clamped-off sparse residual R is
multiplied in high precision and added back. Backward reuses the forward's FP4 tensors:
their per-row scales lie on the reduction dims of dgrad and wgrad, so they are folded into dY
before dY is quantized to E5M2 (per row for dgrad, per column for wgrad). The weight gradient
is then corrected by the DGE factor f'(w/s) (``fp4train.dge``), or passed straight through.

Two backends compute the same numbers:

- ``reference``: plain PyTorch in float32 on the dequantized grid values; any device. This
  is the definition of correct.
- ``triton`` (``fp4train.kernels``): fused quantization kernels storing the grid values as
  float8 (every E2M1 value is an E4M3 value) and FP8 tensor-core GEMMs via
  ``torch._scaled_mm`` with row-wise float32 scales, so the FP4 GEMM is simulated exactly.
  Quantized values match the reference bit for bit; GEMM outputs differ only by float32
  accumulation order, and with OCC by the residual R, which the triton path holds dense in
  bf16 (the reference: its nonzeros in float32) and multiplies on bf16 tensor cores.

``backend="auto"`` picks triton on CUDA when it supports the recipe and shapes, and the
reference otherwise (with a one-time warning on CUDA, since the numbers are the same but the
speed is not).

DX passes straight through the OCC clamp: dX = dgrad(dY, Ŵ), outliers included.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from fp4train import dge as _dge
from fp4train import occ as _occ
from fp4train.quantize import QuantizedTensor, quantize
from fp4train.recipe import OperandSpec, Recipe

__all__ = ["FP4Linear", "reference_forward", "reference_backward"]

log = logging.getLogger("fp4train")
_warned_fallback: set[str] = set()


# ---------------------------------------------------------------------------- reference
def _quant(
    t: torch.Tensor, spec: OperandSpec, reduce_dim: int, nonfinite: str
) -> QuantizedTensor | None:
    """Quantize a 2-D operand per ``spec``; blocks run along the GEMM's reduction dim."""
    if not spec.quantized:
        return None
    kw = dict(rounding=spec.rounding, nonfinite=nonfinite)
    if spec.granularity == "block" and reduce_dim == 0:
        q = quantize(t.t(), spec.format, "block", block_size=spec.block_size, **kw)
        return QuantizedTensor(q.data.t(), q.scale.t(), q.fmt, "block_t", q.block_size)
    return quantize(t, spec.format, spec.granularity, block_size=spec.block_size, **kw)


def _deq(q: QuantizedTensor | None, t: torch.Tensor) -> torch.Tensor:
    if q is None:
        return t
    if q.granularity == "block_t":  # blocks along dim 0
        return q.data * q.scale.repeat_interleave(q.block_size, dim=0)
    return q.dequantize()


def reference_forward(
    x2d: torch.Tensor, weight: torch.Tensor, recipe: Recipe
) -> tuple[torch.Tensor, tuple]:
    """Forward GEMM in float32: returns y [M, N] float32 and the tensors backward needs."""
    x_hp, w_hp = x2d.float(), weight.float()  # [M, K], [N, K]
    nf = recipe.nonfinite
    residual = None
    if recipe.occ is not None:
        if nf == "raise":
            _occ_check_finite(x_hp)
        x_c, residual = _occ.clamp_outliers(x_hp, recipe.occ.alpha, recipe.occ.granularity)
        if not recipe.occ.compensate:
            residual = None
    else:
        x_c = x_hp
    qx = _quant(x_c, recipe.fwd_x, reduce_dim=1, nonfinite=nf)
    if residual is not None and recipe.occ.compensation == "e4m3":
        # the outliers ride in X's FP8 operand on the E4M3 grid; only the part beyond
        # E4M3's range (R₂, usually empty) stays for the high-precision products
        data8, r2 = _occ.outliers_on_e4m3(x_hp, x_c.float(), qx.data, qx.scale)
        qx = dataclasses.replace(qx, data=data8)
        residual = _occ.SparseResidual.from_dense(r2)
    qw = _quant(w_hp, recipe.fwd_w, reduce_dim=1, nonfinite=nf)
    x_hat, w_hat = _deq(qx, x_c), _deq(qw, w_hp)
    # fwd: Y = Q(X_c) · Q(W)ᵀ + R · Wᵀ   [M,K] @ [K,N] -> [M,N]
    # (compensation "e4m3": Y = (Q(X_c) + O) · Q(W)ᵀ + R₂ · Wᵀ, O the outliers in E4M3)
    y = x_hat @ w_hat.t()
    r_idx = r_val = None
    if residual is not None:
        y = y + residual.matmul_t(w_hp)  # sparse R [M,K] @ Wᵀ, float32
        r_idx, r_val = residual.indices, residual.values
        if recipe.act_save == "e4m3":  # wgrad's copy of R in E4M3, one scale per row
            q_r = quantize(residual.to_dense(), "e4m3", "row", nonfinite="propagate")
            r_val = q_r.dequantize().reshape(-1)[r_idx]
    # x_c is only needed when wgrad re-quantizes X itself
    x_keep = None if recipe.wgrad_x.reuse_fwd else x_c
    saved = (x_keep, _scale_of(qx), _scale_of(qw), _data_of(qx), _data_of(qw), r_idx, r_val)
    return y, saved


def _scale_of(q: QuantizedTensor | None) -> torch.Tensor | None:
    return None if q is None else q.scale


def _data_of(q: QuantizedTensor | None) -> torch.Tensor | None:
    return None if q is None else q.data


def _occ_check_finite(x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"FP4Linear input holds {int(torch.isnan(x).sum())} NaN and "
            f"{int(torch.isinf(x).sum())} Inf values: cannot clamp outliers or quantize it"
        )


def reference_backward(
    saved: tuple,
    dy2d: torch.Tensor,
    weight: torch.Tensor,
    recipe: Recipe,
    need_dx: bool = True,
    need_dw: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dgrad and wgrad in float32 per the recipe; returns (dx [M, K], dw [N, K])."""
    x_c, s_x, s_w, qx_data, qw_data, r_idx, r_val = saved
    dy = dy2d.float()  # [M, N]
    w_hp = weight.float()
    nf = recipe.nonfinite
    dx = dw = None
    if need_dx:
        if recipe.dgrad_w.reuse_fwd:
            # fold W's per-out-channel scale (on the reduction dim N) into dY's columns
            dy_fold = dy * s_w.reshape(1, -1)  # [M,N] * [1,N] (or a scalar)
            q_dy = _quant(dy_fold, recipe.dgrad_dy, reduce_dim=1, nonfinite=nf)
            # dgrad: dX = Q(dY·diag(s_w)) · W_q   [M,N] @ [N,K] -> [M,K]
            dx = _deq(q_dy, dy_fold) @ qw_data
        else:
            q_w = _quant(w_hp, recipe.dgrad_w, reduce_dim=0, nonfinite=nf)
            q_dy = _quant(dy, recipe.dgrad_dy, reduce_dim=1, nonfinite=nf)
            dx = _deq(q_dy, dy) @ _deq(q_w, w_hp)
    if need_dw:
        if recipe.wgrad_x.reuse_fwd:
            # fold X's per-token scale (on the reduction dim M) into dY's rows
            dy_fold = dy * s_x.reshape(-1, 1)  # [M,N] * [M,1] (or a scalar)
            q_dy = _quant(dy_fold, recipe.wgrad_dy, reduce_dim=0, nonfinite=nf)
            # wgrad: dW = Q(diag(s_x)·dY)ᵀ · X_q   [N,M] @ [M,K] -> [N,K]
            dw = _deq(q_dy, dy_fold).t() @ qx_data
        else:
            q_x = _quant(x_c, recipe.wgrad_x, reduce_dim=0, nonfinite=nf)
            q_dy = _quant(dy, recipe.wgrad_dy, reduce_dim=0, nonfinite=nf)
            dw = _deq(q_dy, dy).t() @ _deq(q_x, x_c)
        if r_idx is not None:  # compensation: dYᵀ · R in high precision
            residual = _occ.SparseResidual(r_idx, r_val, (dy.shape[0], w_hp.shape[1]))
            dw = dw + residual.t_matmul(dy)
        if recipe.dge is not None:
            # DGE: d(master W) = d(Ŵ) · f'(w / s) at w's position in its grid interval
            s_full = _expand_scale(s_w, recipe.fwd_w, w_hp.shape)
            fmax = recipe.fwd_w.fmt().max
            # absmax scaling puts |w/s| <= max; the rounded scale can push a row's largest
            # weight an ulp past it, which correction() would treat as saturated (factor 0)
            w_scaled = torch.clamp(w_hp / s_full, -fmax, fmax)
            dw = dw * _dge.correction(w_scaled, recipe.fwd_w.format, recipe.dge.k, recipe.dge.clip)
    return dx, dw


def _expand_scale(scale: torch.Tensor, spec: OperandSpec, shape: torch.Size) -> torch.Tensor:
    if spec.granularity == "block":
        return scale.repeat_interleave(spec.block_size, dim=-1)
    return scale.expand(shape)


# ---------------------------------------------------------------------------- autograd
def _use_triton(x: torch.Tensor, layer: FP4Linear) -> bool:
    recipe = layer.recipe
    if recipe.backend == "reference" or not x.is_cuda:
        if recipe.backend == "triton":
            raise RuntimeError(
                f"recipe backend='triton' needs a CUDA tensor, got one on {x.device}; "
                "use backend='reference' or 'auto' on CPU"
            )
        return False
    from fp4train import kernels

    reason = None
    if not kernels.triton_available():
        reason = "triton or an FP8-capable GPU (sm_89+) is not available"
    else:
        reason = kernels.check_supported(recipe, layer.in_features, layer.out_features)
    if reason is None:
        return True
    if recipe.backend == "triton":
        raise RuntimeError(f"the triton backend cannot run recipe {recipe.name!r}: {reason}")
    key = f"{recipe.name}:{reason}"
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        log.warning("fp4train: recipe %r runs on the slow reference path: %s", recipe.name, reason)
    return False


class _FP4LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, recipe, use_triton, out_dtype, grad_enabled):
        if use_triton:
            from fp4train import kernels

            # OCC's residual serves only the weight gradient: none kept when W needs none or
            # no graph is recorded (no_grad / inference_mode, where needs_input_grad still
            # says True); a dense R is packed to its nonzeros later, without waiting
            # (ctx.deferred)
            deferred = []
            need_residual = grad_enabled and ctx.needs_input_grad[1]
            y, saved = kernels.linear_forward(x2d, weight, recipe, need_residual, deferred)
            ctx.deferred = deferred[0] if deferred else None
        else:
            y, saved = reference_forward(x2d, weight, recipe)
        ctx.recipe, ctx.use_triton, ctx.x_dtype = recipe, use_triton, x2d.dtype
        ctx.save_for_backward(weight, *saved)
        # no `.to` when the dtype already matches: torch 2.11's Dynamo turns the gradient of a
        # Function output that is a no-op `.to` of an intermediate into zeros
        return y if y.dtype == out_dtype else y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy2d):
        weight, *saved = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.use_triton:
            from fp4train import kernels

            dx, dw = kernels.linear_backward(
                tuple(saved), dy2d, weight, ctx.recipe, need_dx, need_dw, ctx.deferred
            )
        else:
            dx, dw = reference_backward(tuple(saved), dy2d, weight, ctx.recipe, need_dx, need_dw)
        dx = dx.to(ctx.x_dtype) if dx is not None else None
        dw = dw.to(weight.dtype) if dw is not None else None
        return dx, dw, None, None, None, None


# ---------------------------------------------------------------------------- module
class FP4Linear(nn.Linear):
    """``nn.Linear`` whose GEMMs are quantized as ``recipe`` says (see the module docstring).

    Same parameters and state-dict keys as ``nn.Linear`` (``weight`` [out, in], ``bias``), so
    checkpoints load either way. The bias is added in high precision after the GEMM.

    Example::

        layer = FP4Linear.from_linear(nn.Linear(4096, 4096), Recipe.preset("fp4-paper"))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        recipe: Recipe | str = "fp4-paper",
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = Recipe.preset(recipe) if isinstance(recipe, str) else recipe
        if not isinstance(self.recipe, Recipe):
            raise TypeError(f"recipe must be a Recipe or a preset name, got {recipe!r}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Recipe | str) -> FP4Linear:
        """Wrap an existing ``nn.Linear``, reusing its Parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False, recipe=recipe)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"FP4Linear expects a floating-point tensor, got {got}")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"FP4Linear({self.in_features} -> {self.out_features}) got input of shape "
                f"{tuple(x.shape)}: its last dim must be {self.in_features}"
            )
        if x.device != self.weight.device:
            raise ValueError(f"input on {x.device} but FP4Linear weight on {self.weight.device}")
        if not self.recipe.quantized:
            return F.linear(x, self.weight, self.bias)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            out_dtype = torch.get_autocast_dtype(dev)
        else:
            out_dtype = x.dtype
        use_triton = _use_triton(x, self)
        if use_triton and self.recipe.occ is not None:
            # OCC's kernels take bf16; the quantize kernels read float32 too, so other recipes
            # quantize a float32 input (autocast's residual stream) as the reference path does,
            # with no cast pass
            x = x.to(getattr(torch, self.recipe.compute_dtype))
        x2d = x.reshape(-1, self.in_features)
        with torch.autocast(dev, enabled=False):
            y = _FP4LinearFn.apply(
                x2d, self.weight, self.recipe, use_triton, out_dtype, torch.is_grad_enabled()
            )
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}"
