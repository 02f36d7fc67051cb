"""Helpers shared by the tests: training runs (CLI, monitor, parallel) and the kernel
checks (interpreter, traced quantizers, GPU)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from fp4train.model import ModelConfig


@pytest.fixture
def one_thread():
    """Run a test on one CPU thread: micro models run fastest so, above all on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_micro_run(d: Path, words: list[str], n_lines: int, seed: int, **model: int) -> Path:
    """Write ``d``/text.txt (``n_lines`` seeded lines of 4–14 ``words``) and ``d``/micro.json
    (a ModelConfig of ``model``'s fields); return ``d``."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choices(words, k=rng.randint(4, 14))) for _ in range(n_lines)]
    (d / "text.txt").write_text("\n".join(lines) + "\n")
    ModelConfig(**model).to_json(d / "micro.json")
    return d


def wide_values(m: int, k: int, gen: torch.Generator, dtype=torch.bfloat16) -> torch.Tensor:
    """[m, k] random values over ~12 binades per row on ``gen``'s device, with zero rows and
    exact E2M1 ties once a row's max scales to 6 (row 1: 0.25, 0.75, 1.25, 5 and 6)."""
    x = torch.randn(m, k, device=gen.device, generator=gen)
    x = x * torch.exp2(torch.randint(-6, 6, (m, k), device=gen.device, generator=gen).float())
    x[:: max(m // 5, 1)] = 0.0
    x[1, :5] = torch.tensor([0.25, 0.75, 1.25, 5.0, 6.0])
    return x.to(dtype)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Raise AssertionError unless ``got`` and ``want`` have the same dtype, shape and bits
    (FP8 compared as bytes), naming ``what`` and how many elements differ."""
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(
            f"{what}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}"
        )
    if got.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    n = int((got != want).sum())
    if n:
        raise AssertionError(f"{what}: {n} of {got.numel()} elements differ")
