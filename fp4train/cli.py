"""The ``fp4train`` command: train, compare, eval, speedup, bench.

A thin shell over :mod:`fp4train.train` (and :mod:`fp4train.speedup` / :mod:`fp4train.bench`,
imported when their command runs). Exit codes: 0 success; 2 bad arguments or inputs (unknown
recipe, missing or empty data file, bad ``--set``, unusable checkpoint), with a one-line
message on stderr; 1 when training diverges (NaN/Inf loss); 130 when interrupted. Under
torchrun every process is one ``fp4train train`` with these codes (messages carry the rank),
and torchrun exits 1 when any of them fails, ending the others.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path

from fp4train.distributed import cleanup, is_main
from fp4train.train import (
    OPTIMIZERS,
    PARALLEL,
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    TrainConfig,
    compare,
    compare_table,
    eval_checkpoint,
    split_recipe_list,
    train,
)

__all__ = ["main", "build_parser"]

_D = TrainConfig()  # the defaults, shown in --help
_DELEGATED = {
    "speedup": "theoretical FP4 speed-up calculator (paper App. B)",
    "bench": "GEMM / layer / training-step benchmarks",
}

_MAIN_EPILOG = """\
examples:
  fp4train train                              # tiny model, embedded corpus, fp4-paper recipe
  fp4train compare                            # bf16 vs fp4-direct vs fp4-paper, same seed
  fp4train eval runs/my-run                   # val loss / perplexity of a run's checkpoint
  fp4train speedup --help                     # theoretical speed-up (paper App. B)
  fp4train bench --help                       # kernel and layer benchmarks

Run `fp4train COMMAND --help` for each command's options and more examples.
"""

_TRAIN_EPILOG = f"""\
examples:
  fp4train train                                   # defaults: tiny model, embedded corpus,
                                                   # fp4-paper, {_D.max_steps} steps, CPU or GPU
  fp4train train --recipe bf16 --name bf16-base    # outputs in runs/bf16-base
  fp4train train --data my.txt --vocab-size 8192 --max-steps 2000
  fp4train train --recipe fp4-paper --set occ.alpha=0.999 --set dge.k=3
  fp4train train --recipe "fp4-paper[fwd_format=e1m2]"
  fp4train train --recipe "fp4-paper[act_save=e4m3]"   # saved activations in FP8
  fp4train train --recipe "fp4-dge[fast_accum=true]"   # FP8 GEMMs with fast accumulation (GPU)
  fp4train train --recipe "fp4-paper[occ.compensation=columns]"  # OCC over outlier channels (GPU)
  fp4train train --recipe "fp4-paper[occ.compensation=e4m3]"  # outliers in the FP8 operand
  fp4train train --model 125m --batch-size 8 --grad-accum 4 --lr 3e-4 --max-steps 5000
  fp4train train --monitor-every 50                # per-layer SNR / cosine / MSE of FP4 operands
  fp4train train --out runs/x --resume             # continue runs/x from its latest checkpoint
  fp4train train --out runs/x --resume --max-steps 400  # train on (the LR schedule then spans 400)
  fp4train train --optimizer adamw-lp              # FP8 first / FP16 second moment (paper)

several GPUs (data parallel; one process per GPU, started by torchrun):
  # one node, 8 GPUs; --batch-size is the global batch, split over the processes
  torchrun --standalone --nproc-per-node 8 -m fp4train train --parallel ddp \\
      --model 125m --batch-size 64 --out runs/ddp8
  # FSDP2 (parameters, gradients and optimizer states sharded per transformer block)
  torchrun --standalone --nproc-per-node 8 -m fp4train train --parallel fsdp ... --out runs/f8
  # the paper's FP8 gradient all-reduce (DDP; slower than float32 on NVLink), or FP8
  # reduce-scatter under --parallel fsdp
  torchrun --standalone --nproc-per-node 8 -m fp4train train --set grad_comm=e5m2 ...
  # two nodes: run on each node; HOST:29500 is reachable from both (e.g. node 0), and --out
  # lies on a filesystem both see (every rank reads the checkpoint on --resume)
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      --rdzv-id JOB_ID -m fp4train train --parallel fsdp ... --out /shared/runs/x
  Rank 0 writes every output; checkpoints hold the full state, so a run saved on N GPUs
  resumes on M (same --batch-size) or on one, and `fp4train eval` reads it. --parallel auto
  (default) is ddp when torchrun starts more than one process. On CPU-only hosts torchrun
  runs on gloo. Export NCCL_NVLS_ENABLE=0 where NVLink multicast must stay off.

outputs in --out (default runs/<timestamp>-<recipe>, or runs/<--name>):
  config.json, metrics.jsonl (step, loss, lr, tokens, tokens_per_s, ...; val_loss rows),
  checkpoints/ (latest.pt + last --keep-ckpts), loss.png, eval.json (val_loss, val_ppl),
  monitor_summary.md (with --monitor-every), tensorboard/ (if tensorboard is installed).

recipes: bf16, fp8, fp4-paper (E2M1 W4A4 + DGE + OCC), fp4-direct (no DGE, no OCC),
  fp4-dge, fp4-occ; `--set KEY=VALUE` (repeatable) changes fields: fwd_format=e1m2,
  grad_format=e4m3, fwd_granularity=tensor, dge.k=3, dge=none, occ.alpha=0.999,
  occ.granularity=row, occ=none, fwd_x.format=e3m0, quantize_lm_head=true, backend=reference,
  grad_comm=e5m2 (FP8 gradient all-reduce / reduce-scatter under --parallel ddp / fsdp),
  act_save=e4m3 (the RMSNorm and SwiGLU inputs, and OCC's residual, kept for backward in FP8
  E4M3 with a scale per row: 1 byte per element).
"""

_COMPARE_EPILOG = """\
Trains the same model on the same data with the same seed once per recipe, into
OUT/<recipe>/, then writes OUT/compare.png (loss curves), OUT/compare.md and OUT/compare.json
(final train / val loss and the gap to bf16 in %) and prints the table.

--recipes is a comma-separated list; each item may carry its own overrides in brackets:
  "fp4-paper[dge.k=3,occ.alpha=0.999]". Global --set applies to every quantized recipe (the
  bf16 baseline is left as it is).

examples:
  fp4train compare                                            # bf16,fp4-direct,fp4-paper
  fp4train compare --recipes bf16,fp8,fp4-paper --max-steps 500 --out runs/cmp

paper ablations, one command each:
  # FP4 formats for W and A (E1M2 / E2M1 / E3M0)
  fp4train compare --recipes "bf16,fp4-paper[fwd_format=e1m2],fp4-paper,fp4-paper[fwd_format=e3m0]"
  # DGE: straight-through vs DGE with k = 3, 5 (paper), 10
  fp4train compare --recipes "fp4-direct,fp4-dge[dge.k=3],fp4-dge,fp4-dge[dge.k=10]"
  # OCC: no clamping vs alpha = 0.999, 0.99 (paper), 0.97
  fp4train compare \\
      --recipes "fp4-dge,fp4-paper[occ.alpha=0.999],fp4-paper,fp4-paper[occ.alpha=0.97]"
  # OCC quantile per tensor (paper's equation, default) vs per token (its code)
  fp4train compare --recipes "fp4-paper,fp4-paper[occ.granularity=row]"
  # scaling granularity: tensor-wise vs vector-wise (token / channel) scales
  fp4train compare --recipes "bf16,fp4-paper[fwd_granularity=tensor],fp4-paper"
  # one recipe with a global override
  fp4train compare --recipes fp4-paper --set occ.alpha=0.999
"""

_EVAL_EPILOG = """\
examples:
  fp4train eval runs/my-run                        # the run's latest checkpoint, on the
                                                   # validation split of its training data
  fp4train eval runs/my-run/checkpoints/step_000200.pt --data held_out.txt
  fp4train eval runs/my-run --max-batches 20 --json
"""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage dump) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(lo: int):
    what = "a positive integer" if lo == 1 else f"an integer >= {lo}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = lo - 1
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


_positive_int, _nonneg_int = _int_at_least(1), _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _add_run_args(p: argparse.ArgumentParser, command: str) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        default=None,
        help=f"tiny, 125m, 350m, 1.3b, 7b or a ModelConfig JSON file (default: {_D.model})",
    )
    g.add_argument(
        "--data",
        metavar="PATH",
        help="text file or directory (.txt, .xz, .gz); default: the embedded corpus",
    )
    g.add_argument(
        "--vocab-size",
        type=_positive_int,
        default=None,
        help=f"BPE vocabulary trained on the data (default: {_D.vocab_size})",
    )
    g.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="tokenized-data cache (default: $FP4TRAIN_CACHE or ~/.cache/fp4train)",
    )

    g = p.add_argument_group("recipe")
    if command == "train":
        g.add_argument(
            "--recipe",
            default=None,
            help=f"preset, preset[key=value,...] or a recipe JSON file (default: {_D.recipe})",
        )
    else:
        g.add_argument(
            "--recipes",
            default="bf16,fp4-direct,fp4-paper",
            help="comma-separated recipe list (default: %(default)s)",
        )
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="override a recipe field (repeatable)",
    )

    g = p.add_argument_group("optimization")
    g.add_argument(
        "--max-steps",
        type=_positive_int,
        default=None,
        help=f"optimizer steps (default: {_D.max_steps})",
    )
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help=f"sequences per micro-batch, over all processes (default: {_D.batch_size})",
    )
    g.add_argument(
        "--grad-accum",
        type=_positive_int,
        default=None,
        help=f"micro-batches per step (default: {_D.grad_accum})",
    )
    g.add_argument(
        "--seq-len",
        type=_positive_int,
        help="tokens per sequence (default: the model's max_seq_len)",
    )
    g.add_argument(
        "--lr", type=_positive_float, help="peak learning rate (default: 4e-3 for tiny, else 3e-4)"
    )
    g.add_argument(
        "--warmup-frac",
        type=float,
        default=None,
        help=f"warm-up fraction of the steps (default: {_D.warmup_frac})",
    )
    g.add_argument(
        "--min-lr-frac",
        type=float,
        default=None,
        help=f"final LR as a fraction of the peak (default: {_D.min_lr_frac})",
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help=f"AdamW weight decay on linear weights (default: {_D.weight_decay})",
    )
    g.add_argument(
        "--grad-clip",
        type=float,
        default=None,
        help=f"max global gradient norm, 0 = off (default: {_D.grad_clip})",
    )
    g.add_argument(
        "--optimizer",
        default=None,
        choices=OPTIMIZERS,
        help=f"adamw, or adamw-lp: FP8 first / FP16 second moment (default: {_D.optimizer})",
    )
    g.add_argument(
        "--seed",
        type=_nonneg_int,
        default=None,
        help=f"seed for weights and data order (default: {_D.seed})",
    )

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument(
        "--log-every",
        type=_positive_int,
        default=None,
        help="metrics.jsonl row every N steps, and at the first and last "
        f"(default: {_D.log_every})",
    )
    g.add_argument(
        "--eval-every",
        type=_positive_int,
        default=None,
        help=f"validation loss every N steps (default: {_D.eval_every})",
    )
    g.add_argument(
        "--eval-batches",
        type=_positive_int,
        default=None,
        help=f"validation batches per evaluation (default: {_D.eval_batches})",
    )
    g.add_argument(
        "--ckpt-every",
        type=_positive_int,
        default=None,
        help=f"checkpoint every N steps, and at the end (default: {_D.ckpt_every})",
    )
    g.add_argument(
        "--keep-ckpts",
        type=_positive_int,
        default=None,
        help=f"step checkpoints kept besides latest.pt (default: {_D.keep_ckpts})",
    )
    g.add_argument(
        "--monitor-every",
        type=_nonneg_int,
        default=None,
        help=f"quantization statistics every N steps, 0 = off (default: {_D.monitor_every})",
    )
    g.add_argument("--out", metavar="DIR", help="output directory (see below)")
    g.add_argument("--name", help="run name: output in runs/NAME")
    if command == "train":
        g.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in --out from checkpoints/latest.pt; the options not given "
            "take the run's own values (from its config.json)",
        )
    g.add_argument("--no-progress", action="store_true", help="print log lines, no progress bar")

    g = p.add_argument_group("system")
    g.add_argument(
        "--device", default=_D.device, help="auto, cpu, cuda or cuda:N (default: %(default)s)"
    )
    g.add_argument(
        "--precision",
        default=None,
        choices=("auto", "bf16", "fp32"),
        help=f"auto = BF16 autocast on GPU, float32 on CPU (default: {_D.precision})",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each transformer block (one graph serves all blocks; FP4Linear's "
        "quantization is fused by Inductor there)",
    )
    g.add_argument(
        "--parallel",
        default=_D.parallel,
        choices=PARALLEL,
        help="data parallelism under torchrun: auto = ddp with more than one process, else "
        "none (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``fp4train`` argument parser (subcommands train, compare, eval, speedup, bench)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _ArgumentParser(
        prog="fp4train",
        description="Train LLaMA-style models with FP4 (E2M1) GEMMs (arXiv 2501.17116).",
        epilog=_MAIN_EPILOG,
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    sub.required = True
    p = sub.add_parser(
        "train",
        help="train one model",
        formatter_class=fmt,
        description="Train one model with one recipe.",
        epilog=_TRAIN_EPILOG,
    )
    _add_run_args(p, "train")
    p = sub.add_parser(
        "compare",
        help="train several recipes on the same model/data/seed",
        formatter_class=fmt,
        description="Compare recipes.",
        epilog=_COMPARE_EPILOG,
    )
    _add_run_args(p, "compare")
    p = sub.add_parser(
        "eval",
        help="validation loss and perplexity of a checkpoint",
        formatter_class=fmt,
        description="Evaluate a checkpoint.",
        epilog=_EVAL_EPILOG,
    )
    p.add_argument("checkpoint", help="a checkpoint file or a run directory (uses latest.pt)")
    p.add_argument(
        "--data",
        metavar="PATH",
        help="text file to evaluate on (default: the validation split of the data "
        "the checkpoint was trained on)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=8,
        help="sequences per batch (default: %(default)s)",
    )
    p.add_argument("--max-batches", type=_positive_int, help="stop after N batches")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    p.add_argument("--cache-dir", metavar="DIR", help="tokenized-data cache")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    for name, help_text in _DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _saved_options(out: str | None) -> dict:
    """The options run ``out`` was last started with (its config.json's "train" section), or
    {} where it has no config.json. :func:`_train_config` takes from it each option read
    through ``opt`` and not given (argparse default None); device, parallelism, compile,
    cache and progress stay this invocation's."""
    path = Path(out or "") / "config.json"
    if out is None or not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["train"]
        if not isinstance(saved, dict):
            raise TypeError(f"its train section is a {type(saved).__name__}")
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{path} cannot be read ({e}); it records the run's options for --resume: "
            "repair or delete it and give the options again"
        ) from e
    return saved


def _train_config(args: argparse.Namespace, command: str) -> TrainConfig:
    out = args.out or (str(Path("runs") / args.name) if args.name else None)
    resume = getattr(args, "resume", False)
    saved = _saved_options(out) if resume else {}

    def opt(name: str):  # given, else the resumed run's, else the default
        given = getattr(args, name, None)
        if given is not None:
            return given
        return saved.get(name, getattr(_D, name))

    return TrainConfig(
        model=opt("model"),
        recipe=opt("recipe") if command == "train" else "",
        overrides=list(opt("overrides")),
        data=opt("data"),
        vocab_size=opt("vocab_size"),
        cache_dir=args.cache_dir,
        seq_len=opt("seq_len"),
        batch_size=opt("batch_size"),
        grad_accum=opt("grad_accum"),
        max_steps=opt("max_steps"),
        lr=opt("lr"),
        warmup_frac=opt("warmup_frac"),
        min_lr_frac=opt("min_lr_frac"),
        weight_decay=opt("weight_decay"),
        grad_clip=opt("grad_clip"),
        eval_every=opt("eval_every"),
        eval_batches=opt("eval_batches"),
        log_every=opt("log_every"),
        ckpt_every=opt("ckpt_every"),
        keep_ckpts=opt("keep_ckpts"),
        seed=opt("seed"),
        device=args.device,
        precision=opt("precision"),
        compile=args.compile,
        monitor_every=opt("monitor_every"),
        out_dir=out,
        resume=resume,
        progress=not args.no_progress,
        optimizer=opt("optimizer"),
        parallel=args.parallel,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    r = train(_train_config(args, "train"))
    if not is_main():
        return 0
    print(
        f"done: {r['step']} steps, {r['tokens']:,} tokens in {r['elapsed_s']:.0f} s; "
        f"train loss {r['train_loss']:.4f}, val loss {r['val_loss']:.4f} "
        f"(ppl {r['val_ppl']:.2f}); outputs in {r['out_dir']}"
    )
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    cfg = _train_config(args, "compare")
    if cfg.out_dir is None and os.environ.get("WORLD_SIZE", "1") != "1":
        raise ConfigError("under torchrun name the output directory with --out or --name")
    out = cfg.out_dir or str(Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    rows = compare(cfg, split_recipe_list(args.recipes), out)
    if not is_main():
        return 0
    base = next((r for r in rows if r["spec"] == "bf16"), rows[0])
    print(compare_table(rows, base["label"]), end="")
    print(f"outputs in {out}: compare.png, compare.md, compare.json, one directory per recipe")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    r = eval_checkpoint(
        args.checkpoint,
        data=args.data,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        device=args.device,
        cache_dir=args.cache_dir,
    )
    if args.json:
        print(json.dumps(r))
    else:
        print(
            f"{r['checkpoint']} (step {r['step']}) on {r['data']}: val_loss "
            f"{r['val_loss']:.4f}, perplexity {r['val_ppl']:.2f}"
        )
    return 0


def _delegate(command: str, argv: list[str]) -> int:
    module = f"fp4train.{command}"
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        print(
            f"fp4train {command}: error: {module} is not available in this installation",
            file=sys.stderr,
        )
        return 2
    rc = mod.main(argv)
    return rc if isinstance(rc, int) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fp4train`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        return _delegate(argv[0], argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2)
        return e.code if isinstance(e.code, int) else 2
    prog = f"fp4train {args.command}"
    if os.environ.get("WORLD_SIZE", "1") != "1":  # under torchrun: say which rank speaks
        prog += f" [rank {os.environ.get('RANK', '?')}]"
    commands = {"train": _cmd_train, "compare": _cmd_compare, "eval": _cmd_eval}
    try:
        return commands[args.command](args)
    except (ConfigError, CheckpointError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup()  # the process group train() joined under torchrun, if any
