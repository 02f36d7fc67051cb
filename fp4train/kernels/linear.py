"""The triton backend of FP4Linear: fused quantize kernels + FP8 tensor-core GEMMs.

The three GEMMs of Y = X Wᵀ run on ``torch._scaled_mm`` with row-wise float32 scales, which
on Hopper needs A row-major and B column-major (the reduction dim contiguous in both), dims
divisible by 16 and a bf16 or float32 output; A may be E5M2 when B is E4M3::

    fwd:   Y  = (q_x·s_x) · (q_w·s_w)ᵀ    A = q_x   [M,K],  B = q_wᵀ  (q_w   [N,K] row-major)
    dgrad: dX = (q_dy·s_dy) · q_w        A = q_dy  [M,N],  B = q_w   (q_w_t [K,N] row-major)
    wgrad: dW = (q_dy2·s_dy2)ᵀ · q_x     A = q_dy2ᵀ[N,M],  B = q_x   (q_x_t [K,M] row-major)

So each FP4 operand is stored in both layouts, written by one pass over its high-precision
tensor (``quantize_rows(..., store_qt=True)``); backward keeps only the transposed copies
(FP8, half the bytes of a bf16 X) and the float32 scales. One pass over dY
(``quantize_rowwise_and_colwise``) writes both of its operands: dY·diag(s_w) per row (dgrad;
W's scale sits on the reduction dim N) and diag(s_x)·dY per column, transposed (wgrad; X's
scale sits on the reduction dim M). The token count M is padded to a multiple of 16 with zero
rows.

The wgrad GEMM writes the float32 master gradient directly; DGE then scales it in one pass.
With OCC, the X quantize pass also writes the dense bf16 residual R, and the compensation
products are bf16 GEMMs (``fp4train.kernels.occ``), over all columns or, with
``occ.compensation="columns"``, over the columns holding an outlier; nothing syncs with the
host but the residual's size (below). With ``occ.compensation="e4m3"`` the quantize pass
stores the outliers themselves in q_x on the E4M3 grid (both GEMMs then carry them at FP8
speed) and R is only their part beyond E4M3's range, compensated over its columns (none,
unless an outlier exceeds 74.7× its row's clamp bound). Backward keeps R for wgrad's term at
its own size when run eagerly (the dense compensation's nonzeros, the column compensations'
[M, n]; the host learns the size through a copy queued behind the kernel that counts it and
reads it once the GEMMs are queued, so the GPU keeps working meanwhile), and full width under
torch.compile or CUDA-graph capture; with ``act_save="e4m3"`` R is rounded to E4M3 with a
float32 scale per row, and W's FP8 copy is not kept: backward quantizes the
master weight again (the same bits; one more read of W).
"""

from __future__ import annotations

import os
import threading

import torch

from fp4train.kernels import traced
from fp4train.kernels.dge import dge_weight_grad
from fp4train.kernels.occ import (
    count_nonzeros,
    gather_columns,
    occ_compensate,
    occ_compensate_columns,
    occ_compensate_columns_wgrad,
    occ_compensate_wgrad,
    occ_thresholds,
    order_columns,
    outlier_columns,
    pack_nonzeros,
    unpack_nonzeros,
)
from fp4train.kernels.quantize import custom_op, quantize_rows, quantize_rowwise_and_colwise
from fp4train.recipe import Recipe

__all__ = [
    "check_supported",
    "linear_forward",
    "linear_backward",
    "scaled_mm_rowwise",
    "DeferredResidual",
    "pack_pending",
]

_FWD_FORMATS = ("e2m1", "e4m3")
_GRAD_FORMATS = ("e4m3", "e5m2")


def check_supported(recipe: Recipe, in_features: int, out_features: int) -> str | None:
    """None if the triton backend runs ``recipe`` on a [out, in] layer, else the reason."""
    if not recipe.quantized:
        return "the recipe quantizes no operand (FP4Linear runs F.linear)"
    for op, allowed in (
        ("fwd_x", _FWD_FORMATS),
        ("fwd_w", _FWD_FORMATS),
        ("dgrad_dy", _GRAD_FORMATS),
        ("wgrad_dy", _GRAD_FORMATS),
    ):
        spec = recipe.operand(op)
        want = "col" if op == "wgrad_dy" else "row"
        if spec.format not in allowed or spec.granularity != want:
            return (
                f"{op} = {spec.format} {spec.granularity}: the triton backend supports "
                f"{'/'.join(allowed)} {want}-wise only"
            )
    for op in ("dgrad_w", "wgrad_x"):
        if not recipe.operand(op).reuse_fwd:
            return f"{op} must reuse the forward's quantized tensor (format 'fwd')"
    if recipe.compute_dtype != "bfloat16":
        return f"compute_dtype {recipe.compute_dtype!r}: row-wise _scaled_mm outputs bfloat16"
    for name, dim in (("in_features", in_features), ("out_features", out_features)):
        if dim % 16:
            return f"{name} = {dim} is not divisible by 16 (torch._scaled_mm needs it)"
    return None


def _check(recipe: Recipe, x2d: torch.Tensor, weight: torch.Tensor) -> None:
    reason = check_supported(recipe, weight.shape[1], weight.shape[0])
    if reason is not None:
        raise NotImplementedError(
            f"recipe {recipe.name!r} is not supported by the triton backend ({reason}); "
            "use backend='reference'"
        )
    if x2d.ndim != 2 or x2d.shape[1] != weight.shape[1]:
        raise ValueError(f"x2d must be [M, {weight.shape[1]}], got {tuple(x2d.shape)}")
    if not x2d.is_cuda and not _interpreting():
        raise ValueError(f"the triton backend needs CUDA tensors, got one on {x2d.device}")
    if recipe.occ is not None and x2d.dtype != torch.bfloat16:
        raise ValueError(f"the triton backend's OCC needs bf16 activations, got {x2d.dtype}")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_ONES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _ones(n: int, device: torch.device) -> torch.Tensor:
    """A cached float32 vector of ones (saves a launch per GEMM). Not cached when first asked
    for during a CUDA-graph capture: its fill would only run at replay, and an eager call
    before that would read garbage."""
    key = (n, device)
    if key not in _ONES:
        ones = torch.ones(n, dtype=torch.float32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return ones
        _ONES[key] = ones
    return _ONES[key]


@custom_op("fp4train::scaled_mm_rowwise")
def scaled_mm_rowwise(
    a: torch.Tensor,
    b_t: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor | None,
    out_dtype: torch.dtype = torch.bfloat16,
    fast_accum: bool = False,
) -> torch.Tensor:
    """``diag(scale_a) · a · b_tᵀ · diag(scale_b)`` on FP8 tensor cores, float32 accumulation
    (``fast_accum``: the tensor cores' faster, less precise accumulation).

    a [M, R] fp8 row-major, b_t [N, R] fp8 row-major (the B operand transposed), scale_a [M],
    scale_b [N] float32 (None: ones); returns [M, N] in ``out_dtype`` (bf16 or float32). A
    custom op under torch.compile, so the compiled graph calls the same GEMM as eager.
    """
    sb = scale_b if scale_b is not None else _ones(b_t.shape[0], a.device)
    if a.device.type != "cuda":  # interpreter runs: the same product in float32
        out = (a.float() * scale_a.reshape(-1, 1)) @ (b_t.float() * sb.reshape(-1, 1)).t()
        return out.to(out_dtype)
    return torch._scaled_mm(
        a,
        b_t.t(),
        scale_a=scale_a.reshape(-1, 1),
        scale_b=sb.reshape(1, -1),
        out_dtype=out_dtype,
        use_fast_accum=fast_accum,
    )


@scaled_mm_rowwise.op.register_fake
def _(a, b_t, scale_a, scale_b, out_dtype=torch.bfloat16, fast_accum=False):
    return a.new_empty((a.shape[0], b_t.shape[0]), dtype=out_dtype)


def _traced(stochastic: bool) -> bool:
    """Quantize with tensor ops (``fp4train.kernels.traced``) instead of the Triton kernels:
    while torch.compile traces, so Inductor fuses the quantization into its producer, unless
    an operand rounds stochastically (the kernels' Philox stream) or
    ``FP4TRAIN_COMPILE_KERNELS=1`` asks for the kernels."""
    return (
        torch.compiler.is_compiling()
        and not stochastic
        and os.environ.get("FP4TRAIN_COMPILE_KERNELS") != "1"
    )


def _quantize_rows(x, fmt, stochastic=False, seed=0, **kw):
    if _traced(stochastic):
        return traced.quantize_rows(x, fmt, **kw)
    return quantize_rows(x, fmt, stochastic=stochastic, seed=seed, **kw)


def _stochastic(recipe: Recipe, op: str) -> bool:
    return recipe.operand(op).rounding == "stochastic"


def _seed(recipe: Recipe, ops: tuple[str, ...]) -> int:
    """A Philox seed from torch's default generator when one of ``ops`` rounds stochastically
    (so ``torch.manual_seed`` makes runs repeatable), else 0 without drawing."""
    if any(_stochastic(recipe, op) for op in ops):
        return int(torch.randint(0, 2**30, ()))
    return 0


class _HostInt:
    """A device scalar's value for the host without a full sync: the copy to pinned memory is
    queued behind the kernel that computes it, and :meth:`get` waits for that kernel only, so
    the work queued after it (the GEMMs) keeps the GPU busy meanwhile."""

    def __init__(self, t: torch.Tensor) -> None:
        self._event = None
        if t.device.type == "cuda":
            self._buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._buf.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._buf = t

    def ready(self) -> bool:
        """Whether :meth:`get` would return without waiting."""
        return self._event is None or self._event.query()

    def get(self) -> int:
        if self._event is not None:
            self._event.synchronize()
        return int(self._buf.reshape(-1)[0])


class DeferredResidual:
    """OCC's R for backward, cut to its size once the host has that size, which it does not
    wait for: the next FP4Linear forward (or this layer's backward) packs it, by when the
    count has long arrived. Until then R is held full width. The dense compensation's R
    (``ends`` given) becomes its nonzeros and their int32 flat indices; a column
    compensation's [M, K] buffer its first n columns. FP4Linear keeps it on its autograd
    context (outside ``save_for_backward``: saved-tensor hooks do not see it)."""

    def __init__(self, r: torch.Tensor, count: _HostInt, ends: torch.Tensor | None = None):
        self.r, self.count, self.ends = r, count, ends
        self.packed = self.idx = None

    def pack(self) -> None:
        if self.r is None:
            return
        n = self.count.get()
        if self.ends is not None:
            self.packed, self.idx = pack_nonzeros(self.r, self.ends, n)
        else:  # a copy: a view would keep the full-width buffer alive
            self.packed = self.r[:, :n].clone(memory_format=torch.contiguous_format)
        self.r = self.ends = self.count = None


_pending: list[DeferredResidual] = []
_pending_lock = threading.Lock()
MAX_PENDING = 4  # beyond this many full-width Rs the oldest is packed, waiting if need be


def pack_pending(wait: bool = False) -> None:
    """Pack the deferred residuals whose count has arrived (all of them with ``wait``)."""
    with _pending_lock:
        keep = []
        for i, h in enumerate(_pending):
            if wait or h.count is None or h.count.ready() or len(_pending) - i > MAX_PENDING:
                h.pack()
            else:
                keep.append(h)
        _pending[:] = keep


# Keep OCC's residual for backward at its size (see _compact_residual); False (or the
# environment's FP4TRAIN_FULL_RESIDUAL=1) keeps the full-width buffers, as under
# torch.compile and CUDA-graph capture: the tests compare both, the benchmarks time both
COMPACT_RESIDUAL = os.environ.get("FP4TRAIN_FULL_RESIDUAL") != "1"


def _compact_residual() -> bool:
    """Whether OCC's residual is kept for backward at its own size: its nonzeros (dense
    compensation) or its n columns, sizes the host learns from the device. Not while
    torch.compile traces or a CUDA graph captures, whose shapes must not depend on data."""
    if not COMPACT_RESIDUAL or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _rows_to_bf16(q: torch.Tensor, s: torch.Tensor, m: int) -> torch.Tensor:
    """The first m rows of an FP8 R with its float32 row scales, dequantized in float32, then
    rounded to bf16 (act_save's R as wgrad's compensation reads it)."""
    return (q[:m].float() * s[:m, None]).to(torch.bfloat16)


def _e4m3_rows_bf16(r: torch.Tensor) -> torch.Tensor:
    """R rounded to E4M3 with one scale per row, back in bf16: act_save's copy of R, the same
    numbers linear_backward reads from the FP8 copy when R is kept full width."""
    q, s, _, _ = _quantize_rows(r, "e4m3", store_q=True)
    return _rows_to_bf16(q, s, r.shape[0])


def linear_forward(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    recipe: Recipe,
    need_residual: bool = True,
    deferred: list | None = None,
) -> tuple[torch.Tensor, tuple]:
    """Y = X Wᵀ per ``recipe``: returns (y [M, N] bf16, tensors for :func:`linear_backward`).

    x2d [M, K] (bf16 on the hot path), weight [N, K] (the float32 master). No bias.
    ``need_residual=False`` (no weight gradient will be asked for: inference, a frozen
    weight) keeps no OCC residual for backward and never waits for its size. ``deferred``
    (a list; FP4Linear's): R is not cut to its size here but appended to it as a
    :class:`DeferredResidual` (saved[4] None), so nothing waits (``act_save`` with a column
    compensation still waits); :func:`linear_backward` takes it back through its
    ``deferred`` argument.

    With OCC, eagerly, backward keeps R at its own size (``_compact_residual``): the dense
    compensation's nonzeros (≈ 2(1 − α) of X's entries) as bf16 values and int32 flat
    indices, the column compensations' [M, n] outlier columns. The sizes come to the host
    through a copy queued behind the kernel that counts them, read after the GEMMs are
    queued, so the GPU does not wait (with ``deferred``, read at the next forward: the host
    does not wait either). Under torch.compile or CUDA-graph capture R is kept full
    width ([M, K] bf16: more memory than a bf16 layer's saved X), as nothing may sync there.
    """
    _check(recipe, x2d, weight)
    if _pending and _compact_residual():  # (never while compiling or capturing)
        pack_pending()  # earlier layers' residuals whose counts have arrived
    x2d = x2d.contiguous()
    m = x2d.shape[0]
    fx, fw = recipe.fwd_x.format, recipe.fwd_w.format
    occ = recipe.occ
    lo = hi = None
    if occ is not None:
        lo, hi = occ_thresholds(x2d, occ.alpha, occ.granularity)
    # q_x [Mp,K] + q_x_t [K,Mp]; with OCC, of the clamped X, plus the residual R [M,K] bf16
    seed = _seed(recipe, ("fwd_x", "fwd_w"))
    # compensation "e4m3": the outliers ride in q_x on the E4M3 grid, resid flags the columns
    # holding a part beyond E4M3's range (usually none), compensated over those columns
    comp = occ.compensation if occ is not None and occ.compensate else None
    q_x, s_x, q_x_t, resid = _quantize_rows(
        x2d, fx, lo=lo, hi=hi, store_q=True, store_qt=True,
        stochastic=_stochastic(recipe, "fwd_x"), seed=seed, outliers_e4m3=comp == "e4m3",
    )  # fmt: skip
    compact = comp is not None and need_residual and _compact_residual()
    order = n_cols = count = r_keep = None
    if comp == "e4m3":  # resid: flags of the columns beyond E4M3's range
        order, n_cols = order_columns(resid)
        count = _HostInt(n_cols) if compact else None
    elif comp == "columns":  # R packed to its outlier columns, first n of order
        order, n_cols = outlier_columns(resid)
        count = _HostInt(n_cols) if compact else None
    elif comp == "dense" and compact:  # wgrad's R (act_save: in E4M3) kept by its nonzeros
        r_keep = resid if recipe.act_save is None else _e4m3_rows_bf16(resid)
        ends = count_nonzeros(r_keep)
        count = _HostInt(ends[-1:])
    keep_w = not _requantize_w(recipe)
    q_w, s_w, q_w_t, _ = _quantize_rows(
        weight, fw, store_q=True, store_qt=keep_w, stochastic=_stochastic(recipe, "fwd_w"),
        seed=seed + 2,
    )  # fmt: skip
    # fwd: Y = (q_x·s_x)(q_w·s_w)ᵀ   [Mp,K] @ [K,N] -> [Mp,N]
    y = scaled_mm_rowwise(q_x, q_w, s_x, s_w, torch.bfloat16, recipe.fast_accum)[:m]
    r = s_r = None
    if comp == "dense":
        y = occ_compensate(y, resid, weight)  # Y += R·Wᵀ, a bf16 GEMM, float32 accumulation
        if compact and deferred is not None:  # packed later, when its count has arrived
            _defer(DeferredResidual(r_keep, count, ends), deferred)
        elif compact:  # R's nonzeros and their flat indices (the GEMMs run meanwhile)
            r, order = pack_nonzeros(r_keep, ends, count.get())
        elif need_residual:
            r = resid
    elif comp is not None:
        # the columns to pack: R's, or X's part beyond E4M3's range (recomputed from x and s)
        src, scale = (x2d, s_x) if comp == "e4m3" else (resid, None)
        later = compact and deferred is not None and recipe.act_save is None
        width = count.get() if compact and not later else None
        zero_rest = recipe.act_save is not None and not compact  # act_save's row scales
        r = gather_columns(src, order, n_cols, zero_rest=zero_rest, scale=scale, width=width)
        if r.shape[1]:  # full width: the kernels read the first n (n on the device)
            y = occ_compensate_columns(y, r, weight, order, n_cols)
        if not need_residual:
            r = order = n_cols = None
        elif later:  # cut to its n columns later, when the count has arrived
            _defer(DeferredResidual(r, count), deferred)
            r = None
    if r is not None and recipe.act_save == "e4m3" and r.ndim == 2 and r.shape[1]:
        r, s_r, _, _ = _quantize_rows(r, "e4m3", store_q=True)  # wgrad's R in FP8, row scales
    if not keep_w:
        q_w_t = None  # backward quantizes W again: the same bits, 1 byte per weight less held
    return y, (q_x_t, s_x, q_w_t, s_w, r, s_r, order, n_cols)


def _defer(held: DeferredResidual, deferred: list) -> None:
    deferred.append(held)
    with _pending_lock:
        _pending.append(held)


def _requantize_w(recipe: Recipe) -> bool:
    """With ``act_save`` the FP8 copy of W is not kept for dgrad: backward makes it again from
    the master weight (deterministic unless W rounds stochastically, then it is kept)."""
    return recipe.act_save is not None and not _stochastic(recipe, "fwd_w")


def linear_backward(
    saved: tuple,
    dy2d: torch.Tensor,
    weight: torch.Tensor,
    recipe: Recipe,
    need_dx: bool,
    need_dw: bool,
    deferred: DeferredResidual | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dgrad and wgrad from :func:`linear_forward`'s ``saved``: (dx [M, K] bf16, dw [N, K] f32).
    ``deferred``: the residual :func:`linear_forward` appended to its ``deferred`` list."""
    q_x_t, s_x, q_w_t, s_w, r, s_r, order, n_cols = saved
    if deferred is not None:
        with _pending_lock:
            if deferred in _pending:
                _pending.remove(deferred)
        deferred.pack()
        r = deferred.packed
        if deferred.idx is not None:  # R's nonzeros at these flat positions
            order = deferred.idx
    dy2d = dy2d.contiguous()
    m = dy2d.shape[0]
    dx = dw = None
    if not (need_dx or need_dw):
        return dx, dw
    # dY·diag(s_w) per row (dgrad; W's scale sits on the reduction dim N) and diag(s_x)·dY per
    # column (wgrad; X's scale sits on the reduction dim M), from one pass over dY
    fr, fc = recipe.dgrad_dy.format, recipe.wgrad_dy.format
    sr_row, sr_col = _stochastic(recipe, "dgrad_dy"), _stochastic(recipe, "wgrad_dy")
    if _traced(sr_row or sr_col):
        q_dy, s_dy, q_dy2_t, s_dy2 = traced.quantize_rowwise_and_colwise(
            dy2d, fr, fc, s_w, s_x[:m], need_dx, need_dw
        )
    else:
        q_dy, s_dy, q_dy2_t, s_dy2 = quantize_rowwise_and_colwise(
            dy2d, fr, fc, s_w, s_x[:m], need_dx, need_dw, sr_row, sr_col,
            _seed(recipe, ("dgrad_dy", "wgrad_dy")),
        )  # fmt: skip
    if need_dx:
        if q_w_t is None:  # act_save: W's FP8 copy was not kept; the same bits again
            _, _, q_w_t, _ = _quantize_rows(
                weight, recipe.fwd_w.format, store_q=False, store_qt=True
            )
        # dgrad: dX = (q_dy·s_dy) · q_w   [Mp,N] @ [N,K] -> [Mp,K]
        dx = scaled_mm_rowwise(q_dy, q_w_t, s_dy, None, torch.bfloat16, recipe.fast_accum)[:m]
    if need_dw:
        # wgrad: dW = (q_dy2·s_dy2)ᵀ · q_x   [N,Mp] @ [Mp,K] -> [N,K]
        dw = scaled_mm_rowwise(q_dy2_t, q_x_t, s_dy2, None, torch.float32, recipe.fast_accum)
        if r is not None:
            if s_r is not None:  # E4M3 R (act_save): dequantized in float32, then bf16
                r = _rows_to_bf16(r, s_r, m)
            if r.ndim == 1:  # R's nonzeros at the flat positions ``order``: dense again
                r = unpack_nonzeros(r, order, (m, weight.shape[1]))
            if n_cols is not None:  # dW[:, cols] += dYᵀ·R[:, cols], the outlier columns only
                if r.shape[1]:
                    dw = occ_compensate_columns_wgrad(dw, dy2d, r, order, n_cols)
            else:
                dw = occ_compensate_wgrad(dw, dy2d, r)  # dW += dYᵀ·R
        if recipe.dge is not None:
            dw = dge_weight_grad(
                dw, weight, s_w, recipe.fwd_w.format, recipe.dge.k, recipe.dge.clip
            )
        else:
            dw = dw.to(weight.dtype)
    return dx, dw
