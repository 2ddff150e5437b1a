"""data.py: shards, tokenizers, prepare, streams (CPU, ~1 s without assets). Tests on the real
tokenizer need `python data.py setup --model-only` (~17 s, 610 MB) and skip otherwise."""
import base64, json
from pathlib import Path

import numpy as np
import pytest

import data

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MODEL = ASSETS / "smollm2-135m"
needs_assets = pytest.mark.skipif(not (MODEL / "tiktoken.json").exists(),
                                  reason="run `python data.py setup --model-only` first")
TEXT = ("It is a truth universally acknowledged, that a single man in possession\n"
        "of a good fortune, must be in want of a wife.\n\n"
        "However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that "
        "he is considered the rightful property of some one or other of their daughters. 1813, "
        "3.14159 -- 'Tis what I'd say; naive cafe, 10,000 pounds!\t\u00e9t\u00e9 \u4e2d\u6587")


def byte_tokenizer(tmp_path, merges=(b"th", b"the", b" the", b"in", b"12", b"123", b"45", b"1234")):
    """A Llama-3-style tokenizer.model: 256 byte ranks + a few merges (tiktoken file format)."""
    toks = [bytes([b]) for b in range(256)] + list(merges)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(toks)))
    return path


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 49152, 10_001)
    data.write_shard(tmp_path / "a.bin", tokens, "ab" * 16, 49152)
    got = data.read_shard(tmp_path / "a.bin", tokenizer_hash="ab" * 16, vocab_size=49152)
    assert got.dtype == np.uint32 and np.array_equal(got, tokens)
    assert data.read_header(tmp_path / "a.bin") == {"version": 1, "vocab_size": 49152,
                                                    "n_tokens": 10_001, "tokenizer_hash": "ab" * 16}
    data.write_shard(tmp_path / "empty.bin", [], "00" * 16, 10)
    assert len(data.read_shard(tmp_path / "empty.bin")) == 0


def test_shard_errors(tmp_path):
    p = tmp_path / "s.bin"
    for bad, match in [([1, 2, 10], r"s\.bin: token id 10 outside"), ([-1, 2], "outside")]:
        with pytest.raises(ValueError, match=match):
            data.write_shard(p, bad, "00" * 16, 10)
    assert not p.exists()
    data.write_shard(p, np.arange(100), "00" * 16, 100)
    good = p.read_bytes()
    for raw, call, match in [
            (good, lambda: data.read_shard(p, tokenizer_hash="11" * 16), "not .*tokenizer"),
            (good, lambda: data.read_shard(p, vocab_size=50), "vocab 100 > the model's 50"),
            (good[:-4], lambda: data.read_shard(p), r"s\.bin: .*truncated"),
            (b"GARBAGE!" + bytes(100), lambda: data.read_shard(p), r"s\.bin: not a token shard"),
            (b"NRT", lambda: data.read_header(p), "bad magic")]:
        p.write_bytes(raw)
        with pytest.raises(ValueError, match=match):
            call()


def test_llama3_style_tokenizer(tmp_path):
    enc = data.load_tokenizer(byte_tokenizer(tmp_path).parent)
    n = 256 + 8
    assert enc.vocab_size == n + 256 and enc.n_vocab == n + 256
    assert enc.eos_id == n + 1 and enc.encode("<|begin_of_text|>", allowed_special="all") == [n]
    assert enc.encode("<|eot_id|>", allowed_special="all") == [n + 9]
    ids = enc.encode_ordinary(TEXT)
    assert enc.decode(ids) == TEXT and 256 + 2 in ids  # " the" merged
    assert [enc.decode([t]) for t in enc.encode_ordinary("12345")] == ["123", "45"]  # \p{N}{1,3}


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.py setup"):
        data.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x0b\x00sentencepiece proto")
    with pytest.raises(ValueError, match="not a tiktoken BPE file"):
        data.load_tokenizer(tmp_path)


def test_clean_text():
    assert data.clean_text("a\r\nb\x04c\ufeffd\x1d\te\U00050000f\n") == "a\nbcd\tef\n"


def test_prepare(tmp_path):
    enc = data.load_tokenizer(byte_tokenizer(tmp_path))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "one.txt").write_text("the first\x04 book")
    (tmp_path / "in" / "two.jsonl").write_text(
        json.dumps({"text": "in the"}) + "\n\n" + json.dumps({"text": TEXT}) + "\n")
    counts = data.prepare([tmp_path / "in", tmp_path / "in" / "one.txt"], enc, tmp_path / "out")
    tokens = data.read_shard(tmp_path / "out" / "in.bin", data.tokenizer_hash(enc))
    assert counts["in"] == len(tokens) and counts["one"] == len(enc.encode("the first book")) + 1
    docs = enc.decode(tokens.tolist()).split("<|end_of_text|>")
    assert docs == ["the first book", "in the", TEXT, ""]
    with pytest.raises(FileNotFoundError):
        data.prepare([tmp_path / "nope.txt"], enc, tmp_path / "out")


def corpus(n_docs=200, seed=0, eos=0):
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(1, 100, rng.integers(1, 60)), eos) for _ in range(n_docs)]
    return np.concatenate(docs).astype(np.uint32)


def test_windows():
    tokens = corpus()
    x, pos = data.windows(tokens, 64, 4, seed=1, step=7, rank=0)
    assert x.shape == pos.shape == (4, 64) and x.dtype == pos.dtype == np.int64
    assert np.array_equal(pos[2], np.arange(64))
    for row in x:  # each window is a contiguous slice of the stream
        assert any(np.array_equal(row, tokens[i:i + 64]) for i in range(len(tokens) - 63))
    again = lambda step=7, rank=0: data.windows(tokens, 64, 4, seed=1, step=step, rank=rank)[0]
    assert np.array_equal(x, again()) and not np.array_equal(x, again(rank=1))
    assert not np.array_equal(x, again(step=8))
    starts = data.doc_starts(tokens, 0)
    assert starts[0] == 0 and np.all(tokens[starts[1:] - 1] == 0) and len(starts) == 200
    x, _ = data.windows(tokens, 32, 16, 0, 0, starts=starts)
    assert all(any(np.array_equal(r, tokens[s:s + 32]) for s in starts) for r in x)
    full, _ = data.windows(tokens, len(tokens), 2, 0, 0)  # a window as long as the stream
    assert np.array_equal(full[0], tokens)
    with pytest.raises(ValueError, match="cannot fill"):
        data.windows(tokens, len(tokens) + 1, 1, 0, 0)


def test_packed():
    tokens = corpus()
    starts = data.doc_starts(tokens, 0)
    ends = np.append(starts[1:], len(tokens))
    x, pos = data.packed(tokens, starts, 256, 3, seed=0, step=5, rank=2, max_doc=20)
    assert x.shape == pos.shape == (3, 256) and np.array_equal(pos[1], np.arange(256))
    assert np.array_equal(x, data.packed(tokens, starts, 256, 3, 0, 5, 2, max_doc=20)[0])
    assert not np.array_equal(x, data.packed(tokens, starts, 256, 3, 0, 5, 3, max_doc=20)[0])
    short = {tuple(tokens[s:e]) for s, e in zip(starts, ends) if e - s <= 20}
    for row in x:  # whole short documents back to back, the last one cut
        docs = np.split(row, np.flatnonzero(row == 0) + 1)
        assert all(tuple(d) in short for d in docs[:-1])
        assert any(doc[:len(docs[-1])] == tuple(docs[-1]) for doc in short)
    with pytest.raises(ValueError, match="max_doc"):
        data.packed(tokens, starts, 256, 1, 0, 0, max_doc=1)


@needs_assets
def test_real_tokenizer():
    enc = data.load_tokenizer(MODEL)
    assert enc.encode_ordinary("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert enc.vocab_size == 49152 and enc.eos_id == 0 and enc.n_vocab == 49152 + 21
    assert enc.encode("<|im_start|>user<|im_end|>", allowed_special="all")[::2] == [1, 2]
    assert [enc.decode([t]) for t in enc.encode_ordinary("in 2024")] == ["in", " ", *"2024"]
    ids = enc.encode_ordinary(TEXT)
    assert enc.decode(ids) == TEXT and max(ids) < 49152
