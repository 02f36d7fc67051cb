import math

import numpy as np
import pytest
import torch

from fp4train.occ import SparseResidual, clamp_outliers, outliers_on_e4m3, quantile_thresholds
from fp4train.quantize import quantize

ALPHAS = (0.51, 0.75, 0.97, 0.99, 0.999)


def _torch_quantiles(x: torch.Tensor, alpha: float, dim=None):
    """Exact reference: torch.quantile (a full sort) in float64, nearest rank."""
    q = torch.tensor([1 - alpha, alpha], dtype=torch.float64)
    if dim is None:
        return torch.quantile(x.double().flatten(), q, interpolation="nearest")
    return torch.quantile(x.double(), q, dim=dim, keepdim=True, interpolation="nearest")


def _heavy_tailed(shape, generator, dtype=torch.float32):
    """Normal bulk with log-normal magnitudes: outliers up to ~100x the typical value."""
    z = torch.randn(shape, generator=generator, dtype=torch.float64)
    return (z * torch.exp(torch.randn(shape, generator=generator, dtype=torch.float64))).to(dtype)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1001, 65536])
def test_thresholds_equal_torch_quantile_nearest(n):
    g = torch.Generator().manual_seed(10 + n)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    for alpha in ALPHAS:
        lo, hi = quantile_thresholds(x, alpha)
        assert lo.dtype == hi.dtype == torch.float64 and lo.shape == (1,)  # float64 x
        ref = _torch_quantiles(x, alpha)
        assert lo.item() == ref[0].item() and hi.item() == ref[1].item(), (alpha, lo, hi, ref)
        lo32, hi32 = quantile_thresholds(x.float(), alpha)
        assert lo32.dtype == torch.float32 and lo32.item() == ref[0].float().item()
        assert hi32.item() == ref[1].float().item()


def test_thresholds_half_ranks_round_to_even():
    x = torch.arange(7, dtype=torch.float32)  # ranks 0.25 * 6 = 1.5 -> 2, 0.75 * 6 = 4.5 -> 4
    lo, hi = quantile_thresholds(x, 0.75)
    assert (lo.item(), hi.item()) == (2.0, 4.0)


def test_thresholds_tensor_granularity_shape_and_dtype():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 8, 33, generator=g).bfloat16()
    lo, hi = quantile_thresholds(x, 0.97)
    assert lo.shape == hi.shape == (1, 1, 1)
    ref = _torch_quantiles(x, 0.97).float()  # bf16 values are exact in float64
    assert (lo.item(), hi.item()) == (ref[0].item(), ref[1].item())


def test_thresholds_per_row():
    g = torch.Generator().manual_seed(12)
    x = _heavy_tailed((3, 5, 257), g)
    for alpha in ALPHAS:
        lo, hi = quantile_thresholds(x, alpha, "row")
        assert lo.shape == hi.shape == (3, 5, 1)
        ref = _torch_quantiles(x, alpha, dim=-1).float()
        assert torch.equal(lo, ref[0]) and torch.equal(hi, ref[1]), alpha


def _tail_error(x: torch.Tensor, est: torch.Tensor, exact: torch.Tensor) -> float:
    """|F(est) − F(exact)|: how far the estimate is, in probability, from the exact quantile."""
    return abs((x <= est).double().mean().item() - (x <= exact).double().mean().item())


@pytest.mark.parametrize("structured", [False, True])
def test_sampled_estimate_within_stated_bound(structured):
    """Above exact_max_numel the thresholds come from a strided sample; its error is bounded.

    The structured case scales a few columns 30x (channel outliers) with a last dim that
    divides the naive stride, so a stride not made coprime with it would sample two columns.
    """
    g = torch.Generator().manual_seed(13 + structured)
    x = torch.randn(4096, 256, generator=g)  # n = 2**20
    if structured:
        x[:, ::37] *= 30
    sample_size = 2**14
    for alpha in (0.99, 0.999):
        lo, hi = quantile_thresholds(x, alpha, exact_max_numel=2**16, sample_size=sample_size)
        ref = _torch_quantiles(x, alpha).float()
        m = x.numel() // 65  # stride 2**20 // 2**14 = 64 shares factors with 256: 65 is used
        bound = 4 * math.sqrt(alpha * (1 - alpha) / m)
        err_lo = _tail_error(x, lo, ref[0])
        err_hi = _tail_error(x, hi, ref[1])
        assert max(err_lo, err_hi) <= bound, (
            f"alpha={alpha}: rank error lo {err_lo:.2e}, hi {err_hi:.2e} > bound {bound:.2e}"
        )


def test_sampled_row_granularity_covers_whole_rows():
    g = torch.Generator().manual_seed(15)
    x = torch.randn(8, 2**15, generator=g)
    x[:, 2**14 :] *= 10  # the second half of each row is wider: a prefix sample would miss it
    lo, hi = quantile_thresholds(x, 0.99, "row", exact_max_numel=2**12, sample_size=2**12)
    ref = _torch_quantiles(x, 0.99, dim=-1).float()
    bound = 4 * math.sqrt(0.99 * 0.01 / 2**12)
    for r in range(x.shape[0]):
        err = max(_tail_error(x[r], lo[r], ref[0, r]), _tail_error(x[r], hi[r], ref[1, r]))
        assert err <= bound, f"row {r}: rank error {err:.2e} > bound {bound:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_clamp_plus_residual_reconstructs_x_exactly(dtype, granularity):
    g = torch.Generator().manual_seed(16)
    x = _heavy_tailed((2, 64, 300), g, dtype)
    if dtype == torch.float64:
        # float64 residuals are exact within 2x the threshold (see SparseResidual)
        x = torch.randn((2, 64, 300), generator=g, dtype=dtype)
    x_c, r = clamp_outliers(x, 0.97, granularity)
    assert x_c.dtype == dtype and x_c.shape == x.shape
    wide = r.values.dtype
    assert wide == (torch.float32 if dtype in (torch.bfloat16, torch.float16) else torch.float64)
    assert torch.equal(x_c.to(wide) + r.to_dense(), x.to(wide))
    lo, hi = (t.double() for t in quantile_thresholds(x, 0.97, granularity))
    assert bool(((x_c.double() >= lo) & (x_c.double() <= hi)).all())
    inside = (x.double() >= lo) & (x.double() <= hi)
    assert torch.equal(x_c[inside], x[inside])  # untouched where not an outlier
    assert torch.equal(r.to_dense().reshape(-1).nonzero().squeeze(1), r.indices)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_residual_density_is_two_tails(granularity):
    """Distinct values: exactly the ranks beyond the two nearest-rank thresholds are clamped."""
    g = torch.Generator().manual_seed(17)
    rows, k = 256, 1024
    x = torch.randn(rows, k, generator=g, dtype=torch.float64)
    for alpha in (0.97, 0.99, 0.999):
        _, r = clamp_outliers(x, alpha, granularity)
        n = x.numel() if granularity == "tensor" else k
        per_group = (n - 1 - round(alpha * (n - 1))) + round((1 - alpha) * (n - 1))
        assert r.nnz == per_group * (x.numel() // n)
        # so the density is 2(1 − α) up to the ranks' rounding: within 2 / n
        assert abs(r.density - 2 * (1 - alpha)) <= 2 / n, (alpha, r.density)


def test_sampled_clamp_density_close_to_two_tails():
    g = torch.Generator().manual_seed(18)
    x = torch.randn(2**20, generator=g)
    _, r = clamp_outliers(x, 0.99, exact_max_numel=2**16, sample_size=2**14)
    m = x.numel() // 65  # stride 64 shares factors with the last dim 2**20: 65 is used
    tol = 2 * 4 * math.sqrt(0.99 * 0.01 / m)  # two tails, each within the stated bound
    assert abs(r.density - 0.02) <= tol, f"density {r.density:.5f}, want 0.02 ± {tol:.5f}"


def test_constant_tensor_has_empty_residual():
    x = torch.full((6, 10), 2.5)
    x_c, r = clamp_outliers(x)
    assert torch.equal(x_c, x) and r.nnz == 0 and r.density == 0.0
    assert torch.equal(r.matmul_t(torch.ones(3, 10)), torch.zeros(6, 3))
    assert torch.equal(r.t_matmul(torch.ones(6, 4)), torch.zeros(4, 10))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_matmul_t_and_t_matmul_match_dense_float64(dtype):
    g = torch.Generator().manual_seed(19)
    b, t, k, n = 3, 40, 192, 48
    x = _heavy_tailed((b, t, k), g, dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    dy = torch.randn(b, t, n, generator=g).to(dtype)
    _, r = clamp_outliers(x, 0.97, "row")
    r64 = r.to_dense(torch.float64).reshape(b * t, k)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rtol = 1e-12 if dtype == torch.float64 else 1e-5  # float32 accumulation of a few terms

    y = r.matmul_t(w)  # [b, t, n]
    ref = r64 @ w.double().T
    scale = r64.abs() @ w.double().abs().T
    assert y.dtype == acc and y.shape == (b, t, n)
    err = ((y.double().reshape(b * t, n) - ref).abs() - rtol * scale).max().item()
    assert err <= 0, f"matmul_t exceeds {rtol} relative error by {err:.3g}"

    dw = r.t_matmul(dy)  # [n, k]
    dy64 = dy.double().reshape(b * t, n)
    ref = dy64.T @ r64
    scale = dy64.abs().T @ r64.abs()
    assert dw.dtype == acc and dw.shape == (n, k) and dw.is_contiguous()
    err = ((dw.double() - ref).abs() - rtol * scale).max().item()
    assert err <= 0, f"t_matmul exceeds {rtol} relative error by {err:.3g}"


def test_bad_inputs_raise():
    x = torch.randn(4, 8)
    bad = x.clone()
    bad[0, 0], bad[1, 1], bad[2, 2] = float("nan"), float("nan"), float("inf")
    with pytest.raises(ValueError, match="2 NaN and 1 Inf"):
        clamp_outliers(bad)
    with pytest.raises(ValueError, match="2 NaN and 1 Inf"):
        quantile_thresholds(bad, granularity="row")
    with pytest.raises(TypeError, match="floating-point"):
        clamp_outliers(torch.arange(10))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantile_thresholds([1.0, 2.0])
    for alpha in (0.5, 1.0, 1, 0.3, 1.2, float("nan"), True, "0.99"):
        with pytest.raises(ValueError, match="alpha"):
            clamp_outliers(x, alpha)
    with pytest.raises(ValueError, match="granularity"):
        clamp_outliers(x, granularity="col")
    with pytest.raises(ValueError, match="empty"):
        quantile_thresholds(torch.empty(0, 5))
    with pytest.raises(ValueError, match="at least 1 dim"):
        quantile_thresholds(torch.tensor(1.0), granularity="row")
    for kw in ({"exact_max_numel": 0}, {"sample_size": 0}, {"sample_size": 2.5}):
        with pytest.raises(ValueError, match="positive int"):
            quantile_thresholds(x, **kw)


def test_residual_matmul_shape_errors():
    _, r = clamp_outliers(torch.randn(2, 5, 8), 0.9)
    with pytest.raises(ValueError, match=r"w of shape \[N, 8\]"):
        r.matmul_t(torch.randn(3, 7))
    with pytest.raises(ValueError, match="w of shape"):
        r.matmul_t(torch.randn(8))
    with pytest.raises(ValueError, match=r"dy of shape \[2, 5, N\]"):
        r.t_matmul(torch.randn(10, 3))
    with pytest.raises(TypeError, match="floating-point"):
        r.matmul_t(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="does not match"):
        SparseResidual(torch.arange(3), torch.zeros(2), torch.Size([4]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(20)
    x = _heavy_tailed((4, 256, 512), g, torch.bfloat16)
    w = torch.randn(384, 512, generator=g).bfloat16()
    dy = torch.randn(4, 256, 384, generator=g).bfloat16()
    for gran, kw in (("tensor", {}), ("row", {}), ("tensor", {"exact_max_numel": 2**16})):
        xc, r = clamp_outliers(x, 0.99, gran, **kw)
        xc_d, r_d = clamp_outliers(x.cuda(), 0.99, gran, **kw)
        assert torch.equal(xc_d.cpu(), xc) and torch.equal(r_d.indices.cpu(), r.indices)
        assert torch.equal(r_d.values.cpu(), r.values)
        torch.testing.assert_close(r_d.matmul_t(w.cuda()).cpu(), r.matmul_t(w))
        torch.testing.assert_close(r_d.t_matmul(dy.cuda()).cpu(), r.t_matmul(dy))


# ----------------------------------------------------------------------------- outliers in E4M3
def test_outliers_on_e4m3_against_ml_dtypes():
    """Independent reference: each outlier is x / scale (float32 division) cast to E4M3 by
    ml_dtypes after clipping to ±448; inliers keep the E2M1 data; r2 is x − clamp(x, ±t),
    t = 448·scale, in float64 rounded once to float32, and zero unless |x| > t."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    g = torch.Generator().manual_seed(5)
    x = _heavy_tailed((64, 200), g)
    x[3, 7], x[40, 100] = 1e5, -3e4  # beyond 448 · scale
    x_c, r = clamp_outliers(x, 0.99, "row")
    q = quantize(x_c, "e2m1", "row")
    data8, r2 = outliers_on_e4m3(x, x_c, q.data, q.scale)
    out = x != x_c
    assert 0 < int(out.sum()) < x.numel() // 20
    assert torch.equal(data8[~out], q.data[~out])
    u = (x / q.scale).numpy()
    want = np.clip(u, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert torch.equal(data8[out], torch.from_numpy(want)[out])
    t = (q.scale * 448).double()  # the float32 product, as the definition takes it
    # a float64 difference of float32 values, rounded once: the float32 subtraction
    assert torch.equal(r2, (x.double() - torch.clamp(x.double(), -t, t)).float())
    beyond = r2 != 0
    assert beyond[3, 7] and beyond[40, 100] and int(beyond.sum()) <= 4
    assert (data8[beyond].abs() == 448).all()
    # together they give x back to E4M3's rounding (2**-4 relative) where it is in range
    back = data8 * q.scale + r2
    assert ((back - x).abs() <= 2**-4 * x.abs() + 1e-6)[out].all()


def test_outliers_on_e4m3_rejects_bad_input():
    x = torch.randn(4, 8)
    s = torch.ones(4, 1)
    with pytest.raises(TypeError, match="float32 x"):
        outliers_on_e4m3(x.double(), x, x, s)
    with pytest.raises(ValueError, match="one \\[M, K\\] shape"):
        outliers_on_e4m3(x, x[:2], x, s)
    with pytest.raises(ValueError, match="scale must be"):
        outliers_on_e4m3(x, x, x, torch.ones(4))
