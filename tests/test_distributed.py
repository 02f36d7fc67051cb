"""fp4train.distributed on CPU: two gloo processes (spawned once per test session) check the
FP8 all-reduce hook against a plain all-reduce, the FP8 reduce-scatter against a plain
reduce-scatter, DDP training with the hook, and FSDP2 sharding (with and without the FP8
reduce-scatter) against a single-process AdamW run; argument errors are checked in this
process."""

import copy
import inspect
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import fp4train.distributed as fdist
from fp4train.distributed import (
    FP8CommState,
    FP8ReduceScatter,
    fp8_allreduce_hook,
    init_from_env,
    wrap_model,
)
from fp4train.formats import get
from fp4train.optim import LowPrecisionAdamW

WORLD = 2
LR = 1e-2


class _Bucket:
    """The part of ``dist.GradBucket`` the hook uses."""

    def __init__(self, t: torch.Tensor):
        self._t = t

    def buffer(self) -> torch.Tensor:
        return self._t


class _Net(nn.Module):
    """Transformer-shaped toy: blocks in ``.layers`` as in fp4train.model.LLaMA."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def _full_batch(step: int):
    xs, ys = zip(*(_batch(r, step) for r in range(WORLD)), strict=True)
    return torch.cat(xs), torch.cat(ys)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


# ---------------------------------------------------------------- worker side (rank r)
def _hook_numerics(rank: int) -> dict:
    out = {}
    for fmt in ("e5m2", "e4m3"):
        g = torch.Generator().manual_seed(1234 + rank)
        mags = torch.logspace(-4, 1, 4096)[torch.randperm(4096, generator=g)]
        x = torch.randn(4096, generator=g) * mags  # 5 decades of magnitudes
        hooked = fp8_allreduce_hook(FP8CommState(fmt), _Bucket(x.clone())).wait()
        ref = x.clone()
        dist.all_reduce(ref)
        inputs = [torch.empty_like(x) for _ in range(WORLD)]
        dist.all_gather(inputs, x)
        out[fmt] = dict(hooked=hooked, ref=ref / WORLD, inputs=torch.stack(inputs))
    x = torch.ones(64)
    if rank == 1:
        x[3] = float("inf")
    out["nonfinite"] = fp8_allreduce_hook(None, _Bucket(x)).wait()
    x = torch.randn(64, generator=torch.Generator().manual_seed(rank)).bfloat16()
    out["bf16"] = (x, fp8_allreduce_hook(None, _Bucket(x.clone())).wait())
    try:
        fp8_allreduce_hook(FP8CommState(reduce="allreduce"), _Bucket(torch.ones(8)))
        out["allreduce_on_gloo"] = "no error"
    except ValueError as e:
        out["allreduce_on_gloo"] = str(e)
    return out


def _reduce_scatter_numerics(rank: int) -> dict:
    n = 2048  # each rank's shard
    # torch 2.13 renamed reduce_scatter_tensor (2.11) to reduce_scatter_single
    plain = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    out = {}
    for fmt in ("e5m2", "e4m3"):
        g = torch.Generator().manual_seed(4321 + rank)
        mags = torch.logspace(-4, 1, WORLD * n)[torch.randperm(WORLD * n, generator=g)]
        x = torch.randn(WORLD * n, generator=g) * mags * 100.0**rank  # ranks 2 decades apart
        ref = torch.empty(n)
        plain(ref, x.clone())
        inputs = [torch.empty_like(x) for _ in range(WORLD)]
        dist.all_gather(inputs, x)
        for op in ("SUM", "AVG"):
            got = torch.empty(n)
            FP8ReduceScatter(fmt)(got, x.clone(), dist.group.WORLD, getattr(dist.ReduceOp, op))
            out[fmt, op] = dict(got=got, ref=ref, inputs=torch.stack(inputs))
    for bad in ("nan", "inf"):
        x = torch.ones(WORLD * 64)
        if rank == 1:
            x[-1] = float(bad)  # in rank 1's own shard: rank 0 never receives it
        out[bad] = torch.empty(64)
        FP8ReduceScatter()(out[bad], x, dist.group.WORLD, dist.ReduceOp.SUM)
    x = torch.randn(WORLD * 64, generator=torch.Generator().manual_seed(rank)).bfloat16()
    out["bf16"] = (x, torch.empty(64, dtype=torch.bfloat16))
    FP8ReduceScatter()(out["bf16"][1], x, dist.group.WORLD, dist.ReduceOp.AVG)
    premul = dist._make_nccl_premul_sum(0.25)  # what FSDP2 sends after set_gradient_divide_factor
    out["premul"] = (hasattr(premul, "factor"), torch.empty(64), torch.empty(64))
    try:
        FP8ReduceScatter()(out["premul"][1], x.float(), dist.group.WORLD, premul)
        FP8ReduceScatter()(out["premul"][2], x.float(), dist.group.WORLD, dist.ReduceOp.SUM)
    except ValueError as e:
        out["premul"] = (False, str(e))
    try:
        FP8ReduceScatter()(torch.empty(64), x.float(), dist.group.WORLD, dist.ReduceOp.MAX)
        out["max"] = "no error"
    except ValueError as e:
        out["max"] = str(e)
    return out


def _ddp_training(rank: int) -> dict:
    torch.manual_seed(rank)  # different inits: DDP must broadcast rank 0's
    net = _Net()
    model = wrap_model(net, "ddp", fp8_comm=True, device="cpu")
    start = _flat(net.parameters()).clone()
    ref = copy.deepcopy(net)
    opt = LowPrecisionAdamW(model.parameters(), lr=LR)
    for step in range(3):
        x, y = _batch(rank, step)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if step == 0:
            ddp_grad = _flat(p.grad for p in net.parameters())
            F.mse_loss(ref(_full_batch(0)[0]), _full_batch(0)[1]).backward()
            true_grad = _flat(p.grad for p in ref.parameters())
        opt.step()
    return dict(start=start, params=_flat(net.parameters()), grad=ddp_grad, true_grad=true_grad)


def _fsdp_training(rank: int, fp8_comm: bool = False) -> dict:
    torch.manual_seed(0)
    net = _Net()
    ref = copy.deepcopy(net)
    start = _flat(ref.parameters()).clone()
    try:
        model = wrap_model(net, "fsdp", fp8_comm=fp8_comm, device="cpu")
    except (NotImplementedError, RuntimeError) as e:  # FSDP2 without gloo/CPU support
        return dict(skip=f"fully_shard on gloo/CPU failed: {e}")
    sharded = type(net.layers[0].weight).__name__
    # float32 states: the sharded update must equal torch's AdamW on the full batch
    opt = LowPrecisionAdamW(
        model.parameters(), lr=LR, exp_avg_dtype="float32", exp_avg_sq_dtype="float32"
    )
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(3):
        F.mse_loss(model(_batch(rank, step)[0]), _batch(rank, step)[1]).backward()
        F.mse_loss(ref(_full_batch(step)[0]), _full_batch(step)[1]).backward()
        if step == 0:
            grad = _flat(p.grad.full_tensor() for p in net.parameters())
            true_grad = _flat(p.grad for p in ref.parameters())
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    return dict(
        start=start,
        params=_flat(p.full_tensor() for p in net.parameters()),
        ref=_flat(ref.parameters()),
        sharded=sharded,
        grad=grad,
        true_grad=true_grad,
    )


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ.update(
        CUDA_VISIBLE_DEVICES="",  # gloo on CPU even on a GPU machine
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    env = init_from_env()
    try:
        res = dict(
            env=(env[0], env[1], env[2], str(env[3]), dist.get_backend()),
            hook=_hook_numerics(rank),
            rs=_reduce_scatter_numerics(rank),
            ddp=_ddp_training(rank),
            fsdp=_fsdp_training(rank),
            fsdp_fp8=_fsdp_training(rank, fp8_comm=True),
        )
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        fdist.cleanup()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Results of both ranks: [rank0, rank1] dicts."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    outdir = tmp_path_factory.mktemp("dist")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(outdir)), nprocs=WORLD, join=True)
    return [torch.load(outdir / f"rank{r}.pt") for r in range(WORLD)]


# ---------------------------------------------------------------- assertions
def test_init_from_env_under_torchrun_env(ranks):
    for r, res in enumerate(ranks):
        assert res["env"] == (r, WORLD, r, "cpu", "gloo")


@pytest.mark.parametrize("fmt", ["e5m2", "e4m3"])
def test_fp8_hook_within_quantization_bound(ranks, fmt):
    res = ranks[0]["hook"][fmt]
    hooked, ref, inputs = res["hooked"], res["ref"], res["inputs"]  # inputs: [WORLD, n]
    assert torch.equal(hooked, ranks[1]["hook"][fmt]["hooked"]), "ranks disagree"
    f = get(fmt)
    # each rank's value is off by at most half an ulp on the shared-scale grid
    scale = inputs.abs().amax() / f.max
    per_rank = torch.maximum(inputs.abs() * 2.0 ** -(f.mbits + 1), scale * f.min_subnormal / 2)
    bound = per_rank.sum(0) / WORLD + 1e-6 * ref.abs()
    err = (hooked - ref).abs()
    rel = (err.norm() / ref.norm()).item()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{fmt}: error exceeds the bound by {worst:.3f}x (rel L2 {rel:.4f})"
    assert rel > 0, f"{fmt}: no quantization happened"
    assert rel < 2.0 ** -(f.mbits + 1), f"{fmt}: relative L2 error {rel:.4f}"


def test_fp8_hook_nonfinite_and_bf16(ranks):
    for res in ranks:
        assert torch.isnan(res["hook"]["nonfinite"]).all()
    x0, out = ranks[0]["hook"]["bf16"]
    x1 = ranks[1]["hook"]["bf16"][0]
    assert out.dtype == torch.bfloat16
    mean = (x0.float() + x1.float()) / 2
    rel = ((out.float() - mean).norm() / mean.norm()).item()
    assert rel < 2.0**-3, f"bf16 bucket: relative error {rel:.4f}"


def test_fp8_hook_allreduce_mode_needs_nccl(ranks):
    assert "needs the NCCL backend" in ranks[0]["hook"]["allreduce_on_gloo"]


def _half_ulp_bound(inputs: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per element, half an FP8 ulp of each rank's value on that rank's own grid, summed:
    ``inputs`` [WORLD, WORLD, n] (source rank, destination shard, element) -> [WORLD, n]."""
    f = get(fmt)
    scale = inputs.abs().amax(dim=2, keepdim=True) / f.max  # one per (source, shard)
    per_rank = torch.maximum(inputs.abs() * 2.0 ** -(f.mbits + 1), scale * f.min_subnormal / 2)
    return per_rank.sum(0) + 1e-6 * inputs.abs().sum(0)  # + float32 rounding of the sum


@pytest.mark.parametrize("op", ["SUM", "AVG"])
@pytest.mark.parametrize("fmt", ["e5m2", "e4m3"])
def test_fp8_reduce_scatter_within_quantization_bound(ranks, fmt, op):
    inputs = ranks[0]["rs"][fmt, op]["inputs"]
    bound = _half_ulp_bound(inputs.view(WORLD, WORLD, -1), fmt)  # [WORLD, n]: shard r on rank r
    div = WORLD if op == "AVG" else 1
    for r, res in enumerate(ranks):
        got, ref = res["rs"][fmt, op]["got"], res["rs"][fmt, op]["ref"] / div
        err = (got - ref).abs()
        worst = (err / (bound[r] / div)).max().item()
        rel = (err.norm() / ref.norm()).item()
        assert worst <= 1.0, f"{fmt} {op} rank {r}: error exceeds the bound by {worst:.3f}x"
        assert worst > 0.5, f"{fmt} {op} rank {r}: bound loose, worst error {worst:.3f} of it"
        assert 0 < rel < 2.0 ** -(get(fmt).mbits + 1), f"{fmt} {op}: relative L2 error {rel:.4f}"


def test_fp8_reduce_scatter_nonfinite_bf16_and_ops(ranks):
    for res in ranks:  # a NaN / Inf in rank 1's own shard: every rank's whole output is NaN
        assert torch.isnan(res["rs"]["nan"]).all() and torch.isnan(res["rs"]["inf"]).all()
    x0, x1 = ranks[0]["rs"]["bf16"][0].float(), ranks[1]["rs"]["bf16"][0].float()
    for r, res in enumerate(ranks):
        out = res["rs"]["bf16"][1]
        assert out.dtype == torch.bfloat16
        mean = ((x0 + x1) / 2).view(WORLD, -1)[r]
        rel = ((out.float() - mean).norm() / mean.norm()).item()
        assert rel < 2.0**-3, f"bf16 rank {r}: relative error {rel:.4f}"
    for res in ranks:
        has_factor, *got = res["rs"]["premul"]
        if has_factor:  # torch 2.13: PREMUL_SUM(0.25) is a quarter of the SUM, exactly
            assert torch.equal(got[0], got[1] * 0.25)
        else:  # torch 2.11's ReduceOp hides its factor
            assert "SUM, AVG or PREMUL_SUM" in got[0] and "force_sum_reduction" in got[0]
        assert "takes ReduceOp SUM, AVG or PREMUL_SUM" in res["rs"]["max"]


def test_fp8_reduce_scatter_implements_fsdp_interface():
    # the private interface FSDPModule.set_custom_reduce_scatter takes; moves with torch
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

    for name in ReduceScatter.__abstractmethods__:
        want = inspect.signature(getattr(ReduceScatter, name)).parameters.values()
        got = inspect.signature(getattr(FP8ReduceScatter, name)).parameters.values()
        assert [(p.name, p.kind) for p in got] == [(p.name, p.kind) for p in want], name


def test_ddp_with_fp8_hook_keeps_ranks_identical(ranks):
    r0, r1 = ranks[0]["ddp"], ranks[1]["ddp"]
    assert torch.equal(r0["start"], r1["start"]), "DDP did not broadcast rank 0's parameters"
    assert torch.equal(r0["params"], r1["params"]), "ranks' parameters diverged"
    assert not torch.equal(r0["params"], r0["start"]), "parameters never changed"
    rel = ((r0["grad"] - r0["true_grad"]).norm() / r0["true_grad"].norm()).item()
    assert 0 < rel < 2.0**-3, f"DDP FP8 gradient vs full-batch gradient: rel error {rel:.4f}"


def test_fsdp2_sharded_training_matches_adamw(ranks):
    r0, r1 = ranks[0]["fsdp"], ranks[1]["fsdp"]
    if "skip" in r0:
        pytest.skip(r0["skip"])
    assert r0["sharded"] == "DTensor"
    assert torch.equal(r0["params"], r1["params"])
    torch.testing.assert_close(r0["params"], r0["ref"], rtol=0, atol=1e-5)


def test_fsdp2_with_fp8_reduce_scatter_close_to_adamw(ranks):
    r0, r1 = ranks[0]["fsdp_fp8"], ranks[1]["fsdp_fp8"]
    if "skip" in r0:
        pytest.skip(r0["skip"])
    assert torch.equal(r0["params"], r1["params"]), "ranks' parameters diverged"
    rel = ((r0["grad"] - r0["true_grad"]).norm() / r0["true_grad"].norm()).item()
    assert 0 < rel < 2.0**-3, f"FSDP FP8 gradient vs full-batch gradient: rel error {rel:.4f}"
    # three AdamW steps, each about lr * sign(grad) per parameter: the few gradients whose
    # sign FP8 rounding flips (where the ranks' gradients nearly cancel) move 2 lr apart
    fp8_step, fp32_step = r0["params"] - r0["start"], ranks[0]["fsdp"]["params"] - r0["start"]
    rel = ((fp8_step - fp32_step).norm() / fp32_step.norm()).item()
    assert 0 < rel < 0.15, f"FP8 vs float32 reduce-scatter: updates differ by {rel:.4f} (rel L2)"


# ---------------------------------------------------------------- single process
def test_init_from_env_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    rank, world, local, device = init_from_env()
    assert (rank, world, local) == (0, 1, 0)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert fdist.is_main()


def test_nvls_disabled_on_import():
    env = {k: v for k, v in os.environ.items() if k != "NCCL_NVLS_ENABLE"}
    code = "import os, fp4train.distributed; print(os.environ['NCCL_NVLS_ENABLE'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "0", out.stderr


def test_wrap_model_errors():
    with pytest.raises(ValueError, match="parallel must be one of"):
        wrap_model(_Net(), "tp")
    with pytest.raises(ValueError, match="initialized process group"):
        wrap_model(_Net(), "ddp", device="cpu")
    with pytest.raises(ValueError, match="fp8_comm needs parallel='ddp' or 'fsdp'"):
        wrap_model(_Net(), "none", fp8_comm=True)
    with pytest.raises(ValueError, match="FP8CommState takes fmt only"):
        wrap_model(_Net(), "fsdp", fp8_comm=FP8CommState(reduce="allreduce"))
    with pytest.raises(ValueError, match="initialized process group"):
        wrap_model(_Net(), "fsdp", fp8_comm=FP8CommState("e4m3"))
    model = _Net()
    assert wrap_model(model, "none", device="cpu") is model


def test_fsdp_fp8_comm_needs_custom_reduce_scatter(monkeypatch):
    from torch.distributed.fsdp import FSDPModule

    monkeypatch.delattr(FSDPModule, "set_custom_reduce_scatter")
    with pytest.raises(RuntimeError, match="needs FSDPModule.set_custom_reduce_scatter"):
        wrap_model(_Net(), "fsdp", fp8_comm=True)


def test_fp8_comm_state_validation():
    with pytest.raises(ValueError, match="fmt"):
        FP8CommState(fmt="e2m1")
    with pytest.raises(ValueError, match="fmt must be one of"):
        FP8ReduceScatter("e2m1")
    with pytest.raises(ValueError, match="reduce"):
        FP8CommState(reduce="sum")


def test_launched_world_size_and_device_choice(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert fdist.launched_world_size() == 1
    assert init_from_env("cpu")[3] == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'cuda'"):
        init_from_env("cuda:1")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'two'"):
        fdist.launched_world_size()


def test_sharded_weight_quantized_then_gathered_gives_the_same_bits():
    """FSDP2 shards W along its output channels, FP4Linear scales W per output channel: each
    rank can quantize its rows and all-gather FP8 (benchmarks/bench_allgather.py times both
    orders on GPUs); the script's check, on two gloo processes, compares the bits."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "bench_allgather.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", script, "--device", "cpu", "--check"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "same bits both ways: small, odd (2 ranks, cpu)" in res.stdout
