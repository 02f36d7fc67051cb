"""Triton quantize kernels: absmax scale, round to an FP4/FP8 grid, store as float8.

The numbers are those of :func:`fp4train.quantize.quantize` bit for bit: the scale is
``max(amax / fmt.max, 2**-126)`` (1 for an all-zero vector) in float32, each value is divided by
it with correctly rounded division (see below; Triton's ``/`` may be approximate) and rounded
to nearest-even (or stochastically, with Philox noise from a seed) on the format grid by
explicit float32 arithmetic (``_round_to_grid``), saturating at ±max. Only
then is it cast to float8, which is exact: every E2M1 and E4M3 value is an ``float8_e4m3fn``
value, every E5M2 value a ``float8_e5m2`` value. So the GPU and the Triton interpreter give the
same bits, whatever the hardware cast's rounding. (They match the reference run on the CPU: on
CUDA, torch computes ``amax / fmt.max`` as ``amax * (1 / fmt.max)``, an ulp off in about half
of the scales.)

A row-wise-only quantization (X, W: ``quantize_rows``, with or without OCC's clamp) holds
whole rows (K up to 16384) in registers (``_quantize_rows_resident_kernel``): each row is read
from memory once, its amax, scale and rounding computed there, the row-major q stored; q_t is
then an FP8 transpose (``_transpose_kernel``, copy speed). Measured on an H100
(benchmarks/sweep_rowblock.py): 75% of copy bandwidth for a bf16 X [8192, 4096] (61% at
K = 11008) and 77% for a float32 W, against 55% and 49% for ``ROW_STRATEGY = "two-walk"``
(``_quantize_rowblock_kernel``, one launch: a persistent program per SM walks each block of
rows twice, the amax walk from memory, the quantize walk from L2 with both FP8 stores, one
transposed; that second walk took 60% of its time). The two give the same bits; rows wider
than 16384 take the two-walk kernel. dY's two operands take three launches over
x [M, K]:

1. ``_amax_partials_kernel`` reads x once, tile by tile, and writes partial amaxes: per row of
   ``v = x * col_scale`` (the row-wise operand) and per column of
   ``x * row_scale`` (the column-wise operand).
2. ``_scales_kernel`` reduces the partials to the scales s = absmax_scale(amax) and their
   reciprocals 1/s (a few KB).
3. ``_quantize_tile_kernel`` reads x again and writes, from the same tile, the row-scaled q
   [Mp, K] and/or its transpose q_t [K, Mp], and/or the column-scaled q2_t [K, Mp].

So a tensor is read twice and every output written once, with no atomics and no dependence on
L2 holding a row block between passes; a dY feeds both backward GEMMs from one such pass.
(Holding dY's rows in registers instead, for one rounding pass without a transposed store and
an FP8 transpose after it, measured slower on the H100: 0.167 against 0.102 ms at 8192 × 4096,
session 12.) The division v / s uses the per-row reciprocal r = 1/s (IEEE) and Markstein's
correction ``q = v·r; u = q + (v − q·s)·r`` (two FMAs), which is the correctly rounded quotient
when r is the correctly rounded reciprocal (Markstein 1990); the tests check it against torch's
division.

Rows are padded to ``Mp`` (a multiple of 16, as ``torch._scaled_mm`` needs) with zeros; padded
rows get scale 1.

The public launchers are ``torch.library`` custom ops when ``torch.compile`` traces them (one
opaque node each) and plain functions in eager mode, which skips the custom-op dispatch cost
(~30 µs a call, more than a small kernel takes).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from fp4train import formats
from fp4train.kernels.launch import cdiv, launch, next_pow2

__all__ = [
    "quantize_rows",
    "quantize_rowwise_and_colwise",
    "FP8_DTYPE",
    "format_constants",
    "padded_rows",
    "empty_output",
]

# storage dtype of each format's grid values (E2M1 values are E4M3 values)
FP8_DTYPE = {"e2m1": torch.float8_e4m3fn, "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_ROW_PAD = 16  # torch._scaled_mm needs every dim divisible by 16


def empty_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output (every element is written; tests poison this to check)."""
    return torch.empty(shape, dtype=dtype, device=device)


def padded_rows(m: int) -> int:
    """``m`` rounded up to a multiple of 16."""
    return -(-m // _ROW_PAD) * _ROW_PAD


def format_constants(name: str) -> dict:
    """The constexprs the kernels need for format ``name`` (must be in ``FP8_DTYPE``); cached,
    so do not modify the returned dict."""
    if name not in FP8_DTYPE:
        raise ValueError(f"the triton kernels quantize to {sorted(FP8_DTYPE)}, not {name!r}")
    return grid_constants(name)


@functools.cache
def grid_constants(name: str) -> dict:
    """``_round_to_grid``'s constexprs (FMAX, MBITS, MIN_EXP, EMAX) for any format of
    ``fp4train.formats`` (e.g. ``"e5m10"``, FP16, for the optimizer's states); cached."""
    f = formats.get(name)
    return dict(
        FMAX=float(f.max),
        MBITS=f.mbits,
        MIN_EXP=f.min_normal_exp,
        EMAX=math.floor(math.log2(f.max)),
    )


# E4M3's grid, for OCC's outliers in an E2M1 operand (compensation "e4m3")
E4M3_MAX = tl.constexpr(grid_constants("e4m3")["FMAX"])
E4M3_MBITS = tl.constexpr(grid_constants("e4m3")["MBITS"])
E4M3_MIN_EXP = tl.constexpr(grid_constants("e4m3")["MIN_EXP"])
E4M3_EMAX = tl.constexpr(grid_constants("e4m3")["EMAX"])


# ------------------------------------------------------------------------------ custom ops
def custom_op(name: str, mutates_args: tuple[str, ...] = ()):
    """Register ``fn`` as custom op ``name`` for torch.compile; call it directly in eager.

    The returned wrapper has the op as ``.op`` (for ``register_fake``).
    """

    def deco(fn):
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if torch.compiler.is_compiling():
                return op(*args, **kwargs)
            return fn(*args, **kwargs)

        wrapper.op = op
        return wrapper

    return deco


# ------------------------------------------------------------------------------ device helpers
@triton.jit
def _absmax_scale(amax, FMAX: tl.constexpr):
    """float32 scale amax / FMAX (IEEE division), floored at 2**-126; 1 where amax == 0."""
    s = tl.math.div_rn(amax, tl.full(amax.shape, FMAX, tl.float32))
    s = tl.maximum(s, 1.1754943508222875e-38)
    return tl.where(amax > 0, s, 1.0)


@triton.jit
def reciprocal(s):
    """1 / s correctly rounded (IEEE division): the r that :func:`div_by_scale` needs."""
    return tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)


@triton.jit
def div_by_scale(v, s, r):
    """v / s correctly rounded, given r = 1/s correctly rounded (Markstein's correction)."""
    q = v * r
    return tl.fma(tl.fma(-q, s, v), r, q)


@triton.jit
def _round_to_grid(
    u,
    MBITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    EMAX: tl.constexpr,
    FMAX: tl.constexpr,
    noise=None,
    STOCHASTIC: tl.constexpr = False,
    e4m3=None,
):
    """Round float32 ``u`` to nearest-even on the grid, saturating at ±FMAX (NaN stays NaN);
    with ``STOCHASTIC``, up with probability frac (``noise`` uniform in [0, 1), u's shape).
    ``e4m3`` (nearest only; a mask of u's shape): round those elements on E4M3's grid instead
    (OCC's outliers in the FP4 operand, ``fp4train.occ.outliers_on_e4m3``).

    The numbers of ``fp4train.formats.round_to_format``: the grid step in u's binade e
    (binades below the smallest normal share its step) is 2**(e - MBITS).
    """
    bits = u.to(tl.int32, bitcast=True)
    mag_bits = bits & 0x7FFFFFFF
    mag = mag_bits.to(tl.float32, bitcast=True)
    if STOCHASTIC:
        e = (mag_bits >> 23) - 127
        # binades above EMAX + 1 saturate like EMAX + 1: keeps the step's exponent in range
        e = tl.minimum(tl.maximum(e, MIN_EXP), EMAX + 1)
        inv_step = ((127 + MBITS - e) << 23).to(tl.float32, bitcast=True)
        step = ((127 - MBITS + e) << 23).to(tl.float32, bitcast=True)
        y = mag * inv_step
        # up with probability frac(y), as ``round_to_format(..., "stochastic")``: unbiased
        f = tl.floor(y)
        y = tl.where(noise < y - f, f + 1.0, f)
        q = tl.minimum(y * step, FMAX)
    else:
        # c = 2**(e + 23 - MBITS) for mag's binade e (floored at MIN_EXP, capped at EMAX + 1):
        # the ulp of mag + c is the grid step, so the float32 addition rounds mag to the grid,
        # to nearest-even, and subtracting c is exact. (Half the instructions of scaling by
        # the step; checked against round_to_format on every format in the tests.)
        e_lo = (MIN_EXP + 127) << 23
        e_hi = (EMAX + 128) << 23
        shift = (23 - MBITS) << 23
        fmax = FMAX
        if e4m3 is not None:  # each element's grid constants selected
            e_lo = tl.where(e4m3, (E4M3_MIN_EXP + 127) << 23, e_lo)
            e_hi = tl.where(e4m3, (E4M3_EMAX + 128) << 23, e_hi)
            shift = tl.where(e4m3, (23 - E4M3_MBITS) << 23, shift)
            fmax = tl.where(e4m3, E4M3_MAX, fmax)
        eb = tl.minimum(tl.maximum(mag_bits & 0x7F800000, e_lo), e_hi)
        c = (eb + shift).to(tl.float32, bitcast=True)
        q = tl.minimum((mag + c) - c, fmax)
    out = (q.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return tl.where(u != u, u, out)


@triton.jit
def _to_bf16_rne(u):
    """float32 -> bf16, rounded to nearest-even by integer arithmetic (the interpreter's cast
    truncates; the GPU's rounds to nearest-even): the same bits on both."""
    b = u.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return tl.where(u != u, u, b.to(tl.float32, bitcast=True)).to(tl.bfloat16)


@triton.jit
def _load_operand(
    x_ptr, stride_xm, rows, cols, M, K, colmul_ptr, lo, hi,
    HAS_COLMUL: tl.constexpr, CLAMP: tl.constexpr,
):  # fmt: skip
    """Tile x[rows, cols] in float32 (0 outside x) and the row-wise operand v of it."""
    rmask = rows < M
    cmask = cols < K
    m2 = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=m2, other=0.0)
    x = x.to(tl.float32)
    v = x
    if HAS_COLMUL:
        v = v * tl.load(colmul_ptr + cols, mask=cmask, other=0.0)[None, :]
    if CLAMP:
        v = tl.where(m2, tl.minimum(tl.maximum(v, lo), hi), 0.0)
    return x, v


@triton.jit
def _clamp_bounds(lo_ptr, hi_ptr, rows, M, CLAMP: tl.constexpr,
                  CLAMP_PER_ROW: tl.constexpr):  # fmt: skip
    """OCC's clamp bounds for ``rows``: one pair, or one per row ([BLOCK_M, 1]); 0 unless
    ``CLAMP``."""
    lo = 0.0
    hi = 0.0
    if CLAMP:
        if CLAMP_PER_ROW:
            lo = tl.load(lo_ptr + rows, mask=rows < M, other=0.0)[:, None]
            hi = tl.load(hi_ptr + rows, mask=rows < M, other=0.0)[:, None]
        else:
            lo = tl.load(lo_ptr)
            hi = tl.load(hi_ptr)
    return lo, hi


# ------------------------------------------------------------------------------ kernels
@triton.jit
def _amax_partials_kernel(
    x_ptr,  # [M, K], unit stride along K
    stride_xm,
    colmul_ptr,  # [K] float32: the row-wise operand is x * colmul (HAS_COLMUL)
    rowmul_ptr,  # [M] float32: the column-wise operand is x * rowmul
    rpart_ptr,  # [M, n_rp] float32: row amax of the row-wise operand over SUB_K columns (ROW_AMAX)
    cpart_ptr,  # [n_mt, K] float32: column amax of the column-wise operand over this tile
    M,
    K,
    n_rp,  # row partials per row: cdiv(K, BLOCK_K) * (BLOCK_K // SUB_K)
    HAS_COLMUL: tl.constexpr,
    ROW_AMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SUB_M: tl.constexpr,
    SUB_K: tl.constexpr,
):
    """Per BLOCK_M x BLOCK_K tile, read once in SUB_M x SUB_K pieces: each column's amax of
    x * rowmul (one partial per tile) and each row's amax of x * colmul (one partial per SUB_K
    columns). The column maxima accumulate elementwise across the tile's rows, one reduction at
    the end (a cross-warp reduction per piece stalls the loads: 0.088 ms against 0.05 at
    8192 x 4096, benchmarks/sweep_dy.py)."""
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    for j in tl.static_range(BLOCK_K // SUB_K):
        cols = pid_k * BLOCK_K + j * SUB_K + tl.arange(0, SUB_K)
        cacc = tl.zeros([SUB_M, SUB_K], dtype=tl.float32)
        for i in tl.static_range(BLOCK_M // SUB_M):
            rows = pid_m * BLOCK_M + i * SUB_M + tl.arange(0, SUB_M)
            rowmul = tl.load(rowmul_ptr + rows, mask=rows < M, other=0.0)[:, None]
            x, v = _load_operand(
                x_ptr, stride_xm, rows, cols, M, K, colmul_ptr, 0.0, 0.0, HAS_COLMUL, False
            )
            if ROW_AMAX:
                part = pid_k * (BLOCK_K // SUB_K) + j
                tl.store(rpart_ptr + rows.to(tl.int64) * n_rp + part,
                         tl.max(tl.abs(v), axis=1), mask=rows < M)  # fmt: skip
            cacc = tl.maximum(cacc, tl.abs(x * rowmul))
        tl.store(cpart_ptr + pid_m * K + cols, tl.max(cacc, axis=0), mask=cols < K)


@triton.jit
def _scales_kernel(
    rpart_ptr,  # [M, n_rp] float32
    cpart_ptr,  # [n_mt, K] float32
    s_row_ptr,  # [Mp] float32 row scales (ROW_AMAX)
    r_row_ptr,  # [Mp] float32 their reciprocals
    s_col_ptr,  # [K] float32 column scales
    r_col_ptr,  # [K] float32 their reciprocals
    M,
    Mp,
    K,
    n_rp,
    n_mt,
    ROW_AMAX: tl.constexpr,
    FMAX_ROW: tl.constexpr,
    FMAX_COL: tl.constexpr,
    BLOCK: tl.constexpr,
    PARTS: tl.constexpr,
):
    pid = tl.program_id(0)
    n_row_progs = tl.cdiv(Mp, BLOCK) if ROW_AMAX else 0
    if pid < n_row_progs:
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        # elementwise max across the loop, one reduction after it (a reduction inside the loop
        # crashes Triton 3.6's thread-locality pass)
        acc_r = tl.zeros([BLOCK, PARTS], dtype=tl.float32)
        for p0 in range(0, n_rp, PARTS):
            parts = p0 + tl.arange(0, PARTS)
            m2 = (rows < M)[:, None] & (parts < n_rp)[None, :]
            t = tl.load(rpart_ptr + rows.to(tl.int64)[:, None] * n_rp + parts[None, :], mask=m2,
                        other=0.0)  # fmt: skip
            acc_r = tl.maximum(acc_r, t)
        amax = tl.max(acc_r, axis=1)
        s = _absmax_scale(amax, FMAX_ROW)
        tl.store(s_row_ptr + rows, s, mask=rows < Mp)
        tl.store(r_row_ptr + rows, reciprocal(s), mask=rows < Mp)
    else:
        cols = (pid - n_row_progs) * BLOCK + tl.arange(0, BLOCK)
        acc_c = tl.zeros([PARTS, BLOCK], dtype=tl.float32)
        for p0 in range(0, n_mt, PARTS):
            parts = p0 + tl.arange(0, PARTS)
            m2 = (parts < n_mt)[:, None] & (cols < K)[None, :]
            t = tl.load(cpart_ptr + parts[:, None] * K + cols[None, :], mask=m2, other=0.0)
            acc_c = tl.maximum(acc_c, t)
        s = _absmax_scale(tl.max(acc_c, axis=0), FMAX_COL)
        tl.store(s_col_ptr + cols, s, mask=cols < K)
        tl.store(r_col_ptr + cols, reciprocal(s), mask=cols < K)


@triton.jit
def _quantize_tile_kernel(
    x_ptr,  # [M, K], unit stride along K
    stride_xm,
    colmul_ptr,
    rowmul_ptr,
    s_row_ptr,  # [Mp] row scales
    r_row_ptr,  # [Mp] their reciprocals
    s_col_ptr,  # [K] column scales
    r_col_ptr,  # [K] their reciprocals
    q_ptr,  # [Mp, K] row-scaled (STORE_Q)
    q2t_ptr,  # [K, Mp] column-scaled x * rowmul, transposed
    M,
    Mp,
    K,
    seed,  # Philox seed of the row-scaled operand (SR1); seed + 1 for the column-scaled one
    HAS_COLMUL: tl.constexpr,
    STORE_Q: tl.constexpr,
    FMAX: tl.constexpr,
    MBITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    EMAX: tl.constexpr,
    FMAX2: tl.constexpr,
    MBITS2: tl.constexpr,
    MIN_EXP2: tl.constexpr,
    EMAX2: tl.constexpr,
    SR1: tl.constexpr,  # stochastic rounding of the row-scaled operand
    SR2: tl.constexpr,  # ... of the column-scaled operand
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    x, v = _load_operand(x_ptr, stride_xm, rows, cols, M, K, colmul_ptr, 0.0, 0.0, HAS_COLMUL,
                         False)  # fmt: skip
    if STORE_Q:
        s = tl.load(s_row_ptr + rows, mask=rows < Mp, other=1.0)[:, None]
        r = tl.load(r_row_ptr + rows, mask=rows < Mp, other=1.0)[:, None]
        _round_and_store(x, v, s, r, rows, cols, M, Mp, K, q_ptr, q_ptr, q_ptr, seed, True,
                         False, False, FMAX, MBITS, MIN_EXP, EMAX, SR1, False)  # fmt: skip
    u, s2, r2 = _col_operand(x, rowmul_ptr, s_col_ptr, r_col_ptr, rows, cols, M, K)
    _round_and_store(x, u, s2, r2, rows, cols, M, Mp, K, q2t_ptr, q2t_ptr, q2t_ptr, seed + 1,
                     False, True, False, FMAX2, MBITS2, MIN_EXP2, EMAX2, SR2, False)  # fmt: skip


@triton.jit
def _rows_absmax_scale(
    x_ptr, stride_xm, rows, M, K, colmul_ptr, lo, hi, FMAX: tl.constexpr,
    HAS_COLMUL: tl.constexpr, CLAMP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The absmax scale of each row of v (rows beyond M: 1) and its reciprocal."""
    # elementwise max across the loop, one reduction after it (a reduction inside a dynamic
    # loop crashes Triton 3.6's thread-locality pass)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x, v = _load_operand(
            x_ptr, stride_xm, rows, cols, M, K, colmul_ptr, lo, hi, HAS_COLMUL, CLAMP
        )
        acc = tl.maximum(acc, tl.abs(v))
    s = _absmax_scale(tl.max(acc, axis=1), FMAX)
    return s, reciprocal(s)


@triton.jit
def _round_and_store(
    x, v, s, r, rows, cols, M, Mp, K, q_ptr, qt_ptr, r_ptr, seed,
    STORE_Q: tl.constexpr, STORE_QT: tl.constexpr, CLAMP: tl.constexpr, FMAX: tl.constexpr,
    MBITS: tl.constexpr, MIN_EXP: tl.constexpr, EMAX: tl.constexpr, SR: tl.constexpr,
    OUT8: tl.constexpr,
):  # fmt: skip
    """Round the tile v[rows, cols] / s (s, r = 1/s: [BLOCK_M, 1]) to the grid (Philox noise
    indexed by row · K + col when ``SR``) and store it row-major in q [Mp, K] and/or
    transposed in q_t [K, Mp]; with ``CLAMP``, the bf16 residual x − v in r [M, K]. With
    ``OUT8`` (and ``CLAMP``), each outlier (x != v) is stored as x / s on the E4M3 grid
    (nearest even, saturating at 448) and r is one int32 flag, raised to 1 (atomic max) when
    x − clamp(x, −448·s, 448·s) is nonzero anywhere in the tile: ``occ.outliers_on_e4m3``'s
    residual (almost never any: no dense residual is written; ``_beyond_columns_kernel`` then
    finds its columns)."""
    noise = None
    if SR:
        noise = tl.rand(seed, rows[:, None] * K + cols[None, :])
    if OUT8 and not SR:
        # one quotient and one rounding: an inlier's v is x, so x / s is its quotient too
        q = _round_to_grid(div_by_scale(x, s, r), MBITS, MIN_EXP, EMAX, FMAX, e4m3=x != v)
    else:
        q = _round_to_grid(div_by_scale(v, s, r), MBITS, MIN_EXP, EMAX, FMAX, noise, SR)
        if OUT8:  # stochastic inliers; the outliers round to nearest
            q8 = _round_to_grid(div_by_scale(x, s, r), E4M3_MBITS, E4M3_MIN_EXP, E4M3_EMAX,
                                E4M3_MAX)  # fmt: skip
            q = tl.where(x != v, q8, q)
    resid = beyond_e4m3(x, s) if OUT8 else x - v
    omask = (rows < Mp)[:, None] & (cols < K)[None, :]
    if STORE_Q:
        tl.store(q_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :],
                 q.to(q_ptr.dtype.element_ty), mask=omask)  # fmt: skip
    if STORE_QT:
        tl.store(qt_ptr + cols.to(tl.int64)[None, :] * Mp + rows[:, None],
                 q.to(qt_ptr.dtype.element_ty), mask=omask)  # fmt: skip
    if CLAMP:
        rmask = (rows < M)[:, None] & (cols < K)[None, :]
        if OUT8:  # one flag for the tile (a per-column reduction and atomics cost more)
            hit = tl.max(tl.max(((resid != 0) & rmask).to(tl.int32), axis=1), axis=0)
            tl.atomic_max(r_ptr, hit, mask=hit > 0)
        else:
            tl.store(r_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :],
                     _to_bf16_rne(resid), mask=rmask)  # fmt: skip


@triton.jit
def beyond_e4m3(x, s):
    """x − clamp(x, ±448·s) in float32: the part of x that X's FP8 operand, with row scale s,
    cannot hold on the E4M3 grid (``fp4train.occ.outliers_on_e4m3``'s residual)."""
    t = s * E4M3_MAX
    return x - tl.minimum(tl.maximum(x, -t), t)


@triton.jit
def _beyond_columns_kernel(
    x_ptr,  # [M, K], unit stride along K
    stride_xm,
    s_ptr,  # [≥ M] float32 row scales of the clamped X
    hit_ptr,  # [1] int32: the row kernel's flag (OUT8)
    flags_ptr,  # [K] int32 column flags, raised to 1 where x − clamp(x, ±448·s) is nonzero
    M,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The columns of X holding a part beyond E4M3's range, only when the row kernel raised
    its flag (persistent: otherwise every program finds no tile to walk)."""
    n_kt = tl.cdiv(K, BLOCK_K)
    live = tl.where(tl.load(hit_ptr) > 0, tl.cdiv(M, BLOCK_M) * n_kt, 0)
    for tile in range(tl.program_id(0), live, tl.num_programs(0)):
        rows = (tile // n_kt) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (tile % n_kt) * BLOCK_K + tl.arange(0, BLOCK_K)
        m2 = (rows < M)[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=m2,
                    other=0.0).to(tl.float32)  # fmt: skip
        s = tl.load(s_ptr + rows, mask=rows < M, other=1.0)[:, None]
        nz = tl.max(((beyond_e4m3(x, s) != 0) & m2).to(tl.int32), axis=0)
        tl.atomic_max(flags_ptr + cols, nz, mask=(cols < K) & (nz > 0))


@triton.jit
def _col_operand(x, rowmul_ptr, s_col_ptr, r_col_ptr, rows, cols, M, K):
    """dY's column-scaled operand of the tile x[rows, cols], x * rowmul (0 past M), with its
    column scales and their reciprocals ([1, BLOCK_K], 1 past K)."""
    rowmul = tl.load(rowmul_ptr + rows, mask=rows < M, other=0.0)[:, None]
    s2 = tl.load(s_col_ptr + cols, mask=cols < K, other=1.0)[None, :]
    r2 = tl.load(r_col_ptr + cols, mask=cols < K, other=1.0)[None, :]
    return x * rowmul, s2, r2


@triton.jit
def _quantize_rowblock_kernel(
    x_ptr,  # [M, K], unit stride along K
    stride_xm,
    colmul_ptr,  # [K] float32: the operand is x * colmul (HAS_COLMUL)
    lo_ptr,  # OCC clamp bounds: one float32 each, or one per row (CLAMP_PER_ROW)
    hi_ptr,
    s_ptr,  # [Mp] float32 row scales
    q_ptr,  # [Mp, K] (STORE_Q)
    qt_ptr,  # [K, Mp] (STORE_QT)
    r_ptr,  # [M, K] bf16: the clamped-off residual x - v (CLAMP)
    M,
    Mp,
    K,
    seed,  # Philox seed (SR)
    HAS_COLMUL: tl.constexpr,
    CLAMP: tl.constexpr,
    CLAMP_PER_ROW: tl.constexpr,
    STORE_Q: tl.constexpr,
    STORE_QT: tl.constexpr,
    FMAX: tl.constexpr,
    MBITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    EMAX: tl.constexpr,
    SR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    OUT8: tl.constexpr,  # OCC's outliers on the E4M3 grid (with CLAMP)
):
    """Persistent: each program takes row blocks pid, pid + P, ... and walks each twice, the
    amax walk from memory and the quantize walk from L2. One launch, no partials."""
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    n_blocks = tl.cdiv(Mp, BLOCK_M)
    for blk in range(pid, n_blocks, n_progs):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        lo, hi = _clamp_bounds(lo_ptr, hi_ptr, rows, M, CLAMP, CLAMP_PER_ROW)
        s, r = _rows_absmax_scale(x_ptr, stride_xm, rows, M, K, colmul_ptr, lo, hi, FMAX,
                                  HAS_COLMUL, CLAMP, BLOCK_M, BLOCK_K)  # fmt: skip
        tl.store(s_ptr + rows, s, mask=rows < Mp)
        s = s[:, None]
        r = r[:, None]
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x, v = _load_operand(
                x_ptr, stride_xm, rows, cols, M, K, colmul_ptr, lo, hi, HAS_COLMUL, CLAMP
            )
            _round_and_store(x, v, s, r, rows, cols, M, Mp, K, q_ptr, qt_ptr, r_ptr, seed,
                             STORE_Q, STORE_QT, CLAMP, FMAX, MBITS, MIN_EXP, EMAX, SR,
                             OUT8)  # fmt: skip


@triton.jit
def _quantize_rows_resident_kernel(
    x_ptr,  # [M, K], unit stride along K
    stride_xm,
    colmul_ptr,  # [K] float32 (HAS_COLMUL)
    lo_ptr,  # OCC clamp bounds (CLAMP)
    hi_ptr,
    s_ptr,  # [Mp] float32 row scales
    q_ptr,  # [Mp, K] row-major
    r_ptr,  # [M, K] bf16 residual (CLAMP)
    M,
    Mp,
    K,
    seed,  # Philox seed (SR)
    HAS_COLMUL: tl.constexpr,
    CLAMP: tl.constexpr,
    CLAMP_PER_ROW: tl.constexpr,
    FMAX: tl.constexpr,
    MBITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    EMAX: tl.constexpr,
    SR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a power of two, CHUNKS * BLOCK_K >= K: whole rows in registers
    CHUNKS: tl.constexpr,  # 1 or 3 (3/4 of a power of two pads less: 11008 to 12288, not 16384)
    OUT8: tl.constexpr,  # OCC's outliers on the E4M3 grid (with CLAMP)
):
    """BLOCK_M whole rows per program, read once from memory and held in registers (in CHUNKS
    pieces of BLOCK_K columns): amax, scale, rounding, one row-major store (the transposed
    layout is a separate FP8 transpose). The arithmetic and the noise indices are
    ``_quantize_rowblock_kernel``'s: the same bits."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    lo, hi = _clamp_bounds(lo_ptr, hi_ptr, rows, M, CLAMP, CLAMP_PER_ROW)
    x, v = _load_operand(x_ptr, stride_xm, rows, cols, M, K, colmul_ptr, lo, hi, HAS_COLMUL,
                         CLAMP)  # fmt: skip
    amax = tl.max(tl.abs(v), axis=1)
    if CHUNKS > 1:
        x1, v1 = _load_operand(x_ptr, stride_xm, rows, cols + BLOCK_K, M, K, colmul_ptr, lo, hi,
                               HAS_COLMUL, CLAMP)  # fmt: skip
        x2, v2 = _load_operand(x_ptr, stride_xm, rows, cols + 2 * BLOCK_K, M, K, colmul_ptr, lo,
                               hi, HAS_COLMUL, CLAMP)  # fmt: skip
        amax = tl.maximum(amax, tl.maximum(tl.max(tl.abs(v1), axis=1), tl.max(tl.abs(v2), axis=1)))
    s = _absmax_scale(amax, FMAX)
    tl.store(s_ptr + rows, s, mask=rows < Mp)
    r = reciprocal(s)[:, None]
    s = s[:, None]
    _round_and_store(x, v, s, r, rows, cols, M, Mp, K, q_ptr, q_ptr, r_ptr, seed, True, False,
                     CLAMP, FMAX, MBITS, MIN_EXP, EMAX, SR, OUT8)  # fmt: skip
    if CHUNKS > 1:
        _round_and_store(x1, v1, s, r, rows, cols + BLOCK_K, M, Mp, K, q_ptr, q_ptr, r_ptr, seed,
                         True, False, CLAMP, FMAX, MBITS, MIN_EXP, EMAX, SR, OUT8)  # fmt: skip
        _round_and_store(x2, v2, s, r, rows, cols + 2 * BLOCK_K, M, Mp, K, q_ptr, q_ptr, r_ptr,
                         seed, True, False, CLAMP, FMAX, MBITS, MIN_EXP, EMAX, SR,
                         OUT8)  # fmt: skip


@triton.jit
def _transpose_kernel(
    src_ptr,  # [R, C] bytes, row-major
    dst_ptr,  # [C, R] bytes
    R,
    C,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m2 = (rows < R)[:, None] & (cols < C)[None, :]
    t = tl.load(src_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=m2)
    tl.store(dst_ptr + cols.to(tl.int64)[None, :] * R + rows[:, None], t, mask=m2)


def transpose_bytes(src: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst`` [C, R] = ``src`` [R, C]ᵀ for contiguous 1-byte tensors (FP8), one launch."""
    r, c = src.shape
    if r and c:
        grid = (cdiv(r, 64), cdiv(c, 64))
        launch(
            _transpose_kernel, grid, src.view(torch.uint8), dst.view(torch.uint8), r, c,
            BLOCK_R=64, BLOCK_C=64, num_warps=4,
        )  # fmt: skip


# ------------------------------------------------------------------------------ launchers
# tuned on an H100 for dY at 8192 x {2048, 4096, 11264} (benchmarks/NOTES.md: 14% faster than
# the H200 choice 128x256/32x128 w8 + 64x64 w4); the interpreter ignores warps
# dY's amax pass (benchmarks/sweep_dy.py, H100, session 12: 0.037 ms at 8192 x 4096, a plain
# read by torch 0.032; 0.080 ms at 8192 x 11008)
AMAX_CONFIG = dict(BLOCK_M=128, BLOCK_K=128, SUB_M=32, SUB_K=128, num_warps=4)
TILE_CONFIG = dict(BLOCK_M=32, BLOCK_K=128, num_warps=4)
# the columns beyond E4M3's range (_beyond_columns_kernel, persistent: PER_SM programs per SM)
BEYOND_CONFIG = dict(BLOCK_M=32, BLOCK_K=128, num_warps=4, PER_SM=4)
# row-only quantization (X, W): the persistent row-block kernel, PER_SM programs per SM, by
# the input's element size (benchmarks/sweep_rowblock.py, H100: 64-row blocks and 16 warps are
# 10% faster than the float32 choice on bf16 X, 22% slower on float32 W); with OCC's clamp
# ("clamp") the 64-row tile spills registers (tests/test_sm90_compile.py), the 32-row one not
ROWBLOCK_CONFIG = {
    2: dict(BLOCK_M=64, BLOCK_K=512, num_warps=16, PER_SM=1),
    4: dict(BLOCK_M=32, BLOCK_K=512, num_warps=8, PER_SM=1),
    "clamp": dict(BLOCK_M=32, BLOCK_K=512, num_warps=8, PER_SM=1),
}


def rowblock_config(element_size: int, clamp: bool) -> dict:
    """The row-block kernel's launch configuration for an input of ``element_size`` bytes."""
    return dict(ROWBLOCK_CONFIG["clamp" if clamp else min(element_size, 4)])


# the row-only quantization's strategy: "resident" (whole rows in registers, read once,
# row-major store, then an FP8 transpose for q_t; rows up to RESIDENT_MAX_K wide) or
# "two-walk" (_quantize_rowblock_kernel: both layouts from one launch that reads each row block
# twice, the second time from L2). benchmarks/sweep_rowblock.py times both (H100: resident
# 75% / 61% / 77% of copy for bf16 X at K = 4096 / 11008 and float32 W, two-walk 55 / 52 / 49%;
# 4096 elements a program beat 8192 at K = 4096, 70%, and tie wider)
ROW_STRATEGY = "resident"
RESIDENT_MAX_K = 16384
RESIDENT_ELEMENTS = 4096  # elements per program (BLOCK_M whole rows, at least one)


def resident_blocks(k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, CHUNKS) of the resident-row kernel for rows of ``k`` elements: whole
    rows, in one chunk of the next power of two p or, when k <= 3p/4, three chunks of p/4 (less
    padding); RESIDENT_ELEMENTS // p rows a program, at least one."""
    p = next_pow2(k)
    block_m = max(1, RESIDENT_ELEMENTS // p)
    if p >= 4 and 4 * k <= 3 * p:
        return block_m, p // 4, 3
    return block_m, p, 1


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def persistent_programs(n_tiles: int, per_sm: int, device: torch.device) -> int:
    """Programs of a persistent launch over ``n_tiles`` tiles: ``per_sm`` per multiprocessor
    (the interpreter: two, so each walks several tiles)."""
    if device.type != "cuda":
        return max(1, min(n_tiles, 2))
    return max(1, min(n_tiles, per_sm * _sm_count(device)))


def _check_2d(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D floating-point tensor, got {_describe(x)}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along its last dim, got {x.stride()}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _vec(t: torch.Tensor | None, n: int, name: str) -> torch.Tensor | None:
    """``t`` as a contiguous float32 vector of ``n`` elements (or one element when n == 1)."""
    if t is None:
        return None
    t = t.reshape(-1)
    if t.numel() != n:
        raise ValueError(f"{name} must hold {n} values, got shape {tuple(t.shape)}")
    return t.float().contiguous()


def _quantize(
    x: torch.Tensor,
    row_fmt: str | None,
    col_fmt: str | None,
    col_scale: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    lo: torch.Tensor | None,
    hi: torch.Tensor | None,
    store_q: bool,
    store_qt: bool,
    sr_row: bool = False,
    sr_col: bool = False,
    seed: int = 0,
    out8: bool = False,
):
    """The launches; returns ``(q, s_row [Mp], q_t, q2_t, s_col [K], resid [M, K])``.

    Without a column operand (``col_fmt`` None): the one-launch row-block path; q2_t and s_col
    are None, ``resid`` is the bf16 residual x − clamp(x) when clamping (else empty). With one
    (dY): the three launches; ``resid`` is None. ``sr_row`` / ``sr_col``: stochastic rounding
    of the row- / column-scaled operand, with Philox noise from ``seed`` (``seed + 1`` for the
    column operand) indexed by the element's position ``row · K + col`` (in int32: tensors
    beyond 2**31 elements reuse noise).
    """
    if not isinstance(seed, int) or not 0 <= seed < 2**31 - 1:
        raise ValueError(f"seed must be an int in [0, 2**31 - 1), got {seed!r}")
    _check_2d(x, "x")
    m, k = x.shape
    mp = padded_rows(m)
    dev = x.device
    cols = col_fmt is not None
    clamp = lo is not None or hi is not None
    if clamp and (lo is None or hi is None):
        raise ValueError("clamping needs both lo and hi, got only one")
    if clamp and cols:
        raise ValueError("the column-wise operand cannot be clamped")
    if out8 and not (clamp and row_fmt == "e2m1"):
        raise ValueError("outliers on the E4M3 grid need clamp bounds and an e2m1 row format")
    if clamp and x.dtype != torch.bfloat16:
        raise ValueError(f"clamping needs a bf16 x (its residual is stored in bf16), got {x.dtype}")
    per_row = clamp and lo.numel() != 1
    lo = _vec(lo, m if per_row else 1, "lo")
    hi = _vec(hi, m if per_row else 1, "hi")
    col_scale = _vec(col_scale, k, "col_scale")
    row_scale = _vec(row_scale, m, "row_scale") if cols else None
    if cols and row_scale is None:
        raise ValueError("the column-wise operand needs row_scale")
    rows = row_fmt is not None and (store_q or store_qt)
    fp8 = FP8_DTYPE[row_fmt] if row_fmt is not None else torch.float8_e4m3fn
    q = empty_output((mp, k) if rows and store_q else (0,), fp8, dev)
    q_t = empty_output((k, mp) if rows and store_qt else (0,), fp8, dev)
    if not cols:  # X, W (and dY's row operand alone): one launch
        s_row = empty_output(mp if row_fmt is not None else 0, torch.float32, dev)
        if out8:  # column flags of the part beyond E4M3's range; the row kernel's one flag
            resid = torch.zeros(k, dtype=torch.int32, device=dev)
            hit = torch.zeros(1, dtype=torch.int32, device=dev)
        else:
            resid = empty_output((m, k) if clamp else (0,), torch.bfloat16, dev)
        # absent optional inputs: any float32 pointer (the kernel's constexprs skip them)
        colmul = col_scale if col_scale is not None else s_row
        lo_, hi_ = (lo, hi) if clamp else (s_row, s_row)
        if not (m and k and row_fmt is not None):
            s_row.fill_(1.0)
        elif ROW_STRATEGY == "resident" and k <= RESIDENT_MAX_K:
            block_m, block_k, chunks = resident_blocks(k)
            q_rows = q if rows and store_q else empty_output((mp, k), fp8, dev)
            launch(
                _quantize_rows_resident_kernel, (cdiv(mp, block_m),), x, x.stride(0),
                colmul, lo_, hi_, s_row, q_rows, (hit if out8 else resid) if clamp else q_rows,
                m, mp, k, seed,
                HAS_COLMUL=col_scale is not None, CLAMP=clamp, CLAMP_PER_ROW=per_row,
                **format_constants(row_fmt), SR=sr_row, BLOCK_M=block_m, BLOCK_K=block_k,
                CHUNKS=chunks, OUT8=out8, num_warps=8,
            )  # fmt: skip
            if rows and store_qt:
                transpose_bytes(q_rows, q_t)
        else:
            cfg = rowblock_config(x.element_size(), clamp)
            progs = persistent_programs(cdiv(mp, cfg["BLOCK_M"]), cfg.pop("PER_SM"), dev)
            launch(
                _quantize_rowblock_kernel, (progs,), x, x.stride(0), colmul, lo_, hi_, s_row,
                q if rows and store_q else q_t, q_t if rows and store_qt else q,
                (hit if out8 else resid) if clamp else q, m, mp, k, seed,
                HAS_COLMUL=col_scale is not None,
                CLAMP=clamp, CLAMP_PER_ROW=per_row, STORE_Q=rows and store_q,
                STORE_QT=rows and store_qt, **format_constants(row_fmt), SR=rows and sr_row,
                OUT8=out8, **cfg,
            )  # fmt: skip
        if out8 and m and k:  # the flagged tiles' columns (no work when none was flagged)
            cfg = dict(BEYOND_CONFIG)
            tiles = cdiv(m, cfg["BLOCK_M"]) * cdiv(k, cfg["BLOCK_K"])
            progs = persistent_programs(tiles, cfg.pop("PER_SM"), dev)
            launch(_beyond_columns_kernel, (progs,), x, x.stride(0), s_row, hit, resid, m, k,
                   **cfg)  # fmt: skip
        # outputs never alias one another (a custom-op rule)
        return q, s_row, q_t, None, None, resid
    c1 = format_constants(row_fmt) if row_fmt is not None else format_constants("e4m3")
    c2 = format_constants(col_fmt)
    q2_t = empty_output((k, mp), FP8_DTYPE[col_fmt], dev)
    n_s = mp if rows else 0
    s_row = empty_output(n_s, torch.float32, dev)
    s_col = empty_output(k, torch.float32, dev)
    if m == 0 or k == 0:
        s_row.fill_(1.0)
        s_col.fill_(1.0)
        q.zero_()
        q2_t.zero_()
        return q, s_row, q_t, q2_t, s_col, None
    # the internal float32 buffers in one allocation (each torch.empty costs the host µs)
    a = AMAX_CONFIG
    n_kt, n_mt = cdiv(k, a["BLOCK_K"]), cdiv(m, a["BLOCK_M"])
    n_rp = n_kt * (a["BLOCK_K"] // a["SUB_K"])  # row partials per row
    n_rpart = m * n_rp if rows else 1
    r_row, r_col, rpart, cpart = torch.empty(
        n_s + k + n_rpart + n_mt * k, dtype=torch.float32, device=dev
    ).split_with_sizes([n_s, k, n_rpart, n_mt * k])  # (Tensor.split is a slower Python wrapper)
    dummy = rpart
    has_colmul = col_scale is not None
    launch(
        _amax_partials_kernel, (n_kt, n_mt), x, x.stride(0), col_scale if has_colmul else dummy,
        row_scale, rpart, cpart, m, k, n_rp, HAS_COLMUL=has_colmul, ROW_AMAX=rows, **a,
    )  # fmt: skip
    block = 256
    n_progs = (cdiv(mp, block) if rows else 0) + cdiv(k, block)
    launch(
        _scales_kernel, (n_progs,), rpart, cpart, s_row if rows else dummy,
        r_row if rows else dummy, s_col, r_col, m, mp, k, n_rp, n_mt, ROW_AMAX=rows,
        FMAX_ROW=c1["FMAX"], FMAX_COL=c2["FMAX"], BLOCK=block, PARTS=16, num_warps=4,
    )  # fmt: skip
    t = TILE_CONFIG
    grid = (cdiv(k, t["BLOCK_K"]), cdiv(mp, t["BLOCK_M"]))
    launch(
        _quantize_tile_kernel, grid, x, x.stride(0), col_scale if has_colmul else dummy, row_scale,
        s_row if rows else dummy, r_row if rows else dummy, s_col, r_col,
        q if rows and store_q else q2_t, q2_t, m, mp, k, seed, HAS_COLMUL=has_colmul,
        STORE_Q=rows and store_q, **c1, FMAX2=c2["FMAX"], MBITS2=c2["MBITS"],
        MIN_EXP2=c2["MIN_EXP"], EMAX2=c2["EMAX"], SR1=rows and sr_row, SR2=sr_col, **t,
    )  # fmt: skip
    return q, s_row, q_t, q2_t, s_col, None


@custom_op("fp4train::quantize_rows")
def quantize_rows(
    x: torch.Tensor,
    fmt: str,
    col_scale: torch.Tensor | None = None,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
    store_q: bool = True,
    store_qt: bool = False,
    stochastic: bool = False,
    seed: int = 0,
    outliers_e4m3: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize each row of ``x`` [M, K] to ``fmt``: ``(q, scale, q_t, resid)``.

    The quantized tensor is ``v = x.float() * col_scale`` (if given; [K]) clamped to
    ``[lo, hi]`` (if given; one value each, or [M] per row), one absmax scale per row:
    q [Mp, K] in ``FP8_DTYPE[fmt]`` (``store_q``), scale [Mp] float32, q_t = qᵀ [K, Mp]
    (``store_qt``), with Mp = M rounded up to 16 (zero rows, scale 1). Absent outputs are empty.
    When clamping (x must be bf16), ``resid`` [M, K] bf16 is OCC's residual x − v, dense (zero
    off the outliers), else empty. ``stochastic`` rounds up with probability equal to the
    fractional distance (unbiased), with Philox noise from ``seed``: the same seed gives the
    same bits. One kernel launch (plus an FP8 transpose for q_t).

    ``outliers_e4m3`` (with lo, hi and fmt ``"e2m1"``; OCC's ``compensation="e4m3"``): each
    outlier (v != x) is stored as x / scale on the E4M3 grid (nearest even, whatever
    ``stochastic`` says), and ``resid`` is [K] int32, 1 for each column that holds a nonzero
    x − clamp(x, −448·scale, 448·scale) (the part beyond E4M3's range,
    :func:`fp4train.occ.outliers_on_e4m3`), else 0: :func:`fp4train.kernels.occ.order_columns`
    and ``gather_columns(x, ..., scale=scale)`` make the packed residual from them.
    """
    if fmt not in FP8_DTYPE:
        raise ValueError(f"the triton kernels quantize to {sorted(FP8_DTYPE)}, not {fmt!r}")
    q, s, q_t, _, _, resid = _quantize(x, fmt, None, col_scale, None, lo, hi, store_q,
                                       store_qt, stochastic, False, seed,
                                       outliers_e4m3)  # fmt: skip
    return q, s, q_t, resid


@quantize_rows.op.register_fake
def _(x, fmt, col_scale=None, lo=None, hi=None, store_q=True, store_qt=False, stochastic=False,
      seed=0, outliers_e4m3=False):  # fmt: skip
    m, k = x.shape
    mp = padded_rows(m)
    fp8 = FP8_DTYPE[fmt]
    return (
        x.new_empty((mp, k) if store_q else (0,), dtype=fp8),
        x.new_empty(mp, dtype=torch.float32),
        x.new_empty((k, mp) if store_qt else (0,), dtype=fp8),
        x.new_empty(k, dtype=torch.int32) if outliers_e4m3
        else x.new_empty((m, k) if lo is not None else (0,), dtype=torch.bfloat16),
    )  # fmt: skip


@custom_op("fp4train::quantize_rowwise_and_colwise")
def quantize_rowwise_and_colwise(
    x: torch.Tensor,
    row_fmt: str,
    col_fmt: str,
    col_scale: torch.Tensor | None,
    row_scale: torch.Tensor,
    need_row: bool = True,
    need_col: bool = True,
    stochastic_row: bool = False,
    stochastic_col: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both backward operands of dY [M, N] from one pass: ``(q_row, s_row, q_col_t, s_col)``.

    Row-wise: ``x.float() * col_scale`` ([N]; dgrad folds W's scale into dY's columns), one
    scale per row -> q_row [Mp, N] in ``FP8_DTYPE[row_fmt]``, s_row [Mp]. Column-wise:
    ``x.float() * row_scale[:, None]`` ([M]; wgrad folds X's scale into dY's rows), one scale
    per column -> q_col_t [N, Mp] (transposed) in ``FP8_DTYPE[col_fmt]``, s_col [N]. Mp is M
    rounded up to 16 (zero rows). ``need_row`` / ``need_col`` False leave that pair empty.
    ``stochastic_row`` / ``stochastic_col``: stochastic rounding of that operand (Philox noise
    from ``seed`` for the row operand, ``seed + 1`` for the column one).
    """
    for f in (row_fmt, col_fmt):
        if f not in FP8_DTYPE:
            raise ValueError(f"the triton kernels quantize to {sorted(FP8_DTYPE)}, not {f!r}")
    q, s_row, _, q2_t, s_col, _ = _quantize(
        x, row_fmt if need_row else None, col_fmt if need_col else None, col_scale,
        row_scale if need_col else None, None, None, True, False, stochastic_row,
        stochastic_col, seed,
    )  # fmt: skip
    if q2_t is None:  # the row operand alone took the one-launch row-block path
        q2_t = torch.empty(0, dtype=FP8_DTYPE[col_fmt], device=x.device)
        s_col = torch.empty(0, dtype=torch.float32, device=x.device)
    # absent outputs keep their format's dtype, as the fake implementation says
    return q.view(FP8_DTYPE[row_fmt]), s_row, q2_t.view(FP8_DTYPE[col_fmt]), s_col


@quantize_rowwise_and_colwise.op.register_fake
def _(x, row_fmt, col_fmt, col_scale, row_scale, need_row=True, need_col=True,
      stochastic_row=False, stochastic_col=False, seed=0):  # fmt: skip
    m, n = x.shape
    mp = padded_rows(m)
    return (
        x.new_empty((mp, n) if need_row else (0,), dtype=FP8_DTYPE[row_fmt]),
        x.new_empty(mp if need_row else 0, dtype=torch.float32),
        x.new_empty((n, mp) if need_col else (0,), dtype=FP8_DTYPE[col_fmt]),
        x.new_empty(n if need_col else 0, dtype=torch.float32),
    )
