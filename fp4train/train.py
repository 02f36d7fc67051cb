"""Training loop: AdamW, warm-up + cosine schedule, clipping, accumulation, checkpoints, eval.

``train(TrainConfig(...))`` runs one training job and returns its final metrics; the
``fp4train train`` command is a thin shell around it, ``fp4train compare`` calls it once per
recipe (:func:`compare`). Read top to bottom: configuration, recipe parsing, schedule and
optimizer, checkpoints, evaluation, the loop, compare.

Choices (the paper's where it states them):

- AdamW β = (0.9, 0.95), ε = 1e-8, weight decay 0.1 on the matrices of linear layers only
  (LM head included); norms, biases and embeddings are not decayed (a tied LM head is an
  embedding, so not decayed either).
- LR: linear warm-up over ``warmup_frac`` (5%) of the steps, then cosine to ``min_lr_frac``
  (10%) of the peak at the last step.
- Gradients clipped to global norm ``grad_clip`` (1.0), after ``grad_accum`` micro-batches.
- Precision: master weights float32; BF16 autocast on CUDA, float32 on CPU (``precision``).
- A step whose loss or gradient norm is NaN/Inf (or whose FP4 layers refuse NaN/Inf inputs)
  is not applied: training stops with :class:`NonFiniteLossError`, and the checkpoints on
  disk are the last good ones.
- Checkpoints are written to a temporary file and moved into place with ``os.replace``, so a
  crash mid-write never damages the previous one. Each holds model, optimizer, scheduler,
  data position, every RNG state and the tokenizer: on CPU a resumed run's losses equal the
  uninterrupted run's bit for bit.
- ``optimizer="adamw-lp"``: :class:`fp4train.optim.LowPrecisionAdamW` (FP8 E4M3 first moment,
  FP16 second, FP32 math), same parameter groups; a checkpoint resumes only with the
  optimizer that wrote it.

Data parallelism (``parallel``; launch with torchrun, see :mod:`fp4train.distributed`):
``batch_size`` stays the *global* batch of a micro-step. Every rank draws the same global
batch (same seed, same position) and takes its contiguous slice of rows ``[r·B/W, (r+1)·B/W)``;
the loss is a token mean over equal slices, so DDP's / FSDP2's gradient average is the
gradient of the global batch, and a run on W processes follows the 1-process run (float32 on
CPU: equal to rounding). Quantized recipes compute some scales over the local batch (dY's
column scales in wgrad, a per-tensor OCC quantile), so there the runs differ by quantization
noise, as in any data-parallel FP8/FP4 training. The logged loss is the mean over ranks,
validation splits each batch over the ranks and sums, and a NaN/Inf loss or gradient norm
(the same number on every rank) stops all of them. Rank 0 alone writes files and prints.
Checkpoints hold the full, unsharded state in the single-process layout
(:func:`fp4train.distributed.get_full_state`), so a run saved on N processes resumes on M,
or on one, and ``fp4train eval`` reads it.

Outputs in ``out_dir``: config.json, metrics.jsonl (one object per logged step: step, loss,
lr, tokens, tokens_per_s, grad_norm; and objects with val_loss at eval steps, with "monitor"
at monitor steps), checkpoints/ (step_NNNNNN.pt, the last ``keep_ckpts`` kept, and latest.pt),
tokenizer.json, loss.png, eval.json (final val_loss, val_ppl), monitor_summary.md with
``monitor_every``, and TensorBoard event files when ``tensorboard`` is installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fp4train.recipe import Recipe

__all__ = [
    "TrainConfig",
    "ConfigError",
    "CheckpointError",
    "NonFiniteLossError",
    "parse_recipe",
    "split_recipe_list",
    "lr_multiplier",
    "build_optimizer",
    "OPTIMIZERS",
    "PARALLEL",
    "build_model",
    "save_checkpoint",
    "load_checkpoint",
    "evaluate",
    "train",
    "eval_checkpoint",
    "compare",
    "compare_table",
    "read_metrics",
]

_CKPT_FORMAT = "fp4train-checkpoint"
_CKPT_VERSION = 1
_CKPT_KEYS = (
    "step",
    "model",
    "optimizer",
    "scheduler",
    "batcher",
    "rng",
    "model_config",
    "recipe",
    "train_config",
)
_DEFAULT_LR = {"tiny": 4e-3}  # measured: the tiny model on the embedded corpus; else 3e-4
_FINAL_LOSS_WINDOW = 20  # "final train loss" = mean over the last this many steps
OPTIMIZERS = ("adamw", "adamw-lp")
PARALLEL = ("auto", "none", "ddp", "fsdp")


# ---------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Everything a training run needs; defaults train the tiny model on a CPU in minutes.

    ``model`` is a name from ``fp4train.model.CONFIGS`` or a JSON file of ModelConfig fields;
    ``recipe`` a preset name, ``"name[key=value,...]"`` or a recipe JSON file, with
    ``overrides`` (``["dge.k=3", ...]``) applied on top. ``data`` None uses the embedded corpus.
    ``seq_len`` None uses the model's ``max_seq_len``; ``lr`` None a per-model default (4e-3 for
    tiny, else the paper's 3e-4). ``precision``: "auto" (BF16 autocast on CUDA, float32 on
    CPU), "bf16" or "fp32". ``monitor_every`` > 0 logs quantization statistics every that many
    steps. ``resume`` continues from ``out_dir``/checkpoints/latest.pt with this config's
    schedule and hyperparameters from the step it reached (each one unlike the checkpoint's is
    printed; the model and the recipe must match it; ``fp4train train --resume`` fills the
    options not given from the run's config.json). ``optimizer``: "adamw"
    or "adamw-lp" (FP8/FP16 states). ``parallel``: "auto" (DDP when torchrun started more
    than one process, else none), "none", "ddp" or "fsdp"; ``batch_size`` is the global batch
    per micro-step, divided over the processes.
    """

    model: str = "tiny"
    recipe: str = "fp4-paper"
    overrides: list[str] = field(default_factory=list)
    data: str | None = None
    vocab_size: int = 4096
    cache_dir: str | None = None
    seq_len: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 200
    lr: float | None = None
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 5
    ckpt_every: int = 100
    keep_ckpts: int = 2
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    monitor_every: int = 0
    out_dir: str | None = None
    resume: bool = False
    progress: bool = True
    optimizer: str = "adamw"
    parallel: str = "auto"

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        for name in (
            "vocab_size",
            "batch_size",
            "grad_accum",
            "max_steps",
            "eval_every",
            "eval_batches",
            "log_every",
            "ckpt_every",
            "keep_ckpts",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 1):
            raise ConfigError(f"seq_len must be a positive integer, got {self.seq_len!r}")
        if self.monitor_every < 0:
            raise ConfigError(f"monitor_every must be >= 0, got {self.monitor_every}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        for name in ("warmup_frac", "min_lr_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "eps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.resume and self.out_dir is None:
            raise ConfigError("resume needs out_dir (--out DIR): the run to continue")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")


class ConfigError(ValueError):
    """A bad setting or input (unknown recipe, missing data file, ...); the CLI exits 2."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model being built."""


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/Inf; the update was not applied."""


# ---------------------------------------------------------------------------- recipes
_SPEC_RE = re.compile(r"^\s*([^\[\]]+?)\s*(?:\[(.*)\])?\s*$")


def split_recipe_list(text: str) -> list[str]:
    """Split ``"bf16,fp4-paper[dge.k=3,occ.alpha=0.999]"`` at the commas outside brackets."""
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"unbalanced ']' in recipe list {text!r}")
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if depth:
        raise ConfigError(f"unbalanced '[' in recipe list {text!r}")
    items.append(cur.strip())
    if any(not it for it in items):
        raise ConfigError(f"empty recipe name in list {text!r}")
    return items


def parse_recipe(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A Recipe from ``"preset"``, ``"preset[key=value,...]"`` or a recipe JSON file, with the
    ``key=value`` ``overrides`` applied after the bracketed ones (``Recipe.with_overrides``).

    Raises :class:`ConfigError` for an unknown preset, a bad override or an unreadable file.
    """
    m = _SPEC_RE.match(spec)
    if m is None:
        raise ConfigError(f"cannot parse recipe {spec!r}; write e.g. fp4-paper[dge.k=3]")
    base, inner = m.group(1), m.group(2)
    local = [s.strip() for s in inner.split(",") if s.strip()] if inner else []
    try:
        if base.endswith(".json"):
            path = Path(base)
            if not path.is_file():
                raise ConfigError(f"recipe file {base!r} does not exist")
            recipe = Recipe.from_dict(json.loads(path.read_text(encoding="utf-8")))
        else:
            recipe = Recipe.preset(base)
        items = local + list(overrides)
        return recipe.with_overrides(items) if items else recipe
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # Recipe validation, JSON, unknown fields
        raise ConfigError(f"recipe {spec!r}: {e}") from e


# ---------------------------------------------------------------------------- optimizer
def lr_multiplier(step: int, max_steps: int, warmup_frac: float, min_lr_frac: float) -> float:
    """Factor on the peak LR for update ``step`` (0-based): linear warm-up over
    ``round(warmup_frac · max_steps)`` steps, then cosine from 1 to ``min_lr_frac``."""
    warmup = round(warmup_frac * max_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - 1 - warmup))
    return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW (``cfg.optimizer`` "adamw") or LowPrecisionAdamW ("adamw-lp") with weight decay
    on linear-layer matrices only (see the module docstring)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # tied parameters appear once
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embedding_params else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adamw-lp":
        from fp4train.optim import LowPrecisionAdamW

        return LowPrecisionAdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same directory, fsync,
    then ``os.replace``. A crash at any point leaves the previous file at ``path`` intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": _CKPT_FORMAT, "version": _CKPT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU.

    Raises :class:`CheckpointError` if the file is missing, unreadable (truncated, corrupt),
    or not an fp4train checkpoint with every expected entry.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "latest.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(
            f"checkpoint {str(path)!r} is unreadable (corrupt or truncated?): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CKPT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an fp4train checkpoint")
    if ckpt.get("version") != _CKPT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has version {ckpt.get('version')}, "
            f"this fp4train reads version {_CKPT_VERSION}"
        )
    missing = [k for k in _CKPT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks entries {missing}")
    return ckpt


def _write_checkpoint(state: dict, ckpt_dir: Path, step: int, keep: int) -> Path:
    """``ckpt_dir``/step_NNNNNN.pt, then latest.pt pointing at it; keep the last ``keep``."""
    path = save_checkpoint(state, ckpt_dir / f"step_{step:06d}.pt")
    latest_tmp = ckpt_dir / ".latest.pt.link"
    latest_tmp.unlink(missing_ok=True)
    try:
        os.link(path, latest_tmp)  # same bytes, no second write
    except OSError:
        import shutil

        shutil.copyfile(path, latest_tmp)
    os.replace(latest_tmp, ckpt_dir / "latest.pt")
    for old in sorted(ckpt_dir.glob("step_*.pt"))[:-keep]:
        old.unlink()
    return ckpt_dir / "latest.pt"


def _load_model_state(model: nn.Module, ckpt: dict, path: Path) -> None:
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit the model: {str(e).splitlines()[0]} ..."
        ) from e


# the settings a resumed run may change, each said when it does: the schedule, the optimizer's
# hyperparameters (its state brings back the saved ones; this run's are applied again after
# it loads: _apply_settings), clipping, and what the batches are (the data order is a
# function of seed, batch size and step). The model and the recipe must stay (checked below).
_RESUME_SETTINGS = (
    "max_steps", "lr", "warmup_frac", "min_lr_frac", "weight_decay", "beta1", "beta2", "eps",
    "grad_clip", "batch_size", "grad_accum", "seq_len", "seed", "precision",
)  # fmt: skip


def _resume_changes(ckpt: dict, cfg: TrainConfig, peak_lr: float, seq_len: int) -> list[str]:
    """Each of _RESUME_SETTINGS this run sets unlike checkpoint ``ckpt``, as "name old -> new"
    (its peak LR read from its scheduler, its sequence length resolved like this run's)."""
    then = dict(ckpt["train_config"])
    then["lr"] = ckpt["scheduler"]["base_lrs"][0]
    then["seq_len"] = then.get("seq_len") or ckpt["model_config"]["max_seq_len"]
    now = dataclasses.asdict(cfg) | {"lr": peak_lr, "seq_len": seq_len}
    return [
        f"{k} {then[k]!r} -> {now[k]!r}"
        for k in _RESUME_SETTINGS
        if k in then and then[k] != now[k]
    ]


def _settings(optimizer) -> list[dict]:
    """Each parameter group's hyperparameters (everything but its parameters)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _apply_settings(optimizer, scheduler, ours: list[dict]) -> None:
    """Loading a checkpoint's optimizer and scheduler states brings back the saved
    hyperparameters; this run's (``ours``: :func:`_settings` from before the load, as
    build_optimizer and the scheduler set them) are applied again, and the LR at the step
    reached follows this run's schedule. Nothing changed: the very numbers the states held
    (LambdaLR's ``base_lr * lambda(last_epoch)``)."""
    for group, settings in zip(optimizer.param_groups, ours, strict=True):
        group.update(settings)
    scheduler.base_lrs = [settings["initial_lr"] for settings in ours]
    for group, lam, base in zip(
        optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs, strict=True
    ):
        group["lr"] = base * lam(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _restore(
    path, model, optimizer, scheduler, batcher, model_config, recipe, cfg, *, sharded, device,
    peak_lr, seq_len,
):  # fmt: skip
    """Load a run's state from checkpoint ``path`` into ``model`` (a DDP / FSDP2 model when
    ``sharded``, every rank reading the file), keeping this run's hyperparameters (peak LR
    ``peak_lr``); return (step, recent losses, the settings changed: see _resume_changes)."""
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:  # name the step checkpoints that could stand in for it
        # (not the one latest.pt is a hard link of: the same damaged bytes)
        older = [
            p
            for p in sorted(Path(path).parent.glob("step_*.pt"))
            if not (Path(path).exists() and os.path.samefile(p, path))
        ]
        if not older:
            raise
        names = ", ".join(p.name for p in older)
        raise CheckpointError(
            f"{str(e).rstrip('.')}. The run's step checkpoints: {names}; copy one to "
            f"{Path(path).name} to resume from it"
        ) from e
    if ckpt["model_config"] != model_config.to_dict():
        raise CheckpointError(
            f"checkpoint {path} was trained with model config {ckpt['model_config']}, "
            f"but this run builds {model_config.to_dict()}"
        )
    # the name is a label; grad_comm only changes how gradients travel (a run with FP8
    # gradient communication may resume on one process, which has nothing to communicate) and
    # fast_accum how the GEMMs sum. Fields newer than the checkpoint take their defaults.
    try:
        theirs = Recipe.from_dict(ckpt["recipe"]).to_dict()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} holds an invalid recipe: {e}") from e
    differ = [
        f"{k} {theirs.get(k)!r} vs {v!r}"
        for k, v in recipe.to_dict().items()
        if k not in ("name", "grad_comm", "fast_accum") and theirs.get(k) != v
    ]
    if differ:
        raise CheckpointError(
            f"checkpoint {path} was trained with recipe {ckpt['recipe']['name']!r}, this run "
            f"uses {recipe.name!r}; they differ in {'; '.join(differ)}"
        )
    saved_optimizer = ckpt["train_config"].get("optimizer", "adamw")
    if saved_optimizer != cfg.optimizer:
        raise CheckpointError(
            f"checkpoint {path} holds the state of optimizer {saved_optimizer!r}, but this run "
            f"uses {cfg.optimizer!r}; resume with --optimizer {saved_optimizer}"
        )
    ours = _settings(optimizer)
    if sharded:
        from fp4train.distributed import set_full_state

        try:
            set_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"checkpoint {path} does not fit this run: {str(e).splitlines()[0]} ..."
            ) from e
    else:
        _load_model_state(model, ckpt, path)
    try:
        if not sharded:
            optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        batcher.load_state_dict(ckpt["batcher"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this run: {e}") from e
    _set_rng_state(ckpt["rng"], device)
    _apply_settings(optimizer, scheduler, ours)
    changes = _resume_changes(ckpt, cfg, peak_lr, seq_len)
    return ckpt["step"], ckpt.get("recent_losses", []), changes


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    # the training GPU's generator only: touching every visible GPU would, under torchrun,
    # open a context on each from each rank
    cuda = device.type == "cuda" and torch.cuda.is_initialized()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if cuda else [],
        # numpy / python states as plain lists so torch.load(weights_only=True) reads them
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][0], device)
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> float:
    """Mean next-token cross-entropy of ``model`` over ``tokens`` (sequential windows from
    ``fp4train.data.eval_batches``), in eval mode; the model's mode is restored after.

    With ``world_size`` > 1 (a process group initialized, every rank calling) rank r scores
    rows ``[r·n/W, (r+1)·n/W)`` of each batch of n windows and the token-weighted sums are
    all-reduced: every rank returns the loss one process would compute.
    """
    from fp4train.data import eval_batches

    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, batch_size, seq_len, max_batches=max_batches):
        n = len(x)
        lo, hi = rank * n // world_size, (rank + 1) * n // world_size
        # a last batch with fewer windows than ranks leaves some ranks none; they still run
        # one window (FSDP2's forward is collective) and do not count it
        weight = 1.0 if hi > lo else 0.0
        x, y = (x[lo:hi], y[lo:hi]) if hi > lo else (x[:1], y[:1])
        x, y = _to_device(x, device), _to_device(y, device)
        with _autocast(device, autocast_dtype):
            loss = model(x, y)
        total += float(loss) * y.numel() * weight
        count += int(y.numel() * weight)
    model.train(was_training)
    if world_size > 1:
        from fp4train.distributed import all_reduce_sum

        sums = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64, device=device))
        total, count = sums[0].item(), int(sums[1].item())
    if count == 0:
        raise ValueError(
            f"no evaluation batch: {len(tokens)} tokens are fewer than seq_len + 1 = {seq_len + 1}"
        )
    return total / count


def _to_device(t, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.long).to(device, non_blocking=True)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


# ---------------------------------------------------------------------------- run setup
def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _prepare_data(data: str | None, vocab_size: int, cache_dir: str | None):
    from fp4train.data import prepare_data

    try:
        return prepare_data(data, vocab_size=vocab_size, cache_dir=cache_dir)
    except FileNotFoundError as e:
        raise ConfigError(f"data file not found: {data} ({e})") from e
    except (ValueError, IsADirectoryError, UnicodeDecodeError) as e:
        raise ConfigError(f"data {data or '(embedded corpus)'}: {e}") from e


def _model_config(name: str, vocab_size: int):
    from fp4train.model import get_config

    try:
        return get_config(name, vocab_size=vocab_size)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise ConfigError(f"model {name!r}: {e}") from e


def build_model(model_config, recipe: Recipe) -> nn.Module:
    """A float32 LLaMA on the CPU, converted to ``recipe`` unless it quantizes nothing (then
    only its ``act_save`` is set)."""
    from fp4train.convert import convert, set_act_save
    from fp4train.model import LLaMA

    model = LLaMA(model_config)
    if recipe.quantized:
        convert(model, recipe)
    else:  # a recipe without quantized operands equals plain nn.Linear
        set_act_save(model, recipe.act_save)
    return model


def _default_out_dir(label: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{_slug(label)}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")


def _tokenizer_json(tokenizer) -> str | None:
    to_str = getattr(tokenizer, "to_str", None)
    return to_str() if callable(to_str) else None


class _MetricsLog:
    """metrics.jsonl (and TensorBoard when installed); on resume, rows past the checkpoint's
    step (from a run that crashed after it) are dropped so the file reads as one run."""

    def __init__(self, out_dir: Path, resume_step: int | None):
        self.path = out_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        else:
            self.path.write_text("")
        self.file = self.path.open("a", encoding="utf-8")
        self.tb = _tensorboard_writer(out_dir)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(_json_safe(row)) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key in ("loss", "lr", "tokens_per_s", "grad_norm", "val_loss"):
                v = row.get(key)
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(key, v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class _NullLog:
    """The metrics log of ranks other than 0: they compute, rank 0 writes."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _tensorboard_writer(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def _json_safe(obj: Any) -> Any:
    """NaN/Inf floats become null (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl file (or of ``DIR/metrics.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON at ``path``, whole or not at all (a temporary file, then a rename):
    --resume reads the run's options back from config.json."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(_json_safe(obj), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _echo(msg: str, bar) -> None:
    if bar is not None:
        bar.write(msg)
    else:
        print(msg, flush=True)


def _parallel_mode(cfg: TrainConfig, world: int) -> str:
    """``cfg.parallel`` resolved for ``world`` launched processes; ConfigError for settings
    that cannot work, checked before any process group is joined."""
    parallel = cfg.parallel
    if parallel == "auto":
        parallel = "ddp" if world > 1 else "none"
    launch = "torchrun --nproc-per-node N -m fp4train train --parallel ddp ..."
    if parallel == "none" and world > 1:
        raise ConfigError(
            f"--parallel none, but torchrun started {world} processes: each would train the same "
            "model alone; use --parallel ddp or fsdp"
        )
    if parallel != "none" and "RANK" not in os.environ:
        raise ConfigError(f"--parallel {parallel} needs a torchrun launch: {launch}")
    if parallel == "none":
        return parallel
    if cfg.batch_size % world:
        raise ConfigError(
            f"batch_size {cfg.batch_size} (the global batch) must be divisible by the "
            f"{world} processes; each takes batch_size / {world} rows"
        )
    if cfg.device.startswith("cuda:"):
        raise ConfigError(
            f"device {cfg.device!r} under torchrun: each process takes the GPU of its "
            "LOCAL_RANK; use --device cuda or auto"
        )
    if cfg.out_dir is None:
        raise ConfigError(
            "under torchrun name the output directory (--out DIR or --name NAME): the default "
            "holds a timestamp, which the processes might not agree on"
        )
    return parallel


# ---------------------------------------------------------------------------- training
def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one training job; return its final metrics.

    Returns a dict with ``out_dir``, ``recipe``, ``step``, ``tokens``, ``train_loss`` (mean of
    the last 20 steps), ``val_loss``, ``val_ppl``, ``elapsed_s``, ``tokens_per_s``, ``params``.
    Raises :class:`ConfigError` for bad settings or inputs (before any training),
    :class:`CheckpointError` for an unusable checkpoint on resume and
    :class:`NonFiniteLossError` when the loss diverges.

    Under torchrun with ``parallel`` "ddp" or "fsdp" every process calls it; it joins the
    process group (left open: ``fp4train.distributed.cleanup()`` ends it) and returns the
    same metrics on every rank, rank 0 alone writing files.
    """
    from tqdm.auto import tqdm

    from fp4train import distributed as fdist

    cfg.validate()
    recipe = parse_recipe(cfg.recipe, cfg.overrides)
    try:
        world = fdist.launched_world_size()
    except ValueError as e:
        raise ConfigError(str(e)) from e
    parallel = _parallel_mode(cfg, world)
    if parallel == "none":
        rank, world, device = 0, 1, _resolve_device(cfg.device)
    else:
        rank, world, _, device = fdist.init_from_env(cfg.device)
    main = rank == 0
    out_dir = Path(cfg.out_dir) if cfg.out_dir else _default_out_dir(cfg.recipe)
    ckpt_dir = out_dir / "checkpoints"
    if not cfg.resume and (ckpt_dir / "latest.pt").exists():
        raise ConfigError(
            f"{out_dir} already holds a run; pass --resume to continue it or pick another --out"
        )
    if not main:
        fdist.barrier()  # rank 0 tokenizes and fills the cache first; the others read it
    data = _prepare_data(cfg.data, cfg.vocab_size, cfg.cache_dir)
    if main:
        fdist.barrier()
    model_config = _model_config(cfg.model, data.vocab_size)
    seq_len = cfg.seq_len or model_config.max_seq_len
    if seq_len > model_config.max_seq_len:
        raise ConfigError(
            f"seq_len {seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}"
        )
    for split, tokens in (("train", data.train), ("validation", data.val)):
        if len(tokens) < seq_len + 1:
            raise ConfigError(
                f"the {split} split has {len(tokens)} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1}; use more text or a smaller --seq-len"
            )
    amp_dtype = _autocast_dtype(cfg.precision, device)
    peak_lr = cfg.lr if cfg.lr is not None else _DEFAULT_LR.get(cfg.model, 3e-4)

    from fp4train.data import Batcher

    _seed_everything(cfg.seed)
    model = build_model(model_config, recipe)
    n_params = model.num_params()
    if cfg.compile:  # per block, before wrapping (torchtitan's order): one graph for all
        from fp4train.model import compile_blocks

        compile_blocks(model)
    if parallel == "none":
        wrapped = model.to(device)
    else:
        # DDP: `wrapped` holds `model`; FSDP2: `wrapped` is `model`, sharded in place
        fp8_comm = fdist.FP8CommState(recipe.grad_comm) if recipe.grad_comm else False
        wrapped = fdist.wrap_model(model, parallel, fp8_comm=fp8_comm, device=device)
    optimizer = build_optimizer(model, cfg, peak_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_multiplier(s, cfg.max_steps, cfg.warmup_frac, cfg.min_lr_frac),
    )
    # every rank draws the global batch and keeps its rows: the stream does not depend on world
    batcher = Batcher(data.train, cfg.batch_size // world, seq_len, cfg.seed, rank, world)
    start_step, recent, changes = 0, deque(maxlen=_FINAL_LOSS_WINDOW), []
    sharded = parallel != "none"
    if cfg.resume:
        start_step, losses, changes = _restore(
            ckpt_dir / "latest.pt",
            wrapped if sharded else model,
            optimizer,
            scheduler,
            batcher,
            model_config,
            recipe,
            cfg,
            sharded=sharded,
            device=device,
            peak_lr=peak_lr,
            seq_len=seq_len,
        )
        if start_step >= cfg.max_steps:
            raise ConfigError(
                f"{ckpt_dir / 'latest.pt'} is at step {start_step}, max_steps is "
                f"{cfg.max_steps}: nothing to do; raise --max-steps to train on"
            )
        recent.extend(losses)
    # DDP's replica evaluates without collectives; an FSDP2 model needs every rank's forward
    eval_model = model if parallel == "ddp" else wrapped
    monitor = None
    if cfg.monitor_every:
        from fp4train.monitor import QuantMonitor

        monitor = QuantMonitor(model)

    tok_json = _tokenizer_json(data.tokenizer)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(
            out_dir / "config.json",
            {
                "train": dataclasses.asdict(cfg)
                | {"lr": peak_lr, "seq_len": seq_len, "out_dir": str(out_dir)},
                "model": model_config.to_dict(),
                "recipe": recipe.to_dict(),
                "data": {
                    "source": data.source,
                    "vocab_size": data.vocab_size,
                    "train_tokens": len(data.train),
                    "val_tokens": len(data.val),
                },
                "params": n_params,
                "device": str(device),
                "parallel": parallel,
                "world_size": world,
                "autocast": str(amp_dtype) if amp_dtype else None,
                "resumed_from_step": start_step if cfg.resume else None,
                "torch": torch.__version__,
            },
        )
        if tok_json is not None:
            (out_dir / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    log = _MetricsLog(out_dir, start_step if cfg.resume else None) if main else _NullLog()

    tokens_per_step = cfg.batch_size * seq_len * cfg.grad_accum  # global
    last_ckpt = ckpt_dir / "latest.pt" if cfg.resume else None

    def checkpoint(step: int) -> Path:
        if sharded:  # collective: every rank takes part, rank 0 receives the full state
            model_state, optim_state = fdist.get_full_state(wrapped, optimizer)
        else:
            model_state, optim_state = model.state_dict(), optimizer.state_dict()
        if main:
            _write_checkpoint(
                {
                    "step": step,
                    "model": model_state,
                    "optimizer": optim_state,
                    "scheduler": scheduler.state_dict(),
                    "batcher": batcher.state_dict(),
                    "rng": _rng_state(device),
                    "recent_losses": list(recent),
                    "model_config": model_config.to_dict(),
                    "recipe": recipe.to_dict(),
                    "train_config": dataclasses.asdict(cfg),
                    "data": {"source": data.source, "vocab_size": data.vocab_size},
                    "tokenizer": tok_json,
                },
                ckpt_dir,
                step,
                cfg.keep_ckpts,
            )
        fdist.barrier()  # the checkpoint is complete when any rank goes on
        return ckpt_dir / "latest.pt"

    def run_eval(step: int) -> float:
        val = evaluate(
            eval_model,
            data.val,
            cfg.batch_size,
            seq_len,
            cfg.eval_batches,
            device,
            amp_dtype,
            rank=rank,
            world_size=world,
        )
        log.write(
            {
                "step": step,
                "tokens": step * tokens_per_step,
                "val_loss": val,
                "val_ppl": math.exp(min(val, 700)),
            }
        )
        return val

    def diverged(step: int, loss: float, norm: float, what: str) -> NonFiniteLossError:
        log.write({"step": step, "loss": loss, "grad_norm": norm, "nonfinite": True})
        keep = (
            f"the last good checkpoint is {last_ckpt}; continue from it with --resume (perhaps "
            "with a lower --lr)"
            if last_ckpt is not None
            else "no checkpoint was written before it"
        )
        return NonFiniteLossError(
            f"training diverged at step {step}: {what}. The update was not applied; {keep}."
        )

    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    progress = cfg.progress and main
    bar = tqdm(
        total=cfg.max_steps,
        initial=start_step,
        unit="step",
        dynamic_ncols=True,
        disable=not progress,
        desc=f"{recipe.name}",
    )
    bar_or_none = bar if progress else None
    echo = (lambda msg: _echo(msg, bar_or_none)) if main else (lambda msg: None)
    where = f"{world} processes ({parallel})" if sharded else f"device {device}"
    echo(
        f"fp4train: {n_params / 1e6:.2f}M params, recipe {recipe.name}, "
        f"{data.source}: {len(data.train):,} train / {len(data.val):,} val tokens, "
        f"{tokens_per_step:,} tokens/step, {where}, out {out_dir}"
    )
    if changes:  # a resumed run set otherwise than its checkpoint: said, then applied
        echo(
            f"resuming at step {start_step} with settings unlike the checkpoint's: "
            f"{', '.join(changes)} (LR of step {start_step + 1}: "
            f"{optimizer.param_groups[0]['lr']:.3g})"
        )
    t_start, train_time, interval_time, interval_tokens = time.perf_counter(), 0.0, 0.0, 0
    val_loss = None
    model.train()
    try:
        for step in range(start_step, cfg.max_steps):
            t0 = time.perf_counter()
            n = step + 1  # updates done after this one
            monitoring = monitor is not None and n % cfg.monitor_every == 0
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = batcher.next_batch()
                x, y = _to_device(x, device), _to_device(y, device)
                if monitoring and micro == 0:
                    monitor.start()
                # DDP: all-reduce once per step, in the last micro-batch's backward
                no_sync = parallel == "ddp" and micro < cfg.grad_accum - 1
                try:
                    with wrapped.no_sync() if no_sync else contextlib.nullcontext():
                        with _autocast(device, amp_dtype):
                            loss = wrapped(x, y)
                        (loss / cfg.grad_accum).backward()
                except ValueError as e:
                    if "NaN" not in str(e):
                        raise
                    # an FP4 layer refused non-finite activations or gradients (on this rank;
                    # under torchrun its exit ends the other ranks)
                    raise diverged(n, math.nan, math.nan, str(e)) from e
                if monitoring and micro == 0:
                    log.write({"step": n, "monitor": monitor.stop()})
                loss_sum += loss.detach().float()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor; the norm over all shards
                grad_norm = grad_norm.full_tensor()
            # the mean over ranks of equal-size token means: the global batch's loss
            loss_mean = fdist.all_reduce_sum(loss_sum) / (world * cfg.grad_accum)
            # both numbers are equal on every rank, so every rank stops at the same step
            loss_val, norm_val = torch.stack([loss_mean, grad_norm.float()]).tolist()
            if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
                raise diverged(n, loss_val, norm_val, f"loss {loss_val}, grad norm {norm_val}")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            recent.append(loss_val)
            dt = time.perf_counter() - t0
            train_time += dt
            interval_time += dt
            interval_tokens += tokens_per_step
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}")
            if n % cfg.log_every == 0 or n in (1, cfg.max_steps):
                tps = interval_tokens / interval_time
                log.write(
                    {
                        "step": n,
                        "loss": loss_val,
                        "lr": lr,
                        "tokens": n * tokens_per_step,
                        "tokens_per_s": tps,
                        "grad_norm": norm_val,
                        "elapsed_s": time.perf_counter() - t_start,
                    }
                )
                if not cfg.progress and main:
                    print(
                        f"step {n}/{cfg.max_steps} loss {loss_val:.4f} lr {lr:.2e} "
                        f"{tps:,.0f} tok/s",
                        flush=True,
                    )
                interval_time, interval_tokens = 0.0, 0
            if n % cfg.eval_every == 0 or n == cfg.max_steps:
                val_loss = run_eval(n)
                echo(f"step {n}: val_loss {val_loss:.4f} (ppl {math.exp(val_loss):.1f})")
            if n % cfg.ckpt_every == 0 or n == cfg.max_steps:
                last_ckpt = checkpoint(n)
    finally:
        bar.close()
        log.close()
        if monitor is not None:
            monitor.remove()
    elapsed = time.perf_counter() - t_start

    final = {
        "out_dir": str(out_dir),
        "recipe": recipe.name,
        "step": cfg.max_steps,
        "tokens": cfg.max_steps * tokens_per_step,
        "train_loss": sum(recent) / len(recent),
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "elapsed_s": elapsed,
        "tokens_per_s": (cfg.max_steps - start_step) * tokens_per_step / train_time,
        "params": n_params,
    }
    if not main:
        return final
    _write_json(out_dir / "eval.json", final)
    from fp4train.plots import plot_losses

    plot_losses(
        {recipe.name: read_metrics(out_dir)},
        out_dir / "loss.png",
        title=f"{Path(cfg.model).stem} / {recipe.name}",
    )
    if monitor is not None and monitor.history:
        (out_dir / "monitor_summary.md").write_text(monitor.summary_markdown(), encoding="utf-8")
    return final


# ---------------------------------------------------------------------------- eval
def eval_checkpoint(
    path: str | Path,
    data: str | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: str = "auto",
    cache_dir: str | None = None,
) -> dict:
    """Validation loss and perplexity of a checkpoint (a file, or a run directory).

    ``data`` None evaluates on the validation split of the data the checkpoint was trained on
    (the embedded corpus by default); a path evaluates on that whole text file, tokenized with
    the checkpoint's tokenizer. Returns ``{val_loss, val_ppl, tokens, step, checkpoint,
    data}``.
    """
    from fp4train.model import ModelConfig

    path = Path(path)
    ckpt_path = path / "checkpoints" / "latest.pt" if path.is_dir() else path
    ckpt = load_checkpoint(ckpt_path)
    model_config = ModelConfig.from_dict(ckpt["model_config"])
    recipe = Recipe.from_dict(ckpt["recipe"])
    train_cfg = ckpt["train_config"]
    seq_len = train_cfg.get("seq_len") or model_config.max_seq_len
    if data is None:
        prepared = _prepare_data(train_cfg.get("data"), train_cfg["vocab_size"], cache_dir)
        if _tokenizer_json(prepared.tokenizer) != ckpt.get("tokenizer"):
            raise CheckpointError(
                f"the tokenizer of {prepared.source} differs from the one checkpoint "
                f"{ckpt_path} was trained with; pass the text to evaluate with --data"
            )
        tokens, source = prepared.val, f"{prepared.source} (validation split)"
    else:
        tokens, source = _tokenize_file(data, ckpt.get("tokenizer")), str(data)
    if len(tokens) < seq_len + 1:
        raise ConfigError(
            f"{source} has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}"
        )
    dev = _resolve_device(device)
    model = build_model(model_config, recipe)
    _load_model_state(model, ckpt, ckpt_path)
    model.to(dev)
    val = evaluate(
        model,
        tokens,
        batch_size,
        seq_len,
        max_batches,
        dev,
        _autocast_dtype(train_cfg.get("precision", "auto"), dev),
    )
    return {
        "val_loss": val,
        "val_ppl": math.exp(val),
        "tokens": len(tokens),
        "step": ckpt["step"],
        "checkpoint": str(ckpt_path),
        "data": source,
    }


def _tokenize_file(path: str | Path, tokenizer_json: str | None) -> np.ndarray:
    """Token ids of a text file under the checkpoint's tokenizer, encoded line by line as
    ``fp4train.data.prepare_data`` encodes its splits."""
    from tokenizers import Tokenizer

    from fp4train.data import read_text

    if tokenizer_json is None:
        raise CheckpointError("the checkpoint holds no tokenizer, so it cannot encode a file")
    try:
        text = read_text(path)
    except FileNotFoundError as e:
        raise ConfigError(f"data file not found: {path}") from e
    except ValueError as e:
        raise ConfigError(f"data {path}: {e}") from e
    tokenizer = Tokenizer.from_str(tokenizer_json)
    lines = re.findall(r"[^\n]*\n|[^\n]+$", text)
    encoded = tokenizer.encode_batch(lines, add_special_tokens=False)
    return np.fromiter((i for enc in encoded for i in enc.ids), dtype=np.int64)


# ---------------------------------------------------------------------------- compare
def compare(
    cfg: TrainConfig, recipes: list[str], out_dir: str | Path, baseline: str = "bf16"
) -> list[dict]:
    """Train ``cfg`` once per recipe spec (same model, data and seed) into ``out_dir/<spec>``;
    write compare.png, compare.md and compare.json there and return one row per recipe.

    ``cfg.overrides`` apply to every recipe that quantizes something (the unquantized
    baseline stays as it is); ``"preset[key=value,...]"`` specs carry their own. The gap is
    the relative difference of validation losses to the ``baseline`` run (or the first run
    when no spec is named ``baseline``), in %.
    """
    out_dir = Path(out_dir)
    runs = []  # (spec, overrides, recipe, label); all checked before anything trains
    for spec in recipes:
        overrides = list(cfg.overrides) if parse_recipe(spec).quantized else []
        label = f"{spec} [{','.join(overrides)}]" if overrides else spec
        runs.append((spec, overrides, parse_recipe(spec, overrides), label))
    _prepare_data(cfg.data, cfg.vocab_size, cfg.cache_dir)  # fail early; later calls hit cache
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec, overrides, recipe, label in runs:
        run_cfg = dataclasses.replace(
            cfg, recipe=spec, overrides=overrides, out_dir=str(out_dir / _slug(label))
        )
        result = train(run_cfg)
        rows.append({"label": label, "spec": spec, **result, "recipe_config": recipe.to_dict()})
    base = next((r for r in rows if r["spec"] == baseline), rows[0])
    for r in rows:
        r["val_gap_pct"] = 100 * (r["val_loss"] - base["val_loss"]) / base["val_loss"]
        r["train_gap_pct"] = 100 * (r["train_loss"] - base["train_loss"]) / base["train_loss"]
    from fp4train.distributed import is_main

    if not is_main():  # under torchrun rank 0 writes the summary
        return rows
    table = compare_table(rows, base["label"])
    (out_dir / "compare.md").write_text(table, encoding="utf-8")
    _write_json(out_dir / "compare.json", {"baseline": base["label"], "runs": rows})
    from fp4train.plots import plot_losses

    plot_losses(
        {r["label"]: read_metrics(r["out_dir"]) for r in rows},
        out_dir / "compare.png",
        title=f"{cfg.model}: {cfg.max_steps} steps, seed {cfg.seed}",
    )
    return rows


def compare_table(rows: list[dict], baseline: str) -> str:
    """A markdown table of final train/val loss and the gap to ``baseline`` per run."""
    lines = [
        f"| recipe | train loss | val loss | val ppl | gap to {baseline} (val) | "
        f"gap (train) | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | "
            f"{r['val_ppl']:.2f} | {r['val_gap_pct']:+.2f}% | {r['train_gap_pct']:+.2f}% | "
            f"{r['tokens_per_s'] or 0:,.0f} |"
        )
    return "\n".join(lines) + "\n"
