"""OCC on the GPU: exact quantile thresholds by radix selection, and the compensation GEMMs.

**Thresholds.** :func:`fp4train.occ.quantile_thresholds` takes the order statistics of ranks
``round((1 − α)(n − 1))`` and ``round(α(n − 1))`` of each group (the tensor, or a row), from a
strided sample when the group is large. We select the same elements without sorting: a bf16
value's bits map to a 16-bit key that orders like the value, so a 256-bin histogram of the
key's high byte finds the bin holding each rank, and a second histogram of the low byte within
that bin finds the value. Two passes over the (sampled) data, each group's last program to
finish a pass doing its selection (no separate launch for it): a memset and two launches, and
the result is exact: the same float32 thresholds as the reference, bit for bit.

**Compensation.** R = X − clamp(X, lo, hi) is nonzero on about 2(1 − α) of the entries. The
forward's quantize kernel writes R (dense, bf16) in the pass that quantizes the clamped X, and
the compensation terms are dense bf16 GEMMs on the tensor cores with float32 accumulation:
Y += R · Wᵀ and dW += dYᵀ · R. Nothing depends on the data's outlier pattern, so there is no
host sync and a step with OCC can be captured in a CUDA graph. (An earlier version gathered
the columns holding an outlier, which syncs for their count: at α = 0.99 nearly every column
holds one, so it cost a gather on top of the same dense GEMM. cuSPARSE's CSR product at 1%
density measured 2.7× slower than the dense GEMM on an H100: benchmarks/NOTES.md.)

**Column compensation** (``OCCConfig.compensation = "columns"``). LLM activations put their
outliers in a few channels: with 3% of the channels 20× larger, the tensor-wise thresholds at
α = 0.99 leave outliers in 122 of 4096 columns (per-row thresholds: 550). Then the products
need only those columns of R and W. Without a host sync: :func:`outlier_columns` orders the
column indices with the outlier columns first and counts them on the device (n), and the
kernels below loop over the first n of a full-width buffer — their work is proportional to n,
their shapes static (so a step still captures in a CUDA graph): :func:`gather_columns` packs
R's outlier columns to the left of a [M, K] buffer (zeros after them), and
:func:`occ_compensate_columns` / :func:`occ_compensate_columns_wgrad` run the two products
over them on the tensor cores (bf16 operands, float32 accumulation, as the dense GEMMs; the
sums are the same up to their order).

**Outliers on the E4M3 grid** (``OCCConfig.compensation = "e4m3"``, not the paper's, see
:mod:`fp4train.occ`). The X quantize kernel stores the outliers in the FP8 operand itself and
raises a flag per column holding a part beyond E4M3's range (x − clamp(x, ±448·s));
:func:`order_columns` orders those columns, ``gather_columns(x, ..., scale=s)`` recomputes
that part from x for them, and the column products above add it back. They are almost never
any: then every one of these launches moves no data.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp4train import occ as _occ
from fp4train.kernels import quantize as _q
from fp4train.kernels.launch import cdiv, launch, next_pow2

__all__ = [
    "occ_thresholds",
    "occ_compensate",
    "occ_compensate_wgrad",
    "outlier_columns",
    "order_columns",
    "gather_columns",
    "occ_compensate_columns",
    "occ_compensate_columns_wgrad",
    "count_nonzeros",
    "pack_nonzeros",
    "unpack_nonzeros",
]

_CHUNK = 4096  # elements per program of the histogram passes


@triton.jit
def _key16(x):
    """bf16 bits -> 16-bit key (int32) that orders like the values (-0 just below +0)."""
    b = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return tl.where(b >= 0x8000, b ^ 0xFFFF, b | 0x8000)


@triton.jit
def _last_program(count_ptr, programs):
    """True in the last of ``programs`` programs to arrive here, a per-group arrival counter.
    The barrier first: the counter's one atomic is issued by one thread, so every thread's
    atomics must precede it; acq_rel then orders them before the last program's reads (the
    last-block pattern of CUDA's threadFenceReduction sample)."""
    tl.debug_barrier()
    return tl.atomic_add(count_ptr, 1, sem="acq_rel") == programs - 1


@triton.jit
def _hist_high_kernel(
    x_ptr, n, group_stride, start, step, sample_ptr, hist_ptr, count_ptr, state_ptr, rank_lo,
    rank_hi, CHUNK: tl.constexpr, GATHER: tl.constexpr,
):  # fmt: skip
    """hist[g, key >> 8] += 1 over elements [c*CHUNK, (c+1)*CHUNK) of group g = program_id(1)
    (element i at ``x[g*group_stride + start + i*step]``); with GATHER the elements are also
    stored contiguously to ``sample`` [G, n] for the second pass. The group's last program
    selects the bins holding ranks lo and hi: state[g] = (bin_lo, rank in bin, bin_hi, ...)."""
    c = tl.program_id(0)
    g = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    x = tl.load(
        x_ptr + g.to(tl.int64) * group_stride + start + offs.to(tl.int64) * step, mask=mask,
        other=0.0,
    )  # fmt: skip
    if GATHER:
        tl.store(sample_ptr + g.to(tl.int64) * n + offs, x, mask=mask)
    # masked lanes land in bin 0 and are taken back out
    high = tl.where(mask, _key16(x) >> 8, 0)
    h = tl.histogram(high, 256)
    bins = tl.arange(0, 256)
    h = h - tl.where(bins == 0, tl.sum((~mask).to(tl.int32)), 0)
    tl.atomic_add(hist_ptr + g * 256 + bins, h, sem="relaxed")
    if _last_program(count_ptr + g, tl.num_programs(0)):
        # read the finished histogram where the atomics left it (L2), not through L1
        hist = tl.atomic_add(hist_ptr + g * 256 + bins, tl.zeros_like(h), sem="relaxed")
        b_lo, r_lo = _select_bin(hist, rank_lo)
        b_hi, r_hi = _select_bin(hist, rank_hi)
        tl.store(state_ptr + g * 4 + 0, b_lo)
        tl.store(state_ptr + g * 4 + 1, r_lo)
        tl.store(state_ptr + g * 4 + 2, b_hi)
        tl.store(state_ptr + g * 4 + 3, r_hi)


@triton.jit
def _select_bin(hist, rank):
    """The bin holding the element of 0-based ``rank`` and that element's rank inside it."""
    cum = tl.cumsum(hist, axis=0)
    b = tl.sum((cum <= rank).to(tl.int32))
    below = tl.sum(tl.where(tl.arange(0, 256) < b, hist, 0))
    return b, rank - below


@triton.jit
def _hist_low_kernel(
    x_ptr, n, group_stride, start, step, state_ptr, hist_ptr, count_ptr, lo_ptr, hi_ptr,
    CHUNK: tl.constexpr,
):  # fmt: skip
    """hist[g, j, key & 255] += 1 for elements whose high byte is the selected bin j (lo, hi);
    the group's last program selects the two values and stores them to lo[g], hi[g]."""
    c = tl.program_id(0)
    g = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    x = tl.load(
        x_ptr + g.to(tl.int64) * group_stride + start + offs.to(tl.int64) * step, mask=mask,
        other=0.0,
    )  # fmt: skip
    key = _key16(x)
    bins = tl.arange(0, 256)
    for j in tl.static_range(2):
        sel = mask & ((key >> 8) == tl.load(state_ptr + g * 4 + 2 * j))
        h = tl.histogram(tl.where(sel, key & 0xFF, 0), 256)
        h = h - tl.where(bins == 0, tl.sum((~sel).to(tl.int32)), 0)
        tl.atomic_add(hist_ptr + (g * 2 + j) * 256 + bins, h, sem="relaxed")
    if _last_program(count_ptr + g, tl.num_programs(0)):
        for j in tl.static_range(2):
            ptrs = hist_ptr + (g * 2 + j) * 256 + bins
            hist = tl.atomic_add(ptrs, tl.zeros_like(bins), sem="relaxed")
            b, _ = _select_bin(hist, tl.load(state_ptr + g * 4 + 2 * j + 1))
            sel_key = (tl.load(state_ptr + g * 4 + 2 * j) << 8) | b
            bits = tl.where(sel_key >= 0x8000, sel_key ^ 0x8000, sel_key ^ 0xFFFF)
            # bf16 bits are the high half of the float32 bits
            value = (bits << 16).to(tl.float32, bitcast=True)
            if j == 0:
                tl.store(lo_ptr + g, value)
            else:
                tl.store(hi_ptr + g, value)


def _groups(x: torch.Tensor, granularity: str, exact_max_numel: int, sample_size: int):
    """How the reference samples 2-D ``x``: groups G, elements per group n, and element i of
    group g at ``x.flatten()[g*group_stride + start + i*step]``."""
    if granularity == "tensor":
        groups, length, period = 1, x.numel(), x.shape[-1]
    else:
        groups, length, period = x.shape[0], x.shape[-1], 1
    sample = _occ._sample(length, period, exact_max_numel, sample_size)
    n = cdiv(length - sample.start, sample.step)
    return groups, n, length, sample.start, sample.step


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
    x = x.contiguous()
    g, n, group_stride, start, step = _groups(x, granularity, exact_max_numel, sample_size)
    dev = x.device
    # one zeroed buffer: the two histograms and the two passes' arrival counters
    work = torch.zeros(g * (3 * 256 + 2), dtype=torch.int32, device=dev)
    hist_high, hist_low = work[: g * 256], work[g * 256 : g * 768]
    count_high, count_low = work[g * 768 : g * 768 + g], work[g * 768 + g :]
    state = torch.empty(g, 4, dtype=torch.int32, device=dev)
    lo = _q.empty_output(g, torch.float32, dev)
    hi = _q.empty_output(g, torch.float32, dev)
    gather = step != 1  # sampled: the first pass packs the sample for the second
    sample = torch.empty(g, n, dtype=x.dtype, device=dev) if gather else x
    grid = (cdiv(n, _CHUNK), g)
    launch(
        _hist_high_kernel, grid, x, n, group_stride, start, step, sample, hist_high, count_high,
        state, _occ._rank(1 - alpha, n), _occ._rank(alpha, n), CHUNK=_CHUNK, GATHER=gather,
        num_warps=8,
    )  # fmt: skip
    if gather:
        group_stride, start, step = n, 0, 1
    launch(
        _hist_low_kernel, grid, sample, n, group_stride, start, step, state, hist_low, count_low,
        lo, hi, CHUNK=_CHUNK, num_warps=8,
    )  # fmt: skip
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


def _programs(device: torch.device, tiles: int) -> int:
    """Programs of the persistent column kernels: four per multiprocessor."""
    return _q.persistent_programs(tiles, 4, device)


# ------------------------------------------------------------------------------ R's nonzeros
# backward keeps the dense compensation's R by its nonzeros (≈ 2(1 − α) of X's entries) when
# the host may learn their count: counts per block, their running sum (the total goes to the
# host through a queued copy), then each block writes its nonzeros at its offset, in order
NZ_CONFIG = dict(BLOCK=4096, num_warps=8)  # elements per program of count and pack


@triton.jit
def _count_nonzeros_kernel(r_ptr, n, counts_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(r_ptr + offs, mask=offs < n, other=0.0)
    tl.store(counts_ptr + tl.program_id(0), tl.sum((v != 0).to(tl.int32), axis=0))


@triton.jit
def _pack_nonzeros_kernel(r_ptr, n, ends_ptr, vals_ptr, idx_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(r_ptr + offs, mask=offs < n, other=0.0)
    nz = v != 0
    start = tl.load(ends_ptr + pid - 1, mask=pid > 0, other=0)  # int64
    pos = start + (tl.cumsum(nz.to(tl.int32), axis=0) - 1).to(tl.int64)
    tl.store(vals_ptr + pos, v, mask=nz)
    tl.store(idx_ptr + pos, offs.to(idx_ptr.dtype.element_ty), mask=nz)


@triton.jit
def _unpack_nonzeros_kernel(vals_ptr, idx_ptr, nnz, r_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < nnz
    i = tl.load(idx_ptr + offs, mask=live, other=0)
    tl.store(r_ptr + i.to(tl.int64), tl.load(vals_ptr + offs, mask=live), mask=live)


def count_nonzeros(r: torch.Tensor) -> torch.Tensor:
    """The running count of ``r``'s nonzeros by blocks of its flat elements (int64, on the
    device; the last entry is the total): what :func:`pack_nonzeros` needs. No sync."""
    if not r.is_contiguous():
        raise ValueError(f"r must be contiguous, got strides {r.stride()}")
    n = r.numel()
    nb = max(cdiv(n, NZ_CONFIG["BLOCK"]), 1)
    counts = torch.zeros(nb, dtype=torch.int32, device=r.device)
    if n:
        launch(_count_nonzeros_kernel, (nb,), r, n, counts, **NZ_CONFIG)
    return torch.cumsum(counts, 0)  # int64


def pack_nonzeros(
    r: torch.Tensor, ends: torch.Tensor, nnz: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r``'s nonzeros in flat order: (values [nnz] in r's dtype, flat indices [nnz], int32
    when r has fewer than 2³¹ elements, else int64), given ``ends`` from
    :func:`count_nonzeros` and the total ``nnz`` (its last entry, read by the host)."""
    n = r.numel()
    vals = torch.empty(nnz, dtype=r.dtype, device=r.device)
    idx = torch.empty(nnz, dtype=torch.int32 if n < 2**31 else torch.int64, device=r.device)
    if nnz:
        launch(_pack_nonzeros_kernel, (ends.numel(),), r, n, ends, vals, idx, **NZ_CONFIG)
    return vals, idx


def unpack_nonzeros(vals: torch.Tensor, idx: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The dense tensor of ``shape`` holding ``vals`` at the flat positions ``idx``, zeros
    elsewhere (the inverse of :func:`pack_nonzeros`)."""
    r = torch.zeros(shape, dtype=vals.dtype, device=vals.device)
    if vals.numel():
        launch(_unpack_nonzeros_kernel, (cdiv(vals.numel(), 4096),), vals, idx, vals.numel(), r,
               BLOCK=4096, num_warps=8)  # fmt: skip
    return r


# ------------------------------------------------------------------------------ column compensation
@triton.jit
def _column_flags_kernel(
    r_ptr,  # [M, K], unit stride along K
    stride_r,
    flags_ptr,  # [K] int32, zeroed: set to 1 where the column holds a nonzero
    M,
    K,
    ROWS: tl.constexpr,  # rows per program, walked BLOCK_R at a time
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    row0 = tl.program_id(1) * ROWS
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
    for r0 in tl.static_range(0, ROWS, BLOCK_R):
        rows = row0 + r0 + tl.arange(0, BLOCK_R)
        m2 = (rows < M)[:, None] & (cols < K)[None, :]
        v = tl.load(r_ptr + rows.to(tl.int64)[:, None] * stride_r + cols[None, :], mask=m2,
                    other=0.0)  # fmt: skip
        acc = tl.maximum(acc, (v != 0).to(tl.int32))
    nz = tl.max(acc, axis=0)
    tl.atomic_max(flags_ptr + cols, nz, mask=(cols < K) & (nz > 0))


@triton.jit
def _order_columns_kernel(flags_ptr, order_ptr, n_ptr, K, BLOCK: tl.constexpr):
    """One program: order = the flagged columns ascending, then the others ascending; n."""
    cols = tl.arange(0, BLOCK)
    f = (tl.load(flags_ptr + cols, mask=cols < K, other=0) > 0).to(tl.int32)
    c = tl.cumsum(f, axis=0)  # flagged columns up to and including this one
    n = tl.sum(f)
    pos = tl.where(f > 0, c - 1, n + cols - c)
    tl.store(order_ptr + pos, cols, mask=cols < K)
    tl.store(n_ptr, n)


_ORDER_MAX_K = 16384  # the one-program ordering's width; wider R takes torch's argsort


@_q.custom_op("fp4train::outlier_columns")
def outlier_columns(resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [K] int32, n [1] int32) for the residual R [M, K]: the indices of the columns
    holding a nonzero, ascending, then the others; n is how many hold one. On the device, no
    sync: one pass over R flags the columns, one program orders them (a stable partition by
    prefix sums)."""
    _q._check_2d(resid, "resid")
    m, k = resid.shape
    if k > _ORDER_MAX_K:
        return _order_flags(resid.ne(0).any(dim=0))
    flags = torch.zeros(k, dtype=torch.int32, device=resid.device)
    if m and k:
        rows = 256
        launch(
            _column_flags_kernel, (cdiv(k, 128), cdiv(m, rows)), resid, resid.stride(0), flags,
            m, k, ROWS=rows, BLOCK_R=32, BLOCK_C=128, num_warps=4,
        )  # fmt: skip
    return _order_flags(flags)


@outlier_columns.op.register_fake
def _(resid):
    k = resid.shape[1]
    return resid.new_empty(k, dtype=torch.int32), resid.new_empty(1, dtype=torch.int32)


def _order_flags(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = flags.shape[0]
    dev = flags.device
    if k > _ORDER_MAX_K:
        f = flags.ne(0)
        order = torch.argsort((~f).to(torch.uint8), stable=True).to(torch.int32)
        return order, f.sum(dtype=torch.int32).reshape(1)
    order = _q.empty_output(k, torch.int32, dev)
    n = _q.empty_output(1, torch.int32, dev)
    if k:
        block = next_pow2(k)
        launch(_order_columns_kernel, (1,), flags, order, n, k, BLOCK=block,
               num_warps=max(4, min(16, block // 1024)))  # fmt: skip
    else:
        n.zero_()
    return order, n


@_q.custom_op("fp4train::order_columns")
def order_columns(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`outlier_columns`'s (order, n) from column flags [K] int32 (nonzero: the column
    holds a residual), e.g. those ``quantize_rows(..., outliers_e4m3=True)`` raises. One
    program, no sync."""
    if flags.ndim != 1 or flags.dtype != torch.int32:
        raise ValueError(f"flags must be a [K] int32 tensor, got {_q._describe(flags)}")
    return _order_flags(flags.contiguous())


@order_columns.op.register_fake
def _(flags):
    k = flags.shape[0]
    return flags.new_empty(k, dtype=torch.int32), flags.new_empty(1, dtype=torch.int32)


@triton.jit
def _gather_columns_kernel(
    src_ptr,  # [R, K], unit stride along K
    stride_s,
    order_ptr,  # [K] int32
    n_ptr,  # [1] int32
    dst_ptr,  # [R, W] bf16: dst[:, j] = src[:, order[j]] for j < n, else 0
    s_ptr,  # [R] float32 row scales (BEYOND)
    R,
    W,  # dst's width (K, or n when the host knows it)
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ZERO_REST: tl.constexpr,  # write zeros after the first n columns (else leave them)
    BEYOND: tl.constexpr,  # gather src − clamp(src, ±448·s): the part beyond E4M3's range
):
    # persistent: the programs walk the live tiles only (those of the first n columns, unless
    # ZERO_REST), so n = 0 costs a launch of a few hundred programs that find no work
    n = tl.load(n_ptr)
    n_rt = tl.cdiv(R, BLOCK_R)
    w_live = W if ZERO_REST else tl.minimum(n, W)
    for tile in range(tl.program_id(0), n_rt * tl.cdiv(w_live, BLOCK_C), tl.num_programs(0)):
        rows = (tile % n_rt) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (tile // n_rt) * BLOCK_C + tl.arange(0, BLOCK_C)
        take = (cols < n) & (cols < W)
        idx = tl.load(order_ptr + cols, mask=take, other=0)
        rmask = (rows < R)[:, None]
        v = tl.load(src_ptr + rows.to(tl.int64)[:, None] * stride_s + idx[None, :],
                    mask=rmask & take[None, :], other=0.0)  # fmt: skip
        if BEYOND:  # the arithmetic of _round_and_store's OUT8 residual: the same bits
            s = tl.load(s_ptr + rows, mask=rows < R, other=1.0)[:, None]
            v = _q.beyond_e4m3(v.to(tl.float32), s)
        write = (cols < W) if ZERO_REST else take
        tl.store(dst_ptr + rows.to(tl.int64)[:, None] * W + cols[None, :],
                 _q._to_bf16_rne(v.to(tl.float32)), mask=rmask & write[None, :])  # fmt: skip


@_q.custom_op("fp4train::gather_columns")
def gather_columns(
    src: torch.Tensor,
    order: torch.Tensor,
    n: torch.Tensor,
    zero_rest: bool = True,
    scale: torch.Tensor | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """[R, K] bf16 whose first n columns are ``src[:, order[:n]]`` (rounded to bf16 to nearest
    even, as ``.to(torch.bfloat16)``) and the rest zero (``zero_rest``; else left unwritten,
    for a consumer that reads only the first n: the full-width write is as long as the
    gather); ``src`` [R, K] bf16 or float32 (W). With ``scale`` ([R] float32 row scales, from
    ``quantize_rows(src, ..., outliers_e4m3=True)``) the columns gathered are those of
    src − clamp(src, ±448·scale) in float32, the part of OCC's outliers beyond E4M3's range.
    ``width``: the output's columns instead of K, when the host knows n (the first ``width``
    of them; pass n itself for a compact [R, n])."""
    _q._check_2d(src, "src")
    r, k = src.shape
    w = k if width is None else width
    if not 0 <= w <= k:
        raise ValueError(f"width must lie in [0, {k}], got {w}")
    dst = _q.empty_output((r, w), torch.bfloat16, src.device)
    if scale is not None and scale.numel() < r:
        raise ValueError(f"scale must hold at least {r} row scales, got {scale.numel()}")
    if r and w:
        grid = (_programs(src.device, cdiv(r, 32) * cdiv(w, 128)),)
        launch(
            _gather_columns_kernel, grid, src, src.stride(0), order, n, dst,
            scale if scale is not None else dst, r, w, BLOCK_R=32, BLOCK_C=128,
            ZERO_REST=zero_rest, BEYOND=scale is not None, num_warps=4,
        )  # fmt: skip
    return dst


@gather_columns.op.register_fake
def _(src, order, n, zero_rest=True, scale=None, width=None):
    w = src.shape[1] if width is None else width
    return src.new_empty((src.shape[0], w), dtype=torch.bfloat16)


# launch configurations of the two products (benchmarks/sweep_columns.py, H100, 8192 x 4096
# x 4096 with 122 outlier columns: fwd 0.124 ms against 0.142 for 128x128x32 w8, wgrad 0.155
# against 0.203 for 128x64x64 w8, whose 64 programs left half the SMs idle)
COLUMNS_FWD_CONFIG = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4)
COLUMNS_WGRAD_CONFIG = dict(BLOCK_N=64, BLOCK_K=64, BLOCK_M=128, num_warps=4)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a · b`` for bf16 a, b (exact products, float32 sums). ``UPCAST`` (the
    interpreter, whose bf16 ``tl.dot`` reads the raw bits as integers in Triton 3.6-3.9) takes
    them in float32, which holds bf16 values and their products exactly."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _compensate_columns_kernel(
    y_ptr,  # [M, N] bf16, unit stride along N
    stride_y,
    r_ptr,  # [M, K] bf16: R's outlier columns first (gather_columns)
    w_ptr,  # [N, K] bf16: W's columns in the same order
    n_ptr,  # [1] int32: how many columns to sum over
    out_ptr,  # [M, N] bf16: y + R_c · W_cᵀ (may be y itself)
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    n = tl.minimum(tl.load(n_ptr), K)  # r and w hold the first n columns (K ≥ n)
    n_mt = tl.cdiv(M, BLOCK_M)
    # persistent over the output tiles; none when no column holds an outlier (no traffic: in
    # place, y stays y)
    live = tl.where(n > 0, n_mt * tl.cdiv(N, BLOCK_N), 0)
    for tile in range(tl.program_id(0), live, tl.num_programs(0)):
        rows = (tile % n_mt) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (tile // n_mt) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, n, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(r_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :],
                        mask=(rows < M)[:, None] & (ks < n)[None, :], other=0.0)  # fmt: skip
            b = tl.load(w_ptr + cols.to(tl.int64)[None, :] * K + ks[:, None],
                        mask=(ks < n)[:, None] & (cols < N)[None, :], other=0.0)  # fmt: skip
            acc = _dot(a, b, acc, UPCAST)
        m2 = (rows < M)[:, None] & (cols < N)[None, :]
        y = tl.load(y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], mask=m2,
                    other=0.0)  # fmt: skip
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :],
                 _q._to_bf16_rne(acc + y.to(tl.float32)), mask=m2)  # fmt: skip


@_q.custom_op("fp4train::occ_compensate_columns_", mutates_args=("y",))
def _compensate_columns(
    y: torch.Tensor, r_c: torch.Tensor, w_c: torch.Tensor, n: torch.Tensor
) -> None:
    m, nn = y.shape
    k = r_c.shape[1]
    if m and nn:
        c = COLUMNS_FWD_CONFIG
        grid = (_programs(y.device, cdiv(m, c["BLOCK_M"]) * cdiv(nn, c["BLOCK_N"])),)
        launch(
            _compensate_columns_kernel, grid, y, y.stride(0), r_c, w_c, n, y, m, nn, k,
            UPCAST=y.device.type != "cuda", **c,
        )  # fmt: skip


@_compensate_columns.op.register_fake
def _(y, r_c, w_c, n):
    return None


def occ_compensate_columns(
    y: torch.Tensor, r_c: torch.Tensor, weight: torch.Tensor, order: torch.Tensor, n: torch.Tensor
) -> torch.Tensor:
    """Forward compensation over the outlier columns, in place on ``y`` [M, N] bf16 (unit
    stride along N): ``Y += R[:, cols] · W[:, cols]ᵀ`` with cols = order[:n]
    (:func:`outlier_columns`), ``r_c`` [M, K] (or [M, n], compact) from
    :func:`gather_columns`, weight [N, K] (its columns gathered at r_c's width and cast to bf16
    here); float32 accumulation, one rounding to bf16. Returns ``y``. Work proportional to n:
    with n = 0, y is neither read nor written."""
    if y.dtype != torch.bfloat16 or (y.shape[1] > 1 and y.stride(1) != 1):
        raise ValueError(f"y must be bf16 with unit stride along N, got {y.dtype} {y.stride()}")
    w_c = gather_columns(weight, order, n, zero_rest=False, width=r_c.shape[1])
    _compensate_columns(y, r_c, w_c, n)
    return y


@triton.jit
def _compensate_columns_wgrad_kernel(
    dw_ptr,  # [N, K] float32, updated in place on columns order[:n]
    dy_ptr,  # [M, N] bf16, unit stride along N
    r_ptr,  # [M, ≥ n] bf16: R's outlier columns first
    stride_r,
    order_ptr,  # [K] int32
    n_ptr,  # [1] int32
    M,
    N,
    K,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr,
):
    n = tl.minimum(tl.load(n_ptr), K)
    n_nt = tl.cdiv(N, BLOCK_N)
    # persistent over the tiles of the first n columns only
    for tile in range(tl.program_id(0), n_nt * tl.cdiv(n, BLOCK_K), tl.num_programs(0)):
        ns = (tile % n_nt) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = (tile // n_nt) * BLOCK_K + tl.arange(0, BLOCK_K)
        take = ks < n
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            ms = m0 + tl.arange(0, BLOCK_M)
            a = tl.load(dy_ptr + ms.to(tl.int64)[None, :] * N + ns[:, None],
                        mask=(ns < N)[:, None] & (ms < M)[None, :], other=0.0)  # fmt: skip
            b = tl.load(r_ptr + ms.to(tl.int64)[:, None] * stride_r + ks[None, :],
                        mask=(ms < M)[:, None] & take[None, :], other=0.0)  # fmt: skip
            acc = _dot(a, b, acc, UPCAST)
        idx = tl.load(order_ptr + ks, mask=take, other=0)
        m2 = (ns < N)[:, None] & take[None, :]
        p = dw_ptr + ns.to(tl.int64)[:, None] * K + idx[None, :]
        tl.store(p, tl.load(p, mask=m2, other=0.0) + acc, mask=m2)


@_q.custom_op("fp4train::occ_compensate_columns_wgrad", mutates_args=("dw",))
def _compensate_columns_wgrad(
    dw: torch.Tensor, dy: torch.Tensor, r_c: torch.Tensor, order: torch.Tensor, n: torch.Tensor
) -> None:
    m, nn = dy.shape
    width = r_c.shape[1]  # programs over R's columns: K, or n when compact
    if m and nn and width:
        c = COLUMNS_WGRAD_CONFIG
        grid = (_programs(dy.device, cdiv(nn, c["BLOCK_N"]) * cdiv(width, c["BLOCK_K"])),)
        launch(
            _compensate_columns_wgrad_kernel, grid, dw, dy, r_c, r_c.stride(0), order, n, m,
            nn, dw.shape[1], UPCAST=dy.device.type != "cuda", **c,
        )  # fmt: skip


@_compensate_columns_wgrad.op.register_fake
def _(dw, dy, r_c, order, n):
    return None


def occ_compensate_columns_wgrad(
    dw: torch.Tensor, dy: torch.Tensor, r_c: torch.Tensor, order: torch.Tensor, n: torch.Tensor
) -> torch.Tensor:
    """Weight-gradient compensation over the outlier columns, in place on the float32 ``dw``
    [N, K]: ``dW[:, cols] += dYᵀ · R[:, cols]`` with cols = order[:n], dy [M, N] (cast to
    bf16), ``r_c`` [M, K] (or [M, n], compact) from :func:`gather_columns`; float32
    accumulation. Returns ``dw``."""
    if dw.dtype != torch.float32 or not dw.is_contiguous():
        raise ValueError(f"dw must be a contiguous float32 tensor, got {dw.dtype} {dw.stride()}")
    _compensate_columns_wgrad(dw, dy.to(torch.bfloat16).contiguous(), r_c, order, n)
    return dw
