"""Minifloat formats (ExMy) and rounding onto their value grids.

A format ``eXmY`` has one sign bit, X exponent bits with bias ``2**(X-1) - 1`` and Y mantissa
bits, with subnormals. Which codes are reserved for Inf/NaN follows the formats as hardware
and ``ml_dtypes`` define them:

- ``e4m3`` is OCP ``float8_e4m3fn``: only S.1111.111 is NaN, max 448, no Inf.
- formats with 5 or more exponent bits (``e5m2``) are IEEE-like: the top exponent is
  reserved for Inf/NaN, so ``e5m2`` has max 57344.
- every other format (``e2m1``, ``e1m2``, ``e3m0``, ...) uses all codes for finite values:
  ``e2m1`` is {0, 0.5, 1, 1.5, 2, 3, 4, 6}, max 6 (``float4_e2m1fn``).

Rounding is to nearest with ties to even mantissa, saturating at ±max (NaN stays NaN, ±Inf
saturates to ±max), or stochastic. The paper's released kernel rounds exact ties toward +Inf;
ties have measure zero on real data, and we follow IEEE, ``ml_dtypes`` and torch's casts.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

__all__ = ["Format", "get", "round_to_format", "E2M1", "E4M3", "E5M2"]

_NAME_RE = re.compile(r"^e(\d+)m(\d+)$")


@dataclass(frozen=True)
class Format:
    """A sign + ``ebits`` exponent + ``mbits`` mantissa minifloat format."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max: float
    ieee_specials: bool  # top exponent reserved for Inf/NaN

    @property
    def min_normal_exp(self) -> int:
        """Exponent of the smallest normal number (also the subnormals' exponent)."""
        return 1 - self.bias

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value; 0 if the format has no subnormals (mbits == 0)."""
        return 2.0 ** (self.min_normal_exp - self.mbits) if self.mbits else 0.0

    @property
    def min_positive(self) -> float:
        """Smallest positive representable value."""
        return self.min_subnormal if self.mbits else 2.0**self.min_normal_exp

    @functools.cached_property
    def grid(self) -> torch.Tensor:
        """All representable finite values, sorted ascending, float64 (zero once)."""
        return _grid(self)

    @property
    def positive_grid(self) -> torch.Tensor:
        """Representable values >= 0, ascending, float64."""
        g = self.grid
        return g[g >= 0]

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    def __repr__(self) -> str:
        return f"Format({self.name}, max={self.max:g})"


def get(name: str | Format) -> Format:
    """Return the format named ``"eXmY"`` (case-insensitive), e.g. ``get("e2m1").max == 6``.

    Raises ``ValueError`` for a malformed name or a format wider than float32 can round.
    """
    if isinstance(name, Format):
        return name
    if not isinstance(name, str):  # checked before the cache, which cannot hash lists
        raise ValueError(f"format must be a name like 'e2m1', got {name!r}")
    return _get(name.strip().lower())


@functools.cache
def _get(name: str) -> Format:
    m = _NAME_RE.match(name)
    if m is None:
        raise ValueError(f"unknown format {name!r}: expected 'eXmY' such as 'e2m1', 'e4m3', 'e5m2'")
    ebits, mbits = int(m.group(1)), int(m.group(2))
    if not (1 <= ebits <= 8 and 0 <= mbits <= 10 and ebits + mbits <= 15):
        raise ValueError(
            f"unsupported format {name!r}: need 1 <= exponent bits <= 8, mantissa bits <= 10 "
            "and at most 15 bits besides the sign"
        )
    bias = 2 ** (ebits - 1) - 1
    ieee = ebits >= 5
    if ieee:
        max_exp = (2**ebits - 2) - bias
        max_val = 2.0**max_exp * (2 - 2.0**-mbits)
    elif ebits == 4 and mbits == 3:
        max_exp = (2**ebits - 1) - bias
        max_val = 2.0**max_exp * (2 - 2 * 2.0**-mbits)  # S.1111.111 is NaN: 448
    else:
        max_exp = (2**ebits - 1) - bias
        max_val = 2.0**max_exp * (2 - 2.0**-mbits)
    return Format(f"e{ebits}m{mbits}", ebits, mbits, bias, max_val, ieee)


def _grid(fmt: Format) -> torch.Tensor:
    vals = {0.0}
    top_exp = (2**fmt.ebits - (2 if fmt.ieee_specials else 1)) - fmt.bias
    for m in range(1, 2**fmt.mbits):  # subnormals
        vals.add(2.0**fmt.min_normal_exp * m / 2**fmt.mbits)
    for e in range(fmt.min_normal_exp, top_exp + 1):
        for m in range(2**fmt.mbits):
            v = 2.0**e * (1 + m / 2**fmt.mbits)
            if v <= fmt.max:
                vals.add(v)
    pos = sorted(vals)
    return torch.tensor([-v for v in reversed(pos[1:])] + pos, dtype=torch.float64)


E2M1 = get("e2m1")
E4M3 = get("e4m3")
E5M2 = get("e5m2")


def round_to_format(
    x: torch.Tensor,
    fmt: str | Format,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Round ``x`` elementwise onto the grid of ``fmt`` (no scaling), same dtype as ``x``.

    ``rounding="nearest"`` rounds to nearest, ties to even mantissa; ``"stochastic"`` rounds
    up with probability equal to the fractional distance between the two neighbouring grid
    points (unbiased), drawing from ``generator``. Magnitudes beyond ``fmt.max`` saturate to
    ±max, ±Inf included; NaN stays NaN. The math runs in float32 (float64 for float64 input),
    which is exact for every format here; the result is cast back to ``x.dtype``, exact
    whenever that dtype holds the format's values (bf16/fp16/fp32 hold e2m1, e4m3, e5m2).
    """
    fmt = get(fmt)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(work)
    mag = xf.abs()
    # exponent of each value's binade, floored at the subnormal exponent; frexp is exact
    _, e = torch.frexp(mag)
    e = torch.clamp(e - 1, min=fmt.min_normal_exp)
    step = torch.ldexp(torch.ones_like(mag), e - fmt.mbits)  # grid spacing in that binade
    u = mag / step  # exact: division by a power of two
    if rounding == "nearest":
        q = torch.round(u)  # half to even, so ties go to the even mantissa
    else:
        # up with probability frac(u); floor(u + noise) would round u + noise to u + 1 in
        # float when noise is within half an ulp of 1, moving exact grid values
        noise = torch.rand(u.shape, generator=generator, dtype=work, device=u.device)
        q = torch.floor(u)
        q = q + (noise < u - q).to(work)
    out = torch.clamp(q * step, max=fmt.max)
    out = torch.where(torch.isnan(xf), xf, torch.copysign(out, xf))
    return out.to(x.dtype)
