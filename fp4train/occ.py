"""Outlier Clamping and Compensation (OCC) for activations quantized to FP4.

Absmax scaling lets a handful of large activations set the scale, which pushes the bulk of
the tensor under FP4's smallest step (0.5 · scale for E2M1) to zero. The paper (arXiv
2501.17116) clamps X to thresholds at a quantile α of its values before quantizing, and adds
the clamped-off part back in high precision:

    lo, hi = (1 − α)-quantile of X, α-quantile of X        (two tails, not |X|)
    X_c    = clamp(X, lo, hi)
    R      = X − X_c                                        (sparse: ≈ 2(1 − α) of entries)
    Y      = Q(X_c) · Q(W)ᵀ + R · Wᵀ                        (R · Wᵀ in float32)

**Compensation on the E4M3 grid** (``OCCConfig.compensation = "e4m3"``, :func:`outliers_on_e4m3`,
not the paper's). With one absmax scale s per row of the clamped X, an outlier x of that row
has x / s = 6 · x / (the row's clamp bound) (E2M1's max is 6), and E4M3 holds that quotient to
2⁻⁴ relative error for |x| up to 448 · s (74.7× the bound). Storing E4M3(x / s) in the FP4
operand's place folds the compensation into the FP8 GEMMs (E2M1 ⊂ E4M3, the operand stays
FP8): Y = (Q(X_c) + O) · Q(W)ᵀ + R₂ · Wᵀ with O the outliers on the E4M3 grid, and only
R₂ = X − clamp(X, −448 · s, 448 · s), the part beyond E4M3's range, left for a high-precision
product (zero unless an outlier exceeds 74.7× its bound). The outliers then meet the quantized
Q(W) instead of W, and carry E4M3's rounding; what that costs against the paper's R · Wᵀ is
measured in benchmarks/NOTES.md.

The paper's equation takes one quantile per tensor, its released code one per token (row):
``granularity="tensor"`` or ``"row"``. Its measurements on a 1.3B model's activations
(cosine / MSE / SNR dB vs. the unquantized tensor): no clamping 92.19% / 0.1055 / 8.31;
clamping at α = 0.999 without compensation 98.83% / 0.0366 / 14.25; with compensation
α = 0.999 99.61% / 0.0245 / 15.31, α = 0.99 100% / 0.0099 / 18.38, α = 0.97 100% / 0.0068 /
20.88. The default is α = 0.99.

**Quantile convention.** The q-quantile of n values is the order statistic of 0-based rank
``round(q · (n − 1))`` (Python/torch rounding, half to even): ``torch.quantile(...,
interpolation="nearest")``. It is always one of the input values.

**No full sort.** Quantiles come from selection (``torch.topk`` from the nearer tail), not a
sort. A group (the whole tensor, or one row) of at most ``exact_max_numel`` elements (2**22)
is selected exactly. A larger group is estimated from a deterministic strided sample of about
``sample_size`` (2**20) of its elements, the stride made coprime with the last dim so that a
tensor-wide sample visits every column (activation outliers cluster in channels). For data
without structure at the stride's period, the sample quantile's rank error behaves like a
random sample's: measured as the fraction of the full group at or below the estimate, it
stays within ``4 · sqrt(α(1 − α) / m)`` of the exact threshold's (m = sample size); for
α = 0.99 and m = 2**20 that is ±3.9e-4 in probability, i.e. each tail's clamped fraction is
(1 − α) to within ±4% of itself. ``tests/test_occ.py`` measures it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from fp4train import formats

__all__ = [
    "quantile_thresholds",
    "clamp_outliers",
    "outliers_on_e4m3",
    "SparseResidual",
    "GRANULARITIES",
    "E4M3_MAX",
]

GRANULARITIES = ("tensor", "row")
E4M3_MAX = formats.get("e4m3").max  # 448: outliers beyond E4M3_MAX · scale leave a residual


def _check_x(x: torch.Tensor, granularity: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if x.numel() == 0:
        raise ValueError(f"cannot take quantiles of an empty tensor (shape {tuple(x.shape)})")
    if granularity == "row" and x.ndim < 1:
        raise ValueError("granularity='row' needs a tensor with at least 1 dim")
    if not bool(torch.isfinite(x).all()):
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise ValueError(
            f"OCC needs finite activations, got {n_nan} NaN and {n_inf} Inf values "
            f"(shape {tuple(x.shape)}); fix the upstream computation"
        )


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.5 < alpha < 1:
        raise ValueError(f"OCC alpha must be a number in (0.5, 1), e.g. 0.99, got {alpha!r}")


def _check_count(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _stride(n: int, sample_size: int, period: int) -> int:
    """Smallest stride >= n // sample_size that is coprime with ``period``."""
    s = max(n // sample_size, 1)
    while math.gcd(s, period) != 1:
        s += 1
    return s


def _sample(n: int, period: int, exact_max_numel: int, sample_size: int) -> slice:
    """The elements of a group of n whose quantiles the thresholds take: all of them up to
    ``exact_max_numel``, else every s-th from s // 2 (the middle of each stride-long stretch;
    s from :func:`_stride`)."""
    if n <= exact_max_numel:
        return slice(0, None, 1)
    s = _stride(n, sample_size, period)
    return slice(s // 2, None, s)


def _rank(q: float, n: int) -> int:
    return round(q * (n - 1))  # half to even, as torch.quantile(interpolation="nearest")


def _order_statistic(v: torch.Tensor, i: int) -> torch.Tensor:
    """The value of 0-based rank ``i`` along v's last dim: [..., n] -> [...].

    A top-k selection from the nearer end: for a tail quantile k is ~(1 − α)·n, and CUDA's
    multi-block radix top-k is ~25x faster than ``kthvalue``'s one block per slice.
    """
    n = v.shape[-1]
    if i >= n // 2:
        return v.topk(n - i, dim=-1, largest=True, sorted=False).values.amin(dim=-1)
    return v.topk(i + 1, dim=-1, largest=False, sorted=False).values.amax(dim=-1)


def quantile_thresholds(
    x: torch.Tensor,
    alpha: float = 0.99,
    granularity: str = "tensor",
    *,
    exact_max_numel: int = 2**22,
    sample_size: int = 2**20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp thresholds ``(lo, hi)``: the (1 − α)- and α-quantiles of ``x``'s values.

    ``granularity="tensor"`` gives one pair for the whole tensor, shaped [1, ..., 1];
    ``"row"`` one pair per vector along the last dim, shaped [..., 1]. Both are float32
    (float64 for float64 ``x``, so that they stay values of ``x``). Groups of at most
    ``exact_max_numel`` elements are exact (nearest-rank, see the module docstring); larger
    ones are estimated from a strided sample of about ``sample_size`` elements, with the
    error bound stated there.

    Raises ValueError for NaN/Inf in ``x``, an empty ``x``, alpha outside (0.5, 1) or an
    unknown granularity; TypeError for a non-floating ``x``.
    """
    _check_alpha(alpha)
    _check_x(x, granularity)
    _check_count(exact_max_numel, "exact_max_numel")
    _check_count(sample_size, "sample_size")
    if granularity == "tensor":
        v = x.reshape(1, -1)  # [1, n]
        out_shape = [1] * x.ndim
    else:
        v = x.reshape(-1, x.shape[-1])  # [rows, K]
        out_shape = [*x.shape[:-1], 1]
    period = x.shape[-1] if granularity == "tensor" and x.ndim else 1
    v = v[:, _sample(v.shape[-1], period, exact_max_numel, sample_size)]
    n = v.shape[-1]
    lo = _order_statistic(v, _rank(1 - alpha, n))
    hi = _order_statistic(v, _rank(alpha, n))
    out = torch.float64 if x.dtype == torch.float64 else torch.float32
    return lo.to(out).reshape(out_shape), hi.to(out).reshape(out_shape)


@dataclass
class SparseResidual:
    """The clamped-off part R = X − clamp(X, lo, hi) of a tensor of shape ``shape``, in COO.

    ``indices`` [nnz] int64 are flat (row-major) positions in ``shape``, ascending;
    ``values`` [nnz] the nonzero entries of R. Values are computed in twice the input's
    precision (float32 for bf16/fp16 input, float64 for float32/float64), where the
    difference of an outlier and its threshold is exact unless their magnitudes differ by
    more than 2**15 (bf16), 2**12 (fp16) or 2**28 (float32); so clamped + ``to_dense()``
    reproduces X bit for bit. (float64 input is exact for outliers within 2× the threshold.)

    For GEMMs the tensor is read as a matrix [M, K] with K = ``shape[-1]`` and M the product
    of the leading dims, as a linear layer reads its input.
    """

    indices: torch.Tensor
    values: torch.Tensor
    shape: torch.Size

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        if self.indices.dtype != torch.int64 or self.indices.ndim != 1:
            raise ValueError(
                f"indices must be 1-D int64, got {self.indices.dtype} "
                f"of shape {tuple(self.indices.shape)}"
            )
        if self.values.shape != self.indices.shape:
            raise ValueError(
                f"values shape {tuple(self.values.shape)} does not match indices "
                f"shape {tuple(self.indices.shape)}"
            )

    @classmethod
    def from_dense(cls, r: torch.Tensor) -> SparseResidual:
        """The nonzero entries of a dense residual ``r`` (their values as they are)."""
        flat = r.reshape(-1)
        idx = flat.nonzero().squeeze(1)
        return cls(idx, flat[idx], r.shape)

    @property
    def nnz(self) -> int:
        """Number of stored (nonzero) entries."""
        return self.indices.numel()

    @property
    def density(self) -> float:
        """nnz / number of elements of the dense tensor."""
        return self.nnz / max(self.shape.numel(), 1)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense R, in ``values``' dtype unless ``dtype`` is given."""
        dense = torch.zeros(self.shape.numel(), dtype=self.values.dtype, device=self.values.device)
        dense[self.indices] = self.values
        dense = dense.reshape(self.shape)
        return dense if dtype is None else dense.to(dtype)

    def _csr(self, acc: torch.dtype, transpose: bool = False) -> torch.Tensor:
        """R [M, K] (or Rᵀ [K, M]) as a sparse CSR matrix in dtype ``acc``.

        CSR, not COO: torch's CPU sparse-dense product is ~60x faster with it, and CUDA hands
        either to cuSPARSE.
        """
        k = self.shape[-1]
        m = self.shape.numel() // k
        rows, cols, vals = self.indices // k, self.indices % k, self.values.to(acc)
        if transpose:
            order = torch.argsort(cols, stable=True)  # column-major, rows ascending within
            rows, cols, vals = cols[order], rows[order], vals[order]
            m, k = k, m
        # rows are sorted, so row r's entries start at the count of entries with row < r
        crow = torch.searchsorted(rows, torch.arange(m + 1, device=rows.device))
        with warnings.catch_warnings():  # CSR is "beta" in torch; the products used are stable
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            warnings.filterwarnings("ignore", "Sparse invariant checks are implicitly disabled")
            return torch.sparse_csr_tensor(crow, cols, vals, (m, k), check_invariants=False)

    def matmul_t(self, w: torch.Tensor) -> torch.Tensor:
        """``R · wᵀ``: R [..., K] (as [M, K]) times w [N, K] -> [..., N].

        Touches only R's nonzeros (a sparse-dense product). Accumulates and returns float32
        (float64 if ``w`` is float64): the caller adds it to the quantized GEMM's output
        before rounding that to its output dtype.
        """
        _check_operand(w, "w")
        if w.ndim != 2 or len(self.shape) < 1 or w.shape[1] != self.shape[-1]:
            raise ValueError(
                f"matmul_t needs w of shape [N, {self.shape[-1] if self.shape else 'K'}] for "
                f"a residual of shape {tuple(self.shape)}, got {tuple(w.shape)}"
            )
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        # cuSPARSE is ~10x faster with a row-major dense operand
        w_t = w.to(acc).t().contiguous()  # [K, N]
        out = torch.sparse.mm(self._csr(acc), w_t)  # [M, K] @ [K, N] -> [M, N]
        return out.reshape(*self.shape[:-1], w.shape[0])

    def t_matmul(self, dy: torch.Tensor) -> torch.Tensor:
        """``dyᵀ · R``: dy [..., N] (as [M, N]) with R [..., K] (as [M, K]) -> [N, K].

        The weight gradient's compensation term. Touches only R's nonzeros; accumulates and
        returns float32 (float64 if ``dy`` is float64).
        """
        _check_operand(dy, "dy")
        if len(self.shape) < 1 or dy.ndim < 1 or dy.shape[:-1] != self.shape[:-1]:
            raise ValueError(
                f"t_matmul needs dy of shape [{', '.join(map(str, self.shape[:-1]))}"
                f", N] for a residual of shape {tuple(self.shape)}, "
                f"got {tuple(dy.shape)}"
            )
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        dy2 = dy.reshape(-1, dy.shape[-1]).to(acc)  # [M, N]
        out_t = torch.sparse.mm(self._csr(acc, transpose=True), dy2)  # [K, M] @ [M, N] -> [K, N]
        return out_t.t().contiguous()


def _check_operand(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def clamp_outliers(
    x: torch.Tensor,
    alpha: float = 0.99,
    granularity: str = "tensor",
    *,
    exact_max_numel: int = 2**22,
    sample_size: int = 2**20,
) -> tuple[torch.Tensor, SparseResidual]:
    """Clamp ``x`` to its quantile thresholds: ``(x_clamped, residual)``.

    ``x_clamped = clamp(x, lo, hi)`` in ``x``'s dtype with ``(lo, hi) =
    quantile_thresholds(x, alpha, granularity, ...)``; ``residual`` holds x − x_clamped
    sparsely: the entries strictly beyond a threshold, about 2(1 − α) of them (values equal
    to a threshold stay). Raises as :func:`quantile_thresholds` does.
    """
    lo, hi = quantile_thresholds(
        x, alpha, granularity, exact_max_numel=exact_max_numel, sample_size=sample_size
    )
    # thresholds are values of x, so casting them back is exact
    x_clamped = torch.clamp(x, min=lo.to(x.dtype), max=hi.to(x.dtype))
    wide = torch.float64 if x.dtype in (torch.float32, torch.float64) else torch.float32
    flat, flat_c = x.reshape(-1), x_clamped.reshape(-1)
    idx = (flat != flat_c).nonzero().squeeze(1)  # [nnz], ascending
    values = flat[idx].to(wide) - flat_c[idx].to(wide)
    return x_clamped, SparseResidual(idx, values, x.shape)


def outliers_on_e4m3(
    x: torch.Tensor, x_c: torch.Tensor, data: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold OCC's outliers into the quantized operand on the E4M3 grid (see the module
    docstring): ``(data8, r2)``.

    x, x_c [M, K] float32: the activation and its clamp; ``data`` [M, K] float32: the grid
    values of x_c / scale (e.g. E2M1); ``scale`` [M, 1] float32: its row scales. ``data8`` is
    ``data`` with every outlier (x != x_c) replaced by x / scale (a correctly rounded float32
    quotient) rounded to E4M3, to nearest even and saturating at ±448; ``r2`` [M, K] float32,
    dense, is x − clamp(x, −t, t) with t = 448 · scale (float32): zero unless |x| > t.
    The triton backend computes the same numbers (r2 rounded to bf16).
    """
    for name, t in (("x", x), ("x_c", x_c), ("data", data), ("scale", scale)):
        if t.dtype != torch.float32:
            raise TypeError(f"outliers_on_e4m3 needs float32 {name}, got {t.dtype}")
    if x.ndim != 2 or x_c.shape != x.shape or data.shape != x.shape:
        raise ValueError(
            f"x, x_c and data must share one [M, K] shape, got {tuple(x.shape)}, "
            f"{tuple(x_c.shape)}, {tuple(data.shape)}"
        )
    if scale.shape != (x.shape[0], 1):
        raise ValueError(f"scale must be [M, 1] = [{x.shape[0]}, 1], got {tuple(scale.shape)}")
    data8 = torch.where(x != x_c, formats.round_to_format(x / scale, "e4m3"), data)
    t = scale * E4M3_MAX
    return data8, x - torch.clamp(x, min=-t, max=t)
