"""Extend a Llama's context window and restore what the scaling breaks, by distilling from the
original.

    torchrun --nproc_per_node=8 train.py --target 32768             # LongReD-C, the default
    python train.py --method linearard --target 32768 --init PATH  # any HF Llama-family folder

One dial: --target. The scale factor s = target / orig, window lengths, the preset's losses and
weights, the gradient accumulation (from a token batch) and the step count (from a token budget)
derive from it; every derived value is printed at start. Teacher = the original model, frozen;
student = same weights, scaled RoPE. Micro-step kinds: long (T_target windows, CE), short (1K
texts: CE or LongReD hidden cosine), s2l (T_orig texts: CE or LongReD short-to-long cosine), rel
(LinearARD relation KL), kd (SDLC).
"""
import argparse
import copy
import json
import math
import os
import re
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn as nn

import ckpt
import data
import distill
from model import Llama, LlamaConfig
from rope import extend, phase_thetas, skipped_positions


@dataclass
class Config:
    method: str = "longred-c"   # cpt | mix-cpt | longred-u | longred-c | linearard(+cpt) | kd
    target: int = 32768         # the one dial: the context window to reach
    init: str = "assets/smollm2-135m"  # HF folder of the original model, or random:SHAPE
    data: str = "assets/tokens"  # folder of token shards from `python data.py prepare`
    out: str = "runs/default"   # checkpoints, log.jsonl, loss.png, final/ (the exported student)
    orig: int = 0               # original window; 0 = the model's max_position_embeddings
    rope: str = ""              # none | pi | abf | ntk | yarn | llama3; "" = the preset's
    abf_theta: float = 0.0      # ABF theta; 0 = theta * 10 s
    tokens: int = 0             # training budget in tokens; 0 = the preset's
    batch_tokens: int = 0       # tokens per optimizer step, all ranks; 0 = the preset's
    micro_tokens: int = 0       # tokens per micro-step per rank; 0 = target
    steps: int = 0              # optimizer steps; 0 = tokens // batch_tokens
    lr: float = 2e-5            # peak AdamW learning rate (LongReD, LinearARD: 2e-5)
    final_lr: float = 0.0       # cosine decay to final_lr * lr; 0 = the preset's (1 = constant)
    warmup: int = 0             # linear warm-up steps; 0 = the preset's
    wd: float = 0.1             # AdamW weight decay on matrices (norms: none)
    beta2: float = 0.95         # AdamW beta2 (beta1 = 0.9)
    clip: float = 0.0           # gradient-norm clip; 0 = the preset's (1.0, LinearARD 5.0)
    alpha1: float = -1.0        # LongReD short-distillation weight; -1 = 5 (s <= 4) or 2
    alpha2: float = -1.0        # LongReD short-to-long weight; -1 = 10 (s <= 4) or 15
    distill_layers: int = 0     # LongReD M+1 (M by attention KL + the last); 0 = 6 (s <= 4) or 3
    short_len: int = 1024       # LongReD short texts
    rel_len: int = 0            # LinearARD window; 0 = min(orig, 4096)
    rel_norm: str = "own"       # own: per relation by its head count | query: LinearARD's code
    rel_tokens: int = 0         # linearard+cpt: tokens of the relation stage; 0 = 144 x 16384
    kd_temperature: float = 1.0
    kd_ce: float = 0.0          # weight of CE mixed into the SDLC logit KD
    phases: str = ""            # kd: comma-separated window lengths; "" = doubling up to target
    train_params: str = ""      # regex on parameter names to train; "" = the preset's (all)
    dtype: str = "auto"         # bfloat16 | float32; auto = bf16 on CUDA, fp32 on CPU
    fsdp: bool = False          # FSDP2: shard the student (the bf16 teacher is replicated)
    checkpointing: bool = False  # per-block activation checkpointing
    compile: bool = False       # torch.compile each block (fuses RoPE, SwiGLU, norms, casts)
    save_every: int = 0         # optimizer steps between checkpoints; 0 = only at the end
    resume: bool = False        # continue from out/ckpt (refused if the config differs)
    stop_at: int = 0            # save and stop after this step (a job's time limit); 0 = run all
    no_save: bool = False       # no checkpoint and no export (speed and memory runs)
    seed: int = 0


PRESETS = {  # method: student RoPE, micro-step mix (per 16 micro-steps), budget, batch (SPEC 4)
    "cpt": dict(rope="abf", mix={"long": 16}),
    "mix-cpt": dict(rope="abf", mix={"short": 6, "s2l": 2, "long": 8}),
    "longred-u": dict(rope="abf", mix={"short": 6, "s2l": 2, "long": 8}, skip="uniform"),
    "longred-c": dict(rope="abf", mix={"short": 6, "s2l": 2, "long": 8}, skip="cream"),
    "linearard": dict(rope="pi", mix={"rel": 16}, tokens=144 * 16384, batch_tokens=16384,
                      train_params=r"\.(q|k|v)_proj\.", warmup=4, final_lr=0.9, clip=5.0),
    "linearard+cpt": dict(rope="pi", mix={"rel": 16}, then={"long": 16}, warmup=4, clip=5.0,
                          train_params=r"\.(q|k|v)_proj\."),
    "kd": dict(rope="phase", mix={"kd": 16}),
}


def parse_args(argv=None):
    """argparse generated from Config: --help lists every knob, typos fail."""
    class Fmt(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Fmt)
    src = open(__file__).read().split("class Config")[1].split("PRESETS")[0]
    comments = dict(re.findall(r"^\s+(\w+): .*?#\s*(.+)$", src, re.M))  # the field's comment
    for f in fields(Config):
        kw = dict(default=f.default, help=comments.get(f.name, ""))
        if f.type is bool:
            p.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", **kw)
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=f.type, **kw)
    cfg = Config(**vars(p.parse_args(argv)))
    if cfg.method not in PRESETS:
        p.error(f"--method {cfg.method!r}: choose from {', '.join(PRESETS)}")
    return cfg


def derive(cfg, model_cfg, world):
    """Every value the one dial implies. -> dict, printed once at start."""
    orig = cfg.orig or model_cfg.max_pos
    s = cfg.target / orig
    if s <= 1:
        raise ValueError(f"--target {cfg.target} must exceed the original window {orig} (--orig)")
    pre = PRESETS[cfg.method]
    micro = cfg.micro_tokens or cfg.target
    batch = cfg.batch_tokens or pre.get("batch_tokens", 2 * 2**20)
    batch = max(batch // (micro * world), 1) * micro * world
    tokens = cfg.tokens or pre.get("tokens", 2**30)
    rope_kind = cfg.rope or pre["rope"]
    d = dict(orig=orig, s=s, micro_tokens=micro, batch_tokens=batch, accum=batch // (micro * world),
             steps=cfg.steps or max(tokens // batch, 1), rope=rope_kind,
             alpha1=cfg.alpha1 if cfg.alpha1 >= 0 else (5.0 if s <= 4 else 2.0),
             alpha2=cfg.alpha2 if cfg.alpha2 >= 0 else (10.0 if s <= 4 else 15.0),
             distill_layers=min(cfg.distill_layers or (6 if s <= 4 else 3), model_cfg.n_layers),
             rel_len=cfg.rel_len or min(orig, 4096), skip=pre.get("skip"),
             train_params=cfg.train_params or pre.get("train_params", ""),
             warmup=cfg.warmup or pre.get("warmup", 0), clip=cfg.clip or pre.get("clip", 1.0),
             final_lr=cfg.final_lr or pre.get("final_lr", 1.0))
    if rope_kind == "phase":
        lengths = [int(x) for x in cfg.phases.split(",")] if cfg.phases else \
            [orig * 2**k for k in range(1, 64) if orig * 2**k < cfg.target] + [cfg.target]
        d["phases"] = phase_thetas(model_cfg.rope_theta, model_cfg.head_dim, orig, lengths)
    else:
        d["theta"], d["scaling"] = extend(rope_kind, model_cfg.rope_theta, model_cfg.head_dim,
                                          orig, cfg.target, cfg.abf_theta)
    d["rel_steps"] = min((cfg.rel_tokens or 144 * 16384) // batch, d["steps"]) \
        if "then" in pre else d["steps"]
    return d


def schedule(mix, n):
    """n micro-step kinds in the proportions of `mix` (largest remainder), in the mix's order."""
    total = sum(mix.values())
    counts = {k: max(int(v * n // total), 1 if v else 0) for k, v in mix.items()}
    while sum(counts.values()) > n:
        counts[max(counts, key=counts.get)] -= 1
    while sum(counts.values()) < n:
        counts[max(mix, key=lambda k: mix[k] * n / total - counts[k])] += 1
    return [k for k in counts for _ in range(counts[k])]


class Call(nn.Module):
    """Routes the wrapper's forward to fn(model, ...) so that DDP/FSDP2 hooks run around the whole
    micro-step (forward_hidden plus the loss through the LM head)."""
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


def touching_head(fn):
    """fn(model) + 0 x sum(LM head): the hidden-state losses (short, s2l, rel) never reach the
    head, and FSDP2 reduce-scatters only parameters that have a gradient, so a rank on a short
    micro-step and one on a long micro-step would otherwise issue different collectives and hang;
    DDP likewise then needs no search for unused parameters."""
    return lambda m: fn(m) + 0.0 * m.lm_head.weight.sum()


def shift(x):
    """Next-token targets for windows x (B,T): x[:, 1:] and -100 at the end. -> (B*T,)"""
    return torch.cat((x[:, 1:], torch.full_like(x[:, :1], -100)), 1).flatten()


def micro_loss(kind, cfg, d, x, pos, teacher, gen):
    """The loss function of one micro-step; teacher outputs computed here without grad."""
    method, layers = cfg.method, d.get("layers", ())
    if kind == "long" or (method == "mix-cpt" and kind in ("short", "s2l")):
        return lambda m: distill.logit_kd(m.forward_hidden(x, pos)[0].flatten(0, 1), None,
                                          m.lm_head.weight, None, targets=shift(x), ce_weight=1.0)
    if kind == "short":  # LongReD L_short: selected blocks, the last one as the final-norm state
        blocks = layers[:-1]
        with torch.no_grad():
            ht, ct = teacher(lambda m: m.forward_hidden(x, pos, hidden_layers=blocks))
        def short(m):
            hs, cs = m.forward_hidden(x, pos, hidden_layers=blocks)
            return d["alpha1"] * distill.hidden_cosine_loss(
                [cs["hidden"][i] for i in blocks] + [hs], [ct["hidden"][i] for i in blocks] + [ht])
        return short
    if kind == "s2l":  # LongReD L_s2l: teacher at 0..T_orig-1, student at skipped ids
        with torch.no_grad():
            ht = teacher(lambda m: m.forward_hidden(x, pos)[0])
        spos = skipped_positions(x.shape[1], cfg.target, d["skip"], gen).to(x.device)
        return lambda m: d["alpha2"] * distill.s2l_loss(m.forward_hidden(x, spos)[0], ht)
    if kind == "rel":  # LinearARD: relation KL of Q/Q, K/K, V/V on every layer
        every = tuple(range(d["n_layers"]))
        with torch.no_grad():
            ct = teacher(lambda m: m.forward_hidden(x, pos, qkv_layers=every)[1])
        return lambda m: distill.relation_loss(ct, m.forward_hidden(x, pos, qkv_layers=every)[1],
                                               every, norm=cfg.rel_norm)
    if kind == "kd":  # SDLC: packed window for the student, each document alone for the teacher
        with torch.no_grad():
            ht, wt = teacher(lambda m: (m.forward_documents(x, d["eos"]), m.lm_head.weight))
        tgt = shift(x) if cfg.kd_ce else None
        return lambda m: distill.logit_kd(m.forward_hidden(x, pos)[0].flatten(0, 1), ht,
                                          m.lm_head.weight, wt, targets=tgt,
                                          temperature=cfg.kd_temperature, ce_weight=cfg.kd_ce)
    raise ValueError(kind)


def select_layers(cfg, d, student, teacher, tokens, device, rank):
    """LongReD: attention KL per layer between teacher and scaled student on T_orig texts; the
    M largest plus the last layer. The same on every rank (rank 0 decides)."""
    x, pos = data.windows(tokens, d["orig"], 1, cfg.seed, 2**62, 0)
    x, pos = torch.as_tensor(x, device=device), torch.as_tensor(pos, device=device)
    every = tuple(range(d["n_layers"]))
    with torch.no_grad():
        ct = teacher(lambda m: m.forward_hidden(x, pos, qkv_layers=every)[1])
        cs = student(lambda m: m.forward_hidden(x, pos, qkv_layers=every)[1])
        kl = distill.attention_kl_per_layer(ct, cs, every)
    layers = [distill.select_layers(kl, d["distill_layers"] - 1)]
    if dist.is_initialized():
        dist.broadcast_object_list(layers, src=0)
    if rank == 0:
        print("attention KL per layer:", " ".join(f"{k:.3g}" for k in kl), "-> layers", layers[0])
    return layers[0]


def setup_dist():
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; NCCL on GPUs, gloo on CPU. -> rank, world,
    device"""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def build(cfg, d, dtype, device, world):
    """Frozen teacher (original RoPE, `dtype`) and student (fp32 master weights, scaled RoPE), each
    behind `Call`; the student in DDP, or sharded by FSDP2 (per block, then the root)."""
    if cfg.init.startswith("random:"):  # random weights of a named shape, made on the device
        torch.manual_seed(cfg.seed)
        with torch.device(device):
            student = Llama(LlamaConfig.of(cfg.init)).init_random()
        teacher = copy.deepcopy(student).to(dtype)
    else:
        student = Llama.from_pretrained(cfg.init, dtype=torch.float32)
        teacher = Llama.from_pretrained(cfg.init, dtype=dtype)
    teacher.requires_grad_(False).eval()
    if d["rope"] == "phase":
        student.set_rope(d["phases"][0][1], None, max_pos=cfg.target)
    else:
        student.set_rope(d["theta"], d["scaling"], max_pos=cfg.target)
    pattern = re.compile(d["train_params"] or ".")
    for name, p in student.named_parameters():
        p.requires_grad_(bool(pattern.search(name)))
    if not any(p.requires_grad for p in student.parameters()):
        raise ValueError(f"--train-params {d['train_params']!r} matches no parameter name")
    student.checkpointing = teacher.checkpointing = cfg.checkpointing
    for block in [*student.layers, *teacher.layers] if cfg.compile else []:
        block.compile()  # in place: names and state_dict keys stay the HF ones
    student, teacher = Call(student.to(device)), Call(teacher.to(device))
    if cfg.fsdp:  # the frozen teacher stays whole on every GPU (bf16: 16 GB for 8B), so ranks
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # need no teacher
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)  # collectives
        for block in student.model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(student, mp_policy=mp)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        student = DDP(student, device_ids=[device.index] if device.type == "cuda" else None)
    return student, teacher


def lr_at(step, d, cfg):
    """Linear warm-up, then cosine from lr to final_lr * lr (final_lr = 1: constant, LongReD)."""
    if step < d["warmup"]:
        return cfg.lr * (step + 1) / d["warmup"]
    t = (step - d["warmup"]) / max(d["steps"] - d["warmup"], 1)
    return cfg.lr * (d["final_lr"] + (1 - d["final_lr"]) * 0.5 * (1 + math.cos(math.pi * t)))


def flops(kind, B, T, c):
    """Model FLOPs of a micro-step (config c): per token the student does 6N + 6 L T d_attn
    (attention causal-halved), the teacher 2N + 2 L T d_attn; N counts the matmul weights: per
    layer q, o (D d_attn each), k, v (D K hd each), gate, up, down (D F each), and the head V D."""
    d_attn = c.n_heads * c.head_dim
    N = c.n_layers * (2 * c.dim * d_attn + 2 * c.dim * c.n_kv_heads * c.head_dim
                      + 3 * c.dim * c.ffn_dim) + c.vocab_size * c.dim
    student = 6 * N + 6 * c.n_layers * T * d_attn
    teacher = 0 if kind == "long" else 2 * N + 2 * c.n_layers * T * d_attn
    return B * T * (student + teacher)


def batch_for(kind, tokens, starts, cfg, d, step_len, j, device):
    """The micro-batch of global micro-step j: a pure function of (seed, j)."""
    length = {"long": cfg.target, "short": cfg.short_len, "s2l": d["orig"], "rel": d["rel_len"],
              "kd": step_len}[kind]
    B = max(d["micro_tokens"] // length, 1)
    if kind == "kd":
        x, pos = data.packed(tokens, starts, length, B, cfg.seed, j, max_doc=d["orig"])
    else:
        x, pos = data.windows(tokens, length, B, cfg.seed, j, 0,
                              starts=starts if kind == "short" else None)
    return torch.as_tensor(x, device=device), torch.as_tensor(pos, device=device)


def optimizer(student, cfg):
    """AdamW on the trainable parameters; no weight decay on norms (1-D). -> (opt, params)"""
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.wd), params


def all_reduce_step(sums, rank, world, stop):
    """One collective per step: loss sums and counts (2, kinds), and per-rank slots (4, world):
    column r holds rank r's bad-loss flag, peak GiB allocated and reserved, and its stop flag
    (SIGTERM), so that every rank skips or stops at the same step. -> (sums, slots)"""
    slots = torch.zeros(4, world, device=sums.device, dtype=sums.dtype)
    slots[0, rank], slots[3, rank] = (~torch.isfinite(sums)).any(), float(stop)
    if sums.device.type == "cuda":
        slots[1:3, rank] = torch.tensor([torch.cuda.max_memory_allocated(),
                                         torch.cuda.max_memory_reserved()]) / 2**30
    if dist.is_initialized():
        flat = torch.cat((sums.flatten(), slots.flatten()))
        dist.all_reduce(flat)
        sums, slots = flat[:sums.numel()].view_as(sums), flat[sums.numel():].view_as(slots)
    return sums, slots


def train_step(step, r):
    """One optimizer step: G micro-steps per rank, clip, one all-reduce, AdamW (skipped on every
    rank if any loss or the gradient norm is non-finite). `r`: the run's namespace from main.
    -> (the log row or None for a skipped step, whether any rank was told to stop)"""
    cfg, d, core, G, pre = r.cfg, r.d, r.core, r.d["accum"], PRESETS[r.cfg.method]
    t0 = time.perf_counter()
    mix = pre["then"] if "then" in pre and step >= d["rel_steps"] else pre["mix"]
    kinds, step_len = schedule(mix, G * r.world), cfg.target
    if d["rope"] == "phase":  # SDLC: the phase's window and theta
        k = min(step * len(d["phases"]) // d["steps"], len(d["phases"]) - 1)
        step_len, theta = d["phases"][k]
        core.set_rope(theta, None, max_pos=cfg.target)
    for g in r.opt.param_groups:
        g["lr"] = lr_at(step, d, cfg)
    names, fl = sorted(set(kinds)), 0.0
    sums = torch.zeros(2, len(names), device=r.device, dtype=torch.float64)  # loss sum, count
    for i in range(G):
        j = (step * G + i) * r.world + r.rank  # global micro index: data and ids as 1 process
        kind = kinds[i * r.world + r.rank]
        x, pos = batch_for(kind, r.tokens, r.starts, cfg, d, step_len, j, r.device)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + j)
        sync = r.student.no_sync() if i < G - 1 and hasattr(r.student, "no_sync") else \
            nullcontext()
        with sync, r.autocast:
            loss = r.student(touching_head(micro_loss(kind, cfg, d, x, pos, r.teacher, gen)))
            (loss / G).backward()
        sums[:, names.index(kind)] += torch.stack((loss.detach().double(), sums.new_ones(())))
        fl += flops(kind, *x.shape, core.cfg)
    norm = torch.nn.utils.clip_grad_norm_(r.params, d["clip"])  # the same on every rank
    sums, slots = all_reduce_step(sums, r.rank, r.world, r.stop)
    skip = bool(slots[0].any()) or not torch.isfinite(torch.as_tensor(norm)).all()
    if skip and r.rank == 0:
        who = f"loss on rank(s) {slots[0].nonzero().flatten().tolist()}" if slots[0].any() \
            else "gradient"
        print(f"step {step + 1}: non-finite {who}; step skipped on all ranks")
    if not skip:
        r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    if r.device.type == "cuda":
        torch.cuda.synchronize()
    dt, B = time.perf_counter() - t0, d["batch_tokens"]
    row = {"step": step + 1, "lr": r.opt.param_groups[0]["lr"], "grad_norm": float(norm),
           "tokens": (step + 1) * B, "tok_s": B / dt, "tok_s_gpu": B / dt / r.world,
           "mfu": fl / dt / (989.4e12 if r.device.type == "cuda" else float("nan")), "sec": dt}
    row.update({f"loss_{k}": float(sums[0, i] / sums[1, i])
                for i, k in enumerate(names) if sums[1, i] > 0})
    if r.device.type == "cuda":  # the largest over ranks (ranks run different micro-steps)
        row["mem_gb"], row["mem_reserved_gb"] = slots[1].max().item(), slots[2].max().item()
    return None if skip else row, bool(slots[3].any())


def main(argv=None):
    cfg = parse_args(argv)
    rank, world, device = setup_dist()
    torch.manual_seed(cfg.seed)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    init_cfg = LlamaConfig.of(cfg.init)
    d = derive(cfg, init_cfg, world)
    tokens, tok_hash, eos = data.load_tokens(cfg.data, cfg.init, init_cfg.vocab_size)
    d.update(n_layers=init_cfg.n_layers, eos=eos)
    student, teacher = build(cfg, d, dtype, device, world)
    # the optimizer before any forward: FSDP2 leaves root parameters unsharded after a no-grad one
    opt, params = optimizer(student, cfg)
    if cfg.method.startswith("longred"):
        d["layers"] = select_layers(cfg, d, student, teacher, tokens, device, rank)
        if cfg.fsdp:
            student.reshard()
    if rank == 0:
        print(f"world {world}, device {device}, dtype {dtype}, {len(tokens):,} training tokens")
        for k, v in d.items():
            print(f"  {k:15} {v}")
    os.makedirs(cfg.out, exist_ok=True)
    meta = ckpt.meta_of(cfg, d, world, tok_hash, tokens, init_cfg)
    start = ckpt.load(f"{cfg.out}/ckpt", student, opt, meta) if cfg.resume else 0
    log_path = f"{cfg.out}/log.jsonl"
    if cfg.resume and rank == 0:
        ckpt.trim_log(log_path, start)
    log = open(log_path, "a" if cfg.resume else "w") if rank == 0 else None
    r = argparse.Namespace(cfg=cfg, d=d, rank=rank, world=world, device=device, student=student,
                           teacher=teacher, opt=opt, params=params, tokens=tokens,
                           starts=data.doc_starts(tokens, eos),
                           core=(student.module if hasattr(student, "module") else student).model,
                           autocast=torch.autocast(device.type, dtype)
                           if dtype != torch.float32 else nullcontext())
    from tqdm import tqdm
    bar = tqdm(range(start, d["steps"]), initial=start, total=d["steps"], disable=rank != 0,
               dynamic_ncols=True)
    done, r.stop = start, False  # SIGTERM (a scheduler's pre-emption): save after this step
    previous = signal.signal(signal.SIGTERM, lambda *_: setattr(r, "stop", True))
    for step in bar:
        (row, stop), done = train_step(step, r), step + 1
        if row and log:
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix({k[5:]: f"{v:.4g}" for k, v in row.items() if k.startswith("loss_")} |
                            {"tok/s": f"{row['tok_s']:.0f}", "mfu": f"{row['mfu']:.1%}"})
        if stop or done == cfg.stop_at:
            break
        if cfg.save_every and done % cfg.save_every == 0 and done < d["steps"]:
            ckpt.save(f"{cfg.out}/ckpt", ckpt.gather(student, opt), done, meta, rank)
    signal.signal(signal.SIGTERM, previous)
    if not cfg.no_save:  # one gather serves the checkpoint and the export
        state = ckpt.gather(student, opt)
        ckpt.save(f"{cfg.out}/ckpt", state, done, meta, rank)
        if done == d["steps"]:
            ckpt.export(f"{cfg.out}/final", state[0], r.core.cfg, init_cfg, rank, cfg.init)
    if rank == 0:
        log.close()
        ckpt.plot(log_path, f"{cfg.out}/loss.png")
        print("done (--no-save)" if cfg.no_save else f"exported {cfg.out}/final"
              if done == d["steps"] else f"stopped at step {done}; continue with --resume")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: the message says what to fix
        raise SystemExit(f"train.py: error: {e}")
