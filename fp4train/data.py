"""Training data: the embedded corpus, an offline byte-level BPE tokenizer, packed token files.

``prepare_data`` turns text (the packaged King James Bible by default, a file, or a directory)
into two flat arrays of token ids, train and validation, cached on disk as raw uint16 (uint32
for vocabularies over 65536) and memory-mapped; ``Batcher`` draws random windows from the
train array and ``eval_batches`` walks the validation array in order.

Cache layout, one directory per (source, vocab_size, val_fraction, format version)::

    <cache_dir>/<name>-v<vocab_size>-<key>/tokenizer.json  train.bin  val.bin  meta.json

``meta.json`` is written last, so a directory without it is incomplete and gets rebuilt.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

__all__ = [
    "EOT",
    "default_corpus_path",
    "read_text",
    "default_cache_dir",
    "train_tokenizer",
    "encode_text",
    "prepare_data",
    "PreparedData",
    "Batcher",
    "eval_batches",
]

EOT = "<|endoftext|>"
_FORMAT_VERSION = 1  # bump when the cleaning, tokenization or file layout changes
_ENCODE_LINES = 16384  # lines per encode_batch call
_SNIFF_BYTES = 8192


def default_corpus_path() -> Path:
    """Path of the packaged corpus (the King James Bible, xz-compressed; see corpus/README.md)."""
    return Path(str(resources.files("fp4train").joinpath("corpus", "kjv.txt.xz")))


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes())
    return path.read_bytes()


def _decode(raw: bytes) -> str | None:
    """UTF-8 text of a file, or None when it looks binary (NUL bytes or invalid UTF-8)."""
    if b"\0" in raw[:_SNIFF_BYTES]:
        return None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        return None


def read_text(path: str | Path | None = None) -> str:
    """All the text of a source: None (the embedded corpus), a file, or a directory.

    Files may be plain UTF-8 or ``.xz`` / ``.gz`` compressed. A directory contributes every
    text file under it (recursively, sorted by relative path, hidden files skipped, binary or
    non-UTF-8 files skipped), each ending in a newline. Raises ``FileNotFoundError`` for a
    missing path, ``ValueError`` for a binary file or when there is no text.
    """
    path = default_corpus_path() if path is None else Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist")
    if path.is_dir():
        parts = []
        for f in _dir_files(path):
            text = _decode(_read_bytes(f))
            if text:
                parts.append(text if text.endswith("\n") else text + "\n")
        if not parts:
            raise ValueError(f"data directory {str(path)!r} holds no text files (it is empty)")
        text = "".join(parts)
    else:
        text = _decode(_read_bytes(path))
        if text is None:
            raise ValueError(
                f"data file {str(path)!r} is not UTF-8 text (binary or another encoding); "
                "convert it to UTF-8 or pass a directory of text files"
            )
    if not text.strip():
        raise ValueError(f"data source {str(path)!r} is empty")
    return text


def _dir_files(root: Path) -> list[Path]:
    files = [
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def train_tokenizer(text: str, vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``text``, offline and deterministic.

    The vocabulary holds the 256 byte symbols, ``<|endoftext|>`` (id 0) and learned merges up to
    ``vocab_size`` in all; a small text may end with fewer (``get_vocab_size()`` tells).
    Any string round-trips: ``decode(encode(s).ids) == s``.
    """
    _check_vocab_size(vocab_size)
    if not text:
        raise ValueError("cannot train a tokenizer on empty text")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_lines(text), trainer=trainer, length=text.count("\n") + 1)
    return tokenizer


def _check_vocab_size(vocab_size: Any) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(
            f"vocab_size must be an int >= 257 (256 bytes + {EOT}), got {vocab_size!r}"
        )


def _check_positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _lines(text: str) -> Iterator[str]:
    """Lines of text keeping their newline: the unit of both training and encoding."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


@dataclass
class PreparedData:
    """Tokenized train/validation arrays (memory-mapped) and the tokenizer that made them."""

    train: np.ndarray  # [n_train] token ids, np.memmap
    val: np.ndarray  # [n_val] token ids, np.memmap
    tokenizer: Tokenizer
    vocab_size: int  # the tokenizer's actual vocabulary size
    cache_dir: Path  # the directory holding this preparation's files
    source: str  # the data source as given ("<embedded kjv>" for the default corpus)
    meta: dict[str, Any] = field(default_factory=dict)  # contents of meta.json


def default_cache_dir() -> Path:
    """``$FP4TRAIN_CACHE`` if set, else ``~/.cache/fp4train``."""
    env = os.environ.get("FP4TRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fp4train"


def _source_identity(path: Path | None) -> tuple[str, dict[str, Any]]:
    """A short name and a dict that changes whenever the source's content may have changed."""
    if path is None:
        digest = hashlib.sha256(default_corpus_path().read_bytes()).hexdigest()
        return "kjv", {"embedded": "kjv", "sha256": digest}
    path = path.expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist")
    files = _dir_files(path) if path.is_dir() else [path]
    stats = [
        [f.relative_to(path).as_posix() if path.is_dir() else "", st.st_size, st.st_mtime_ns]
        for f in files
        for st in [f.stat()]
    ]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name.split(".")[0]) or "data"
    return name, {"path": str(path), "files": stats}


def _split(text: str, val_fraction: float) -> tuple[str, str]:
    """Train = head, validation = the last ``val_fraction`` of the characters, cut at a line start.

    The cut moves forward to the next line start (backward when there is none after it).
    """
    target = len(text) - round(len(text) * val_fraction)
    nl = text.find("\n", max(target - 1, 0))
    cut = nl + 1 if 0 <= nl < len(text) - 1 else text.rfind("\n", 0, max(target - 1, 0)) + 1
    train, val = text[:cut], text[cut:]
    if not train.strip() or not val.strip():
        raise ValueError(
            f"cannot split {len(text)} characters into train and validation at val_fraction="
            f"{val_fraction} on a line boundary: give more text (several lines) or another "
            "val_fraction"
        )
    return train, val


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _atomic_write(dest: Path, write: Any, mode: str = "wb") -> None:
    """Write via ``write(file)`` to a temp file in dest's directory, then rename over dest."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _encode_chunks(
    tokenizer: Tokenizer, text: str, desc: str | None = None
) -> Iterator[np.ndarray]:
    """Token ids of text, one array per batch of lines (encode_batch runs them in parallel)."""
    dtype = _token_dtype(tokenizer.get_vocab_size())
    lines = list(_lines(text))
    # a bar only for inputs big enough to wait on, and only on a terminal
    show = desc is not None and len(text) > 2**20
    with tqdm(total=len(lines), desc=desc, unit="line", disable=None if show else True) as bar:
        for i in range(0, len(lines), _ENCODE_LINES):
            batch = tokenizer.encode_batch(lines[i : i + _ENCODE_LINES], add_special_tokens=False)
            yield np.fromiter((t for enc in batch for t in enc.ids), dtype=dtype)
            bar.update(len(batch))


def encode_text(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text`` exactly as :func:`prepare_data` encodes a split (line by line).

    uint16 for vocabularies up to 65536, else uint32. For evaluating a checkpoint on new text.
    """
    chunks = list(_encode_chunks(tokenizer, text))
    return (
        np.concatenate(chunks) if chunks else np.zeros(0, _token_dtype(tokenizer.get_vocab_size()))
    )


def _encode_to_file(tokenizer: Tokenizer, text: str, dest: Path, desc: str) -> int:
    """Tokenize text into a raw token file, written atomically; returns the token count."""
    n_tokens = 0

    def write(f):
        nonlocal n_tokens
        for ids in _encode_chunks(tokenizer, text, desc):
            ids.tofile(f)
            n_tokens += ids.size

    _atomic_write(dest, write)
    return n_tokens


def _load(cache: Path, source: str) -> PreparedData | None:
    """The cached preparation in ``cache``, or None when it is missing or incomplete."""
    try:
        meta = json.loads((cache / "meta.json").read_text(encoding="utf-8"))
        tokenizer = Tokenizer.from_file(str(cache / "tokenizer.json"))
        dtype = np.dtype(meta["dtype"])
        arrays = []
        for split in ("train", "val"):
            f = cache / f"{split}.bin"
            if f.stat().st_size != meta[f"n_{split}_tokens"] * dtype.itemsize:
                return None
            arrays.append(np.memmap(f, dtype=dtype, mode="r"))
    except Exception:  # missing, partial or unreadable (tokenizers raises plain Exception)
        return None
    return PreparedData(
        train=arrays[0],
        val=arrays[1],
        tokenizer=tokenizer,
        vocab_size=tokenizer.get_vocab_size(),
        cache_dir=cache,
        source=source,
        meta=meta,
    )


def prepare_data(
    data: str | Path | None = None,
    vocab_size: int = 4096,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.02,
) -> PreparedData:
    """Tokenize a text source into cached train/validation token arrays.

    ``data``: None for the embedded corpus, else a text file or directory (see
    :func:`read_text`). Validation is the last ``val_fraction`` of the text, cut at a line
    start (for a directory: the end of its last files in sorted order); the tokenizer is
    trained on the train part only. Results are cached
    under ``cache_dir`` (default :func:`default_cache_dir`) keyed by the source's identity
    (path, sizes and mtimes; content hash for the embedded corpus), ``vocab_size``,
    ``val_fraction`` and a format version; a later call with the same key memory-maps the
    files without re-tokenizing. Files are written atomically and the result is deterministic,
    so concurrent callers at worst duplicate work; with several ranks, let rank 0 prepare first.
    Returns the arrays memory-mapped read-only.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float):
        raise ValueError(f"val_fraction must be a number in (0, 0.5], got {val_fraction!r}")
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    _check_vocab_size(vocab_size)
    src_path = None if data is None else Path(data)
    source = "<embedded kjv>" if data is None else str(data)
    name, identity = _source_identity(src_path)
    key_doc = {
        "source": identity,
        "vocab_size": vocab_size,
        "val_fraction": val_fraction,
        "format_version": _FORMAT_VERSION,
    }
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:16]
    root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    cache = root / f"{name}-v{vocab_size}-{key}"

    prepared = _load(cache, source)
    if prepared is not None:
        return prepared

    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_text, val_text = _split(read_text(src_path), val_fraction)
    tok_file = cache / "tokenizer.json"
    if tok_file.is_file():
        tokenizer = Tokenizer.from_file(str(tok_file))
    else:
        tokenizer = train_tokenizer(train_text, vocab_size)
        _atomic_write(tok_file, lambda f: f.write(tokenizer.to_str(pretty=True)), mode="w")
    n_train = _encode_to_file(tokenizer, train_text, cache / "train.bin", f"tokenize {name}")
    n_val = _encode_to_file(tokenizer, val_text, cache / "val.bin", f"tokenize {name} (val)")
    meta = {
        **key_doc,
        "source_name": source,
        "dtype": _token_dtype(tokenizer.get_vocab_size()).name,
        "actual_vocab_size": tokenizer.get_vocab_size(),
        "n_train_chars": len(train_text),
        "n_val_chars": len(val_text),
        "n_train_tokens": n_train,
        "n_val_tokens": n_val,
        "val_first_line": val_text.split("\n", 1)[0][:200],
        "prepare_seconds": round(time.perf_counter() - t0, 3),
    }
    _atomic_write(cache / "meta.json", lambda f: json.dump(meta, f, indent=2), mode="w")
    prepared = _load(cache, source)
    if prepared is None:
        raise RuntimeError(f"prepared data in {str(cache)!r} could not be read back")
    return prepared


class Batcher:
    """Random contiguous windows of a token array: x [batch, seq_len] and y = x shifted by one.

    Step ``i``'s windows come from a generator seeded with ``(seed, i)``, so the stream is a
    pure function of the seed and ``state_dict()`` is just the step. Each step draws
    ``batch_size · world_size`` start positions and rank r takes the r-th slice: ranks see
    different windows, and the global batch does not depend on how it is sharded.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        for name, v in (
            ("batch_size", batch_size),
            ("seq_len", seq_len),
            ("world_size", world_size),
        ):
            _check_positive_int(f"Batcher {name}", v)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Batcher seed must be a non-negative int, got {seed!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"Batcher rank must be in [0, world_size={world_size}), got {rank}")
        if tokens.ndim != 1:
            raise ValueError(f"Batcher tokens must be 1-D, got shape {tokens.shape}")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"token array of length {len(tokens)} is too short for seq_len={seq_len} "
                f"(needs at least seq_len + 1 = {seq_len + 1} tokens)"
            )
        self.tokens = tokens
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0
        self._offsets = np.arange(seq_len + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), int64 tensors [batch_size, seq_len] on the CPU."""
        rng = np.random.default_rng([self.seed, self.step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, self.batch_size * self.world_size)
        starts = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        self.step += 1
        return _windows(self.tokens, starts, self._offsets)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {
            "step": self.step,
            "seed": self.seed,
            "global_batch_size": self.batch_size * self.world_size,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state["step"]``; the seed, global batch and seq_len must match.

        A different world size with the same global batch continues the same global stream.
        """
        mine = self.state_dict()
        for key in ("seed", "global_batch_size", "seq_len"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"Batcher state has {key}={state.get(key)!r} but this Batcher has "
                    f"{mine[key]!r}; resume with the same settings"
                )
        self.step = int(state["step"])


def _windows(
    tokens: np.ndarray, starts: np.ndarray, offsets: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = torch.from_numpy(tokens[starts[:, None] + offsets].astype(np.int64))  # [B, T+1]
    return chunk[:, :-1], chunk[:, 1:]


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows over ``tokens`` in order, as (x, y) int64 [≤batch_size, seq_len].

    Window i covers tokens ``[i·seq_len, (i+1)·seq_len]`` (x then y shifted by one), so each
    token but the first is predicted exactly once until the last full window; the last batch
    may hold fewer windows. ``max_batches`` stops early. Deterministic.
    """
    _check_positive_int("eval_batches batch_size", batch_size)
    _check_positive_int("eval_batches seq_len", seq_len)
    if max_batches is not None:
        _check_positive_int("eval_batches max_batches", max_batches)
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows == 0:
        raise ValueError(
            f"token array of length {len(tokens)} is too short for seq_len={seq_len} "
            f"(needs at least {seq_len + 1} tokens)"
        )
    n_batches = -(-n_windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    # a generator made after the checks, so bad arguments raise at the call, not on iteration
    return (_eval_batch(tokens, b, batch_size, seq_len, n_windows) for b in range(n_batches))


def _eval_batch(
    tokens: np.ndarray, b: int, batch_size: int, seq_len: int, n_windows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    starts = np.arange(b * batch_size, min((b + 1) * batch_size, n_windows)) * seq_len
    return _windows(tokens, starts, np.arange(seq_len + 1))
