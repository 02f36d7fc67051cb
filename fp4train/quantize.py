"""Reference absmax quantizers in plain PyTorch: the definition of the numbers.

For each vector v of the chosen granularity the scale is ``s = amax(|v|) / fmt.max`` in float32
(``s = 1`` for an all-zero vector, and ``s`` floored at 2**-126 so it never underflows to 0),
the quantized values are ``q = round_to_format(v / s)`` and the dequantized vector is
``q * s``. Granularities, for x of shape [..., K]:

- ``"tensor"``: one scale for the whole tensor, scale shape [1, ..., 1].
- ``"row"``:    one scale per vector along the last dim (token-wise for activations X[M, K],
  channel-wise for weights W[N, K]), scale shape [..., 1].
- ``"col"``:    one scale per column (reduce over every dim but the last), scale [1, ..., K].
- ``"block"``:  one scale per ``block_size`` consecutive elements of the last dim (MX / NVFP4
  style), scale shape [..., K // block_size]. ``scale_format`` picks how block scales are
  stored: None (exact float32), ``"e8m0"`` (MXFP4: power of two,
  ``2**(floor(log2 amax) - floor(log2 fmt.max))``) or ``"e4m3"`` (NVFP4: the block scale
  rounded to E4M3 under a float32 per-tensor scale ``amax(|x|) / (fmt.max * 448)``).

The Triton kernels in ``fp4train.kernels`` reproduce these numbers bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4train.formats import Format, get, round_to_format

__all__ = ["QuantizedTensor", "quantize", "fake_quantize", "absmax_scale", "GRANULARITIES"]

GRANULARITIES = ("tensor", "row", "col", "block")
_MIN_SCALE = 2.0**-126  # smallest normal float32


@dataclass
class QuantizedTensor:
    """Values on a format's grid plus the float32 scales that map them back.

    ``data`` holds ``round(x / scale)`` (float32, every value on ``fmt.grid``), ``scale`` the
    float32 scales (shape depends on ``granularity``, see the module docstring).
    """

    data: torch.Tensor
    scale: torch.Tensor
    fmt: Format
    granularity: str
    block_size: int | None = None

    def expanded_scale(self) -> torch.Tensor:
        """The scale broadcastable against ``data`` (block scales repeated per element)."""
        if self.granularity == "block":
            return self.scale.repeat_interleave(self.block_size, dim=-1)
        return self.scale

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``data * scale`` in float32, cast to ``dtype``."""
        return (self.data * self.expanded_scale()).to(dtype)


def absmax_scale(amax: torch.Tensor, fmt: Format) -> torch.Tensor:
    """float32 scale ``amax / fmt.max``; 1 where amax is 0; floored at 2**-126."""
    amax = amax.float()
    # divide by a tensor: CUDA turns division by a Python scalar into a multiplication by its
    # reciprocal, which differs from CPU (and from the kernels) by an ulp
    s = torch.clamp(amax / torch.tensor(fmt.max, device=amax.device), min=_MIN_SCALE)
    return torch.where(amax > 0, s, torch.ones_like(s))


def _check_input(x: torch.Tensor, nonfinite: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"quantize expects a floating-point tensor, got dtype {x.dtype}")
    if nonfinite not in ("raise", "propagate"):
        raise ValueError(f"nonfinite must be 'raise' or 'propagate', got {nonfinite!r}")
    if nonfinite == "raise" and x.numel() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"cannot quantize a tensor holding {n_nan} NaN and {n_inf} Inf values "
            f"(shape {tuple(x.shape)}): absmax scaling would turn the whole vector into "
            "garbage; fix the upstream computation or pass nonfinite='propagate'"
        )


def _amax(x: torch.Tensor, granularity: str, block_size: int | None) -> torch.Tensor:
    a = x.abs().float()
    if granularity == "tensor":
        return a.amax().reshape([1] * x.ndim) if x.ndim else a.amax()
    if granularity == "row":
        return a.amax(dim=-1, keepdim=True)
    if granularity == "col":
        return a.amax(dim=tuple(range(x.ndim - 1)), keepdim=True)
    return a.unflatten(-1, (-1, block_size)).amax(dim=-1)  # block: [..., K // B]


def quantize(
    x: torch.Tensor,
    fmt: str | Format,
    granularity: str = "tensor",
    block_size: int | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    scale_format: str | None = None,
    nonfinite: str = "raise",
) -> QuantizedTensor:
    """Absmax-quantize ``x`` to ``fmt`` at ``granularity``; see the module docstring.

    Args:
        x: floating-point tensor; ``"row"`` needs ``x.ndim >= 1``, ``"col"`` ``x.ndim >= 2``,
            ``"block"`` a last dim divisible by ``block_size``.
        fmt: a format or its name (``"e2m1"``, ``"e4m3"``, ``"e5m2"``, any ``"eXmY"``).
        rounding: ``"nearest"`` (ties to even) or ``"stochastic"`` (uses ``generator``).
        scale_format: block scales only: None, ``"e8m0"`` (MXFP4) or ``"e4m3"`` (NVFP4).
        nonfinite: ``"raise"`` (default) raises ValueError on NaN/Inf input; ``"propagate"``
            skips the check, so NaN/Inf spread through their vector's scale.
    """
    fmt = get(fmt)
    _check_input(x, nonfinite)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "row" and x.ndim < 1:
        raise ValueError("granularity='row' needs a tensor with at least 1 dim")
    if granularity == "col" and x.ndim < 2:
        raise ValueError(f"granularity='col' needs a tensor with at least 2 dims, got {x.ndim}")
    if granularity == "block":
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(
                f"granularity='block' needs a positive int block_size, got {block_size!r}"
            )
        if x.ndim < 1 or x.shape[-1] % block_size:
            raise ValueError(
                f"last dim {tuple(x.shape)[-1:]} is not divisible by block_size={block_size}"
            )
    elif scale_format is not None:
        raise ValueError("scale_format applies to granularity='block' only")
    if scale_format not in (None, "e8m0", "e4m3"):
        raise ValueError(f"scale_format must be None, 'e8m0' or 'e4m3', got {scale_format!r}")

    amax = _amax(x, granularity, block_size)
    if scale_format == "e8m0":
        # OCP MX: shared exponent floor(log2(amax)) - emax of the element format
        emax = int(torch.tensor(fmt.max).log2().floor())
        _, e = torch.frexp(amax)
        # E8M0's smallest value is 2**-127; below it the scale would underflow to 0 (0/0 = NaN)
        e = torch.clamp(e - 1 - emax, min=-127)
        scale = torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), e), 1.0)
    elif scale_format == "e4m3":
        e4m3 = get("e4m3")
        fmax = torch.tensor(fmt.max, device=amax.device)
        global_scale = absmax_scale(amax.amax(), e4m3) / fmax  # amax / (448 * fmt.max)
        block = round_to_format(absmax_scale(amax, fmt) / global_scale, e4m3)
        # a nonzero block whose scale underflows E4M3 keeps E4M3's smallest value (never an
        # unscaled 1); an all-zero block gets scale 1 like every other granularity
        block = block.clamp(min=e4m3.min_positive)
        scale = torch.where(amax > 0, block * global_scale, torch.ones_like(block))
    else:
        scale = absmax_scale(amax, fmt)

    full_scale = scale.repeat_interleave(block_size, dim=-1) if granularity == "block" else scale
    data = round_to_format(x.float() / full_scale, fmt, rounding, generator)
    return QuantizedTensor(data, scale, fmt, granularity, block_size)


def fake_quantize(x: torch.Tensor, fmt: str | Format, granularity: str = "tensor", **kwargs):
    """``quantize(x, ...).dequantize()`` cast back to ``x.dtype``."""
    return quantize(x, fmt, granularity, **kwargs).dequantize(x.dtype)
