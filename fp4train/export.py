"""FP4 checkpoints for inference: linear weights as packed E2M1 codes plus float32 scales.

:func:`export_fp4` quantizes each linear weight W [N, K] with ``fp4train.quantize`` (absmax,
one scale per output channel by default, as the forward GEMM does), stores the 4-bit codes two
per byte and the scales in float32, keeps every other tensor as it is, and writes one
safetensors file (``pip install fp4train[export]``). :func:`load_fp4` reads it back into a
state dict of dequantized weights, equal to ``fake_quantize(W)`` bit for bit.

Code layout (one nibble per value), the bit patterns of ``ml_dtypes.float4_e2m1fn`` and
``torch.float4_e2m1fn_x2``: bit 3 sign, bits 2..1 exponent (bias 1), bit 0 mantissa, so
codes 0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6 and ``code | 8`` their negatives (8 is -0). Other
4-bit formats (``e1m2``, ``e3m0``) number their non-negative grid values 0..7 the same way.

Packing runs along the last dim (K): byte j holds element 2j in its low nibble and element
2j+1 in its high nibble, the order PyTorch's ``float4_e2m1fn_x2`` uses (its NVFP4
``_scaled_mm`` tests pack ``x[1::2] << 4 | x[::2]``); a packed uint8 tensor can be
``.view(torch.float4_e2m1fn_x2)`` (a storage-only dtype: torch has no casts to or from it,
which is why the file stores uint8). An odd K is padded with one zero code per row; the true
shape is in the metadata.

File contents, for each quantized weight ``name``: ``name`` uint8 [N, ceil(K/2)] and
``name.scale`` float32 (shape of the granularity: row [N, 1], tensor [1, 1], block
[N, K / block_size]); the safetensors metadata key ``"fp4train"`` holds JSON with the format,
the layout, and each quantized tensor's shape, granularity, block size and original dtype.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

from fp4train.formats import Format, get
from fp4train.quantize import QuantizedTensor, quantize
from fp4train.recipe import Recipe

__all__ = ["export_fp4", "load_fp4", "to_codes", "from_codes", "pack_nibbles", "unpack_nibbles"]

_META_KEY = "fp4train"
_VERSION = 1
_LAYOUT = "nibbles along the last dim, element 2j low / 2j+1 high; code = sign<<3 | grid index"
_GRANULARITIES = ("tensor", "row", "block")  # scales that factor out of the forward GEMM


def _fmt4(fmt: str | Format) -> Format:
    f = get(fmt)
    if f.bits != 4:
        raise ValueError(f"FP4 export needs a 4-bit format (e2m1, e1m2, e3m0), got {f.name}")
    return f


def to_codes(x: torch.Tensor, fmt: str | Format = "e2m1") -> torch.Tensor:
    """Values on ``fmt``'s grid (e.g. ``quantize(...).data``) -> their 4-bit codes, uint8.

    Raises ValueError if a value is not on the grid (NaN included).
    """
    f = _fmt4(fmt)
    grid = f.positive_grid.to(device=x.device, dtype=torch.float32)  # [8] ascending
    mag = x.detach().abs().float()
    idx = torch.searchsorted(grid, mag).clamp_(max=grid.numel() - 1)
    if not torch.equal(grid[idx], mag):
        bad = mag[grid[idx] != mag].flatten()[:4].tolist()
        raise ValueError(f"values not on the {f.name} grid, e.g. {bad}: quantize them first")
    return (idx | (torch.signbit(x).long() << 3)).to(torch.uint8)


def from_codes(codes: torch.Tensor, fmt: str | Format = "e2m1") -> torch.Tensor:
    """4-bit codes (uint8, values 0..15) -> float32 values on ``fmt``'s grid (8 is -0.0)."""
    grid = _fmt4(fmt).positive_grid.to(device=codes.device, dtype=torch.float32)
    mag = grid[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., K] (each < 16) -> uint8 [..., ceil(K/2)]: element 2j in the low
    nibble of byte j, 2j+1 in the high nibble; an odd K is padded with a zero code."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.ndim == 0:
        raise ValueError("codes must have at least one dim to pack along")
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 [..., P] -> codes uint8 [..., k], k in {2P-1, 2P}."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    p = packed.shape[-1] if packed.ndim else 0
    if not packed.ndim or k not in (2 * p - 1, 2 * p) or k < 1:
        raise ValueError(f"cannot unpack {k} codes from a last dim of {p} bytes")
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)  # [..., 2P]
    return codes[..., :k]


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError(
            "FP4 export needs the safetensors package: pip install 'fp4train[export]'"
        ) from e
    return safetensors


def _linear_weight_names(model: nn.Module) -> set[str]:
    linears = (n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    return {f"{n}.weight" if n else "weight" for n in linears}


def _settings(recipe_or_granularity, fmt, block_size) -> tuple[Format, str, int | None]:
    if isinstance(recipe_or_granularity, Recipe):
        spec = recipe_or_granularity.fwd_w
        if not spec.quantized:
            raise ValueError(
                f"recipe {recipe_or_granularity.name!r} keeps forward weights in high "
                "precision (fwd_w.format is None): nothing to export in FP4"
            )
        if fmt is not None and get(fmt) != spec.fmt():
            raise ValueError(f"fmt={fmt!r} contradicts the recipe's fwd_w.format {spec.format!r}")
        fmt, granularity, block_size = spec.format, spec.granularity, spec.block_size
    else:
        granularity = recipe_or_granularity
    if granularity not in _GRANULARITIES:
        raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}")
    if granularity == "block" and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"granularity='block' needs a positive int block_size, got {block_size}")
    return _fmt4(fmt if fmt is not None else "e2m1"), granularity, block_size


def export_fp4(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    path: str | os.PathLike,
    recipe_or_granularity: Recipe | str = "row",
    fmt: str | None = None,
    *,
    block_size: int | None = None,
    skip: Iterable[str] = ("embed", "lm_head"),
    other_dtype: torch.dtype | None = None,
) -> list[str]:
    """Write an FP4 inference checkpoint (safetensors) of a model; returns the quantized names.

    Args:
        model_or_state_dict: a model (its ``nn.Linear`` / ``FP4Linear`` weights are exported
            in FP4) or a state dict (every 2-D floating tensor whose name ends in ``weight``).
            Tensors must be full, not FSDP2 shards.
        path: output file, conventionally ``*.safetensors``.
        recipe_or_granularity: ``"row"`` (one scale per output channel), ``"tensor"``,
            ``"block"`` (with ``block_size``, blocks along K), or a Recipe whose forward
            weight spec (``fwd_w``) gives format, granularity and block size: the weights
            then match what FP4Linear computed with.
        fmt: a 4-bit format, default ``"e2m1"`` (or the recipe's).
        skip: name substrings left unquantized; the defaults keep embeddings and the LM head
            in high precision. ``skip=()`` quantizes them too (any linear LM head).
        other_dtype: cast the unquantized floating-point tensors (e.g. ``torch.bfloat16``);
            None keeps their dtype.
    """
    f, granularity, block_size = _settings(recipe_or_granularity, fmt, block_size)
    st = _safetensors()
    if isinstance(model_or_state_dict, nn.Module):
        state_dict = model_or_state_dict.state_dict()
        eligible = _linear_weight_names(model_or_state_dict)
    elif isinstance(model_or_state_dict, dict):
        state_dict, eligible = model_or_state_dict, None
    else:
        raise TypeError(
            f"export_fp4 expects an nn.Module or a state dict, got {type(model_or_state_dict)}"
        )
    skip = tuple(skip)
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    seen_storage: set[int] = set()
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
        if hasattr(t, "full_tensor"):
            raise ValueError(
                f"{name!r} is an FSDP2 shard (DTensor): export a full state dict, e.g. "
                "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
                "options=StateDictOptions(full_state_dict=True))"
            )
        t = t.detach().cpu()
        is_weight = (
            t.is_floating_point() and t.ndim == 2 and name.endswith("weight")
            if eligible is None
            else name in eligible
        )
        if is_weight and not any(s in name for s in skip):
            q = quantize(t, f, granularity, block_size=block_size)
            tensors[name] = pack_nibbles(to_codes(q.data, f))
            tensors[name + ".scale"] = q.scale.contiguous()
            info[name] = dict(
                shape=list(t.shape),
                granularity=granularity,
                block_size=block_size if granularity == "block" else None,
                dtype=str(t.dtype).removeprefix("torch."),
            )
            continue
        if other_dtype is not None and t.is_floating_point():
            t = t.to(other_dtype)
        t = t.contiguous()
        if t.untyped_storage().data_ptr() in seen_storage:  # tied weights: safetensors
            t = t.clone()  # refuses shared storage
        seen_storage.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    meta = dict(version=_VERSION, format=f.name, layout=_LAYOUT, tensors=info)
    st.torch.save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})
    return list(info)


def load_fp4(
    path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Read an :func:`export_fp4` file: FP4 weights dequantized to ``dtype``, other tensors
    as stored. With ``dtype=torch.float32`` each weight equals ``fake_quantize`` of the
    exported one exactly. Raises ValueError for a file that is not a valid FP4 export."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    st = _safetensors()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no FP4 checkpoint at {path}")
    try:
        with st.safe_open(str(path), framework="pt") as fh:
            raw_meta = (fh.metadata() or {}).get(_META_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except st.SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated?): {e}") from e
    if raw_meta is None:
        raise ValueError(f"{path} has no {_META_KEY!r} metadata: not written by export_fp4")
    try:
        meta = json.loads(raw_meta)
        version, f, info = meta["version"], _fmt4(meta["format"]), meta["tensors"]
        if not isinstance(info, dict):
            raise TypeError(f"'tensors' must be a JSON object, got {type(info).__name__}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed {_META_KEY!r} metadata ({e!r})") from e
    if version != _VERSION:
        raise ValueError(f"{path}: FP4 export version {version}, this fp4train reads {_VERSION}")

    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(".scale") and name[: -len(".scale")] in info:
            continue
        if name not in info:
            out[name] = t
            continue
        out[name] = _dequantize(path, name, t, tensors.get(name + ".scale"), info[name], f)
        out[name] = out[name].to(dtype)
    missing = set(info) - set(out)
    if missing:
        raise ValueError(f"{path}: metadata lists tensors missing from the file: {sorted(missing)}")
    return out


def _dequantize(path, name, packed, scale, entry, f: Format) -> torch.Tensor:
    try:
        shape, granularity, block_size = entry["shape"], entry["granularity"], entry["block_size"]
        n, k = shape
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed metadata for {name!r}: {entry!r}") from e
    expected_scale = {"row": [n, 1], "tensor": [1, 1]}.get(granularity)
    if granularity == "block":
        expected_scale = [n, k // block_size] if block_size and k % block_size == 0 else None
    if packed.dtype != torch.uint8 or list(packed.shape) != [n, (k + 1) // 2]:
        raise ValueError(
            f"{path}: {name!r} should be uint8 [{n}, {(k + 1) // 2}] for shape {shape}, "
            f"got {packed.dtype} {list(packed.shape)}"
        )
    if expected_scale is None or scale is None or list(scale.shape) != expected_scale:
        got = None if scale is None else list(scale.shape)
        raise ValueError(
            f"{path}: scale of {name!r} ({granularity}, block {block_size}) should have shape "
            f"{expected_scale}, got {got}"
        )
    data = from_codes(unpack_nibbles(packed, k), f)
    return QuantizedTensor(data, scale.float(), f, granularity, block_size).dequantize()
