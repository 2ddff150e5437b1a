import json
import os
import shutil

import pytest
import torch

from model import Llama, LlamaConfig, save_pretrained

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32,
            rms_norm_eps=1e-5, initializer_range=0.2)
ROPES = {"default": {}, "abf": {"rope_theta": 1e6},  # over rope_type default, rope_theta 1e4
         "linear": {"rope_type": "linear", "factor": 4.0},
         "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
         "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "rope_theta": 5e5,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}


def hf_model(path, arch="Llama", rope="default", **kw):
    """A tiny random transformers model saved with save_pretrained; returns (model, folder)."""
    import transformers
    torch.manual_seed(0)
    cfg = getattr(transformers, arch + "Config")(**{**TINY, **kw}, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, **ROPES[rope]})
    m = getattr(transformers, arch + "ForCausalLM")(cfg)
    m.save_pretrained(path)
    return m.eval(), str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The default tiny Llama folder, for the tests that only read it."""
    return hf_model(tmp_path_factory.mktemp("tiny"))[1]


def ids(B=2, T=48, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,rope,kw", [
    ("Llama", "default", {}), ("Llama", "default", {"num_key_value_heads": 4}),  # MHA
    ("Llama", "default", {"tie_word_embeddings": True}), ("Llama", "abf", {}),
    ("Llama", "linear", {}), ("Llama", "yarn", {}), ("Llama", "llama3", {}),
    ("Llama", "default", {"attention_bias": True}), ("Qwen2", "default", {}),
    ("Qwen2", "yarn", {"tie_word_embeddings": True})])
def test_logits_match_transformers(tmp_path, arch, rope, kw):
    ref, path = hf_model(tmp_path, arch, rope, **kw)
    ours, x = Llama.from_pretrained(path).eval(), ids()
    pos = torch.arange(48) * 3 + 5  # explicit positions well past the 32-token original window
    with torch.no_grad():
        want = ref(x, position_ids=pos[None].expand(2, -1)).logits
        for p in (pos, pos[None].expand(2, -1)):  # positions (T,) and (B,T)
            assert (ours(x, p) - want).abs().max() <= 1e-5
    assert want.abs().max() > 0.1  # the comparison is not trivially between zeros
    if kw.get("tie_word_embeddings"):
        assert ours.lm_head.weight is ours.embed_tokens.weight


@pytest.mark.parametrize("scaling,theta", [
    ({"rope_type": "linear", "factor": 4.0}, 10000.0),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 10000.0),
    (None, 2e6)])
def test_export_round_trip_in_transformers(tiny, tmp_path, scaling, theta):
    """Saved with an extended RoPE, a folder loads in transformers with that RoPE and logits."""
    import transformers
    ours = Llama.from_pretrained(tiny).set_rope(theta, scaling, max_pos=128).eval()
    ours.save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["rope_theta"] == theta and cfg["rope_scaling"] == scaling  # legacy keys (4.x, vLLM)
    want = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
    assert cfg["rope_parameters"] == want
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (ours(x := ids(1, 100)) - ref(x).logits).abs().max() <= 1e-5
    again = Llama.from_pretrained(tmp_path).cfg
    assert (again.rope_scaling, again.rope_theta, again.max_pos) == (scaling, theta, 128)


def test_sharded_save_and_load(tiny, tmp_path):
    m = Llama.from_pretrained(tiny)
    save_pretrained(m.cfg, m.state_dict(), tmp_path, shard_bytes=20_000)
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    again = Llama.from_pretrained(tmp_path).state_dict()
    for k, v in m.state_dict().items():
        assert torch.equal(v, again[k]), k


def test_causal_default_positions_and_captures(tiny):
    m, x = Llama.from_pretrained(tiny).eval(), ids(1, 20)
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 1) % 97
    with torch.no_grad():
        a, b = m(x), m(y)
        assert torch.equal(a[:, :12], b[:, :12]) and not torch.allclose(a[:, 12:], b[:, 12:])
        assert torch.equal(a, m(x, torch.arange(20)))
        x = ids(2, 10)
        h, cap = m.forward_hidden(x, hidden_layers=(0, 1), qkv_layers=(1,))
        assert torch.allclose(m.lm_head(h), m(x)) and torch.allclose(m.norm(cap["hidden"][1]), h)
        assert cap["q"][1].shape == (2, 4, 10, 16) and cap["k"][1].shape == (2, 2, 10, 16)
        assert cap["v"][1].shape == (2, 2, 10, 16) and cap["hidden"][0].shape == (2, 10, 64)


def test_checkpointing_gives_same_gradients(tiny):
    grads = []
    for ckpt in (False, True):
        m = Llama.from_pretrained(tiny).train()
        m.checkpointing = ckpt
        h, cap = m.forward_hidden(ids(1, 12), qkv_layers=(0,))
        (m.lm_head(h).square().mean() + cap["q"][0].square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Llama.from_pretrained(tmp_path)
    path = shutil.copytree(tiny, tmp_path / "m")
    cfg, st = json.load(open(path / "config.json")), path / "model.safetensors"
    longrope = {"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4}
    for bad, match in [({k: v for k, v in cfg.items() if k != "hidden_size"},
                        "missing key.*hidden_size"),
                       ({**cfg, "intermediate_size": 128}, r"mlp\.\w+_proj\.weight has shape"),
                       ({**cfg, "rope_parameters": longrope}, "unknown rope_type 'longrope'")]:
        (path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            Llama.from_pretrained(path)
    (path / "config.json").write_text(json.dumps(cfg))
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors.*corrupt or truncated"):
        Llama.from_pretrained(path)
    os.remove(st)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Llama.from_pretrained(path)


def test_config_round_trip():
    c = LlamaConfig(rope_theta=2e7, rope_scaling=None, tie_embeddings=True)
    c2 = LlamaConfig.from_hf(c.to_hf())
    assert {k: v for k, v in vars(c2).items() if k != "hf"} == \
        {k: v for k, v in vars(c).items() if k != "hf"}


def test_checkpoint_dtype_from_either_transformers_key():
    """config.json's torch_dtype (transformers 4) or dtype (5) sets load and export dtype."""
    hf = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
          "intermediate_size": 128, "vocab_size": 256}
    assert LlamaConfig.from_hf({**hf, "dtype": "bfloat16"}).dtype == torch.bfloat16
    assert LlamaConfig.from_hf({**hf, "torch_dtype": "float16"}).dtype == torch.float16
    assert LlamaConfig.from_hf(hf).dtype == torch.float32


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_document_attention_is_each_document_alone(device):
    """Causal attention within each document and none across: equal to SDPA on each document
    alone (bf16 on CUDA: PyTorch's varlen flash kernel; CPU: one SDPA call per document)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from model import document_attention
    dtype = torch.bfloat16 if device == "cuda" else torch.float64
    g = torch.Generator().manual_seed(0)
    B, H, K, T, hd = 2, 6, 2, 40, 16
    q, k, v = (torch.randn(B, n, T, hd, generator=g).to(device, dtype) for n in (H, K, K))
    bounds = [0, 7, 40, 41, 55, 80]  # documents over the flattened B*T = 80 tokens
    documents = torch.tensor(bounds, dtype=torch.int32, device=device)
    y = document_attention(q, k, v, documents)
    for start, end in zip(bounds[:-1], bounds[1:]):
        row = start // T
        first = start - row * T
        last = end - row * T
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[row:row + 1, :, first:last], k[row:row + 1, :, first:last],
            v[row:row + 1, :, first:last], is_causal=True, enable_gqa=True)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-12
        torch.testing.assert_close(y[row:row + 1, :, first:last], alone, rtol=tol, atol=tol)
