"""fp4train.formats against ml_dtypes, torch's own casts and hand-written encode tables."""

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fp4train.formats import E2M1, E4M3, E5M2, Format, get, round_to_format

# our formats whose finite values ml_dtypes implements exactly (its Inf/NaN codes aside)
ML_DTYPES = {
    "e2m1": ml_dtypes.float4_e2m1fn,
    "e4m3": ml_dtypes.float8_e4m3fn,
    "e5m2": ml_dtypes.float8_e5m2,
    "e5m10": np.float16,
    "e8m7": ml_dtypes.bfloat16,
}
if hasattr(ml_dtypes, "float6_e3m2fn"):
    ML_DTYPES["e3m2"] = ml_dtypes.float6_e3m2fn
    ML_DTYPES["e2m3"] = ml_dtypes.float6_e2m3fn
SMALL_FORMATS = [n for n in ML_DTYPES if get(n).bits <= 8]

# torch casts that round to nearest-even like ours, for finite inputs within ±max
TORCH_DTYPES = {
    "e4m3": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
    "e5m10": torch.float16,
    "e8m7": torch.bfloat16,
}

FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _ml_finite_values(dt) -> np.ndarray:
    """Every finite value of an ml_dtypes / numpy float type, sorted, -0 folded into 0."""
    bits = ml_dtypes.finfo(dt).bits
    codes = np.arange(2**bits, dtype=np.uint16 if bits > 8 else np.uint8)
    with np.errstate(invalid="ignore"):
        v = codes.view(dt).astype(np.float64)
    return np.unique(v[np.isfinite(v)] + 0.0)


def _ml_round(x: np.ndarray, dt) -> np.ndarray:
    """float32 -> ml_dtypes type -> float32: ml_dtypes' round-to-nearest-even."""
    return x.astype(np.float32).astype(dt).astype(np.float32)


def _ours(x: np.ndarray, fmt, **kw) -> np.ndarray:
    return round_to_format(torch.from_numpy(np.ascontiguousarray(x, np.float32)), fmt, **kw).numpy()


def _assert_bitwise_equal(got: np.ndarray, want: np.ndarray, x: np.ndarray, what: str):
    """Equal bit patterns, so a -0.0 vs +0.0 mismatch counts too."""
    bad = got.view(np.uint32) != want.view(np.uint32)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} mismatches, e.g. x={x[bad][:4]} ours={got[bad][:4]} "
        f"reference={want[bad][:4]}"
    )


def _samples(fmt: Format, n: int, seed: int) -> np.ndarray:
    """float32 values within ±max spread over every binade, subnormals and below included."""
    rng = np.random.default_rng(seed)
    lo = np.log2(fmt.min_positive) - 3
    mag = 2.0 ** rng.uniform(lo, np.log2(fmt.max), n)
    x = (mag * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    raw = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    raw = raw[np.abs(raw) <= fmt.max]  # random bit patterns: every exponent float32 has
    return np.concatenate([x, raw, np.float32([0.0, -0.0, fmt.max, -fmt.max])])


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "name, ebits, mbits, max_, min_positive",
    [
        ("e2m1", 2, 1, 6.0, 0.5),
        ("e1m2", 1, 2, 3.5, 0.5),
        ("e3m0", 3, 0, 16.0, 0.25),
        ("e4m3", 4, 3, 448.0, 2.0**-9),
        ("e5m2", 5, 2, 57344.0, 2.0**-16),
        ("e3m2", 3, 2, 28.0, 0.0625),
        ("e2m3", 2, 3, 7.5, 0.125),
        ("e5m10", 5, 10, 65504.0, 2.0**-24),  # float16
    ],
)
def test_format_constants(name, ebits, mbits, max_, min_positive):
    fmt = get(name)
    assert (fmt.name, fmt.ebits, fmt.mbits, fmt.bits) == (name, ebits, mbits, 1 + ebits + mbits)
    assert fmt.max == max_
    assert fmt.min_positive == min_positive
    assert fmt.grid[-1].item() == max_ and fmt.grid[0].item() == -max_
    assert fmt.positive_grid[1].item() == min_positive


@pytest.mark.parametrize(
    "name, magnitudes",
    [
        ("e2m1", [0, 0.5, 1, 1.5, 2, 3, 4, 6]),
        ("e1m2", [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5]),  # bias 0: a uniform grid
        ("e3m0", [0, 0.25, 0.5, 1, 2, 4, 8, 16]),  # powers of two, no subnormals
    ],
)
def test_fp4_grids(name, magnitudes):
    want = sorted({s * m for m in magnitudes for s in (-1.0, 1.0)})
    assert get(name).grid.tolist() == want
    assert get(name).positive_grid.tolist() == [float(m) for m in magnitudes]


def test_module_constants():
    assert (E2M1, E4M3, E5M2) == (get("e2m1"), get("e4m3"), get("e5m2"))
    assert E2M1.grid.dtype == torch.float64


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_grid_equals_every_finite_ml_dtypes_value(name):
    dt = ML_DTYPES[name]
    want = _ml_finite_values(dt)
    got = get(name).grid.numpy()
    assert got.shape == want.shape, f"{name}: {got.size} grid values, ml_dtypes has {want.size}"
    np.testing.assert_array_equal(got, want)
    assert get(name).max == float(ml_dtypes.finfo(dt).max)


@settings(max_examples=40, deadline=None)
@given(ebits=st.integers(1, 6), mbits=st.integers(0, 4))
def test_any_exmy_grid_structure(ebits, mbits):
    fmt = get(f"E{ebits}M{mbits}")
    g = fmt.grid
    assert fmt.name == f"e{ebits}m{mbits}" and fmt.bias == 2 ** (ebits - 1) - 1
    assert torch.equal(g, -g.flip(0)), "grid is not symmetric"
    assert bool((g.diff() > 0).all()), "grid is not strictly increasing"
    # codes: 2**bits minus -0, minus Inf/NaN codes (IEEE-like) or the one NaN code (e4m3)
    reserved = 2 * 2**mbits if ebits >= 5 else (2 if (ebits, mbits) == (4, 3) else 0)
    assert g.numel() == 2**fmt.bits - 1 - reserved
    assert g[-1].item() == fmt.max
    pos = fmt.positive_grid
    assert pos[1].item() == fmt.min_positive
    # within each binade [2**e, 2**(e+1)) the spacing is 2**(e - mbits)
    for e in range(fmt.min_normal_exp, int(np.log2(fmt.max)) + 1):
        binade = pos[(pos >= 2.0**e) & (pos < 2.0 ** (e + 1))]
        assert bool((binade.diff() == 2.0 ** (e - mbits)).all()), f"binade 2**{e}"
    below = pos[pos < 2.0**fmt.min_normal_exp]  # zero and the subnormals
    assert below.numel() == 2**mbits


def test_get_accepts_names_and_formats():
    assert get(" E2M1 ") == E2M1 and get("E4M3") == E4M3
    assert get(E4M3) is E4M3
    assert repr(E2M1) == "Format(e2m1, max=6)"


@pytest.mark.parametrize("bad", ["fp4", "e2", "e2m", "m2e1", "e0m3", "e9m1", "e2m11", "e8m8", ""])
def test_get_rejects_bad_names(bad):
    with pytest.raises(ValueError, match="format"):
        get(bad)


@pytest.mark.parametrize("bad", [4, None, 2.5, ["e2m1"], {"e": 2}])
def test_get_rejects_non_strings(bad):
    # unhashable values too (a JSON list from the CLI's --set), not lru_cache's TypeError
    with pytest.raises(ValueError, match="format must be a name"):
        get(bad)


# ----------------------------------------------------------------------------- rounding


ENCODE_TABLE = [
    # (fmt, x, expected)
    ("e2m1", 0.2, 0.0),
    ("e2m1", 0.25, 0.0),  # tie to even
    ("e2m1", 0.3, 0.5),
    ("e2m1", 0.75, 1.0),  # tie to even
    ("e2m1", 1.25, 1.0),  # tie to even
    ("e2m1", 1.3, 1.5),
    ("e2m1", 1.75, 2.0),  # tie to even
    ("e2m1", 2.5, 2.0),  # tie to even
    ("e2m1", 2.6, 3.0),
    ("e2m1", 3.5, 4.0),  # tie to even
    ("e2m1", 5.0, 4.0),  # tie to even
    ("e2m1", 5.1, 6.0),
    ("e2m1", 6.0, 6.0),
    ("e2m1", 7.0, 6.0),  # saturate (the next binade's tie, 7, is not special)
    ("e2m1", 1e30, 6.0),  # saturate
    ("e2m1", -1.25, -1.0),  # tie to even, sign kept
    ("e2m1", -5.0, -4.0),  # tie to even, sign kept
    ("e4m3", 2.0**-10, 0.0),  # tie to even: half the smallest subnormal
    ("e4m3", 3 * 2.0**-10, 2.0**-8),  # tie to even between subnormals 1 and 2 (x 2**-9)
    ("e4m3", 1.0625, 1.0),  # tie to even
    ("e4m3", 1.1875, 1.25),  # tie to even
    ("e4m3", 464.0, 448.0),  # tie between 448 and the NaN code's 480: saturate
    ("e4m3", 1e4, 448.0),  # saturate
    ("e5m2", 1.125, 1.0),  # tie to even
    ("e5m2", 1.375, 1.5),  # tie to even
    ("e5m2", 61440.0, 57344.0),  # saturate where an IEEE cast gives Inf
    ("e5m2", 1e6, 57344.0),  # saturate
    ("e3m0", 0.125, 0.0),  # tie between 0 and 0.25
    ("e3m0", 3.0, 4.0),  # tie between 2 and 4 goes up (mantissa-less, as ml_dtypes' e8m0)
    ("e3m0", 2.9, 2.0),
]


@pytest.mark.parametrize("fmt, x, want", ENCODE_TABLE)
def test_encode_table(fmt, x, want):
    got = round_to_format(torch.tensor([x], dtype=torch.float64), fmt).item()
    assert got == want, f"round_to_format({x}, {fmt}) = {got}, want {want}"


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_round_matches_ml_dtypes_on_random_values(name):
    fmt = get(name)
    x = _samples(fmt, 20_000, seed=list(ML_DTYPES).index(name))
    _assert_bitwise_equal(_ours(x, fmt), _ml_round(x, ML_DTYPES[name]), x, name)


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_round_matches_ml_dtypes_on_every_grid_point_and_tie(name):
    fmt = get(name)
    g = fmt.grid.numpy()
    ties = ((g[:-1] + g[1:]) / 2).astype(np.float32)  # midpoints, both signs: exact
    x = np.concatenate([g.astype(np.float32), ties, np.nextafter(ties, np.float32(0))])
    x = np.concatenate([x, np.nextafter(ties, np.float32(np.inf))])
    assert np.array_equal(x[: g.size], g) and np.array_equal(x[g.size : g.size + ties.size], ties)
    _assert_bitwise_equal(_ours(x, fmt), _ml_round(x, ML_DTYPES[name]), x, name)
    np.testing.assert_array_equal(_ours(g, fmt), g)  # grid points are fixed points


@settings(max_examples=30, deadline=None)
@given(x=hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(width=32)))
def test_round_matches_ml_dtypes_property(x):
    for name in SMALL_FORMATS:
        fmt = get(name)
        inside = x[np.abs(x) <= fmt.max]  # NaN and beyond-max are tested separately
        _assert_bitwise_equal(_ours(inside, fmt), _ml_round(inside, ML_DTYPES[name]), inside, name)


@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_round_matches_torch_casts(name):
    fmt = get(name)
    x = _samples(fmt, 20_000, seed=1)
    g = fmt.grid.numpy()
    x = np.concatenate([x, g, (g[:-1] + g[1:]) / 2]).astype(np.float32)
    xt = torch.from_numpy(x)
    want = xt.to(TORCH_DTYPES[name]).float()
    torch.testing.assert_close(round_to_format(xt, fmt), want, rtol=0, atol=0)


def test_round_matches_torch_float4_cast():
    x = torch.from_numpy(_samples(E2M1, 4096, seed=2)[:4096].copy())
    try:
        want = x.to(torch.float4_e2m1fn_x2).float()
    except (RuntimeError, NotImplementedError, TypeError) as e:
        pytest.skip(f"torch {torch.__version__} cannot cast to float4_e2m1fn_x2: {e}")
    if want.shape != x.shape:
        pytest.skip(f"torch's float4_e2m1fn_x2 cast packs values: shape {tuple(want.shape)}")
    torch.testing.assert_close(round_to_format(x, E2M1), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["e2m1", "e4m3", "e5m2", "e3m2", "e1m2"])
def test_saturates_beyond_max(name):
    fmt = get(name)
    big = torch.tensor([fmt.max * 1.01, fmt.max * 1.5, fmt.max * 2, 1e30, float("inf")])
    x = torch.cat([big, -big])
    want = torch.tensor([fmt.max] * 5 + [-fmt.max] * 5)
    torch.testing.assert_close(round_to_format(x, fmt), want, rtol=0, atol=0)
    torch.testing.assert_close(
        round_to_format(x, fmt, "stochastic", torch.Generator().manual_seed(0)),
        want,
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", ["e2m1", "e4m3", "e5m2"])
def test_nan_inf_and_signed_zero(name, dtype):
    fmt = get(name)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1e-6], dtype=dtype)
    for rounding in ("nearest", "stochastic"):
        y = round_to_format(x, fmt, rounding, torch.Generator().manual_seed(0))
        assert y.dtype == dtype
        assert torch.isnan(y[0]), "NaN must stay NaN"
        assert y[1:3].tolist() == [fmt.max, -fmt.max], "±Inf saturates to ±max"
        assert y[3:5].tolist() == [0.0, 0.0] and torch.signbit(y[3:5]).tolist() == [True, False]
    # ml_dtypes keeps the sign of zero, also for a negative that rounds to zero
    y = round_to_format(x, fmt)
    want = _ml_round(np.float32([-0.0, 0.0, -1e-6]), ML_DTYPES[name])
    assert want.tolist() == y[3:].tolist() == [0.0, 0.0, 0.0]
    assert torch.signbit(y[3:]).tolist() == np.signbit(want).tolist() == [True, False, True]


@pytest.mark.parametrize("name", ["e2m1", "e4m3", "e5m2"])
def test_input_dtypes_keep_dtype_and_values(name):
    # bf16 values with exponents inside fp16's normal range are exact in all four dtypes
    g = torch.Generator().manual_seed(3)
    mag = torch.exp2(torch.empty(4096).uniform_(-14, 15.9, generator=g))
    x = (mag * torch.randn(4096, generator=g).sign()).to(torch.bfloat16)
    ref = round_to_format(x.double(), name)
    for dtype in FLOAT_DTYPES:
        y = round_to_format(x.to(dtype), name)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=0, msg=f"input {dtype}")
    for rounding in ("nearest", "stochastic"):  # float64 keeps float64 math and values
        y = round_to_format(x.double(), name, rounding, torch.Generator().manual_seed(0))
        assert y.dtype == torch.float64


# ----------------------------------------------------------------------------- stochastic


def _neighbours(x: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest grid value <= x and smallest >= x (x within ±max)."""
    g = fmt.grid
    hi = g[torch.searchsorted(g, x.double(), right=False)]
    lo = g[torch.searchsorted(g, x.double(), right=True) - 1]
    return lo, hi


@pytest.mark.parametrize("name", ["e2m1", "e4m3", "e5m2"])
def test_stochastic_lands_on_a_neighbour(name):
    fmt = get(name)
    x = torch.from_numpy(_samples(fmt, 5000, seed=4)).repeat(8)
    y = round_to_format(x, fmt, "stochastic", torch.Generator().manual_seed(5)).double()
    lo, hi = _neighbours(x, fmt)
    ok = (y == lo) | (y == hi)
    assert bool(ok.all()), f"{int((~ok).sum())} results off the two neighbours, x={x[~ok][:4]}"
    assert bool(((y == lo) & (lo != hi)).any() and ((y == hi) & (lo != hi)).any())


@pytest.mark.parametrize("name", ["e2m1", "e4m3", "e5m10"])
def test_stochastic_keeps_grid_values(name):
    # grid values must never move: x = floor(u + noise) rounds u + noise up to u + 1 in float
    # when noise is within half an ulp of 1, which the top binade of e5m10 hits every ~2**14
    fmt = get(name)
    top = fmt.grid.float()[fmt.grid.abs() >= fmt.max / 2]  # the top binade of each sign
    x = top.repeat(2**18 // top.numel() + 1)
    y = round_to_format(x, fmt, "stochastic", torch.Generator().manual_seed(6))
    moved = y != x
    assert not bool(moved.any()), (
        f"{int(moved.sum())} of {x.numel()} grid values moved, e.g. {x[moved][:4]}"
    )


@pytest.mark.parametrize(
    "name, value",
    [
        ("e2m1", 1.3),
        ("e2m1", -4.7),
        ("e2m1", 0.1),
        ("e4m3", 100.3),
        ("e4m3", -0.0031),
        ("e5m2", 3e-5),
    ],
)
def test_stochastic_is_unbiased(name, value):
    fmt = get(name)
    n = 200_000
    x = torch.full((n,), value, dtype=torch.float64)
    y = round_to_format(x, fmt, "stochastic", torch.Generator().manual_seed(7))
    lo, hi = (v[0].item() for v in _neighbours(x[:1], fmt))
    assert set(y.unique().tolist()) == {lo, hi}
    p = (value - lo) / (hi - lo)
    se = (hi - lo) * (p * (1 - p) / n) ** 0.5
    mean = y.mean().item()
    assert abs(mean - value) < 4 * se, f"mean {mean} vs {value}: {abs(mean - value) / se:.1f} SE"


def test_stochastic_is_deterministic_with_a_seeded_generator():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(8)) * 3
    a = round_to_format(x, E2M1, "stochastic", torch.Generator().manual_seed(9))
    b = round_to_format(x, E2M1, "stochastic", torch.Generator().manual_seed(9))
    c = round_to_format(x, E2M1, "stochastic", torch.Generator().manual_seed(10))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------- bad input


def test_rejects_bad_rounding():
    with pytest.raises(ValueError, match="rounding must be 'nearest' or 'stochastic'"):
        round_to_format(torch.ones(3), E2M1, rounding="stochastik")


def test_rejects_bad_format():
    with pytest.raises(ValueError, match="unknown format 'fp4'"):
        round_to_format(torch.ones(3), "fp4")


@pytest.mark.parametrize("x", [torch.arange(3), torch.ones(3, dtype=torch.bool), [1.0, 2.0]])
def test_rejects_non_float_input(x):
    with pytest.raises(TypeError, match="floating-point tensor|must be a torch.Tensor"):
        round_to_format(x, E2M1)
