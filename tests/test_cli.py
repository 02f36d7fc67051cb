"""The fp4train command: smoke runs, outputs, exit codes and error messages, help texts."""

import json
import math
import subprocess
import sys
import types

import pytest
from conftest import write_micro_run

from fp4train import cli
from fp4train.cli import main
from fp4train.model import LLaMA
from fp4train.train import read_metrics

WORDS = "and it came to pass that the people went up unto the city of light".split()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    write_micro_run(
        d, WORDS, 1000, 99, dim=32, n_layers=1, n_heads=2, ffn_hidden=64, max_seq_len=16
    )
    (d / "empty.txt").write_text("  \n")
    return d


def _args(micro, *extra) -> list[str]:
    return [
        "--model",
        str(micro / "micro.json"),
        "--data",
        str(micro / "text.txt"),
        "--vocab-size",
        "280",
        "--cache-dir",
        str(micro / "cache"),
        "--batch-size",
        "2",
        "--max-steps",
        "3",
        "--log-every",
        "1",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]


def test_train_then_eval(micro, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *_args(micro, "--out", str(out), "--set", "dge.k=3")]) == 0
    assert "done: 3 steps" in capsys.readouterr().out
    for f in ("config.json", "metrics.jsonl", "checkpoints/latest.pt", "loss.png", "eval.json"):
        assert (out / f).is_file(), f
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for r in train_rows:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(r)
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 3]
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["dge"]["k"] == 3 and config["recipe"]["name"] == "fp4-paper*"
    final = json.loads((out / "eval.json").read_text())
    assert final["val_ppl"] == pytest.approx(math.exp(final["val_loss"]))

    assert (
        main(
            [
                "eval",
                str(out),
                "--json",
                "--batch-size",
                "2",
                "--max-batches",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["val_loss"] == final["val_loss"] and r["step"] == 3  # same batches as training
    assert (
        main(
            [
                "eval",
                str(out / "checkpoints" / "latest.pt"),
                "--data",
                str(micro / "text.txt"),
                "--max-batches",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "perplexity" in capsys.readouterr().out


def test_resume_takes_the_runs_own_options(micro, tmp_path, capsys):
    """``--resume`` with only --out (and what to change) continues the run as it was started:
    its model, data, batch, LR, weight decay and seed come from its config.json, and only what
    is given changes (said in one line); a config.json that does not parse is an error that
    leaves the checkpoint as it was."""
    out = tmp_path / "run"
    first = ["--lr", "2e-3", "--weight-decay", "0.05", "--seed", "5", "--out", str(out)]
    assert main(["train", *_args(micro, *first)]) == 0
    started = json.loads((out / "config.json").read_text())["train"]
    common = ["--out", str(out), "--resume", "--cache-dir", str(micro / "cache"), "--no-progress"]
    capsys.readouterr()
    assert main(["train", *common, "--max-steps", "5"]) == 0
    printed = capsys.readouterr().out
    assert "settings unlike the checkpoint's: max_steps 3 -> 5 (" in printed, printed
    now = json.loads((out / "config.json").read_text())["train"]
    for key in ("model", "data", "vocab_size", "batch_size", "lr", "weight_decay", "seed"):
        assert now[key] == started[key], key
    assert (now["lr"], now["batch_size"], now["seed"]) == (2e-3, 2, 5)
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["tokens"] == 5 * 2 * 16  # the run's batch of 2 x 16 tokens throughout

    assert main(["train", *common, "--max-steps", "6", "--lr", "1e-3"]) == 0
    assert "max_steps 5 -> 6, lr 0.002 -> 0.001 (" in capsys.readouterr().out

    latest = out / "checkpoints" / "latest.pt"
    before = latest.read_bytes()
    (out / "config.json").write_text("{not json")
    assert main(["train", *common, "--max-steps", "8"]) == 2
    err = capsys.readouterr().err
    assert "config.json cannot be read" in err and len(err.strip().splitlines()) == 1, err
    assert latest.read_bytes() == before


def test_compare_two_recipes(micro, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            *_args(micro, "--recipes", "bf16,fp4-paper[occ.alpha=0.999]", "--out", str(out)),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| fp4-paper[occ.alpha=0.999] |" in printed and "gap to bf16" in printed
    for f in ("compare.png", "compare.md", "compare.json"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "compare.json").read_text())
    bf16, fp4 = summary["runs"]
    assert bf16["val_gap_pct"] == 0.0 and bf16["recipe_config"]["fwd_x"]["format"] is None
    assert fp4["recipe_config"]["occ"]["alpha"] == 0.999
    expect = 100 * (fp4["val_loss"] - bf16["val_loss"]) / bf16["val_loss"]
    assert fp4["val_gap_pct"] == pytest.approx(expect)
    # same model, data and seed: identical initial weights, so the first losses nearly agree
    first = [read_metrics(r["out_dir"])[0]["loss"] for r in summary["runs"]]
    assert first[0] == pytest.approx(first[1], rel=0.02)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--recipe", "fp5-magic"], "unknown recipe preset 'fp5-magic'"),
        (["train", "--data", "/no/such/file.txt"], "not found"),
        (["train", "--data", "{empty}"], "empty"),
        (["train", "--set", "dge.k"], "key=value"),
        (["train", "--set", "nonsense.field=1"], "unknown recipe field"),
        (["compare", "--recipes", "bf16,nope"], "unknown recipe preset 'nope'"),
        (["compare", "--recipes", "fp4-paper[dge.k=3"], "unbalanced"),
        (["train", "--max-steps", "0"], "positive integer"),
        (["train", "--frobnicate"], "unrecognized arguments"),
        (["eval", "{missing}"], "no checkpoint"),
        (["eval", "{text}"], "unreadable"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(micro, argv, needle, capsys):
    subst = {
        "{empty}": str(micro / "empty.txt"),
        "{missing}": str(micro / "nope.pt"),
        "{text}": str(micro / "text.txt"),
    }
    argv = [subst.get(a, a) for a in argv]
    if argv[0] != "eval":
        argv += ["--cache-dir", str(micro / "cache"), "--out", str(micro / "never")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (micro / "never").exists()


def test_diverging_run_exits_nonzero(micro, tmp_path, monkeypatch, capsys):
    real_forward = LLaMA.forward

    def inf_loss(self, idx, targets=None):
        out = real_forward(self, idx, targets)
        return out * math.inf if self.training and targets is not None else out

    monkeypatch.setattr(LLaMA, "forward", inf_loss)
    assert main(["train", *_args(micro, "--recipe", "bf16", "--out", str(tmp_path))]) == 1
    assert "diverged at step 1" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "compare", "eval"])
def test_help_has_examples(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"fp4train {command} " in text
    if command == "compare":
        for ablation in ("fwd_format=e1m2", "dge.k=3", "occ.alpha=0.999", "fwd_granularity=tensor"):
            assert ablation in text


def test_python_dash_m_help():
    r = subprocess.run(
        [sys.executable, "-m", "fp4train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0
    for command in ("train", "compare", "eval", "speedup", "bench"):
        assert command in r.stdout


def test_delegated_commands(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("fp4train.bench")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "fp4train.bench", fake)
    assert main(["bench", "--shape", "4096", "--help"]) == 7
    assert seen == [["--shape", "4096", "--help"]]
    monkeypatch.setitem(sys.modules, "fp4train.speedup", None)  # as if not installed
    assert cli.main(["speedup"]) == 2
    assert "fp4train.speedup is not available" in capsys.readouterr().err
