"""The quantize kernels' numbers from plain tensor ops, for torch.compile to fuse.

In eager mode every quantization is one of the Triton kernels of ``fp4train.kernels.quantize``:
it must read its input from memory. Under torch.compile the same operations written as tensor
ops let Inductor fuse them into the op that produced the input (RMSNorm, SwiGLU, the previous
backward op), as torchao's float8 training does, so the bf16 tensor need not be written and read
again. The numbers are the kernels' bit for bit (the same scales, IEEE division by the scale,
exact rounding to the grid, written for tensor ops); the GPU tests check this. (Inductor may
still skip a bf16 rounding between a fused producer and the quantization: the same caveat as for
any compiled bf16 model.) Stochastic rounding is not available here (its Philox stream is the
kernels'): callers use the kernels for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fp4train.kernels.quantize import FP8_DTYPE, grid_constants, padded_rows

__all__ = ["quantize_rows", "quantize_rowwise_and_colwise"]

_MIN_SCALE = 1.1754943508222875e-38  # 2**-126, as the kernels' _absmax_scale
_GRID = {name: grid_constants(name) for name in FP8_DTYPE}  # plain dicts: nothing to trace


def _div(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """float32 ``a / b`` correctly rounded, as the kernels' IEEE division: computed in float64
    and rounded to float32, which is exact for division (53 >= 2 * 24 + 2: rounding twice
    cannot differ from rounding once). Inductor lowers a float32 ``/`` to Triton's
    approximate division; its float64 division is IEEE. For the [M] scale vectors."""
    return (a.double() / b).float()


def _div_by_scales(v: torch.Tensor, s: torch.Tensor, dim: int) -> torch.Tensor:
    """float32 ``v / s`` (s broadcast along ``dim``) correctly rounded, without a division
    per element: ``v · (1/s)`` in float64, rounded to float32. The float64 value is within
    2**-52 (relative) of the quotient, and a quotient of two float32 numbers is never within
    2**-50 of a float32 rounding midpoint (|a - m·b| is a nonzero multiple of 2**-49 |a|), so
    the rounding is the IEEE quotient's."""
    r = (1.0 / s.double()).unsqueeze(dim)
    return (v.double() * r).float()


def _absmax_scale(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    s = torch.clamp_min(_div(amax, fmax), _MIN_SCALE)
    return torch.where(amax > 0, s, 1.0)


def _round_to_grid(u: torch.Tensor, fmt: str) -> torch.Tensor:
    """The kernels' ``_round_to_grid`` numbers (nearest-even, saturating, NaN kept) on float32
    ``u``: scaled to the grid step, rounded by ``torch.round`` (half to even) and scaled back,
    where the kernels add and subtract 2**(e + 23 - MBITS); both are exact, and the GPU test
    ``test_compiled_traced_quantizers_equal_the_kernels`` compares their bits."""
    c = _GRID[fmt]
    bits = u.view(torch.int32)
    mag_bits = bits & 0x7FFFFFFF
    e = torch.clamp((mag_bits >> 23) - 127, c["MIN_EXP"], c["EMAX"] + 1)
    inv_step = ((127 + c["MBITS"] - e) << 23).view(torch.float32)
    step = ((127 - c["MBITS"] + e) << 23).view(torch.float32)
    y = torch.round(mag_bits.view(torch.float32) * inv_step)  # exact, below 2**(MBITS+1)
    q = torch.clamp_max(y * step, c["FMAX"])
    out = (q.view(torch.int32) | (bits & -2147483648)).view(torch.float32)
    return torch.where(u != u, u, out)


def _pad_rows(t: torch.Tensor, mp: int) -> torch.Tensor:
    return t if t.shape[0] == mp else F.pad(t, (0, 0, 0, mp - t.shape[0]))


def _absmax_quantize(v: torch.Tensor, fmt: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(v on ``fmt``'s grid in units of its scale, float32; the scales) of float32 ``v``
    [M, K], one absmax scale per row (``dim=1``) or per column (``dim=0``)."""
    s = _absmax_scale(v.abs().amax(dim=dim), _GRID[fmt]["FMAX"])
    return _round_to_grid(_div_by_scales(v, s, dim), fmt), s


def _rows(v: torch.Tensor, fmt: str, mp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [Mp, K] in ``FP8_DTYPE[fmt]``, scale [Mp]) of float32 ``v`` [M, K], one scale per
    row; rows M..Mp are zero with scale 1, as the kernels pad them."""
    q, s = _absmax_quantize(v, fmt, 1)
    return _pad_rows(q, mp).to(FP8_DTYPE[fmt]), F.pad(s, (0, mp - v.shape[0]), value=1.0)


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
    """:func:`fp4train.kernels.quantize.quantize_rows` (without stochastic rounding)."""
    mp = padded_rows(x.shape[0])
    v = x.float()
    if col_scale is not None:
        v = v * col_scale.float()[None, :]
    resid = x.new_empty(0, dtype=torch.bfloat16)
    if lo is not None:
        lo2, hi2 = (t.float().reshape(-1, 1) for t in (lo, hi))
        v = torch.minimum(torch.maximum(v, lo2), hi2)
        resid = (x.float() - v).to(torch.bfloat16)
    if outliers_e4m3:  # OCC's outliers on the E4M3 grid; resid: the columns beyond its range
        data, s = _absmax_quantize(v, fmt, 1)
        xf = x.float()
        data = torch.where(xf != v, _round_to_grid(_div_by_scales(xf, s, 1), "e4m3"), data)
        t = (s * _GRID["e4m3"]["FMAX"]).unsqueeze(1)
        resid = (xf - torch.clamp(xf, min=-t, max=t) != 0).any(dim=0).to(torch.int32)
        q = _pad_rows(data, mp).to(FP8_DTYPE[fmt])
        s = F.pad(s, (0, mp - s.shape[0]), value=1.0)
    else:
        q, s = _rows(v, fmt, mp)
    empty = x.new_empty(0, dtype=FP8_DTYPE[fmt])
    return (q if store_q else empty, s, q.t().contiguous() if store_qt else empty,
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
    """:func:`fp4train.kernels.quantize.quantize_rowwise_and_colwise` (no stochastic rounding)."""
    m, n = x.shape
    mp = padded_rows(m)
    xf = x.float()
    q_row = x.new_empty(0, dtype=FP8_DTYPE[row_fmt])
    s_row = x.new_empty(0, dtype=torch.float32)
    q_col_t = x.new_empty(0, dtype=FP8_DTYPE[col_fmt])
    s_col = x.new_empty(0, dtype=torch.float32)
    if need_row:
        v = xf * col_scale.float()[None, :] if col_scale is not None else xf
        q_row, s_row = _rows(v, row_fmt, mp)
    if need_col:
        q2, s_col = _absmax_quantize(xf * row_scale.float()[:, None], col_fmt, 0)
        q_col_t = _pad_rows(q2, mp).to(FP8_DTYPE[col_fmt]).t().contiguous()
    return q_row, s_row, q_col_t, s_col
