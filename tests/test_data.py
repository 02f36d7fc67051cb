import gzip
import lzma
import os

import numpy as np
import pytest
import torch

from fp4train import data
from fp4train.data import (
    EOT,
    Batcher,
    default_corpus_path,
    encode_text,
    eval_batches,
    prepare_data,
    read_text,
    train_tokenizer,
)

UNICODE_SAMPLES = [
    "",
    "plain ascii, with  two spaces and a trailing space ",
    "  leading spaces\tand a tab\r\nwindows line end\n\n\n",
    "naïve café — “quotes” …",
    "日本語のテキストと中文",
    "emoji 🙂🚀 and ZWJ 👩‍👩‍👧 family",
    "combining e\u0301 and Hangul \u1100\u1161",
    "null \x00 and bell \x07 control chars",
    EOT + " special-looking text",
]


def corpus_sample(n_chars: int, seed: int) -> str:
    text = read_text(None)
    start = np.random.default_rng(seed).integers(0, len(text) - n_chars)
    return text[start : start + n_chars]


@pytest.fixture(scope="module")
def small_tokenizer():
    return train_tokenizer(corpus_sample(200_000, seed=0), vocab_size=512)


def write_lines(path, n_lines: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "ζήτα", "the", "and", "of"]
    lines = [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(n_lines)]
    text = "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


# ---- corpus and read_text ------------------------------------------------------------------


def test_embedded_corpus_is_packaged():
    path = default_corpus_path()
    assert path.is_file() and path.stat().st_size < 1_300_000
    assert (path.parent / "README.md").is_file()
    text = read_text(None)
    assert text.startswith("Genesis 1\nIn the beginning God created the heaven and the earth.\n")
    assert text.endswith("The grace of our Lord Jesus Christ be with you all. Amen.\n")
    assert len(text) > 4_000_000


def test_read_text_files_and_compression(tmp_path):
    text = "first line\nsecond línea\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "c.txt.xz").write_bytes(lzma.compress(text.encode()))
    (tmp_path / "bom.md").write_bytes(b"\xef\xbb\xbf" + text.encode())
    for name in ("a.txt", "b.txt.gz", "c.txt.xz", "bom.md"):
        assert read_text(tmp_path / name) == text, name
    assert read_text(str(tmp_path / "a.txt")) == text


def test_read_text_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b.txt").write_text("bee\n")
    (tmp_path / "a.md").write_text("ay")  # no final newline: one is added
    (tmp_path / "sub" / "c.txt").write_text("sea\n")
    (tmp_path / "sub" / "d.txt.gz").write_bytes(gzip.compress(b"dee\n"))
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "utf16.txt").write_text("wide\n", encoding="utf-16-le")  # valid UTF-8, has NULs
    (tmp_path / ".hidden.txt").write_text("hidden\n")
    (tmp_path / ".git" / "config").write_text("git\n")
    assert read_text(tmp_path) == "ay\nbee\nsea\ndee\n"


def test_read_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="is empty"):
        read_text(tmp_path / "blank.txt")
    (tmp_path / "bin.dat").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="not UTF-8 text"):
        read_text(tmp_path / "bin.dat")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="empty"):
        read_text(tmp_path / "emptydir")


# ---- tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_tokenizer_round_trips_corpus(small_tokenizer, seed):
    sample = corpus_sample(5000, seed=100 + seed)
    ids = small_tokenizer.encode(sample).ids
    assert small_tokenizer.decode(ids) == sample
    assert len(ids) < len(sample) / 2  # the merges compress English


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_tokenizer_round_trips_unicode(small_tokenizer, text):
    ids = small_tokenizer.encode(text).ids
    assert small_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_vocab_and_determinism():
    text = corpus_sample(100_000, seed=7)
    a, b = train_tokenizer(text, vocab_size=400), train_tokenizer(text, vocab_size=400)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 400
    assert a.token_to_id(EOT) == 0
    # every byte has a token, so nothing maps to an unknown id
    assert a.encode("\x00\xff").ids and None not in a.encode("\x00\xff").ids
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(text, vocab_size=256)


# ---- prepare_data ----------------------------------------------------------------------------


def test_prepare_data_splits_and_round_trips(tmp_path):
    text = write_lines(tmp_path / "corpus.txt", 400, seed=0)
    prep = prepare_data(tmp_path / "corpus.txt", vocab_size=300, cache_dir=tmp_path / "cache")
    assert isinstance(prep.train, np.memmap) and isinstance(prep.val, np.memmap)
    assert prep.train.dtype == np.uint16 and prep.train.ndim == 1
    assert prep.vocab_size == prep.tokenizer.get_vocab_size() <= 300
    assert prep.source == str(tmp_path / "corpus.txt")
    assert prep.cache_dir.parent == tmp_path / "cache"
    assert {p.name for p in prep.cache_dir.iterdir()} == {
        "tokenizer.json",
        "train.bin",
        "val.bin",
        "meta.json",
    }
    train_text = prep.tokenizer.decode(prep.train.tolist())
    val_text = prep.tokenizer.decode(prep.val.tolist())
    assert train_text + val_text == text
    assert train_text.endswith("\n")  # the split is on a line boundary
    assert abs(len(val_text) / len(text) - 0.02) < 0.01
    assert prep.meta["n_train_tokens"] == len(prep.train)
    # encode_text encodes new text exactly as the splits were encoded
    np.testing.assert_array_equal(encode_text(prep.tokenizer, val_text), prep.val)
    assert encode_text(prep.tokenizer, val_text).dtype == np.uint16


def test_prepare_data_reuses_cache(tmp_path, monkeypatch):
    src = tmp_path / "corpus.txt"
    write_lines(src, 300, seed=1)
    first = prepare_data(src, vocab_size=300, cache_dir=tmp_path)
    calls = []
    monkeypatch.setattr(data, "train_tokenizer", lambda *a, **k: calls.append("train"))
    monkeypatch.setattr(data, "_encode_to_file", lambda *a, **k: calls.append("encode"))
    second = prepare_data(src, vocab_size=300, cache_dir=tmp_path)
    assert calls == []
    assert second.cache_dir == first.cache_dir
    np.testing.assert_array_equal(second.train, first.train)
    np.testing.assert_array_equal(second.val, first.val)

    # a changed source or other settings key a new preparation
    monkeypatch.undo()
    write_lines(src, 300, seed=2)
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    changed = prepare_data(src, vocab_size=300, cache_dir=tmp_path)
    assert changed.cache_dir != first.cache_dir
    other_vocab = prepare_data(src, vocab_size=280, cache_dir=tmp_path)
    other_split = prepare_data(src, vocab_size=300, cache_dir=tmp_path, val_fraction=0.1)
    assert len({changed.cache_dir, other_vocab.cache_dir, other_split.cache_dir}) == 3


def test_prepare_data_rebuilds_incomplete_cache(tmp_path):
    src = tmp_path / "corpus.txt"
    write_lines(src, 200, seed=3)
    first = prepare_data(src, vocab_size=300, cache_dir=tmp_path)
    want = np.array(first.train)
    with open(first.cache_dir / "train.bin", "r+b") as f:
        f.truncate(10)  # as if a writer died half-way
    again = prepare_data(src, vocab_size=300, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.train, want)


def test_prepare_data_directory_and_env_cache(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    t1 = write_lines(docs / "one.txt", 150, seed=4)
    t2 = write_lines(docs / "two.txt", 150, seed=5)
    monkeypatch.setenv("FP4TRAIN_CACHE", str(tmp_path / "envcache"))
    prep = prepare_data(docs, vocab_size=300)
    assert prep.cache_dir.parent == tmp_path / "envcache"
    decoded = prep.tokenizer.decode(prep.train.tolist()) + prep.tokenizer.decode(prep.val.tolist())
    assert decoded == t1 + t2


def test_prepare_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_data(tmp_path / "nope.txt", cache_dir=tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        prepare_data(tmp_path / "empty.txt", cache_dir=tmp_path)
    (tmp_path / "one_line.txt").write_text("just one line without a break")
    with pytest.raises(ValueError, match="line boundary"):
        prepare_data(tmp_path / "one_line.txt", cache_dir=tmp_path)
    (tmp_path / "ok.txt").write_text("a\nb\n")
    for bad in (0, 0.9, "0.1"):
        with pytest.raises(ValueError, match="val_fraction"):
            prepare_data(tmp_path / "ok.txt", cache_dir=tmp_path, val_fraction=bad)
    with pytest.raises(ValueError, match="vocab_size"):
        prepare_data(tmp_path / "ok.txt", cache_dir=tmp_path, vocab_size=100)


def test_prepare_embedded_corpus(tmp_path):
    # the whole corpus: about 3 s on 2 CPU cores
    prep = prepare_data(cache_dir=tmp_path)
    assert prep.source == "<embedded kjv>"
    assert prep.vocab_size == 4096
    assert 900_000 < len(prep.train) < 1_200_000
    assert 0.015 < len(prep.val) / (len(prep.train) + len(prep.val)) < 0.025
    text = read_text(None)
    val_text = prep.tokenizer.decode(prep.val.tolist())
    assert text.endswith(val_text) and text[: len(text) - len(val_text)].endswith("\n")
    assert prep.tokenizer.decode(prep.train[:12].tolist()) in text[:100]


# ---- Batcher ---------------------------------------------------------------------------------


def collect(batcher: Batcher, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batcher.next_batch() for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batcher_windows_are_contiguous():
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = Batcher(tokens, batch_size=8, seq_len=32, seed=0).next_batch()
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    # tokens[i] == i: each row is a run of consecutive ids and y is x shifted by one
    torch.testing.assert_close(x, x[:, :1] + torch.arange(32), rtol=0, atol=0)
    torch.testing.assert_close(y, x + 1, rtol=0, atol=0)
    assert x.min() >= 0 and y.max() <= 9_999


def test_batcher_reaches_both_ends():
    tokens = np.arange(40, dtype=np.uint16)
    batcher = Batcher(tokens, batch_size=64, seq_len=8, seed=0)
    starts = torch.cat([x[:, 0] for x, _ in collect(batcher, 5)])
    assert starts.min() == 0 and starts.max() == 40 - 8 - 1


def test_batcher_is_deterministic_and_resumes():
    tokens = np.random.default_rng(0).integers(0, 5000, 20_000).astype(np.uint16)
    a = Batcher(tokens, batch_size=4, seq_len=16, seed=42)
    b = Batcher(tokens, batch_size=4, seq_len=16, seed=42)
    assert_batches_equal(collect(a, 3), collect(b, 3))
    state = a.state_dict()
    expected = collect(a, 3)
    resumed = Batcher(tokens, batch_size=4, seq_len=16, seed=42)
    resumed.load_state_dict(state)
    assert_batches_equal(collect(resumed, 3), expected)
    other_seed = Batcher(tokens, batch_size=4, seq_len=16, seed=43).next_batch()
    assert not torch.equal(other_seed[0], Batcher(tokens, 4, 16, seed=42).next_batch()[0])


def test_batcher_rank_sharding():
    tokens = np.random.default_rng(1).integers(0, 5000, 50_000).astype(np.uint16)
    ranks = [
        Batcher(tokens, batch_size=4, seq_len=16, seed=7, rank=r, world_size=2) for r in (0, 1)
    ]
    single = Batcher(tokens, batch_size=8, seq_len=16, seed=7)
    for _ in range(3):
        (x0, y0), (x1, y1) = (r.next_batch() for r in ranks)
        assert not torch.equal(x0, x1)
        x, y = single.next_batch()
        # the global batch is the same however it is sharded
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    # elastic resume: a state from 2 ranks resumes a single-rank run with the same global batch
    single_resumed = Batcher(tokens, batch_size=8, seq_len=16, seed=7)
    single_resumed.load_state_dict(ranks[0].state_dict())
    x, _ = single_resumed.next_batch()
    assert torch.equal(torch.cat([ranks[0].next_batch()[0], ranks[1].next_batch()[0]]), x)


def test_batcher_errors():
    tokens = np.arange(100, dtype=np.uint16)
    with pytest.raises(ValueError, match="too short"):
        Batcher(tokens, batch_size=2, seq_len=100)
    Batcher(tokens, batch_size=2, seq_len=99).next_batch()  # exactly seq_len + 1 tokens is enough
    with pytest.raises(ValueError, match="rank"):
        Batcher(tokens, batch_size=2, seq_len=8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        Batcher(tokens, batch_size=0, seq_len=8)
    with pytest.raises(ValueError, match="seq_len"):
        Batcher(tokens, 2, 8).load_state_dict(Batcher(tokens, 2, 16).state_dict())
    with pytest.raises(ValueError, match="seed"):
        Batcher(tokens, 2, 8, seed=1).load_state_dict(Batcher(tokens, 2, 8, seed=2).state_dict())


def test_batcher_on_prepared_memmap(tmp_path):
    write_lines(tmp_path / "c.txt", 300, seed=6)
    prep = prepare_data(tmp_path / "c.txt", vocab_size=300, cache_dir=tmp_path)
    x, y = Batcher(prep.train, batch_size=2, seq_len=16).next_batch()
    assert int(x.max()) < prep.vocab_size and torch.equal(x[:, 1:], y[:, :-1])


# ---- eval_batches ----------------------------------------------------------------------------


@pytest.mark.parametrize("n_tokens", [161, 170, 200])
def test_eval_batches_cover_the_tokens_once(n_tokens):
    tokens = np.arange(n_tokens, dtype=np.uint16)
    batches = list(eval_batches(tokens, batch_size=3, seq_len=10))
    n_windows = (n_tokens - 1) // 10
    assert [len(x) for x, _ in batches] == [3] * (n_windows // 3) + (
        [n_windows % 3] if n_windows % 3 else []
    )
    xs = torch.cat([x for x, _ in batches]).flatten()
    ys = torch.cat([y for _, y in batches]).flatten()
    assert torch.equal(xs, torch.arange(n_windows * 10))
    assert torch.equal(ys, torch.arange(1, n_windows * 10 + 1))
    assert_batches_equal(batches, list(eval_batches(tokens, batch_size=3, seq_len=10)))


def test_eval_batches_max_and_errors():
    tokens = np.arange(1000, dtype=np.uint16)
    assert len(list(eval_batches(tokens, batch_size=2, seq_len=10, max_batches=4))) == 4
    with pytest.raises(ValueError, match="too short"):
        eval_batches(tokens[:10], batch_size=2, seq_len=10)
    with pytest.raises(ValueError, match="max_batches"):
        eval_batches(tokens, batch_size=2, seq_len=10, max_batches=0)
