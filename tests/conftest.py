"""Helpers shared by the training, CLI, monitor and parallel tests."""

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
