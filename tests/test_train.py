"""Training loop: schedule, optimizer groups, recipe parsing, checkpoints, resume, divergence."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import write_micro_run

from fp4train import FP4Linear, Recipe
from fp4train import train as train_mod
from fp4train.data import Batcher, prepare_data
from fp4train.model import LLaMA, ModelConfig
from fp4train.train import (
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    TrainConfig,
    build_model,
    build_optimizer,
    eval_checkpoint,
    load_checkpoint,
    lr_multiplier,
    parse_recipe,
    read_metrics,
    save_checkpoint,
    split_recipe_list,
    train,
)

WORDS = (
    "the quick brown fox jumps over a lazy dog and cat run far from home while birds sing".split()
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A 2-layer dim-64 model config, a small seeded text file and a shared data cache."""
    d = tmp_path_factory.mktemp("micro")
    return write_micro_run(
        d, WORDS, 1500, 1234, dim=64, n_layers=2, n_heads=2, ffn_hidden=128, max_seq_len=32
    )


def _cfg(micro, out, **kw) -> TrainConfig:
    base = dict(
        model=str(micro / "micro.json"),
        data=str(micro / "text.txt"),
        vocab_size=300,
        cache_dir=str(micro / "cache"),
        batch_size=4,
        max_steps=8,
        eval_every=4,
        eval_batches=2,
        log_every=1,
        ckpt_every=4,
        progress=False,
        device="cpu",
        out_dir=str(out),
        lr=3e-3,
    )
    return TrainConfig(**(base | kw))


def _losses(out) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(out) if "loss" in r]


# ---------------------------------------------------------------------------- schedule
def test_lr_multiplier_warmup_then_cosine_to_min():
    max_steps, warm, floor = 100, 0.05, 0.1
    got = [lr_multiplier(s, max_steps, warm, floor) for s in range(max_steps)]
    assert got[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # 5 warm-up steps
    # cosine from step 5 (factor 1) to the last step 99 (factor 0.1)
    for s in (5, 30, 52, 77, 99):
        t = (s - 5) / 94
        assert got[s] == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
    assert got[-1] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(got[4:], got[5:], strict=False))
    assert lr_multiplier(0, 10, 0.0, 0.1) == 1.0  # no warm-up


def test_weight_decay_only_on_linear_matrices():
    for tie in (False, True):
        model = LLaMA(ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=64, tie_embeddings=tie))
        opt = build_optimizer(model, TrainConfig(weight_decay=0.1), lr=1e-3)
        decay, no_decay = opt.param_groups
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = {names[id(p)] for p in decay["params"]}
        expected = {
            n
            for n, p in model.named_parameters()
            if p.ndim == 2 and not n.startswith("tok_embeddings")
        }
        assert decayed == expected
        assert ("lm_head.weight" in decayed) == (not tie)
        assert not any("norm" in n for n in decayed)
        n_all = sum(len(g["params"]) for g in opt.param_groups)
        assert n_all == len(list(model.parameters()))


# ---------------------------------------------------------------------------- recipes
def test_parse_recipe_brackets_equal_overrides():
    a = parse_recipe("fp4-paper[dge.k=3,occ.alpha=0.999]")
    b = Recipe.preset("fp4-paper").with_overrides(["dge.k=3", "occ.alpha=0.999"])
    assert a == b and a.dge.k == 3 and a.occ.alpha == 0.999
    c = parse_recipe("fp4-paper[dge.k=3]", ["fwd_format=e1m2"])
    assert c.fwd_x.format == "e1m2" and c.dge.k == 3
    assert parse_recipe("bf16") == Recipe.preset("bf16")


@pytest.mark.parametrize(
    "spec, overrides, needle",
    [
        ("nope", [], "unknown recipe preset 'nope'"),
        ("fp4-paper", ["dge.k"], "key=value"),
        ("fp4-paper", ["bogus=1"], "unknown recipe field 'bogus'"),
        ("fp4-paper[occ.alpha=2]", [], "occ.alpha"),
        ("missing.json", [], "does not exist"),
    ],
)
def test_parse_recipe_errors_name_the_problem(spec, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_recipe(spec, overrides)


def test_split_recipe_list():
    assert split_recipe_list("bf16, fp4-paper[dge.k=3,occ.alpha=0.999],fp8") == [
        "bf16",
        "fp4-paper[dge.k=3,occ.alpha=0.999]",
        "fp8",
    ]
    for bad in ("bf16,,fp8", "fp4-paper[dge.k=3", "fp4-paper]"):
        with pytest.raises(ConfigError):
            split_recipe_list(bad)


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    good = {"step": 1, "w": torch.randn(4, 4)}
    save_checkpoint(good, path)

    def crashing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial bytes of a zip")  # half-written file, then the crash
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint({"step": 2, "w": torch.zeros(4, 4)}, path)
    monkeypatch.undo()
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], good["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


def test_corrupt_or_foreign_checkpoint_raises_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    real = tmp_path / "real.pt"
    save_checkpoint({k: 0 for k in train_mod._CKPT_KEYS}, real)
    raw = real.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    for name in ("trunc.pt", "noise.pt"):
        with pytest.raises(CheckpointError, match="unreadable"):
            load_checkpoint(tmp_path / name)
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an fp4train checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    save_checkpoint({"step": 3}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="lacks entries"):
        load_checkpoint(tmp_path / "partial.pt")


# ---------------------------------------------------------------------------- training
def test_resume_continues_bit_for_bit(micro, tmp_path, monkeypatch, capsys):
    straight = train(_cfg(micro, tmp_path / "straight"))

    # crash in step 6: checkpoint at step 4, metrics rows up to step 5 on disk
    calls = {"n": 0}
    real_next = Batcher.next_batch

    def flaky_next(self):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("simulated crash")
        return real_next(self)

    monkeypatch.setattr(Batcher, "next_batch", flaky_next)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_cfg(micro, tmp_path / "resumed"))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "resumed")["step"] == 4
    capsys.readouterr()
    resumed = train(_cfg(micro, tmp_path / "resumed", resume=True))
    assert "unlike the checkpoint" not in capsys.readouterr().out  # nothing changed

    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
    assert len(_losses(tmp_path / "straight")) == 8
    assert resumed["val_loss"] == straight["val_loss"]
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    losses = [x[1] for x in _losses(tmp_path / "straight")]
    assert sum(losses[-3:]) < sum(losses[:3])  # and it learns


def test_resume_applies_and_reports_changed_settings(micro, tmp_path, capsys):
    """The optimizer's and scheduler's states bring back the saved LR and weight decay; a
    resumed run asking for others gets them (torch would keep the saved ones), and says what
    changed. A longer run stretches the schedule from the step it resumes at."""
    out = tmp_path / "run"
    train(_cfg(micro, out, max_steps=4, lr=2e-3))
    capsys.readouterr()
    train(_cfg(micro, out, max_steps=6, lr=1e-3, weight_decay=0.05, resume=True))
    said = [ln for ln in capsys.readouterr().out.splitlines() if "unlike the checkpoint" in ln]
    assert len(said) == 1
    assert "max_steps 4 -> 6, lr 0.002 -> 0.001, weight_decay 0.1 -> 0.05 (" in said[0]
    lrs = {step: lr for step, _, lr in _losses(out)}
    assert lrs[4] == 2e-3 * lr_multiplier(3, 4, 0.05, 0.1)  # before: the old schedule
    for step in (5, 6):  # update step - 1 (0-based) of the new one
        assert lrs[step] == 1e-3 * lr_multiplier(step - 1, 6, 0.05, 0.1)
    ckpt = load_checkpoint(out)
    assert ckpt["scheduler"]["base_lrs"] == [1e-3, 1e-3]
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert groups[0]["lr"] == 1e-3 * lr_multiplier(6, 6, 0.05, 0.1)


def test_resume_from_a_damaged_latest_names_the_step_checkpoints(micro, tmp_path):
    out = tmp_path / "run"
    train(_cfg(micro, out, max_steps=4, ckpt_every=2, keep_ckpts=2))
    latest = out / "checkpoints" / "latest.pt"
    # damaged in place: step_000004.pt, the same file (a hard link), with it
    latest.write_bytes(latest.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"checkpoints: step_000002.pt; copy one"):
        train(_cfg(micro, out, max_steps=6, resume=True))
    latest.unlink()
    shutil.copyfile(out / "checkpoints" / "step_000002.pt", latest)
    assert train(_cfg(micro, out, max_steps=6, resume=True))["step"] == 6
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_outputs_and_refusals(micro, tmp_path):
    out = tmp_path / "run"
    r = train(_cfg(micro, out, max_steps=4, keep_ckpts=1, ckpt_every=1))
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "metrics.jsonl",
        "checkpoints",
        "loss.png",
        "eval.json",
        "tokenizer.json",
    } <= names
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest.pt",
        "step_000004.pt",
    ]
    rows = read_metrics(out)
    for row in (x for x in rows if "loss" in x):
        assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(row)
    assert [x["step"] for x in rows if "val_loss" in x] == [4]
    assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(_cfg(micro, out, max_steps=4))
    # resuming with another model is refused, not half-loaded
    other = tmp_path / "other.json"
    ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=32).to_json(other)
    with pytest.raises(CheckpointError, match="model config"):
        train(_cfg(micro, out, max_steps=4, model=str(other), resume=True))
    with pytest.raises(CheckpointError, match="recipe"):
        train(_cfg(micro, out, max_steps=4, recipe="bf16", resume=True))


def test_tensorboard_event_files_hold_the_logged_scalars(micro, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(_cfg(micro, out, max_steps=4, log_every=1))
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"loss", "lr", "tokens_per_s", "val_loss"} <= set(acc.Tags()["scalars"])
    logged = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    tb = {e.step: e.value for e in acc.Scalars("loss")}
    assert tb.keys() == logged.keys()
    assert all(tb[k] == pytest.approx(logged[k], rel=1e-6) for k in logged)


def test_act_save_recipe_trains_close_to_the_default(micro, tmp_path):
    bf16 = build_model(
        ModelConfig(dim=32, n_layers=2, n_heads=2), parse_recipe("bf16[act_save=e4m3]")
    )
    assert [blk.feed_forward.act_save for blk in bf16.layers] == ["e4m3", "e4m3"]
    assert not any(isinstance(m, FP4Linear) for m in bf16.modules())  # bf16: no layer swapped
    plain = train(_cfg(micro, tmp_path / "plain", recipe="fp4-paper", max_steps=4))
    out = tmp_path / "e4m3"
    e4m3 = train(_cfg(micro, out, recipe="fp4-paper[act_save=e4m3]", max_steps=4))
    assert load_checkpoint(out)["recipe"]["act_save"] == "e4m3"
    a, b = [x[1] for x in _losses(tmp_path / "plain")], [x[1] for x in _losses(out)]
    assert len(b) == 4 and a[0] == b[0]  # same forward; E4M3 storage changes the gradients
    assert all(math.isfinite(y) and abs(y - x) < 0.02 * x for x, y in zip(a, b, strict=True))
    assert abs(e4m3["val_loss"] - plain["val_loss"]) < 0.02 * plain["val_loss"]
    with pytest.raises(CheckpointError, match="act_save 'e4m3' vs None"):
        train(_cfg(micro, out, recipe="fp4-paper", max_steps=6, resume=True))


def test_resume_takes_an_older_recipe_and_another_accumulation(micro, tmp_path):
    """A checkpoint whose recipe predates ``fast_accum`` and ``occ.compensation`` resumes
    (the missing fields take their defaults), also with ``fast_accum`` switched on (how the
    GEMMs sum, like grad_comm, not what the weights are); a real difference is still refused."""
    out = tmp_path / "run"
    train(_cfg(micro, out, recipe="fp4-paper", max_steps=4))
    latest = out / "checkpoints" / "latest.pt"
    ckpt = torch.load(latest, map_location="cpu", weights_only=True)
    del ckpt["recipe"]["fast_accum"], ckpt["recipe"]["occ"]["compensation"]
    torch.save(ckpt, latest)
    resumed = train(_cfg(micro, out, recipe="fp4-paper[fast_accum=true]", max_steps=6,
                         resume=True))  # fmt: skip
    assert math.isfinite(resumed["val_loss"])
    assert [x[0] for x in _losses(out)][-2:] == [5, 6]
    with pytest.raises(CheckpointError, match="differ in occ"):
        train(_cfg(micro, out, recipe="fp4-dge", max_steps=8, resume=True))


@pytest.mark.slow
def test_compiled_training_follows_eager(micro, tmp_path):
    """``--compile`` (each block compiled by Inductor: C++ on the CPU, ~1 min) trains as eager
    does: the same first loss, the later ones within FP4 rounding flips; the checkpoint loads
    into an uncompiled model."""
    eager = train(_cfg(micro, tmp_path / "eager", recipe="fp4-paper", max_steps=4))
    out = tmp_path / "compiled"
    compiled = train(_cfg(micro, out, recipe="fp4-paper", max_steps=4, compile=True))
    a, b = [x[1] for x in _losses(tmp_path / "eager")], [x[1] for x in _losses(out)]
    assert len(b) == 4 and b[0] == pytest.approx(a[0], rel=1e-5)
    assert all(abs(y - x) < 0.01 * x for x, y in zip(a, b, strict=True)), (a, b)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-2)
    state = load_checkpoint(out)["model"]
    assert not any("_orig_mod" in k for k in state)  # plain keys: loads without compile


def test_mismatched_state_dict_is_refused(micro, tmp_path):
    out = tmp_path / "run"
    train(_cfg(micro, out, max_steps=2, recipe="bf16"))
    ck = load_checkpoint(out)
    del ck["model"]["layers.0.attention.wqkv.weight"]
    broken = tmp_path / "broken.pt"
    save_checkpoint({k: v for k, v in ck.items() if k not in ("format", "version")}, broken)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        eval_checkpoint(broken, device="cpu")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(micro, tmp_path, monkeypatch):
    real_forward = LLaMA.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None):
        out = real_forward(self, idx, targets)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                return out * float("nan")
        return out

    monkeypatch.setattr(LLaMA, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="diverged at step 3.*last good checkpoint"):
        train(_cfg(micro, out, ckpt_every=2))
    assert load_checkpoint(out)["step"] == 2
    last = read_metrics(out)[-1]
    assert last["step"] == 3 and last["nonfinite"] and last["loss"] is None


def test_low_precision_adamw_trains_and_resumes_bit_for_bit(micro, tmp_path):
    kw = dict(optimizer="adamw-lp", recipe="bf16")
    straight = tmp_path / "straight"
    train(_cfg(micro, straight, **kw))
    opt = load_checkpoint(straight)["optimizer"]
    decay, no_decay = opt["param_groups"]  # build_optimizer's groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["exp_avg_dtype"] == "e4m3" and decay["exp_avg_sq_dtype"] == "float16"
    assert opt["state"][0]["exp_avg"].dtype == torch.float8_e4m3fn
    losses = [x[1] for x in _losses(straight)]
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    step4 = load_checkpoint(straight / "checkpoints" / "step_000004.pt")
    save_checkpoint(
        {k: v for k, v in step4.items() if k not in ("format", "version")},
        resumed / "checkpoints" / "latest.pt",
    )
    with pytest.raises(CheckpointError, match="optimizer 'adamw-lp'.*--optimizer adamw-lp"):
        train(_cfg(micro, resumed, recipe="bf16", resume=True))
    train(_cfg(micro, resumed, resume=True, **kw))
    assert _losses(resumed) == _losses(straight)[4:]  # steps 5..8, bit for bit


def test_eval_checkpoint_matches_training_eval(micro, tmp_path):
    out = tmp_path / "run"
    r = train(_cfg(micro, out, max_steps=3))
    e = eval_checkpoint(
        out, batch_size=4, max_batches=2, device="cpu", cache_dir=str(micro / "cache")
    )
    assert e["val_loss"] == r["val_loss"] and e["step"] == 3
    # a text file is encoded line by line with the checkpoint's tokenizer, exactly as the
    # data pipeline encodes its train + validation splits
    prepared = prepare_data(str(micro / "text.txt"), vocab_size=300, cache_dir=micro / "cache")
    e = eval_checkpoint(out, data=str(micro / "text.txt"), max_batches=1, device="cpu")
    assert e["tokens"] == len(prepared.train) + len(prepared.val)
    ids = train_mod._tokenize_file(micro / "text.txt", prepared.tokenizer.to_str())
    assert np.array_equal(ids, np.concatenate([prepared.train, prepared.val]))


def test_config_validation():
    for bad in (
        {"batch_size": 0},
        {"lr": -1.0},
        {"warmup_frac": 1.5},
        {"device": "tpu"},
        {"precision": "fp8"},
        {"resume": True},
        {"optimizer": "sgd"},
        {"parallel": "tp"},
    ):
        with pytest.raises(ConfigError):
            dataclasses.replace(TrainConfig(), **bad).validate()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", ["bf16", "fp4-paper", "fp4-paper[act_save=e4m3]"])
def test_trains_on_gpu_under_bf16_autocast(micro, tmp_path, recipe):
    out = tmp_path / recipe
    r = train(_cfg(micro, out, recipe=recipe, device="cuda", monitor_every=2))
    rows = read_metrics(out)
    assert all(math.isfinite(x["loss"]) for x in rows if "loss" in x)
    assert math.isfinite(r["val_loss"])
    ck = load_checkpoint(out)
    assert len(ck["rng"]["cuda"]) >= 1
    assert json.loads((out / "config.json").read_text())["autocast"] == "torch.bfloat16"
