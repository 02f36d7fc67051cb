"""Differentiable Gradient Estimator (DGE): a smooth stand-in for the quantizer's derivative.

Rounding to a grid is a staircase: its derivative is 0 almost everywhere, so training uses the
straight-through estimator (STE), which pretends the derivative is 1 and ignores where a weight
sits inside its quantization interval. The paper (arXiv 2501.17116, "Differentiable Gradient
Estimator") instead approximates the quantizer on each interval [a, a + δ] by a smooth
function and uses its derivative in backward. Writing x for the offset from the interval's
start,

    f(x)  = δ · (1 + sign(2x/δ − 1) · |2x/δ − 1|^(1/k)) / 2
    f'(x) = (1/k) · |2x/δ − 1|^(1/k − 1)

With t = x/δ ∈ [0, 1] the interval's width drops out of the derivative, so everything here is
a function of t alone: ``smooth(t) = (1 + sign(2t − 1)·|2t − 1|^(1/k)) / 2`` (f / δ) and
``derivative(t) = (1/k)·|2t − 1|^(1/k − 1)`` (df/dx). The power 1/k < 1 makes f a steep step
at the interval's midpoint (the rounding decision) and flat near the grid points: k → ∞
recovers hard rounding, k = 1 the identity (STE). The derivative is 1/k at the grid points,
grows without bound at the midpoint (t = 1/2), and is clipped at ``clip`` there to keep
updates bounded. The paper uses k = 5 and clip 3.0.

Absmax scaling makes the estimate scale-free: with x = w / s the quantizer is Q(w) = s·q(w/s),
so dQ/dw = q'(w/s) and the master weight's gradient is the dequantized weight's gradient
times ``correction(w / s)``. Intervals follow the format's non-uniform grid (for E2M1:
δ = 0.5 on [0, 2), 1 on [2, 4), 2 on [4, 6]); values beyond the format's max saturate, so
their factor is 0.
"""

from __future__ import annotations

import math

import torch

from fp4train import formats

__all__ = ["smooth", "derivative", "correction"]


def _check_k(k: float) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 1 or math.isinf(k):
        raise ValueError(f"DGE k must be a finite number > 1 (the paper uses 5), got {k!r}")


def _check_clip(clip: float) -> None:
    bad = isinstance(clip, bool) or not isinstance(clip, (int, float))
    if bad or not clip > 0 or math.isinf(clip):
        raise ValueError(f"DGE clip must be a finite number > 0 (the paper uses 3.0), got {clip!r}")


def _check_tensor(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def smooth(t: torch.Tensor, k: float = 5.0) -> torch.Tensor:
    """The smooth quantizer on one interval, ``(1 + sign(2t − 1)·|2t − 1|^(1/k)) / 2``.

    ``t`` is the position inside the interval, in [0, 1]; maps 0 -> 0, 1/2 -> 1/2, 1 -> 1.
    Computed in float32 (float64 for float64 input), returned in ``t.dtype``.
    """
    _check_k(k)
    _check_tensor(t, "t")
    u = 2 * t.to(_work_dtype(t)) - 1
    return ((1 + torch.sign(u) * u.abs().pow(1 / k)) / 2).to(t.dtype)


def derivative(t: torch.Tensor, k: float = 5.0, clip: float = 3.0) -> torch.Tensor:
    """``d smooth / dt = (1/k)·|2t − 1|^(1/k − 1)``, clipped to at most ``clip``.

    Infinite at t = 1/2 before clipping, so ``clip`` there; 1/k at t = 0 and t = 1.
    Computed in float32 (float64 for float64 input), returned in ``t.dtype``.
    """
    _check_k(k)
    _check_clip(clip)
    _check_tensor(t, "t")
    u = (2 * t.to(_work_dtype(t)) - 1).abs()
    return torch.clamp(u.pow(1 / k - 1) / k, max=clip).to(t.dtype)


def correction(
    x_scaled: torch.Tensor,
    fmt: str | formats.Format = "e2m1",
    k: float = 5.0,
    clip: float = 3.0,
) -> torch.Tensor:
    """DGE factor for each scaled value: multiply the dequantized weight's gradient by it.

    ``x_scaled`` is w / s (already divided by the absmax scale, so |x| <= ``fmt.max``). Finds
    the interval [a, a + δ] of the format's positive grid holding |x|, sets t = (|x| − a) / δ
    and returns ``derivative(t, k, clip)``. A value on a grid point has t = 0 (factor 1/k),
    except ±max, which ends the last interval (t = 1, also 1/k); |x| > max (saturated, ±Inf
    included) gives 0; NaN stays NaN. Even in x. Works for any device and float dtype; the
    math runs in float32 (float64 for float64 input) and the result is float32.
    """
    _check_k(k)
    _check_clip(clip)
    _check_tensor(x_scaled, "x_scaled")
    fmt = formats.get(fmt)
    work = _work_dtype(x_scaled)
    grid = fmt.positive_grid.to(device=x_scaled.device, dtype=work)  # [G], 0 first, max last
    mag = x_scaled.to(work).abs()
    # a = grid[i] <= |x| < grid[i + 1]; |x| == max joins the last interval as its end
    i = torch.searchsorted(grid, mag, right=True) - 1
    i = torch.clamp(i, 0, grid.numel() - 2)
    a = grid[i]
    t = (mag - a) / (grid[i + 1] - a)
    d = derivative(t, k, clip)
    return torch.where(mag > fmt.max, torch.zeros_like(d), d).float()
