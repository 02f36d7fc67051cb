"""`fp4train train --parallel ddp|fsdp` under torchrun on CPU (gloo, 2 processes): the same
global batch gives the 1-process run's losses, checkpoints move between world sizes, and bad
settings fail before any process group is joined.

Each torchrun launch takes several seconds (three Python processes import torch), so the
launched runs are module fixtures shared by the tests that read them.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import write_micro_run

from fp4train.cli import main
from fp4train.optim import LowPrecisionAdamW
from fp4train.train import (
    TrainConfig,
    eval_checkpoint,
    load_checkpoint,
    read_metrics,
    train,
)

WORDS = "one two three four five six seven eight nine ten red green blue up down".split()
WORLD = 2
RTOL = 2e-5  # float32 on CPU: only the order of the reductions differs

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A 2-layer dim-32 model, a small text and its prepared cache (so ranks only read it)."""
    d = tmp_path_factory.mktemp("par")
    write_micro_run(d, WORDS, 800, 7, dim=32, n_layers=2, n_heads=2, ffn_hidden=64, max_seq_len=16)
    from fp4train.data import prepare_data

    prepare_data(str(d / "text.txt"), vocab_size=280, cache_dir=d / "cache")
    return d


def _settings(micro, **kw) -> dict:
    """TrainConfig fields of the runs compared here (bf16: no batch-dependent scales)."""
    base = dict(
        model=str(micro / "micro.json"),
        data=str(micro / "text.txt"),
        vocab_size=280,
        cache_dir=str(micro / "cache"),
        recipe="bf16",
        batch_size=4,
        grad_accum=2,
        max_steps=6,
        eval_every=3,
        eval_batches=2,
        log_every=1,
        ckpt_every=3,
        keep_ckpts=2,
        lr=3e-3,
        device="cpu",
        progress=False,
    )
    return base | kw


def _argv(settings: dict) -> list[str]:
    argv = []
    for key, value in settings.items():
        if key == "progress":
            argv += [] if value else ["--no-progress"]
        elif key == "out_dir":
            argv += ["--out", str(value)]
        elif value is True:
            argv.append("--" + key.replace("_", "-"))
        else:
            argv += ["--" + key.replace("_", "-"), str(value)]
    return argv


def _torchrun(settings: dict, nproc: int = WORLD) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "-m", "fp4train", "train", *_argv(settings)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _launch(settings: dict) -> None:
    r = _torchrun(settings)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _rows(out) -> tuple[list, list]:
    rows = read_metrics(out)
    train_rows = [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rows if "loss" in r]
    return train_rows, [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def _copy_stopped_at(run, dst, step: int):
    """A copy of ``run`` as if it had stopped at ``step``: its checkpoint becomes latest.pt."""
    shutil.copytree(run, dst)
    ckpts = dst / "checkpoints"
    shutil.copyfile(ckpts / f"step_{step:06d}.pt", ckpts / "latest.pt")
    return dst


def _assert_same_run(got, want, rtol=RTOL):
    (t_got, v_got), (t_want, v_want) = _rows(got), _rows(want)
    assert [r[0] for r in t_got] == [r[0] for r in t_want]  # rank 0 alone logged
    assert [r[0] for r in v_got] == [r[0] for r in v_want]
    for a, b in zip(t_got, t_want, strict=True):
        assert a[1] == pytest.approx(b[1], rel=rtol), f"step {a[0]} loss: {a[1]} vs {b[1]}"
        assert a[2] == pytest.approx(b[2], rel=10 * rtol), f"step {a[0]} grad norm"
        assert a[3] == b[3], f"step {a[0]} lr"
    for a, b in zip(v_got, v_want, strict=True):
        assert a[1] == pytest.approx(b[1], rel=rtol), f"step {a[0]} val loss: {a[1]} vs {b[1]}"


def _assert_same_full_state(run, reference) -> tuple[dict, dict]:
    """The checkpoints of two runs hold the same model (to float32 rounding) under the same
    keys, and optimizer state for the same parameters; returns both checkpoints."""
    a, b = load_checkpoint(run), load_checkpoint(reference)
    assert a["model"].keys() == b["model"].keys()
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    return a, b


@pytest.fixture(scope="module")
def single(micro, tmp_path_factory):
    """The 1-process reference run (in this process)."""
    out = tmp_path_factory.mktemp("single") / "run"
    train(TrainConfig(**_settings(micro, out_dir=str(out))))
    return out


@pytest.fixture(scope="module")
def ddp_run(micro, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    _launch(_settings(micro, out_dir=out, parallel="ddp"))
    return out


# ---------------------------------------------------------------------------- ddp
def test_ddp_equals_one_process_run(ddp_run, single):
    _assert_same_run(ddp_run, single)
    config = json.loads((ddp_run / "config.json").read_text())
    assert (config["parallel"], config["world_size"]) == ("ddp", WORLD)
    # the full state, keyed as a single process keys it: no "module." prefixes
    a, b = _assert_same_full_state(ddp_run, single)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["batcher"] == b["batcher"]  # the data position is global


def test_ddp_checkpoint_resumes_on_one_process_and_evaluates(micro, ddp_run, tmp_path):
    out = _copy_stopped_at(ddp_run, tmp_path / "resumed", 3)
    train(TrainConfig(**_settings(micro, out_dir=str(out), resume=True)))
    _assert_same_run(out, ddp_run)
    final = json.loads((ddp_run / "eval.json").read_text())
    e = eval_checkpoint(
        ddp_run, batch_size=4, max_batches=2, device="cpu", cache_dir=micro / "cache"
    )
    assert e["step"] == 6 and e["val_loss"] == pytest.approx(final["val_loss"], rel=RTOL)


# ---------------------------------------------------------------------------- fsdp
@pytest.fixture(scope="module")
def fsdp_run(micro, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    _launch(_settings(micro, out_dir=out, parallel="fsdp"))
    return out


def test_fsdp_equals_one_process_run(fsdp_run, single):
    _assert_same_run(fsdp_run, single)
    _assert_same_full_state(fsdp_run, single)  # gathered from the shards


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_fsdp(micro, fsdp_run, tmp_path):
    # the full checkpoint is scattered back into shards: bit for bit
    resumed = _copy_stopped_at(fsdp_run, tmp_path / "resumed", 3)
    _launch(_settings(micro, out_dir=resumed, parallel="fsdp", resume=True))
    _assert_same_run(resumed, fsdp_run, rtol=0)


# ---------------------------------------------------------------------------- more ddp
@pytest.mark.slow
def test_ddp_fp4_recipe_close_to_one_process(micro, tmp_path):
    # FP4 scales over the local batch (dY columns in wgrad, the OCC quantile): close, not equal
    kw = dict(recipe="fp4-paper", grad_accum=1, max_steps=3, ckpt_every=3)
    _launch(_settings(micro, out_dir=tmp_path / "ddp", parallel="ddp", **kw))
    train(TrainConfig(**_settings(micro, out_dir=str(tmp_path / "one"), **kw)))
    _assert_same_run(tmp_path / "ddp", tmp_path / "one", rtol=5e-3)


@pytest.mark.slow
def test_ddp_low_precision_adamw_trains_and_resumes(micro, tmp_path):
    kw = dict(optimizer="adamw-lp", max_steps=8, ckpt_every=4, eval_every=4)
    out = tmp_path / "lp"
    _launch(_settings(micro, out_dir=out, parallel="ddp", **kw))
    losses = [r[1] for r in _rows(out)[0]]
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses
    state = load_checkpoint(out)["optimizer"]["state"][0]
    assert state["exp_avg"].dtype == torch.float8_e4m3fn
    assert state["sqrt_exp_avg_sq"].dtype == torch.float16
    # resume from step 4 on 2 processes (bit for bit) and on 1 (float32 rounding apart)
    _assert_resumes_from_step_4(micro, out, tmp_path, kw, "ddp", rtol_two=0, rtol_one=1e-4)


def _assert_resumes_from_step_4(micro, out, tmp_path, kw, parallel, rtol_two, rtol_one):
    """Copies of run ``out`` resumed from its step-4 checkpoint, on 2 processes under
    ``parallel`` and on 1, repeat its logged steps to these tolerances."""
    for name, launch in (("two", _launch), ("one", None)):
        resumed = _copy_stopped_at(out, tmp_path / name, 4)
        settings = _settings(micro, out_dir=resumed, resume=True, **kw)
        if launch is not None:
            launch(settings | {"parallel": parallel})
        else:
            train(TrainConfig(**settings | {"out_dir": str(resumed)}))
        _assert_same_run(resumed, out, rtol=rtol_two if launch else rtol_one)


@pytest.mark.slow
def test_fsdp_low_precision_adamw_checkpoints_reshard(micro, tmp_path):
    """FSDP2 + adamw-lp: each rank's blocked FP8/FP16 states are gathered into the
    single-process layout, and scattered back on resume, on 2 processes and on 1."""
    kw = dict(optimizer="adamw-lp", max_steps=8, ckpt_every=4, eval_every=4)
    out = tmp_path / "lp"
    _launch(_settings(micro, out_dir=out, parallel="fsdp", **kw))
    losses = [r[1] for r in _rows(out)[0]]
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses
    ddp = tmp_path / "ddp"  # the same run under DDP: one process' layout throughout
    _launch(_settings(micro, out_dir=ddp, parallel="ddp", **kw))
    got, want = load_checkpoint(out)["optimizer"], load_checkpoint(ddp)["optimizer"]
    assert got["state"].keys() == want["state"].keys()
    group = want["param_groups"][0]
    for i, st in want["state"].items():
        assert {k: (v.dtype, v.shape) for k, v in got["state"][i].items()} == {
            k: (v.dtype, v.shape) for k, v in st.items()
        }, i
        shape = st["exp_avg"].shape
        a = LowPrecisionAdamW.decode_stored(group, got["state"][i], shape)
        b = LowPrecisionAdamW.decode_stored(group, st, shape)
        for name in ("exp_avg", "sqrt_exp_avg_sq"):  # shard-wise vs whole-tensor blocks
            torch.testing.assert_close(a[name], b[name], rtol=0.15, atol=0.05 * b[name].abs().max())
    # the states are re-rounded where a 128-element block spans two shards (the norms')
    _assert_resumes_from_step_4(micro, out, tmp_path, kw, "fsdp", rtol_two=1e-4, rtol_one=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallel, ref_run, rel",
    [("ddp", "ddp_run", 2e-2), ("fsdp", "fsdp_run", 1e-3)],  # fsdp measured: within 1e-4
)
def test_fp8_grad_comm_close_to_float32(micro, tmp_path, request, parallel, ref_run, rel):
    """FP8 gradient communication (DDP all-reduce hook, FSDP2 reduce-scatter): the same first
    loss, then losses that differ from the float32 run's, but by less than ``rel``."""
    out = tmp_path / "fp8comm"
    _launch(_settings(micro, out_dir=out, parallel=parallel) | {"set": "grad_comm=e5m2"})
    (t_fp8, _), (t_ref, _) = _rows(out), _rows(request.getfixturevalue(ref_run))
    assert t_fp8[0][1] == t_ref[0][1]  # same forward before the first update
    for a, b in zip(t_fp8[1:], t_ref[1:], strict=True):
        assert a[1] != b[1] and a[1] == pytest.approx(b[1], rel=rel), (a, b)
    config = json.loads((out / "config.json").read_text())
    assert (config["parallel"], config["recipe"]["grad_comm"]) == (parallel, "e5m2")


@pytest.mark.slow
def test_divergence_stops_every_rank_at_the_same_step(micro, tmp_path):
    out = tmp_path / "nan"
    kw = dict(lr=1e3, grad_clip=0, warmup_frac=0, grad_accum=1, max_steps=30, ckpt_every=2)
    r = _torchrun(_settings(micro, out_dir=out, parallel="ddp", **kw))
    assert r.returncode != 0
    # each rank says so (the two lines may interleave in the shared stderr)
    steps = re.findall(r"\[rank \d\]: error: training diverged at step (\d+)", r.stderr)
    assert len(steps) == WORLD and len(set(steps)) == 1, r.stderr[-3000:]
    last = read_metrics(out)[-1]
    assert last["nonfinite"] and last["step"] == int(steps[0])
    assert load_checkpoint(out)["step"] < last["step"]


# ---------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize(
    "world, extra, needle",
    [
        (2, ["--batch-size", "3"], "must be divisible by the 2 processes"),
        (None, ["--parallel", "ddp"], "needs a torchrun launch"),
        (2, ["--parallel", "none"], "each would train the same model"),
        (None, ["--parallel", "tp"], "invalid choice: 'tp'"),
        (None, ["--optimizer", "sgd"], "invalid choice: 'sgd'"),
    ],
)
def test_bad_parallel_settings_exit_2_before_joining(
    micro, monkeypatch, capsys, world, extra, needle
):
    # the checks run before any process group exists: one process holding torchrun's
    # variables stands for a rank
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("LOCAL_RANK", "1")
    settings = _settings(micro, out_dir=micro / "never")
    assert main(["train", *_argv(settings), *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    if world is not None:
        assert err.startswith("fp4train train [rank 1]: error:")
    assert not dist.is_initialized()
    assert not (micro / "never").exists()


def test_torchrun_needs_an_output_directory(micro, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["train", *_argv(_settings(micro))]) == 2
    assert "name the output directory" in capsys.readouterr().err


@pytest.mark.slow
def test_bad_setting_under_torchrun_names_rank(micro, tmp_path):
    r = _torchrun(_settings(micro, out_dir=tmp_path / "x", batch_size=3, parallel="ddp"))
    assert r.returncode != 0
    assert "fp4train train [rank 1]: error: batch_size 3" in r.stderr, r.stderr[-2000:]
    assert "exitcode  : 2" in r.stderr
    assert not (tmp_path / "x").exists()
