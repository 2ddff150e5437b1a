"""A single-file Llama (Llama-2/3/3.1/3.2, Mistral, SmolLM2, Qwen2): GQA, RMSNorm, SwiGLU, optional
q/k/v bias, explicit positions, HF config.json + safetensors in and out.

Shapes: B batch, T time, D model dim, H query heads, K kv heads, hd head dim, F ffn dim, V vocab.
Parameter names are the HF checkpoint's minus the `model.` prefix, so loading needs no mapping
table.
"""
import inspect
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rope import apply_rope, rope_cos_sin, rope_inv_freq

HF_KEYS = {  # our field -> HF config.json key
    "vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
    "ffn_dim": "intermediate_size",
    "norm_eps": "rms_norm_eps", "max_pos": "max_position_embeddings",
    "tie_embeddings": "tie_word_embeddings"}


@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    ffn_dim: int = 1536
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope_scaling dict; None = default RoPE
    max_pos: int = 8192
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias also sets o_bias
    o_bias: bool = False
    hf: dict = field(default_factory=dict, repr=False)  # the rest of config.json, passed through

    @classmethod
    def from_hf(cls, d, source="config.json"):
        """From an HF config dict (Llama, Mistral, Qwen2 families)."""
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size", "vocab_size") if k not in d]
        if missing:
            raise ValueError(f"{source}: missing key(s) {missing}; "
                             "is this an HF Llama-family config?")
        if d.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not supported")
        kw = {f: d[k] for f, k in HF_KEYS.items() if d.get(k) is not None}
        kw.setdefault("n_kv_heads", d["num_attention_heads"])
        kw["head_dim"] = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        rp = dict(d.get("rope_parameters") or {})  # transformers 5.x
        kw["rope_theta"] = float(d.get("rope_theta") or rp.get("rope_theta") or 10000.0)
        scaling = d.get("rope_scaling") or {k: v for k, v in rp.items() if k != "rope_theta"}
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            kw["rope_scaling"] = {"rope_type": scaling.get("rope_type", scaling.get("type")),
                                  **{k: v for k, v in scaling.items()
                                     if k not in ("type", "rope_type")}}
        qwen = d.get("model_type") == "qwen2"
        kw["qkv_bias"] = bool(qwen or d.get("attention_bias"))
        kw["o_bias"] = bool(not qwen and d.get("attention_bias"))
        cfg = cls(**kw, hf=dict(d))
        rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_pos)  # validates
        return cfg

    @property
    def dtype(self):
        """The checkpoint's dtype: config.json's torch_dtype (transformers 4) or dtype (5), else
        float32."""
        name = str(self.hf.get("torch_dtype") or self.hf.get("dtype") or "float32")
        return getattr(torch, name.removeprefix("torch."), torch.float32)

    @classmethod
    def of(cls, init):
        """The config of train.py's --init: an HF folder's config.json, or random:NAME of SHAPES
        (saved as bfloat16, as the real checkpoints of those shapes are)."""
        if not init.startswith("random:"):
            return cls.from_json(_need(init, "config.json"))
        if init[7:] not in SHAPES:
            raise ValueError(f"--init {init}: known shapes are random:{', random:'.join(SHAPES)}")
        return cls(**SHAPES[init[7:]], hf={"torch_dtype": "bfloat16"})

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            return cls.from_hf(json.load(f), source=path)

    def to_hf(self):
        """HF config dict with the RoPE written both ways (legacy rope_theta/rope_scaling for
        transformers 4.x and vLLM, rope_parameters for transformers 5.x), consistent."""
        d = {k: v for k, v in self.hf.items() if k not in ("rope_scaling", "rope_parameters")}
        d.setdefault("architectures", ["Qwen2ForCausalLM" if self.qkv_bias and not self.o_bias
                                       else "LlamaForCausalLM"])
        d.setdefault("model_type", "qwen2" if self.qkv_bias and not self.o_bias else "llama")
        d.update({k: getattr(self, f) for f, k in HF_KEYS.items()}, head_dim=self.head_dim,
                 hidden_act="silu", rope_theta=self.rope_theta, rope_scaling=self.rope_scaling)
        if d["model_type"] != "qwen2":
            d["attention_bias"] = self.qkv_bias
        d["rope_parameters"] = {"rope_type": "default", **(self.rope_scaling or {}),
                                "rope_theta": self.rope_theta}
        return d


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in fp32 as HF does."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (xf * rms).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.H = c.n_heads
        self.K = c.n_kv_heads
        self.hd = c.head_dim
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=c.o_bias)

    def forward(self, x, cos, sin, documents=None):
        """documents: None (causal over each row), or the cumulative lengths (n+1,) int32 of the
        documents that tile the flattened B*T tokens: causal within each document only."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.hd).transpose(1, 2)  # (B,H,T,hd)
        k = self.k_proj(x).view(B, T, self.K, self.hd).transpose(1, 2)  # (B,K,T,hd)
        v = self.v_proj(x).view(B, T, self.K, self.hd).transpose(1, 2)  # (B,K,T,hd)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if documents is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=self.K != self.H)
        else:
            y = document_attention(q, k, v, documents)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.hd)), (q, k, v)


def document_attention(q, k, v, documents):
    """Causal attention within each document of the flattened B*T tokens, none across: q
    (B,H,T,hd), k and v (B,K,T,hd), documents = cumulative lengths (n+1,) int32 from 0 to B*T,
    no document crossing a row (so none is longer than T). -> (B,H,T,hd)
    One variable-length flash call on CUDA in half precision (PyTorch's varlen_attn); elsewhere
    (CPU, fp32) one SDPA call per document."""
    B, H, T, hd = q.shape
    K = k.shape[1]
    q_tokens = q.transpose(1, 2).reshape(B * T, H, hd)  # (B*T, H, hd), varlen's layout
    k_tokens = k.transpose(1, 2).reshape(B * T, K, hd)
    v_tokens = v.transpose(1, 2).reshape(B * T, K, hd)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _varlen_attn() is not None:
        y_tokens = _varlen_causal(q_tokens, k_tokens, v_tokens, documents, T)
    else:
        y_tokens = torch.empty_like(q_tokens)
        bounds = documents.tolist()
        if bounds[0] != 0 or bounds[-1] != B * T:
            raise ValueError(f"documents must run from 0 to B*T = {B * T}, got {bounds}")
        for start, end in zip(bounds[:-1], bounds[1:]):
            q_document = q_tokens[start:end].transpose(0, 1)  # (H, length, hd)
            k_document = k_tokens[start:end].transpose(0, 1)  # (K, length, hd)
            v_document = v_tokens[start:end].transpose(0, 1)
            y = F.scaled_dot_product_attention(q_document, k_document, v_document,
                                               is_causal=True, enable_gqa=K != H)
            y_tokens[start:end] = y.transpose(0, 1)
    return y_tokens.view(B, T, H, hd).transpose(1, 2)


def _varlen_attn():
    """torch.nn.attention.varlen.varlen_attn, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _varlen_causal(q, k, v, documents, max_length):
    """varlen_attn, causal, on (tokens, heads, hd); k and v repeated to the query heads where
    this torch's varlen_attn has no enable_gqa. max_length: an upper bound (the window), a
    constant, so that a compiled block is not recompiled for every batch."""
    varlen_attn = _varlen_attn()
    parameters = inspect.signature(varlen_attn).parameters
    keywords = {}
    if "window_size" in parameters:
        keywords["window_size"] = (-1, 0)  # causal, in torch >= 2.12's terms
    else:
        keywords["is_causal"] = True
    if k.shape[1] != q.shape[1] and "enable_gqa" in parameters:
        keywords["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:
        group_size = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group_size, 1)
        v = v.repeat_interleave(group_size, 1)
    return varlen_attn(q, k, v, documents, documents, max_length, max_length, **keywords)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.ffn_dim, bias=False)
        self.up_proj = nn.Linear(c.dim, c.ffn_dim, bias=False)
        self.down_proj = nn.Linear(c.ffn_dim, c.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, documents=None):
        a, qkv = self.self_attn(self.input_layernorm(x), cos, sin, documents)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), qkv


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.checkpointing = False  # per-block activation checkpointing (recompute in backward)

    def set_rope(self, theta, scaling=None, max_pos=None):
        """Change the RoPE (ABF: theta; PI/YaRN/llama3: an HF scaling dict); weights untouched."""
        self.cfg.rope_theta = float(theta)
        self.cfg.rope_scaling = scaling
        self.cfg.max_pos = max_pos or self.cfg.max_pos
        rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, scaling, self.cfg.max_pos)
        return self

    def rope(self, positions, dtype):
        c = self.cfg
        inv_freq, attn = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, c.max_pos)
        return rope_cos_sin(positions, inv_freq, attn, dtype)

    def forward_hidden(self, tokens, positions=None, hidden_layers=(), qkv_layers=(),
                       documents=None):
        """tokens (B,T) -> (final-norm hidden (B,T,D), cap). cap["hidden"][l] is the residual stream
        after block l; cap["q"/"k"/"v"][l] are layer l's post-RoPE q (B,H,T,hd), k and v
        (B,K,T,hd). documents: None, or the cumulative lengths (n+1,) int32 of documents that
        tile the flattened B*T tokens, each attending only within itself (document_attention)."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device)
        if positions.shape[-1] != T:
            raise ValueError(f"positions {tuple(positions.shape)} do not match tokens {(B, T)}")
        x = self.embed_tokens(tokens)
        cos, sin = self.rope(positions, x.dtype)  # (T,hd) or (B,T,hd)
        cap = {"hidden": {}, "q": {}, "k": {}, "v": {}}
        for i, block in enumerate(self.layers):
            if self.checkpointing and self.training:
                x, qkv = checkpoint(block, x, cos, sin, documents, use_reentrant=False)
            else:
                x, qkv = block(x, cos, sin, documents)
            if i in hidden_layers:
                cap["hidden"][i] = x
            if i in qkv_layers:
                cap["q"][i], cap["k"][i], cap["v"][i] = qkv
        return self.norm(x), cap

    def forward(self, tokens, positions=None):
        """tokens (B,T) int64, positions None | (T,) | (B,T) -> logits (B,T,V)."""
        return self.lm_head(self.forward_hidden(tokens, positions)[0])

    def init_random(self, std=0.02):
        """N(0, std) matrices, unit norms: sane logits for speed and memory runs. -> self"""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=std)
        return self

    @classmethod
    def from_pretrained(cls, path, dtype=None, rope=None):
        """Load an HF folder (config.json + model.safetensors or a sharded index). `rope`
        overrides the config's RoPE with HF keys: {"rope_theta", "rope_scaling",
        "max_position_embeddings"}."""
        cfg = LlamaConfig.from_json(_need(path, "config.json"))
        if rope:
            cfg.rope_theta = float(rope.get("rope_theta", cfg.rope_theta))
            cfg.rope_scaling = rope.get("rope_scaling", cfg.rope_scaling)
            cfg.max_pos = int(rope.get("max_position_embeddings", cfg.max_pos))
        dtype = dtype or cfg.dtype
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(load_safetensors(path, model), assign=True, strict=False)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model.to(dtype)

    def save_pretrained(self, path):
        save_pretrained(self.cfg, self.state_dict(), path)


SHAPES = {  # named shapes for random weights (train.py --init random:NAME): speed and memory runs
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         head_dim=64, ffn_dim=1536, rope_theta=1e5, max_pos=8192,
                         tie_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      head_dim=128, ffn_dim=14336, rope_theta=5e5, max_pos=8192),
    "llama-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                     head_dim=64, ffn_dim=8192, rope_theta=5e5, max_pos=8192, tie_embeddings=True)}


def _need(path, name):
    p = os.path.join(path, name)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{p} not found: an HF model folder needs {name} "
                                "(run `python data.py setup` for the default model)")
    return p


def load_safetensors(path, model):
    """State dict for `model` from model.safetensors or model.safetensors.index.json in `path`,
    names with the `model.` prefix stripped, shapes checked against the config."""
    from safetensors import SafetensorError, safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [os.path.basename(_need(path, "model.safetensors"))]
    want = {k: v for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        want.pop("lm_head.weight")
    sd = {}
    for name in files:
        fname = _need(path, name)
        try:
            with safe_open(fname, framework="pt") as f:
                for key in f.keys():
                    k = key.removeprefix("model.")
                    if k not in want:
                        continue  # e.g. rotary inv_freq buffers, a tied lm_head
                    t = f.get_tensor(key)
                    if t.shape != want[k].shape:
                        raise ValueError(f"{fname}: {key} has shape {tuple(t.shape)} but "
                                         f"config.json implies {tuple(want[k].shape)}; config "
                                         "and weights differ")
                    sd[k] = t
        except (OSError, SafetensorError) as e:  # a truncated or corrupt file
            raise ValueError(f"{fname}: cannot read safetensors ({e}); the file is corrupt or "
                             "truncated, download or export it again") from e
    missing = sorted(set(want) - set(sd))
    if missing:
        raise ValueError(f"{path}: weights missing from the checkpoint: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    return sd


def readable_mode():
    """The mode a plain open() gives a new file under this process's umask (0644 by default)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_pretrained(cfg, state_dict, path, shard_bytes=4 << 30):
    """Write an HF folder: config.json and safetensors (sharded above `shard_bytes`, with an
    index)."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    sd = {("" if k == "lm_head.weight" else "model.") + k: v.detach().contiguous().cpu()
          for k, v in state_dict.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    shards = [{}]
    size = 0  # bytes in the last shard
    for k, v in sd.items():
        if size and size + v.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        os.chmod(os.path.join(path, name), readable_mode())  # save_file writes 0600
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.nbytes for v in sd.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    hf = cfg.to_hf()
    hf["torch_dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def n_params(model, embeddings=True):
    n = sum(p.numel() for p in model.parameters())
    return n if embeddings else n - model.embed_tokens.weight.numel()


if __name__ == "__main__":
    import sys
    path = sys.argv[1] if len(sys.argv) > 1 else "assets/smollm2-135m"
    m = Llama.from_pretrained(path)
    print(m.cfg, f"\n{n_params(m) / 1e6:.1f}M parameters")
