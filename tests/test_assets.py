"""assets.py: BPE from GGUF, GGUF conversion, R/deb readers (CPU, ~1 s without assets). Tests on
the real model need `python data.py setup --model-only` (~17 s, 610 MB) and skip otherwise."""
import io, json, struct, tarfile, zlib

import numpy as np
import pytest

import assets, data
from test_data import ASSETS, MODEL, TEXT, needs_assets


def test_bpe_from_gguf_and_save(tmp_path):
    tokens = ["<|endoftext|>", "a", "b", "ab", "\u0120", "\u0120ab", "1", "<|im_start|>"]
    ranks, special = assets.bpe_from_gguf(tokens, [3, 1, 1, 1, 1, 1, 1, 3])
    assert special == {"<|endoftext|>": 0, "<|im_start|>": 7}
    assert ranks[b" ab"] == 5 and ranks[b" "] == 4 and len(ranks) == 5 + 1 + 252
    assert sorted(r for r in ranks.values() if r >= 8) == list(range(8, 8 + 252))
    assets.save_tokenizer(tmp_path, "tiny", ranks, special, len(tokens))
    enc = data.load_tokenizer(tmp_path)
    assert enc.vocab_size == 8 and enc.eos_id == 0
    assert enc.encode_ordinary("ab ab 11") == [3, 5, ranks[b" "], 6, 6]  # digits split singly
    assert enc.decode(enc.encode_ordinary(TEXT)) == TEXT
    assert data.tokenizer_hash(enc) == data.tokenizer_hash(data.load_tokenizer(tmp_path))


def test_setup_through_data_cli(tmp_path):  # data.py imports assets lazily, in its setup branch
    with pytest.raises(FileNotFoundError, match="--gguf .*nope.gguf: no such file"):
        data.main(["setup", "--dir", str(tmp_path), "--gguf", str(tmp_path / "nope.gguf")])


def test_convert_gguf_unpermutes(tmp_path):
    gguf = pytest.importorskip("gguf")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    rng, D, H, K, hd, F = np.random.default_rng(0), 32, 4, 2, 8, 48
    shapes = {"embed_tokens": (9, D), "norm": (D,), "layers.0.input_layernorm": (D,),
              "layers.0.self_attn.q_proj": (H * hd, D), "layers.0.self_attn.k_proj": (K * hd, D),
              "layers.0.self_attn.v_proj": (K * hd, D), "layers.0.self_attn.o_proj": (D, H * hd),
              "layers.0.post_attention_layernorm": (D,), "layers.0.mlp.gate_proj": (F, D),
              "layers.0.mlp.up_proj": (F, D), "layers.0.mlp.down_proj": (D, F)}
    hf = {f"model.{k}.weight": rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    to_gguf = {v: k for k, v in assets.GGUF_TO_HF.items()}

    def permute(w, n):  # llama.cpp's convert_hf_to_gguf.py, HF -> GGUF
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    for k, v in [("block_count", 1), ("context_length", 64), ("embedding_length", D),
                 ("feed_forward_length", F), ("head_count", H), ("head_count_kv", K),
                 ("rope_freq_base", 1e5), ("layer_norm_rms_eps", 1e-5), ("tokenizer_pre", "smollm"),
                 ("rope_dimension_count", hd), ("tokenizer_model", "gpt2"),
                 ("token_list", ["<|endoftext|>", "a", "b", "ab", "\u0120", "\u0120ab", *"123"]),
                 ("token_types", [3] + [1] * 8)]:
        getattr(w, f"add_{k}")(v)
    for name, t in hf.items():
        if "q_proj" in name or "k_proj" in name:
            t = permute(t, H if "q_proj" in name else K)
        short = to_gguf[name.removeprefix("model.layers.0.").rsplit(".", 1)[0]]
        w.add_tensor(f"blk.0.{short}.weight" if "layers" in name else f"{short}.weight", t)
    for step in ("write_header_to_file", "write_kv_data_to_file", "write_tensors_to_file", "close"):
        getattr(w, step)()
    assets.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    got = safetensors_numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert got.keys() == hf.keys()
    for k in hf:
        assert np.array_equal(got[k], hf[k]), k
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (H, K, hd)
    assert cfg["tie_word_embeddings"] and cfg["rms_norm_eps"] == 1e-5 and cfg["vocab_size"] == 9
    assert data.load_tokenizer(tmp_path / "hf").encode_ordinary("ab 12") == [3, 4, 6, 7]


def r_rdb(vectors):
    """Serialise character vectors the way R's lazy-load database does (XDR, version 3, zlib)."""
    out = b""
    for strs in vectors:
        blob = b"X\n" + struct.pack(">iiii", 3, 0x40201, 0x30500, 5) + b"UTF-8"
        blob += struct.pack(">ii", 16, len(strs))
        for s in strs:
            b = s.encode() if s is not None else b""
            blob += struct.pack(">ii", 0x40009, len(b) if s is not None else -1) + b
        out += struct.pack(">i", len(blob)) + zlib.compress(blob)
    return out


def test_r_strings_and_deb_file(tmp_path):
    rdb = r_rdb([["EMMA", "", "By Jane Austen", None], ["Persuasion", "caf\u00e9"]])
    assert assets.r_strings(rdb) == [["EMMA", "", "By Jane Austen", ""], ["Persuasion", "caf\u00e9"]]
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w:xz") as t:
        info = tarfile.TarInfo("./usr/lib/R/site-library/x/data/Rdata.rdb")
        info.size = len(rdb)
        t.addfile(info, io.BytesIO(rdb))
    members = [(b"debian-binary", b"2.0\n"), (b"control.tar.xz", b"abc"),
               (b"data.tar.xz", tar.getvalue())]
    ar = b"!<arch>\n" + b"".join(name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) * 2 +
                                 b"100644".ljust(8) + str(len(body)).encode().ljust(10) + b"`\n" +
                                 body + b"\n" * (len(body) % 2) for name, body in members)
    (tmp_path / "x.deb").write_bytes(ar)
    assert assets.deb_file(tmp_path / "x.deb", "data/Rdata.rdb") == rdb


@needs_assets
def test_real_model_config():
    cfg = json.loads((MODEL / "config.json").read_text())
    want = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "head_dim": 64, "vocab_size": 49152, "rope_theta": 1e5, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 8192, "tie_word_embeddings": True, "rope_scaling": None}
    assert {k: cfg[k] for k in want} == want
    from safetensors import safe_open
    with safe_open(str(MODEL / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"} and len(f.keys()) == 272
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]


@needs_assets
def test_real_tokenizer_matches_hf_bpe():
    tokenizers = pytest.importorskip("tokenizers")
    gguf = pytest.importorskip("gguf")
    if not (ASSETS / ".cache" / assets.GGUF).exists():
        pytest.skip("no cached GGUF (setup --gguf was used)")
    r = gguf.GGUFReader(str(ASSETS / ".cache" / assets.GGUF))
    vocab = r.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in r.fields["tokenizer.ggml.merges"].contents()]
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(
        {t: i for i, t in enumerate(vocab)}, merges))
    pre = tokenizers.pre_tokenizers
    hf.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True),
                                     pre.ByteLevel(add_prefix_space=False, use_regex=True)])
    enc = data.load_tokenizer(MODEL)
    texts = [TEXT, "x  1  22\n\n\n 333 's 'S'll\u00a0\u3000 \U0001f600 \u0661\u0662 \u00b2"]
    for path in sorted((ASSETS / "corpus").rglob("*.jsonl"))[:3]:
        texts.append(json.loads(path.read_text().split("\n", 1)[0])["text"][:20_000])
    for t in texts:
        assert enc.encode_ordinary(t) == hf.encode(t, add_special_tokens=False).ids
