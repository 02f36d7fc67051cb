"""Recipes: what each of a linear layer's three GEMMs does, as frozen, validated data.

A linear layer Y = X Wᵀ (X [M, K], W [N, K]) runs three GEMMs:

- ``fwd``:   Y  = X · Wᵀ   reduce over K   operands ``fwd_x`` (X), ``fwd_w`` (W)
- ``dgrad``: dX = dY · W   reduce over N   operands ``dgrad_dy`` (dY), ``dgrad_w`` (W)
- ``wgrad``: dW = dYᵀ · X  reduce over M   operands ``wgrad_dy`` (dY), ``wgrad_x`` (X)

Each operand has an :class:`OperandSpec`: a format (``None`` keeps it in high precision), a
granularity relative to the tensor as stored (``"row"``: one scale per row, so per token for
X and dY, per output channel for W; ``"col"``: one per column; ``"tensor"``; ``"block"``:
``block_size`` elements along the GEMM's reduction dim), and a rounding mode.

``dgrad_w`` and ``wgrad_x`` may be ``OperandSpec("fwd")``: reuse the forward pass' quantized
tensor (FP4 values, as the paper does). Its per-row scale lies on the reduction dim of that
GEMM, so it is folded into dY before dY is quantized: dgrad uses ``Q(dY · diag(s_w)) · W_q``,
wgrad ``Q(diag(s_x) · dY)ᵀ · X_q``. The fold needs the forward granularity ``"row"`` or
``"tensor"``.

``dge`` (a :class:`DGEConfig`, or None for the straight-through estimator) corrects the weight
gradient; ``occ`` (an :class:`OCCConfig`, or None) clamps activation outliers before
quantization and adds the clamped-off residual back in high precision.

``grad_comm`` is not a GEMM setting: under ``fp4train train --parallel ddp`` it all-reduces
gradients in FP8 (``"e5m2"`` or ``"e4m3"``, the paper's MS-AMP scheme), under ``--parallel
fsdp`` it reduce-scatters them in FP8 (see :mod:`fp4train.distributed`); None (every preset)
keeps the plain float32 collective, which measured faster on NVLink (the all-reduce). It has
no effect in a single process.

``fast_accum`` (False in every preset) runs the triton backend's FP8 GEMMs with
``torch._scaled_mm(use_fast_accum=True)``: Hopper's tensor cores then accumulate with fewer
bits instead of promoting partial sums to float32 (the precision loss the DeepSeek-V3 report
measures at up to 2% relative for K = 4096 and avoids by promoting every 128 products), for
about 13% more GEMM throughput. The quantized operands are unchanged; the reference backend,
which sums in float32, ignores it.

``act_save`` is not a GEMM setting either: it says how the non-GEMM activations that autograd
keeps for backward are stored. None (every preset) saves them as computed; ``"e4m3"`` saves the
input of each RMSNorm of a ``fp4train.model`` (the residual stream, float32 under bf16 autocast)
and the two inputs of each SwiGLU MLP in FP8 E4M3 with one float32 absmax scale per row
(COAT-style activation compression: 1 byte per element instead of 4 for float32 inputs, 2 for
bf16), dequantized in backward. With OCC it also keeps the residual R that the weight
gradient's compensation term needs in E4M3 per row. On the triton backend FP4Linear then also
drops its FP8 copy of the weight after the forward and quantizes the master weight again in
backward (the same bits: one byte per weight less held, one more read of W). The forward is
unchanged.
:func:`fp4train.convert` sets it on the model's norms and MLPs; FP4Linear reads it from its
recipe.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from fp4train import formats

__all__ = ["OperandSpec", "DGEConfig", "OCCConfig", "Recipe", "PRESETS"]

_REUSE = "fwd"
_ROUNDINGS = ("nearest", "stochastic")
_BACKENDS = ("auto", "triton", "reference")
_COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
_GRAD_COMMS = (None, "e5m2", "e4m3")
ACT_SAVES = (None, "e4m3")  # how Recipe.act_save may store saved activations
OCC_COMPENSATIONS = ("dense", "columns", "e4m3")  # OCCConfig.compensation
# granularities whose scales sit off the GEMM's reduction dim (or blocks along it)
_ALLOWED_GRAN = {
    "fwd_x": ("tensor", "row", "block"),
    "fwd_w": ("tensor", "row", "block"),
    "dgrad_dy": ("tensor", "row", "block"),
    "dgrad_w": ("tensor", "col", "block"),
    "wgrad_dy": ("tensor", "col", "block"),
    "wgrad_x": ("tensor", "col", "block"),
}
OPERANDS = tuple(_ALLOWED_GRAN)


@dataclass(frozen=True)
class OperandSpec:
    """How one GEMM operand is quantized: ``format`` None keeps high precision."""

    format: str | None = None
    granularity: str = "row"
    block_size: int | None = None
    rounding: str = "nearest"

    @property
    def quantized(self) -> bool:
        return self.format is not None and self.format != _REUSE

    @property
    def reuse_fwd(self) -> bool:
        return self.format == _REUSE

    def fmt(self) -> formats.Format:
        return formats.get(self.format)


@dataclass(frozen=True)
class DGEConfig:
    """Differentiable Gradient Estimator: f'(t) = (1/k)|2t-1|^(1/k-1), clipped at ``clip``."""

    k: float = 5.0
    clip: float = 3.0


@dataclass(frozen=True)
class OCCConfig:
    """Outlier Clamping and Compensation at quantile ``alpha`` of the activation."""

    alpha: float = 0.99
    granularity: str = "tensor"  # "tensor" (the paper's equation) or "row" (its released code)
    compensate: bool = True  # add R·Wᵀ back in high precision
    # how the compensation is computed. "dense" and "columns" are the paper's R·Wᵀ and differ
    # only in how the triton backend runs it (the same numbers up to the order of the sums;
    # the reference backend ignores the choice): bf16 GEMMs over all K columns, or only over
    # the columns holding an outlier (fp4train.kernels.occ), cheaper when the outliers sit in
    # a few channels, as in LLM activations. "e4m3" is not the paper's: the outliers ride in
    # X's FP8 operand on the E4M3 grid (no extra GEMM) and meet Q(W) instead of W; only the
    # part of an outlier beyond 74.7x its row's clamp bound stays for a high-precision
    # product (fp4train.occ.outliers_on_e4m3). Needs a row-wise E2M1 X.
    compensation: str = "dense"


def _e(fmt: str | None, gran: str = "row", **kw) -> OperandSpec:
    return OperandSpec(fmt, gran, **kw)


@dataclass(frozen=True)
class Recipe:
    """What every GEMM operand of an :class:`~fp4train.FP4Linear` does; see the module doc.

    Build one with :meth:`preset` and adjust it with :meth:`replace`, which validates again::

        r = Recipe.preset("fp4-paper").replace(**{"occ.alpha": 0.999, "dge.k": 3})
    """

    name: str = "custom"
    fwd_x: OperandSpec = field(default_factory=OperandSpec)
    fwd_w: OperandSpec = field(default_factory=OperandSpec)
    dgrad_dy: OperandSpec = field(default_factory=OperandSpec)
    dgrad_w: OperandSpec = field(default_factory=lambda: OperandSpec(None, "col"))
    wgrad_dy: OperandSpec = field(default_factory=lambda: OperandSpec(None, "col"))
    wgrad_x: OperandSpec = field(default_factory=lambda: OperandSpec(None, "col"))
    dge: DGEConfig | None = None
    occ: OCCConfig | None = None
    backend: str = "auto"
    compute_dtype: str = "bfloat16"  # GEMM output dtype on CUDA; on CPU the input's dtype
    quantize_lm_head: bool = False  # convert() leaves the LM head in high precision by default
    nonfinite: str = "raise"  # "raise": NaN/Inf entering a quantized GEMM raise (reference path)
    grad_comm: str | None = None  # DDP / FSDP gradient communication in FP8: None, "e5m2", "e4m3"
    act_save: str | None = None  # RMSNorm, SwiGLU inputs, OCC's R for backward: None, "e4m3"
    fast_accum: bool = False  # triton backend: FP8 GEMMs in the tensor cores' fast accumulation

    def __post_init__(self) -> None:
        _validate(self)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def preset(name: str) -> Recipe:
        """A named recipe; ``Recipe.presets()`` lists the names."""
        if name not in PRESETS:
            raise ValueError(f"unknown recipe preset {name!r}; choose from {sorted(PRESETS)}")
        return PRESETS[name]

    @staticmethod
    def presets() -> list[str]:
        return list(PRESETS)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` applied and validated.

        Keys are field names (``backend``), dotted sub-fields (``"fwd_x.format"``,
        ``"dge.k"``, ``"occ.alpha"``), or shorthands: ``fwd_format`` / ``grad_format``
        (both operands of fwd / both dY operands), ``fwd_granularity`` (X and W in fwd),
        ``rounding`` (every quantized operand). ``dge`` / ``occ`` take None (or ``"none"``)
        to switch off, ``True`` / ``"on"`` for the defaults, or a config.
        """
        cur = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in changes.items():
            _apply(cur, key, value)
        if "name" not in changes and changes:
            cur["name"] = self.name if self.name.endswith("*") else self.name + "*"
        return Recipe(**cur)

    def with_overrides(self, overrides: list[str]) -> Recipe:
        """Apply ``["key=value", ...]`` strings (the CLI's ``--set``); values parsed as JSON
        where they parse (numbers, true/false, null), else as strings."""
        changes = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value, e.g. dge.k=3")
            key, raw = item.split("=", 1)
            changes[key.strip()] = _parse_value(raw.strip())
        return self.replace(**changes)

    # ------------------------------------------------------------------ queries
    @property
    def quantized(self) -> bool:
        """True if any GEMM operand is quantized."""
        return any(getattr(self, op).quantized for op in OPERANDS)

    def operand(self, name: str) -> OperandSpec:
        return getattr(self, name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Recipe:
        d = dict(d)
        for op in OPERANDS:
            if op in d and isinstance(d[op], dict):
                d[op] = OperandSpec(**d[op])
        if isinstance(d.get("dge"), dict):
            d["dge"] = DGEConfig(**d["dge"])
        if isinstance(d.get("occ"), dict):
            d["occ"] = OCCConfig(**d["occ"])
        unknown = set(d) - {f.name for f in dataclasses.fields(Recipe)}
        if unknown:
            raise ValueError(f"unknown recipe fields {sorted(unknown)}")
        return Recipe(**d)

    def describe(self) -> str:
        """One line per GEMM operand, for logs and the README table."""

        def s(spec: OperandSpec) -> str:
            if spec.format is None:
                return "high precision"
            if spec.reuse_fwd:
                return "forward's quantized tensor (scale folded into dY)"
            b = f"{spec.block_size}" if spec.granularity == "block" else ""
            r = ", stochastic" if spec.rounding == "stochastic" else ""
            return f"{spec.format} {spec.granularity}{b}{r}"

        lines = [f"recipe {self.name}:"] + [f"  {op:9s} {s(getattr(self, op))}" for op in OPERANDS]
        lines.append(f"  dge       {self.dge if self.dge else 'off (straight-through)'}")
        lines.append(f"  occ       {self.occ if self.occ else 'off'}")
        lines.append(f"  backend   {self.backend}")
        lines.append(f"  grad_comm {self.grad_comm or 'float32'}")
        act_save = f"in {self.act_save} per row" if self.act_save else "as computed"
        lines.append(f"  act_save  RMSNorm, SwiGLU inputs and OCC residual {act_save}")
        accum = "fast (reduced precision)" if self.fast_accum else "float32"
        lines.append(f"  accum     FP8 GEMMs accumulate in {accum}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.name


def _parse_value(raw: str) -> Any:
    if raw.lower() in ("none", "null", "off"):
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _sub(obj: Any, cls: type, attr: str, value: Any, key: str) -> Any:
    base = obj if obj is not None else cls()
    names = {f.name for f in dataclasses.fields(cls)}
    if attr not in names:
        raise ValueError(f"unknown recipe field {key!r}; {cls.__name__} has {sorted(names)}")
    return dataclasses.replace(base, **{attr: value})


def _apply(cur: dict, key: str, value: Any) -> None:
    if key == "fwd_format":
        for op in ("fwd_x", "fwd_w"):
            cur[op] = dataclasses.replace(cur[op], format=value)
    elif key == "grad_format":
        for op in ("dgrad_dy", "wgrad_dy"):
            cur[op] = dataclasses.replace(cur[op], format=value)
    elif key == "fwd_granularity":
        for op in ("fwd_x", "fwd_w"):
            cur[op] = dataclasses.replace(cur[op], granularity=value)
    elif key == "rounding":
        for op in OPERANDS:
            if cur[op].quantized:
                cur[op] = dataclasses.replace(cur[op], rounding=value)
    elif key in ("dge", "occ"):
        cls = DGEConfig if key == "dge" else OCCConfig
        if value is None or value is False or value == "none":
            cur[key] = None
        elif value is True or value == "on":
            cur[key] = cls()
        elif isinstance(value, dict):
            cur[key] = cls(**value)
        elif isinstance(value, cls):
            cur[key] = value
        else:
            raise ValueError(f"recipe field {key!r} takes None, True or a {cls.__name__}")
    elif "." in key:
        head, attr = key.split(".", 1)
        if head in OPERANDS:
            cur[head] = _sub(cur[head], OperandSpec, attr, value, key)
        elif head == "dge":
            cur[head] = _sub(cur[head], DGEConfig, attr, value, key)
        elif head == "occ":
            cur[head] = _sub(cur[head], OCCConfig, attr, value, key)
        else:
            raise ValueError(f"unknown recipe field {key!r}")
    elif key in cur:
        if key in OPERANDS and isinstance(value, dict):
            value = OperandSpec(**value)
        cur[key] = value
    else:
        allowed = sorted(cur) + ["fwd_format", "grad_format", "fwd_granularity", "rounding"]
        raise ValueError(f"unknown recipe field {key!r}; allowed: {allowed}")


def _validate(r: Recipe) -> None:
    def bad(fieldname: str, value: Any, allowed: Any) -> ValueError:
        return ValueError(f"recipe field {fieldname!r} = {value!r} is invalid; allowed: {allowed}")

    if not isinstance(r.name, str):
        raise bad("name", r.name, "a string")
    for op in OPERANDS:
        spec = getattr(r, op)
        if not isinstance(spec, OperandSpec):
            raise bad(op, spec, "an OperandSpec")
        if spec.format is not None:
            if spec.format == _REUSE:
                if op not in ("dgrad_w", "wgrad_x"):
                    raise bad(f"{op}.format", spec.format, "a format name like 'e2m1', or None")
                src = r.fwd_w if op == "dgrad_w" else r.fwd_x
                if not src.quantized:
                    raise ValueError(
                        f"recipe field '{op}.format' = 'fwd' reuses the forward operand, but "
                        f"{'fwd_w' if op == 'dgrad_w' else 'fwd_x'} is not quantized"
                    )
                if src.granularity not in ("row", "tensor"):
                    raise ValueError(
                        f"recipe field '{op}.format' = 'fwd' needs the forward operand's "
                        f"granularity 'row' or 'tensor' (its scale is folded into dY), got "
                        f"{src.granularity!r}"
                    )
                continue
            try:
                formats.get(spec.format)
            except ValueError as e:
                raise bad(
                    f"{op}.format",
                    spec.format,
                    "None, 'e2m1', 'e4m3', 'e5m2', any "
                    "'eXmY'" + (", or 'fwd'" if op in ("dgrad_w", "wgrad_x") else ""),
                ) from e
        if spec.granularity not in _ALLOWED_GRAN[op]:
            raise bad(f"{op}.granularity", spec.granularity, _ALLOWED_GRAN[op])
        if spec.granularity == "block":
            if not isinstance(spec.block_size, int) or spec.block_size < 1:
                raise bad(f"{op}.block_size", spec.block_size, "a positive int with 'block'")
        elif spec.block_size is not None:
            raise bad(f"{op}.block_size", spec.block_size, "None unless granularity='block'")
        if spec.rounding not in _ROUNDINGS:
            raise bad(f"{op}.rounding", spec.rounding, _ROUNDINGS)
    if r.dge is not None:
        if not isinstance(r.dge, DGEConfig):
            raise bad("dge", r.dge, "None or a DGEConfig")
        if not r.fwd_w.quantized:
            raise ValueError("recipe field 'dge' needs a quantized weight (fwd_w.format)")
        if not (isinstance(r.dge.k, (int, float)) and r.dge.k > 1):
            raise bad("dge.k", r.dge.k, "a number > 1 (the paper uses 5)")
        if not (isinstance(r.dge.clip, (int, float)) and r.dge.clip > 0):
            raise bad("dge.clip", r.dge.clip, "a positive number (the paper uses 3.0)")
    if r.occ is not None:
        if not isinstance(r.occ, OCCConfig):
            raise bad("occ", r.occ, "None or an OCCConfig")
        if not (isinstance(r.occ.alpha, (int, float)) and 0.5 < r.occ.alpha < 1):
            raise bad("occ.alpha", r.occ.alpha, "a number in (0.5, 1), e.g. 0.99")
        if r.occ.granularity not in ("tensor", "row"):
            raise bad("occ.granularity", r.occ.granularity, ("tensor", "row"))
        if not isinstance(r.occ.compensate, bool):
            raise bad("occ.compensate", r.occ.compensate, (True, False))
        if r.occ.compensation not in OCC_COMPENSATIONS:
            raise bad("occ.compensation", r.occ.compensation, OCC_COMPENSATIONS)
        if r.occ.compensation == "e4m3":
            if not r.occ.compensate:
                raise ValueError("occ.compensation='e4m3' needs occ.compensate=True")
            if (r.fwd_x.format, r.fwd_x.granularity) != ("e2m1", "row"):
                raise ValueError(
                    "occ.compensation='e4m3' stores outliers in the FP8 operand of a row-wise "
                    f"E2M1 X; got fwd_x = {r.fwd_x.format} {r.fwd_x.granularity}"
                )
            if not r.wgrad_x.reuse_fwd:
                raise ValueError(
                    "occ.compensation='e4m3' needs wgrad_x = 'fwd' (wgrad reuses the forward's "
                    "X, outliers included)"
                )
        if not r.fwd_x.quantized:
            raise ValueError("recipe field 'occ' needs a quantized activation (fwd_x.format)")
    if r.backend not in _BACKENDS:
        raise bad("backend", r.backend, _BACKENDS)
    if r.compute_dtype not in _COMPUTE_DTYPES:
        raise bad("compute_dtype", r.compute_dtype, _COMPUTE_DTYPES)
    if not isinstance(r.quantize_lm_head, bool):
        raise bad("quantize_lm_head", r.quantize_lm_head, (True, False))
    if r.nonfinite not in ("raise", "propagate"):
        raise bad("nonfinite", r.nonfinite, ("raise", "propagate"))
    if r.grad_comm not in _GRAD_COMMS:
        raise bad("grad_comm", r.grad_comm, _GRAD_COMMS)
    if r.act_save not in ACT_SAVES:
        raise bad("act_save", r.act_save, ACT_SAVES)
    if not isinstance(r.fast_accum, bool):
        raise bad("fast_accum", r.fast_accum, (True, False))


def _w4a4(name: str, dge: bool, occ: bool) -> Recipe:
    """The paper's W4A4 layout: E2M1 X/W (token-/channel-wise), E5M2 dY, FP4 W and X reused."""
    return Recipe(
        name=name,
        fwd_x=_e("e2m1", "row"),
        fwd_w=_e("e2m1", "row"),
        dgrad_dy=_e("e5m2", "row"),
        dgrad_w=_e(_REUSE, "col"),
        wgrad_dy=_e("e5m2", "col"),
        wgrad_x=_e(_REUSE, "col"),
        dge=DGEConfig() if dge else None,
        occ=OCCConfig() if occ else None,
    )


PRESETS: dict[str, Recipe] = {
    "bf16": Recipe(name="bf16"),
    "fp8": Recipe(
        name="fp8",
        fwd_x=_e("e4m3", "row"),
        fwd_w=_e("e4m3", "row"),
        dgrad_dy=_e("e5m2", "row"),
        dgrad_w=_e(_REUSE, "col"),
        wgrad_dy=_e("e5m2", "col"),
        wgrad_x=_e(_REUSE, "col"),
    ),
    "fp4-paper": _w4a4("fp4-paper", dge=True, occ=True),
    "fp4-direct": _w4a4("fp4-direct", dge=False, occ=False),
    "fp4-dge": _w4a4("fp4-dge", dge=True, occ=False),
    "fp4-occ": _w4a4("fp4-occ", dge=False, occ=True),
}
