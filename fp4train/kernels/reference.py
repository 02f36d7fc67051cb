"""Plain-PyTorch twins of the Triton kernels: the same signatures and the same numbers.

Each is written with the reference functions (``fp4train.quantize``, ``fp4train.dge``,
``fp4train.occ``), so a test that pairs a kernel with its twin checks the kernel against the
definition of the numbers. Outputs follow the kernels' layout and padding conventions.
"""

from __future__ import annotations

import torch

from fp4train import dge as _dge
from fp4train import occ as _occ
from fp4train.kernels.quantize import FP8_DTYPE, padded_rows
from fp4train.quantize import quantize

__all__ = [
    "quantize_rows",
    "quantize_rowwise_and_colwise",
    "dge_weight_grad",
    "occ_thresholds",
]


def _pad_rows(t: torch.Tensor, mp: int, value: float) -> torch.Tensor:
    pad = torch.full((mp - t.shape[0], *t.shape[1:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


def quantize_rows(
    x: torch.Tensor,
    fmt: str,
    col_scale: torch.Tensor | None = None,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
    store_q: bool = True,
    store_qt: bool = False,
    outliers_e4m3: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of :func:`fp4train.kernels.quantize.quantize_rows` (nearest rounding)."""
    mp = padded_rows(x.shape[0])
    v = x.float()
    if col_scale is not None:
        v = v * col_scale.reshape(1, -1).float()
    resid = x.new_empty(0, dtype=torch.bfloat16)
    if lo is not None:
        v = torch.clamp(v, min=lo.float().reshape(-1, 1), max=hi.float().reshape(-1, 1))
        resid = (x.float() - v).bfloat16()
    qt = quantize(v, fmt, "row", nonfinite="propagate")
    data = qt.data
    if outliers_e4m3:  # resid: the flags of the columns holding a value beyond E4M3's range
        data, r2 = _occ.outliers_on_e4m3(x.float(), v, qt.data, qt.scale)
        resid = (r2 != 0).any(dim=0).to(torch.int32)
    q = _pad_rows(data, mp, 0.0).to(FP8_DTYPE[fmt])
    scale = _pad_rows(qt.scale.reshape(-1), mp, 1.0)
    empty = x.new_empty(0, dtype=FP8_DTYPE[fmt])
    return (q if store_q else empty, scale, q.t().contiguous() if store_qt else empty,
            resid)  # fmt: skip


def quantize_rowwise_and_colwise(
    x: torch.Tensor,
    row_fmt: str,
    col_fmt: str,
    col_scale: torch.Tensor | None,
    row_scale: torch.Tensor,
    need_row: bool = True,
    need_col: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Twin of :func:`fp4train.kernels.quantize.quantize_rowwise_and_colwise`."""
    q_row, s_row, _, _ = quantize_rows(x, row_fmt, col_scale)
    v = x.float() * row_scale.reshape(-1, 1).float()
    qt = quantize(v, col_fmt, "col", nonfinite="propagate")
    q_col_t = _pad_rows(qt.data, padded_rows(x.shape[0]), 0.0).t().contiguous()
    q_col_t = q_col_t.to(FP8_DTYPE[col_fmt])
    e8, e32 = x.new_empty(0, dtype=torch.float8_e4m3fn), x.new_empty(0, dtype=torch.float32)
    if not need_row:
        q_row, s_row = e8.to(FP8_DTYPE[row_fmt]), e32
    if not need_col:
        return q_row, s_row, e8.to(FP8_DTYPE[col_fmt]), e32
    return q_row, s_row, q_col_t, qt.scale.reshape(-1)


def dge_weight_grad(
    dw: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, fmt: str, k: float, clip: float
) -> torch.Tensor:
    """Twin of :func:`fp4train.kernels.dge.dge_weight_grad`."""
    x_scaled = weight.float() / w_scale.reshape(-1, 1).float()
    return dw.float() * _dge.correction(x_scaled, fmt, k, clip)


def occ_thresholds(
    x: torch.Tensor,
    alpha: float,
    granularity: str,
    exact_max_numel: int = 2**22,
    sample_size: int = 2**20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of :func:`fp4train.kernels.occ.occ_thresholds`: [1] or [M] float32 each."""
    lo, hi = _occ.quantile_thresholds(
        x.float(), alpha, granularity, exact_max_numel=exact_max_numel, sample_size=sample_size
    )
    return lo.reshape(-1), hi.reshape(-1)
