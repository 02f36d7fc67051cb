"""AdamW with low-precision optimizer states: FP8 first moment, FP16 second moment (MS-AMP).

The paper trains with MS-AMP's mixed-precision scheme: the first moment m is stored in FP8
E4M3 and the second moment v in FP16, while every update is computed in FP32. Per element
that is 1 + 2 bytes instead of AdamW's 4 + 4 (plus a float32 scale per block; see
:func:`state_bytes_per_param`).

Storage, per parameter p with n elements (p flattened; blocks of ``block_size`` elements,
the last one zero-padded for the scale computation):

- ``exp_avg``: m as E4M3 values (``torch.float8_e4m3fn``) with one float32 absmax scale per
  block in ``exp_avg_scale``: exactly ``fp4train.quantize``'s ``"block"`` granularity (the
  block's amax maps to 448), computed with torch's nearest-even casts.
- ``sqrt_exp_avg_sq``: sqrt(v), not v. Adam divides by sqrt(v), and sqrt(v) has the
  gradient's dynamic range, half of v's in binades, so FP16 cannot underflow on small
  gradients (v ~ 1e-10 is below FP16's smallest subnormal, sqrt(v) ~ 1e-5 is not). FP16
  and E4M3 store it with a float32 absmax scale per block (FP16 is the ``e5m10`` format,
  its amax maps to 65504); a positive value never rounds to 0 there
  (it is raised to the smallest subnormal): a zero denominator would turn m into m / eps.
  BF16 has float32's exponent range and needs no scale.
- ``step``: float32 scalar, as in ``torch.optim.AdamW``.

Each step dequantizes m and sqrt(v) to float32, applies the AdamW update exactly as
``torch.optim.AdamW`` does (decoupled weight decay, bias correction, eps outside the sqrt),
updates the parameter with those float32 moments, and requantizes them for storage. The
states are rounded to nearest (ties to even) each step; the E4M3 first moment carries a
relative error of at most 2**-4 per element (half an ulp with 3 mantissa bits), the FP16
sqrt(v) at most 2**-11. ``"float32"`` for both states reproduces ``torch.optim.AdamW``.

On CUDA the step of each parameter runs as one Triton kernel (``fused``, the default there;
:mod:`fp4train.kernels.adamw`), the same float32 arithmetic in one pass over memory.

Parameters may be float32 master weights or bf16/fp16 (the update is rounded back to the
parameter's dtype). Under FSDP2 (``fully_shard``) each rank keeps the states of its local
shard, as plain tensors (blocks run over the shard). :func:`fp4train.distributed.get_full_state`
gathers them into the single-process layout (decoded, gathered, re-encoded over the full
tensor) and :func:`~fp4train.distributed.set_full_state` scatters them back, so checkpoints
reshard; where shard boundaries are not multiples of ``block_size`` that re-encoding rounds
the moments once more.
Non-finite gradients propagate (NaN spreads over their block), as with ``torch.optim.AdamW``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fp4train.formats import get
from fp4train.quantize import absmax_scale

__all__ = ["LowPrecisionAdamW", "state_bytes_per_param", "STATE_DTYPES"]


@dataclass(frozen=True)
class _Codec:
    """How one optimizer state is stored: ``fmt`` None is a plain cast to ``storage``."""

    storage: torch.dtype
    fmt: str | None  # grid rounded to under a per-block float32 absmax scale


_CODECS = {
    "e4m3": _Codec(torch.float8_e4m3fn, "e4m3"),
    "float16": _Codec(torch.float16, "e5m10"),  # FP16 is e5m10
    "bfloat16": _Codec(torch.bfloat16, None),
    "float32": _Codec(torch.float32, None),
}
STATE_DTYPES = tuple(_CODECS)
# (exp_avg, sqrt_exp_avg_sq) storage the fused kernel (fp4train.kernels.adamw) handles: the
# defaults. Here, not there, so the CPU path never imports triton (an optional dependency).
FUSED_STATES = ("e4m3", "float16")
_STATES = ("exp_avg", "sqrt_exp_avg_sq")
_DTYPE_KEY = {"exp_avg": "exp_avg_dtype", "sqrt_exp_avg_sq": "exp_avg_sq_dtype"}


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x [n] -> [ceil(n / B), B], zero-padded (a copy only when n % B != 0)."""
    pad = -x.numel() % block_size
    return (F.pad(x, (0, pad)) if pad else x).view(-1, block_size)


def _encode(
    x: torch.Tensor, codec: _Codec, block_size: int, positive: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [n] float32 -> (data [n] in codec.storage, scale [ceil(n / B)] float32 or None).

    Equals ``quantize(x, codec.fmt, "block", block_size)`` bit for bit (tests pair the two):
    the scale is quantize's ``absmax_scale``, and torch's cast to the storage dtype rounds
    to nearest-even exactly like ``round_to_format`` for |x / scale| <= fmt.max, in one
    kernel instead of a dozen.
    """
    if codec.fmt is None:
        return x.to(codec.storage), None
    fmt = get(codec.fmt)
    blocks = _blocks(x, block_size)  # [nb, B]
    scale = absmax_scale(blocks.abs().amax(dim=1), fmt)  # [nb]
    q = blocks / scale[:, None]
    if positive:  # values in (0, min_subnormal / 2] would round to 0
        q = torch.where(q > 0, q.clamp(min=fmt.min_subnormal), q)
    return q.to(codec.storage).view(-1)[: x.numel()], scale


def _decode(
    data: torch.Tensor, scale: torch.Tensor | None, codec: _Codec, block_size: int
) -> torch.Tensor:
    """Inverse of :func:`_encode`: float32 [n], a fresh tensor (never the stored state)."""
    if codec.fmt is None:
        return data.to(torch.float32, copy=True)
    x = _blocks(data.float(), block_size) * scale[:, None]  # [nb, B]
    return x.view(-1)[: data.numel()]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor parameter or gradient; the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _check_hparams(group: dict[str, Any]) -> None:
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    if not isinstance(lr, float | int) or lr < 0:
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    betas = group["betas"]
    if not (isinstance(betas, tuple | list) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not isinstance(b, float | int) or not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r}")
    if not isinstance(eps, float | int) or eps <= 0:
        raise ValueError(f"eps must be a number > 0, got {eps!r}")
    if not isinstance(wd, float | int) or wd < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {wd!r}")
    for key in _DTYPE_KEY.values():
        if group[key] not in _CODECS:
            raise ValueError(f"{key} must be one of {STATE_DTYPES}, got {group[key]!r}")
    bs = group["block_size"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"block_size must be a positive int, got {bs!r}")


def _expected_state(param: torch.Tensor, group: dict[str, Any]) -> dict[str, tuple]:
    """State key -> (dtype, numel) that ``param`` has under ``group``'s settings."""
    n = _local(param).numel()
    expected = {"step": (torch.float32, 1)}
    for name, key in _DTYPE_KEY.items():
        codec = _CODECS[group[key]]
        expected[name] = (codec.storage, n)
        if codec.fmt is not None:
            expected[name + "_scale"] = (torch.float32, -(-n // group["block_size"]))
    return expected


def _check_saved_group(i: int, saved: dict[str, Any], defaults: dict[str, Any]) -> None:
    """A saved parameter group holds every setting, each valid; ValueError names the gap."""
    missing = set(defaults) - set(saved)
    if missing:
        raise ValueError(f"parameter group {i} of the state dict lacks {sorted(missing)}")
    _check_hparams(saved)


def _check_stored(stored: dict, expected: dict[str, tuple]) -> None:
    """A stored state has exactly the ``expected`` keys (:func:`_expected_state`), each a
    tensor of the expected dtype and size; ValueError names the first mismatch."""
    if set(stored) != set(expected):
        raise ValueError(f"the state has keys {sorted(stored)}, expected {sorted(expected)}")
    for key, (dtype, numel) in expected.items():
        v = stored[key]
        if not isinstance(v, torch.Tensor) or v.dtype != dtype or v.numel() != numel:
            got = (
                f"dtype {v.dtype} with {v.numel()} elements"
                if isinstance(v, torch.Tensor)
                else type(v).__name__
            )
            raise ValueError(
                f"state {key!r}: expected dtype {dtype} with {numel} elements, got {got}"
            )


class LowPrecisionAdamW(torch.optim.Optimizer):
    """AdamW keeping m in FP8 E4M3 and sqrt(v) in FP16 with per-block scales; FP32 math.

    Drop-in for ``torch.optim.AdamW`` (same update, same hyperparameter meaning); see the
    module docstring for the storage layout. Defaults follow the paper's training setup.

    Args:
        params: parameters or parameter groups (each group may override any setting).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        exp_avg_dtype: storage of the first moment, one of ``STATE_DTYPES``
            (``"e4m3"``, ``"float16"``, ``"bfloat16"``, ``"float32"``).
        exp_avg_sq_dtype: storage of sqrt(second moment), same choices.
        block_size: elements per float32 scale for the ``"e4m3"`` / ``"float16"`` states.
        fused: one Triton launch per parameter (:mod:`fp4train.kernels.adamw`) instead of the
            eager step's ~20 kernels. None (default): on CUDA parameters when Triton and an
            FP8 GPU are there and the states are the defaults (E4M3 m, FP16 sqrt(v), a
            power-of-two ``block_size``); True: required (ValueError if it cannot run);
            False: never. The two agree to the last bit of float32 arithmetic (a state may
            land one grid step apart where that bit decides its rounding).

    Example::

        opt = LowPrecisionAdamW(model.parameters(), lr=3e-4)
        print(state_bytes_per_param(opt))  # after the first step: ~3.06 vs AdamW's 8
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        exp_avg_dtype: str = "e4m3",
        exp_avg_sq_dtype: str = "float16",
        block_size: int = 128,
        fused: bool | None = None,
    ) -> None:
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        self.fused = fused
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            exp_avg_dtype=exp_avg_dtype,
            exp_avg_sq_dtype=exp_avg_sq_dtype,
            block_size=block_size,
        )
        _check_hparams(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_hparams(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on every parameter with a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, bs = group["lr"], group["eps"], group["weight_decay"], group["block_size"]
            codecs = {name: _CODECS[group[key]] for name, key in _DTYPE_KEY.items()}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("LowPrecisionAdamW does not support sparse gradients")
                p_local, g = _local(p), _local(p.grad).reshape(-1).float()  # g: [n] fp32
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    for name in _STATES:
                        self._store(state, name, torch.zeros_like(g), codecs[name], bs)
                state["step"] = state["step"] + 1  # new tensor: saved state dicts stay put
                t = state["step"].item()
                if self._use_fused(p_local, group):
                    from fp4train.kernels.adamw import adamw_lp_step

                    adamw_lp_step(
                        p_local, _local(p.grad), state, lr=lr, beta1=beta1, beta2=beta2,
                        eps=eps, weight_decay=wd, step=t, block_size=bs,
                    )  # fmt: skip
                    continue
                m = self._load(state, "exp_avg", codecs["exp_avg"], bs)
                r = self._load(state, "sqrt_exp_avg_sq", codecs["sqrt_exp_avg_sq"], bs)

                m.lerp_(g, 1 - beta1)
                r = r.square_().mul_(beta2).addcmul_(g, g, value=1 - beta2).sqrt_()  # sqrt(v)
                denom = (r / math.sqrt(1 - beta2**t)).add_(eps)
                p_hp = p_local if p_local.dtype == torch.float32 else p_local.float()
                p_hp.mul_(1 - lr * wd)
                p_hp.addcdiv_(m.view_as(p_hp), denom.view_as(p_hp), value=-lr / (1 - beta1**t))
                if p_hp is not p_local:
                    p_local.copy_(p_hp)

                self._store(state, "exp_avg", m, codecs["exp_avg"], bs)
                self._store(state, "sqrt_exp_avg_sq", r, codecs["sqrt_exp_avg_sq"], bs, True)
        return loss

    def _use_fused(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p``'s step runs in the fused kernel (see ``fused`` in the class doc)."""
        if self.fused is False:
            return False
        reason = None
        states = (group["exp_avg_dtype"], group["exp_avg_sq_dtype"])
        bs = group["block_size"]
        if states != FUSED_STATES:
            reason = f"states {states}, the kernel stores {FUSED_STATES}"
        elif bs & (bs - 1):
            reason = f"block_size {bs} is not a power of two"
        elif p.dtype not in (torch.float32, torch.bfloat16) or not p.is_contiguous():
            reason = f"a {p.dtype} parameter (contiguous={p.is_contiguous()})"
        elif not (p.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            reason = f"the parameter is on {p.device}"
        elif p.is_cuda:
            from fp4train import kernels

            if not kernels.triton_available():
                reason = "Triton or an FP8-capable GPU is not available"
        if reason is not None and self.fused:
            raise ValueError(f"LowPrecisionAdamW(fused=True) cannot run: {reason}")
        return reason is None

    def decoded_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """``p``'s state with the moments decoded: ``{"step", "exp_avg", "sqrt_exp_avg_sq"}``,
        the moments float32 in ``p``'s (local) shape; empty before ``p``'s first step."""
        state = self.state.get(p)
        if not state:
            return {}
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        return self.decode_stored(group, state, _local(p).shape)

    @staticmethod
    def decode_stored(group: dict[str, Any], stored: dict, shape: torch.Size) -> dict:
        """The moments of a stored state (``self.state[p]``'s form, e.g. from a single-process
        checkpoint) as float32 tensors of ``shape``, checked against ``group``'s settings;
        ValueError names the first mismatch."""
        _check_stored(stored, _expected_state(torch.empty(shape, device="meta"), group))
        out = {"step": stored["step"]}
        for name, key in _DTYPE_KEY.items():
            codec = _CODECS[group[key]]
            x = _decode(stored[name], stored.get(name + "_scale"), codec, group["block_size"])
            out[name] = x.view(shape)
        return out

    @staticmethod
    def encoded_state(group: dict[str, Any], decoded: dict[str, torch.Tensor]) -> dict:
        """Inverse of :meth:`decoded_state` under ``group``'s settings: the stored form (values
        flattened, blocked over the tensor given) of ``{"step", "exp_avg",
        "sqrt_exp_avg_sq"}``. Re-encoding over other block boundaries (another sharding)
        rounds the moments again."""
        state = {"step": decoded["step"]}
        bs = group["block_size"]
        for name, key in _DTYPE_KEY.items():
            x = decoded[name].reshape(-1).float()
            LowPrecisionAdamW._store(
                state, name, x, _CODECS[group[key]], bs, name == "sqrt_exp_avg_sq"
            )
        return state

    @staticmethod
    def _store(state, name: str, x: torch.Tensor, codec: _Codec, bs: int, positive=False):
        state[name], scale = _encode(x, codec, bs, positive)
        if scale is not None:
            state[name + "_scale"] = scale

    @staticmethod
    def _load(state, name: str, codec: _Codec, bs: int) -> torch.Tensor:
        return _decode(state[name], state.get(name + "_scale"), codec, bs)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, keeping the low-precision states' dtypes.

        ``torch.optim.Optimizer.load_state_dict`` would cast every floating-point state to
        the parameter's dtype (E4M3 and FP16 states to float32); here the states are checked
        against the parameters and the saved settings, then moved to the parameters' devices
        unchanged. Raises ValueError naming the first mismatch.
        """
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("optimizer state dict must be a dict with 'state' and 'param_groups'")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state dict has {len(saved_groups)} parameter groups, "
                f"the optimizer {len(self.param_groups)}"
            )
        id_map = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            _check_saved_group(i, saved, self.defaults)
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"parameter group {i}: state dict has {len(saved['params'])} parameters, "
                    f"the optimizer {len(group['params'])}"
                )
            for pid, p in zip(saved["params"], group["params"], strict=True):
                id_map[pid] = (p, saved)
        unknown = set(saved_state) - set(id_map)
        if unknown:
            raise ValueError(f"state dict holds state for unknown parameter ids {sorted(unknown)}")
        for pid, st in saved_state.items():
            p, saved = id_map[pid]
            try:
                _check_stored(st, _expected_state(p, saved))
            except ValueError as e:
                raise ValueError(f"parameter {pid} (shape {tuple(p.shape)}): {e}") from None
        # the base class loads the groups (hyperparameters); the states are placed here
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        for pid, st in saved_state.items():
            p = id_map[pid][0]
            dev = _local(p).device
            self.state[p] = {
                k: v.clone() if k == "step" else v.to(dev, copy=True) for k, v in st.items()
            }


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of optimizer state (every tensor in ``optimizer.state``) per parameter element.

    Works for any optimizer: ``torch.optim.AdamW`` gives 8 (+ its per-tensor step counters),
    :class:`LowPrecisionAdamW` with the defaults ~3.06 (1 + 2 bytes + two float32 scales per
    128 elements). Call it after the first ``step()``, when the states exist.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not optimizer.state:
        raise ValueError("the optimizer has no state yet: call state_bytes_per_param after step()")
    n_params = sum(_local(p).numel() for p in params)
    n_bytes = sum(
        _local(t).numel() * t.element_size()
        for st in optimizer.state.values()
        for t in st.values()
        if isinstance(t, torch.Tensor)
    )
    return n_bytes / n_params
