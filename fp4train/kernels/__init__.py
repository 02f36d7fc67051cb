"""Fast path on Hopper: Triton quantize kernels + FP8 tensor-core GEMMs (``torch._scaled_mm``).

FP4Linear's triton backend calls three functions from here:

- :func:`check_supported` ``(recipe, in_features, out_features) -> str | None``
- :func:`linear_forward` ``(x2d, weight, recipe, need_residual=True, deferred=None) ->
  (y2d bf16, saved)``
- :func:`linear_backward` ``(saved, dy2d, weight, recipe, need_dx, need_dw, deferred=None)
  -> (dx, dw)``

and the kernels behind them are public too, each a ``torch.library`` custom op with a
plain-PyTorch twin of the same name in :mod:`fp4train.kernels.reference`:

- :func:`quantize_rows` — row-wise absmax quantization to E2M1/E4M3/E5M2 stored as float8,
  both layouts at once, optional column fold (dgrad) or OCC clamp.
- :func:`quantize_rowwise_and_colwise` — dY's two operands (row-wise with W's scale folded in,
  column-wise with X's scale folded in, transposed) from one pass.
- :func:`quantize_rowwise_e2m1_to_fp8` — the common case: ``(q [M, K] e4m3fn, scale [M, 1])``.
- :func:`dge_weight_grad` — the DGE-corrected float32 weight gradient in one pass.
- :func:`occ_thresholds` — exact OCC quantile thresholds by radix selection (no sort).

:mod:`fp4train.kernels.adamw` holds :class:`fp4train.optim.LowPrecisionAdamW`'s fused step.

Importing this package does not import triton; the submodules do.
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "triton_available",
    "check_supported",
    "linear_forward",
    "linear_backward",
    "quantize_rows",
    "quantize_rowwise_and_colwise",
    "quantize_rowwise_e2m1_to_fp8",
    "dge_weight_grad",
    "occ_thresholds",
]

_LAZY = {
    "check_supported": "linear",
    "linear_forward": "linear",
    "linear_backward": "linear",
    "quantize_rows": "quantize",
    "quantize_rowwise_and_colwise": "quantize",
    "dge_weight_grad": "dge",
    "occ_thresholds": "occ",
}


@functools.cache
def triton_available() -> bool:
    """True if triton imports and a CUDA GPU with FP8 tensor cores (sm_89+) is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability() >= (8, 9)


def quantize_rowwise_e2m1_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E2M1 absmax quantization per row of x [M, K]: ``(q [M, K] float8_e4m3fn, scale [M, 1])``.

    ``q * scale`` equals ``fp4train.quantize.quantize(x, "e2m1", "row").dequantize()``.
    """
    from fp4train.kernels.quantize import quantize_rows

    m = x.shape[0]
    q, scale, _, _ = quantize_rows(x, "e2m1")
    return q[:m], scale[:m].reshape(m, 1)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"fp4train.kernels.{_LAZY[name]}"), name)
        # kept as a module attribute: later lookups skip this hook (an import_module call,
        # ≈ 1 µs here; FP4Linear looks up two of these per forward and one per backward)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fp4train.kernels' has no attribute {name!r}")
