"""Multi-GPU training on PyTorch's own engines: torchrun, DDP, FSDP2, FP8 gradient communication.

Launch one process per GPU with ``torchrun``; :func:`init_from_env` reads its environment::

    # one node, 8 GPUs
    torchrun --standalone --nproc-per-node 8 -m fp4train train ...
    # two nodes: run on each node; HOST:29500 is reachable from both (e.g. node 0)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 --rdzv-id JOB_ID -m fp4train train ...

Without torchrun everything runs as a single process (rank 0 of 1).
``fp4train train --parallel ddp|fsdp`` uses what is here: :func:`init_from_env`,
:func:`wrap_model`, :func:`all_reduce_sum` for the logged loss, and :func:`get_full_state` /
:func:`set_full_state`, which gather and scatter the full (unsharded) model and optimizer
state so checkpoints look like a single process' whatever the number of ranks.

:func:`wrap_model` applies data parallelism: DDP (optionally with :func:`fp8_allreduce_hook`,
the paper's FP8 gradient all-reduce from MS-AMP) or FSDP2 ``fully_shard`` per transformer
block, then the root (torchtitan's order; optionally with :class:`FP8ReduceScatter`, the same
idea for FSDP2's gradient reduce-scatter).

FP8 all-reduce. Per DDP bucket of gradients the ranks agree on one scale: all-reduce MAX of
the bucket's amax, ``s = amax / fmt.max``. Each rank sends ``round(g / s)`` as FP8 (E5M2 by
default, the gradient format; E4M3 optional), and the result is ``s / world_size`` times the
sum. Two ways to sum (``FP8CommState.reduce``):

- ``"gather"`` (default): all-gather the FP8 bytes (as uint8) and sum in float32 locally.
  Works on every backend (gloo cannot reduce float8) and adds no rounding beyond each rank's
  one quantization, but each rank receives (world_size - 1) n bytes for n gradients, against
  8 (world_size - 1) / world_size n for a float32 ring all-reduce: fewer up to 8 ranks only.
- ``"allreduce"``: NCCL sums the FP8 values itself (NCCL >= 2.24 and a PyTorch that maps
  float8 to NCCL's FP8 types; torch 2.11 with NCCL 2.28 does). The scale then also divides
  by world_size so the sum cannot overflow, and partial sums are rounded to FP8 along the
  ring: more error (relative L2 error on 2 ranks, E5M2: 0.061 vs 0.053 gathered).

Measured on 2 H200s (NVLink), one 25 MB float32 bucket: plain all-reduce 0.13 ms, bf16
compression 0.27 ms, FP8 gather 1.48 ms, FP8 all-reduce 0.89 ms. Quantizing costs more than
the bytes save on NVLink; FP8 communication can only pay off on slower links (across nodes,
not measured here).

FP8 reduce-scatter (FSDP2). FSDP2 reduce-scatters each sharded module's gradients as one flat
tensor, ``world_size`` equal chunks, chunk d for rank d's shard. :class:`FP8ReduceScatter`
replaces that collective: each rank quantizes each chunk with its own scale (``amax / fmt.max``
of that chunk on that rank: no collective to agree on one), sends chunk d as FP8 bytes with
its float32 scale to rank d in one ``all_to_all_single``, and rank d dequantizes the
``world_size`` chunks it receives and sums them in float32 (then divides by ``world_size``
for FSDP2's AVG). Each rank sends (world_size - 1) / world_size n bytes for n gradients, a
quarter of a float32 ring reduce-scatter's at any world size; the error is at most half an
FP8 ulp of each rank's value, summed. Not yet timed on GPUs.

``NCCL_NVLS_ENABLE=0`` is set (if unset) when this module is imported: NVLink multicast
(NVLS) must stay off on our GPU machines. Keep it off when launching by hand as well.
"""

# no `from __future__ import annotations`: DDP checks the hook's annotations as objects
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from fp4train.formats import get, round_to_format
from fp4train.quantize import absmax_scale

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # read by NCCL when a communicator starts

__all__ = [
    "init_from_env",
    "launched_world_size",
    "is_main",
    "barrier",
    "cleanup",
    "all_reduce_sum",
    "get_full_state",
    "set_full_state",
    "FP8CommState",
    "fp8_allreduce_hook",
    "FP8ReduceScatter",
    "wrap_model",
    "PARALLEL_MODES",
]

PARALLEL_MODES = ("ddp", "fsdp", "none")
_FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_REDUCE_MODES = ("gather", "allreduce")


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it, 1 without torchrun; reads only the environment, so
    settings can be checked before any process group exists."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        value = os.environ["WORLD_SIZE"]
        raise ValueError(f"WORLD_SIZE must be an integer, got {value!r}") from None


def init_from_env(device: str = "auto") -> tuple[int, int, int, torch.device]:
    """Join the process group torchrun describes; returns (rank, world_size, local_rank, device).

    Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) this initializes
    ``torch.distributed`` with NCCL on CUDA (one GPU per local rank, made current) or gloo on
    CPU; a process group that is already initialized is reused. ``device="cpu"`` takes gloo
    on the CPU even where GPUs are visible. Otherwise it returns ``(0, 1, 0, device)`` for a
    single process, device being the current GPU or the CPU.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0, torch.device("cpu") if device == "cpu" else _default_device()
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    if device != "cpu" and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are "
                "visible: --nproc-per-node must not exceed the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return rank, world, local_rank, device


def is_main() -> bool:
    """True on rank 0, or when not distributed: the process that logs and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group, if any (call once at the end of training)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place, and return it (unchanged when not distributed).

    SUM rather than AVG: gloo has no AVG; divide by the world size for a mean.
    """
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def get_full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The full (unsharded) state of a DDP or FSDP2 model and its optimizer, on the CPU.

    Collective: every rank calls it; rank 0 gets the tensors, the other ranks empty dicts.
    Keyed like a single process' ``module.state_dict()`` and ``optimizer.state_dict()``
    (no ``module.`` prefixes; optimizer states under integer ids in parameter-group order),
    so a checkpoint does not depend on the number of ranks that wrote it. Built on
    ``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True, cpu_offload=True``.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    if _sharded_low_precision(optimizer):
        return model_sd, _gather_low_precision_state(optimizer)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    if not optim_sd:
        return model_sd, {}
    # parameter names -> running ids, as torch.optim.Optimizer.state_dict numbers them
    ids: dict[str, int] = {}
    groups = [
        {**g, "params": [ids.setdefault(name, len(ids)) for name in g["params"]]}
        for g in optim_sd["param_groups"]
    ]
    state = {ids[name]: v for name, v in optim_sd["state"].items()}
    return model_sd, {"state": state, "param_groups": groups}


def set_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict
) -> None:
    """Load a full state (as :func:`get_full_state` returns it, or a single process wrote it)
    into a DDP or FSDP2 model and its optimizer; every rank passes the same full dicts.

    Collective. Raises RuntimeError / ValueError / KeyError when the state does not fit.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    names = {id(p): name for name, p in _unwrap(model).named_parameters()}
    fqns = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved_groups: list[dict[str, Any]] = optim_sd["param_groups"]
    n_saved = sum(len(g["params"]) for g in saved_groups)
    if n_saved != len(fqns) or len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"optimizer state has {len(saved_groups)} groups of {n_saved} parameters, the "
            f"optimizer {len(optimizer.param_groups)} groups of {len(fqns)}"
        )
    by_id = {i: fqns[pos] for pos, i in enumerate(i for g in saved_groups for i in g["params"])}
    named = {
        "state": {by_id[i]: v for i, v in optim_sd["state"].items()},
        "param_groups": [{**g, "params": [by_id[i] for i in g["params"]]} for g in saved_groups],
    }
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=opts)
    if _sharded_low_precision(optimizer):
        _scatter_low_precision_state(optimizer, optim_sd)
    else:
        set_optimizer_state_dict(model, optimizer, named, options=opts)


def _sharded_low_precision(optimizer: torch.optim.Optimizer) -> bool:
    """A :class:`~fp4train.optim.LowPrecisionAdamW` over FSDP2 (DTensor) parameters: its
    blocked states are plain per-shard tensors, which DCP cannot gather or reshard."""
    from torch.distributed.tensor import DTensor

    from fp4train.optim import LowPrecisionAdamW

    return isinstance(optimizer, LowPrecisionAdamW) and any(
        isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"]
    )


def _gather_low_precision_state(optimizer) -> dict:
    """Decode each shard's moments, all-gather them as DTensors and re-encode them over the
    full tensor on rank 0: the state dict a single process would hold (collective)."""
    from torch.distributed.tensor import DTensor

    main = dist.get_rank() == 0
    state, groups, i = {}, [], 0
    for group in optimizer.param_groups:
        ids = []
        for p in group["params"]:
            decoded = optimizer.decoded_state(p)  # every rank steps the same parameters
            if decoded:
                full = {"step": decoded["step"].clone()}
                for name in ("exp_avg", "sqrt_exp_avg_sq"):
                    t = decoded[name]
                    if isinstance(p, DTensor):
                        t = DTensor.from_local(
                            t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                        ).full_tensor()
                    full[name] = t
                if main:
                    encoded = optimizer.encoded_state(group, full)
                    state[i] = {k: v.cpu() for k, v in encoded.items()}
            ids.append(i)
            i += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups} if main else {}


def _scatter_low_precision_state(optimizer, optim_sd: dict) -> None:
    """Inverse of :func:`_gather_low_precision_state`: decode each full state, keep this
    rank's shard, re-encode it over the shard (collective)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from fp4train.optim import _check_saved_group

    for gi, (saved, group) in enumerate(
        zip(optim_sd["param_groups"], optimizer.param_groups, strict=True)
    ):
        _check_saved_group(gi, saved, optimizer.defaults)
        group.update({k: v for k, v in saved.items() if k != "params"})
        for pid, p in zip(saved["params"], group["params"], strict=True):
            stored = optim_sd["state"].get(pid)
            if stored is None:
                optimizer.state.pop(p, None)
                continue
            dev = p.to_local().device if isinstance(p, DTensor) else p.device
            stored = {k: v.to(dev) for k, v in stored.items() if k != "step"} | {
                "step": stored["step"].clone()
            }
            try:
                full = optimizer.decode_stored(group, stored, p.shape)
            except ValueError as e:
                raise ValueError(f"parameter {pid} (shape {tuple(p.shape)}): {e}") from e
            if isinstance(p, DTensor):
                for name in ("exp_avg", "sqrt_exp_avg_sq"):
                    full[name] = distribute_tensor(full[name], p.device_mesh, p.placements)
                    full[name] = full[name].to_local()
            optimizer.state[p] = optimizer.encoded_state(group, full)


def _check_fp8_fmt(fmt: str) -> None:
    if fmt not in _FP8_DTYPES:
        raise ValueError(f"fmt must be one of {tuple(_FP8_DTYPES)}, got {fmt!r}")


@dataclass
class FP8CommState:
    """Settings of :func:`fp8_allreduce_hook` (DDP) and of ``wrap_model(..., fp8_comm=)``;
    see the module docstring.

    Args:
        fmt: ``"e5m2"`` (default, the paper's gradient format) or ``"e4m3"``.
        reduce: ``"gather"`` (all-gather FP8 bytes, float32 sum; any backend) or
            ``"allreduce"`` (FP8 sum inside NCCL; needs NCCL FP8 support). DDP only: FSDP2's
            :class:`FP8ReduceScatter` always sums the exchanged bytes in float32 and takes
            ``"gather"`` only.
        process_group: the group to reduce over; None is the default (world) group. DDP only:
            FSDP2 reduce-scatters over its mesh, which must leave it None.
    """

    fmt: str = "e5m2"
    reduce: str = "gather"
    process_group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        _check_fp8_fmt(self.fmt)
        if self.reduce not in _REDUCE_MODES:
            raise ValueError(f"reduce must be one of {_REDUCE_MODES}, got {self.reduce!r}")


def _all_gather_single(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool):
    # torch 2.13 renamed all_gather_into_tensor (2.11) to all_gather_single
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)


def fp8_allreduce_hook(
    state: FP8CommState | None, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average gradients across ranks, communicated in FP8.

    Register with ``ddp_model.register_comm_hook(FP8CommState(), fp8_allreduce_hook)``.
    Each rank quantizes its bucket with the shared scale (exact rounding by
    ``fp4train.formats.round_to_format``, ties to even); the averaged result differs from a
    plain all-reduce mean by at most half an FP8 ulp of each rank's value, averaged. A NaN or
    Inf gradient anywhere in the bucket makes the whole averaged bucket NaN, so overflow
    checks still see it.
    """
    state = state if state is not None else FP8CommState()
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    if state.reduce == "allreduce" and dist.get_backend(group) != "nccl":
        raise ValueError(
            f"FP8CommState(reduce='allreduce') needs the NCCL backend, this group uses "
            f"{dist.get_backend(group)!r}, which cannot sum float8: use reduce='gather'"
        )
    world = dist.get_world_size(group)
    fmt, fp8 = get(state.fmt), _FP8_DTYPES[state.fmt]
    buf = bucket.buffer()  # [n] this bucket's gradients, flat, in the parameters' dtype

    amax = buf.detach().abs().amax().float()
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    headroom = world if state.reduce == "allreduce" else 1  # an FP8 sum of world terms
    scale = absmax_scale(amax * headroom, fmt)
    q = round_to_format(buf.float() / scale, fmt).to(fp8)  # [n], exact: values on fmt's grid

    if state.reduce == "allreduce":
        fut = dist.all_reduce(q, group=group, async_op=True).get_future()

        def total() -> torch.Tensor:
            return q.float()

    else:
        gathered = torch.empty(world * q.numel(), dtype=torch.uint8, device=q.device)
        fut = _all_gather_single(gathered, q.view(torch.uint8), group, True).get_future()

        def total() -> torch.Tensor:
            return gathered.view(fp8).view(world, -1).float().sum(0)  # [world, n] -> [n]

    def finish(_fut) -> torch.Tensor:
        # amax * 0 is NaN exactly when amax is NaN or Inf: poison the bucket, no host sync
        buf.copy_(total().mul_(scale / world).add_(amax * 0))
        return buf

    return fut.then(finish)


class FP8ReduceScatter:
    """FSDP2 gradient reduce-scatter in FP8, :func:`fp8_allreduce_hook`'s counterpart for
    ``fully_shard``; see the module docstring.

    Install it on every ``fully_shard``-ed module with
    ``module.set_custom_reduce_scatter(FP8ReduceScatter())`` (``wrap_model(...,
    parallel="fsdp", fp8_comm=True)`` does). It implements torch's private ``ReduceScatter``
    interface (``torch.distributed.fsdp._fully_shard._fsdp_api``: ``allocate`` and
    ``__call__``) without subclassing it, so importing this module does not depend on that
    path; tests pin the interface.

    Args:
        fmt: ``"e5m2"`` (default, the paper's gradient format) or ``"e4m3"``.
    """

    def __init__(self, fmt: str = "e5m2") -> None:
        _check_fp8_fmt(fmt)
        self.fmt = fmt

    def allocate(
        self, size: tuple[int, ...], *, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """FSDP2's buffers (the flat input and output), plain ``torch.empty``."""
        return torch.empty(size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: dist.ReduceOp | dist.ReduceOp.RedOpType,
        async_op: bool = False,
    ) -> dist.Work | None:
        """Reduce ``input_tensor`` ([world * n], chunk d for rank d) over ``group`` into this
        rank's ``output_tensor`` ([n], its own dtype).

        ``op``: ``SUM``, ``AVG`` (FSDP2's default for float32 / bf16 gradients) or, where the
        ``ReduceOp`` exposes its factor (torch 2.13 does, 2.11 does not), ``PREMUL_SUM``; others
        raise ValueError. A NaN or Inf in any rank's input makes every rank's whole output
        NaN (as :func:`fp8_allreduce_hook` does with a bucket), so every rank's overflow check
        sees it. The call is synchronous: the sum needs the received bytes. ``async_op=True``
        returns the exchange's ``Work``, already waited on (on CUDA: the current stream waits
        for it; no host sync anywhere); FSDP2 calls with ``async_op=False`` and gets None.
        """
        world = dist.get_world_size(group)
        n = output_tensor.numel()
        if input_tensor.numel() != world * n:
            raise ValueError(
                f"reduce-scatter input has {input_tensor.numel()} elements, the output "
                f"{n}: need world_size ({world}) times as many"
            )
        _check_reduce_op(op)
        fmt, fp8 = get(self.fmt), _FP8_DTYPES[self.fmt]
        x = input_tensor.detach().view(world, n)  # row d: this rank's gradients for rank d

        amax = x.abs().amax(dim=1).float()  # [world]
        scale = absmax_scale(amax, fmt)  # [world], one per destination chunk
        # amax * 0 is NaN exactly when some amax is NaN or Inf: sent to every rank with the
        # scales, it poisons every shard (scale alone would not: Inf saturates to fmt.max)
        poison = (amax.amax() * 0).expand(world)
        meta = torch.stack([scale, poison], dim=1)  # [world, 2] float32
        # one exchange: row d = 8 bytes of [scale, poison], then n FP8 bytes, for rank d
        send = torch.empty(world, 8 + n, dtype=torch.uint8, device=x.device)
        send[:, :8] = meta.view(torch.uint8)
        send[:, 8:].view(fp8).copy_(round_to_format(x.float() / scale[:, None], fmt))  # exact
        recv = torch.empty_like(send)  # row s: from rank s, for this rank
        work = dist.all_to_all_single(recv, send, group=group, async_op=async_op)
        if work is not None:
            work.wait()

        meta_recv = recv[:, :8].contiguous().view(torch.float32)  # [world, 2]
        total = (recv[:, 8:].view(fp8).float() * meta_recv[:, :1]).sum(0)  # [world, n] -> [n]
        total.add_(meta_recv[:, 1].sum())
        if op == dist.ReduceOp.AVG:
            total.div_(world)
        elif op == dist.ReduceOp.PREMUL_SUM:
            total.mul_(op.factor)
        output_tensor.copy_(total)
        return work


def _check_reduce_op(op) -> None:
    if op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
        return
    if op == dist.ReduceOp.PREMUL_SUM and hasattr(op, "factor"):
        return
    raise ValueError(
        f"FP8ReduceScatter takes ReduceOp SUM, AVG or PREMUL_SUM (the last where ReduceOp "
        f"exposes its factor, as torch 2.13's does; this is torch {torch.__version__}), got "
        f"{op}. FSDP2 sends PREMUL_SUM after set_gradient_divide_factor(f) with f other than "
        "the world size; set_force_sum_reduction_for_comms(True) makes it send SUM instead"
    )


def wrap_model(
    model: nn.Module,
    parallel: str = "ddp",
    fp8_comm: bool | FP8CommState = False,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Make ``model`` data-parallel over the initialized process group.

    Args:
        model: any module; for ``"fsdp"`` its ``.layers`` ModuleList (the transformer blocks
            of ``fp4train.model.LLaMA``) is sharded block by block, then the root; a model
            without one is sharded as a whole.
        parallel: ``"ddp"`` (DistributedDataParallel), ``"fsdp"`` (FSDP2 ``fully_shard``,
            parameters become DTensor shards) or ``"none"`` (just move to ``device``).
        fp8_comm: communicate gradients in FP8 (True for ``FP8CommState()``, or a state to
            choose the format / reduction): DDP all-reduces with :func:`fp8_allreduce_hook`,
            FSDP2 reduce-scatters with :class:`FP8ReduceScatter` (which takes ``fmt`` only:
            ``reduce="allreduce"`` or a ``process_group`` raise ValueError).
        device: where the model runs; default the current GPU, else the CPU.

    Returns the wrapped model (DDP: a wrapper whose ``.module`` is ``model``; FSDP2: ``model``
    itself, sharded in place).
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    state = None
    if fp8_comm:
        state = fp8_comm if isinstance(fp8_comm, FP8CommState) else FP8CommState()
        _check_fp8_comm(state, parallel)
    if parallel != "none" and not dist.is_initialized():
        raise ValueError(
            f"parallel={parallel!r} needs an initialized process group: launch with torchrun "
            "and call fp4train.distributed.init_from_env() first"
        )
    device = torch.device(device) if device is not None else _default_device()
    if not any(p.is_meta for p in model.parameters()):  # meta models are sharded, then filled
        model.to(device)
    if parallel == "none":
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if state is not None:
            ddp.register_comm_hook(state, fp8_allreduce_hook)
        return ddp

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = getattr(model, "layers", None)
    blocks = list(layers) if isinstance(layers, nn.ModuleList) else []
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once by backward: keep them
        fully_shard(block, mesh=mesh, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh)
    if state is not None:
        comm = FP8ReduceScatter(state.fmt)
        for module in (*blocks, model):
            module.set_custom_reduce_scatter(comm)
    return model


def _check_fp8_comm(state: FP8CommState, parallel: str) -> None:
    if parallel == "none":
        raise ValueError("fp8_comm needs parallel='ddp' or 'fsdp', got parallel='none'")
    if parallel != "fsdp":
        return
    if state.reduce != "gather" or state.process_group is not None:
        raise ValueError(
            "with parallel='fsdp', FP8CommState takes fmt only: FSDP2 reduce-scatters over "
            "its mesh (leave process_group None) and sums the exchanged FP8 bytes in float32 "
            f"(reduce='gather'; 'allreduce' is DDP's sum inside NCCL), got reduce="
            f"{state.reduce!r}, process_group={state.process_group!r}"
        )
    from torch.distributed.fsdp import FSDPModule

    if not hasattr(FSDPModule, "set_custom_reduce_scatter"):
        raise RuntimeError(
            f"fp8_comm with parallel='fsdp' needs FSDPModule.set_custom_reduce_scatter, which "
            f"torch {torch.__version__} lacks (2.11 and 2.13 have it): upgrade torch, or use "
            "parallel='ddp' or fp8_comm=False"
        )
