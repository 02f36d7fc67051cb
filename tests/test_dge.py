import math

import pytest
import torch

from fp4train import formats
from fp4train.dge import correction, derivative, smooth

KS = (2.0, 5.0, 10.0)


def _ref_derivative(t: float, k: float, clip: float) -> float:
    u = abs(2 * t - 1)
    return clip if u == 0 else min(u ** (1 / k - 1) / k, clip)


def _ref_correction(x: float, grid: list[float], k: float, clip: float) -> float:
    """Per-element loop over the positive grid's intervals, independent of searchsorted."""
    mag = abs(x)
    if mag > grid[-1]:
        return 0.0
    for a, b in zip(grid[:-1], grid[1:], strict=True):
        if a <= mag < b or (b == grid[-1] and mag == b):
            return _ref_derivative((mag - a) / (b - a), k, clip)
    raise AssertionError(f"{x} not in any interval of {grid}")


def test_smooth_maps_interval_onto_itself_monotonically():
    t = torch.linspace(0, 1, 10001, dtype=torch.float64)
    for k in KS:
        f = smooth(t, k)
        assert f[0] == 0 and f[-1] == 1 and f[5000] == 0.5
        assert bool((f.diff() > 0).all()), f"smooth is not increasing for k={k}"
        # odd about the midpoint: f(1 - t) = 1 - f(t)
        torch.testing.assert_close(smooth(1 - t, k), 1 - f, rtol=0, atol=1e-14)


def test_derivative_matches_finite_difference_of_smooth():
    g = torch.Generator().manual_seed(1)
    t = torch.rand(4000, generator=g, dtype=torch.float64)
    t = t[(t - 0.5).abs() > 0.02]  # the cusp at 1/2 has no finite difference
    h = 1e-6
    for k in KS:
        fd = (smooth(t + h, k) - smooth(t - h, k)) / (2 * h)
        d = derivative(t, k, clip=1e9)
        err = ((d - fd).abs() / fd).max().item()
        assert err < 1e-6, f"k={k}: max relative error vs finite difference {err:.3g}"


def test_derivative_values_and_clip():
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 0.4999, 0.5001], dtype=torch.float64)
    for k in KS:
        for clip in (0.5, 3.0, 100.0):
            got = derivative(t, k, clip).tolist()
            want = [_ref_derivative(v, k, clip) for v in t.tolist()]
            assert got == pytest.approx(want, rel=1e-12), (k, clip)
    # the midpoint is infinite before clipping, so it equals clip exactly
    assert derivative(torch.tensor([0.5]), 5.0, 3.0).item() == 3.0
    assert derivative(torch.tensor([0.0, 1.0]), 5.0, 3.0).tolist() == pytest.approx([0.2, 0.2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_smooth_and_derivative_keep_dtype(dtype):
    t = torch.tensor([0.0, 0.25, 0.75, 1.0], dtype=dtype)
    assert smooth(t).dtype == dtype and derivative(t).dtype == dtype
    want = torch.tensor([_ref_derivative(v, 5.0, 3.0) for v in t.double().tolist()])
    torch.testing.assert_close(derivative(t).double(), want.double(), rtol=1e-2, atol=0)


@pytest.mark.parametrize("k", [1, 1.0, 0.5, -5, float("nan"), float("inf"), True, "5"])
def test_bad_k_raises(k):
    t = torch.rand(4)
    for fn in (lambda: smooth(t, k), lambda: derivative(t, k), lambda: correction(t, k=k)):
        with pytest.raises(ValueError, match="k must be"):
            fn()


@pytest.mark.parametrize("clip", [0, -1.0, float("nan"), float("inf"), None])
def test_bad_clip_raises(clip):
    t = torch.rand(4)
    with pytest.raises(ValueError, match="clip must be"):
        derivative(t, 5.0, clip)
    with pytest.raises(ValueError, match="clip must be"):
        correction(t, clip=clip)


def test_bad_input_types_raise():
    with pytest.raises(TypeError, match="floating-point"):
        correction(torch.arange(4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        derivative([0.1, 0.2])
    with pytest.raises(ValueError, match="unknown format"):
        correction(torch.rand(4), fmt="fp4")


@pytest.mark.parametrize(
    "x, want",
    [
        (0.25, 3.0),  # [0, 0.5], t = 1/2: clipped
        (2.5, 3.0),  # [2, 3], t = 1/2
        (5.0, 3.0),  # [4, 6], t = 1/2
        (1.75, 3.0),  # [1.5, 2], t = 1/2
        (4.0, 0.2),  # grid point: t = 0, 1/k
        (0.0, 0.2),
        (0.5, 0.2),
        (6.0, 0.2),  # max ends the last interval: t = 1, 1/k
        (6.0001, 0.0),  # saturated
        (7.0, 0.0),
        (float("inf"), 0.0),
        (4.5, 0.2 * 0.5 ** (1 / 5 - 1)),  # [4, 6], t = 1/4: |2t - 1| = 1/2
        (0.125, 0.2 * 0.5 ** (1 / 5 - 1)),  # [0, 0.5], t = 1/4
        (3.75, 0.2 * 0.5 ** (1 / 5 - 1)),  # [3, 4], t = 3/4
    ],
)
def test_correction_e2m1_hand_cases(x, want):
    for sign in (1.0, -1.0):
        got = correction(torch.tensor([sign * x]), "e2m1", k=5.0, clip=3.0)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(want, rel=1e-6), f"x={sign * x}"


def test_correction_nan_propagates():
    assert math.isnan(correction(torch.tensor([float("nan")])).item())


@pytest.mark.parametrize("fmt", ["e2m1", "e1m2", "e3m0", "e4m3"])
def test_correction_matches_per_element_loop(fmt):
    f = formats.get(fmt)
    grid = f.positive_grid.tolist()
    g = torch.Generator().manual_seed(2)
    # random values over the range and a bit past it, plus every grid point and midpoint
    x = (torch.rand(3000, generator=g, dtype=torch.float64) * 2 - 1) * f.max * 1.1
    pts = torch.tensor(grid, dtype=torch.float64)
    x = torch.cat([x, pts, -pts, (pts[1:] + pts[:-1]) / 2]).float()
    for k, clip in ((5.0, 3.0), (3.0, 1.5)):
        got = correction(x, fmt, k, clip)
        want = torch.tensor([_ref_correction(v, grid, k, clip) for v in x.double().tolist()])
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)


def test_correction_is_even_and_dtype_independent():
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(10000, generator=g) * 2 - 1) * 7
    x = x.bfloat16()  # every dtype below holds these values exactly
    ref = correction(x)
    assert torch.equal(correction(-x), ref)
    for dtype in (torch.float16, torch.float32, torch.float64):
        got = correction(x.to(dtype))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


def test_correction_is_derivative_of_piecewise_smooth_quantizer():
    """The factor is d/dx of a + δ·smooth((x − a)/δ), so each interval's δ must cancel."""
    f = formats.get("e2m1")
    grid = f.positive_grid
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2000, generator=g, dtype=torch.float64) * f.max
    i = torch.clamp(torch.searchsorted(grid, x, right=True) - 1, 0, grid.numel() - 2)
    a, delta = grid[i], grid[i + 1] - grid[i]
    t = (x - a) / delta
    keep = ((t - 0.5).abs() > 0.05) & (t > 1e-3) & (t < 1 - 1e-3)  # away from cusp and ends
    x, a, delta = x[keep], a[keep], delta[keep]
    h = 1e-7

    def q(v):  # the smooth quantizer on x's own interval
        return a + delta * smooth((v - a) / delta)

    fd = (q(x + h) - q(x - h)) / (2 * h)
    got = correction(x, "e2m1", clip=1e9).double()
    err = ((got - fd).abs() / fd).max().item()
    assert err < 1e-5, f"max relative error vs finite difference {err:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_correction_cuda_matches_cpu():
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(1 << 16, generator=g) * 2 - 1) * 7
    for dtype in (torch.bfloat16, torch.float32):
        xd = x.to(dtype)
        got = correction(xd.cuda())
        assert got.is_cuda and got.dtype == torch.float32
        torch.testing.assert_close(got.cpu(), correction(xd), rtol=1e-6, atol=0)
