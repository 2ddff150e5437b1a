import json
import os

import pytest
import torch

from model import Llama, LlamaConfig

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32,
            rms_norm_eps=1e-5, initializer_range=0.2)
ROPES = {"default": {"rope_type": "default", "rope_theta": 10000.0},
         "abf": {"rope_type": "default", "rope_theta": 1e6},
         "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
         "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                  "rope_theta": 10000.0},
         "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                    "rope_theta": 500000.0}}


def hf_model(tmp_path, arch="llama", rope="default", **kw):
    """A tiny random transformers model saved with save_pretrained; returns (model, folder)."""
    import transformers
    torch.manual_seed(0)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**{**TINY, **kw}, rope_parameters=ROPES[rope])
        m = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**{**TINY, **kw}, rope_parameters=ROPES[rope])
        m = transformers.LlamaForCausalLM(cfg)
    m.save_pretrained(tmp_path)
    return m.eval(), str(tmp_path)


def ids(B=2, T=48, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,rope,kw", [
    ("llama", "default", {}), ("llama", "default", {"num_key_value_heads": 4}),  # MHA
    ("llama", "default", {"tie_word_embeddings": True}), ("llama", "abf", {}),
    ("llama", "linear", {}), ("llama", "yarn", {}), ("llama", "llama3", {}),
    ("llama", "default", {"attention_bias": True}), ("qwen2", "default", {}),
    ("qwen2", "yarn", {"tie_word_embeddings": True})])
def test_logits_match_transformers(tmp_path, arch, rope, kw):
    ref, path = hf_model(tmp_path, arch, rope, **kw)
    ours = Llama.from_pretrained(path).eval()
    x = ids()
    pos = torch.arange(48) * 3 + 5  # explicit positions well past the 32-token original window
    with torch.no_grad():
        want = ref(x, position_ids=pos[None].expand(2, -1)).logits
        got = ours(x, pos)
        got_batched = ours(x, pos[None].expand(2, -1))
    assert (got - want).abs().max() <= 1e-5
    assert (got_batched - want).abs().max() <= 1e-5
    assert want.abs().max() > 0.1  # the comparison is not trivially between zeros
    if kw.get("tie_word_embeddings"):
        assert ours.lm_head.weight is ours.embed_tokens.weight


@pytest.mark.parametrize("scaling,theta", [
    ({"rope_type": "linear", "factor": 4.0}, 10000.0),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 10000.0),
    (None, 2e6)])
def test_export_round_trip_in_transformers(tmp_path, scaling, theta):
    """A folder we save with an extended RoPE loads in transformers with the same RoPE and logits."""
    import transformers
    _, path = hf_model(tmp_path / "orig")
    ours = Llama.from_pretrained(path).set_rope(theta, scaling, max_pos=128).eval()
    ours.save_pretrained(tmp_path / "ext")
    cfg = json.load(open(tmp_path / "ext" / "config.json"))
    assert cfg["rope_theta"] == theta and cfg["rope_scaling"] == scaling  # legacy keys (4.x, vLLM)
    assert cfg["rope_parameters"] == {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ext").eval()
    x = ids(1, 100)
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max() <= 1e-5
    again = Llama.from_pretrained(tmp_path / "ext")
    assert again.cfg.rope_scaling == scaling and again.cfg.rope_theta == theta
    assert again.cfg.max_pos == 128


def test_sharded_save_and_load(tmp_path):
    _, path = hf_model(tmp_path / "orig")
    m = Llama.from_pretrained(path)
    from model import save_pretrained
    save_pretrained(m.cfg, m.state_dict(), tmp_path / "sharded", shard_bytes=20_000)
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    m2 = Llama.from_pretrained(tmp_path / "sharded")
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_causal_and_default_positions(tmp_path):
    _, path = hf_model(tmp_path)
    m = Llama.from_pretrained(path).eval()
    x = ids(1, 20)
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 1) % 97
    with torch.no_grad():
        a, b = m(x), m(y)
        assert torch.equal(a[:, :12], b[:, :12]) and not torch.allclose(a[:, 12:], b[:, 12:])
        assert torch.equal(m(x), m(x, torch.arange(20)))


def test_forward_hidden_captures(tmp_path):
    _, path = hf_model(tmp_path)
    m = Llama.from_pretrained(path).eval()
    x = ids(2, 10)
    with torch.no_grad():
        h, cap = m.forward_hidden(x, hidden_layers=(0, 1), qkv_layers=(1,))
        assert torch.allclose(m.lm_head(h), m(x))
        assert cap["q"][1].shape == (2, 4, 10, 16) and cap["k"][1].shape == (2, 2, 10, 16)
        assert cap["v"][1].shape == (2, 2, 10, 16) and cap["hidden"][0].shape == (2, 10, 64)
        assert torch.allclose(m.norm(cap["hidden"][1]), h)


def test_checkpointing_gives_same_gradients(tmp_path):
    _, path = hf_model(tmp_path)
    grads = []
    for ckpt in (False, True):
        m = Llama.from_pretrained(path).train()
        m.checkpointing = ckpt
        h, cap = m.forward_hidden(ids(1, 12), qkv_layers=(0,))
        (m.lm_head(h).square().mean() + cap["q"][0].square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Llama.from_pretrained(tmp_path)
    _, path = hf_model(tmp_path / "m")
    cfg = json.load(open(os.path.join(path, "config.json")))
    broken = dict(cfg)
    del broken["hidden_size"]
    json.dump(broken, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="missing key.*hidden_size"):
        Llama.from_pretrained(path)
    json.dump({**cfg, "intermediate_size": 128}, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight has shape"):
        Llama.from_pretrained(path)
    json.dump({**cfg, "rope_parameters": {"rope_type": "longrope", "factor": 2.0,
                                          "rope_theta": 1e4}}, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="unknown rope_type 'longrope'"):
        Llama.from_pretrained(path)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    st = os.path.join(path, "model.safetensors")
    data = open(st, "rb").read()
    open(st, "wb").write(data[: len(data) // 2])
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
