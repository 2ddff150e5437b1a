"""Extend a Llama's context window and restore what the scaling breaks, by distilling from the
original.

    torchrun --nproc_per_node=8 train.py --target 32768             # LongReD-C, the default
    python train.py --method linearard --target 32768 --init PATH  # any HF Llama-family folder

One dial: --target. The scale factor s = target / orig, the student's RoPE, window lengths, the
method's loss weights, the micro-step mix, the gradient accumulation (from a token batch) and the
step count (from a token budget) derive from it; every derived value is printed at start.
Teacher = the original model, frozen, original RoPE; student = the same weights, scaled RoPE.

A method is a weighted sum of loss terms (TERMS) over one or more stages (PRESETS); each term reads
one kind of micro-step data: long (T_target windows), short (1K texts), orig (T_orig texts), rel
(LinearARD's windows), kd (short documents packed into a T_target window).
"""
import copy
import json
import math
import os
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import ckpt
import data
import distill
import plan as planning
from methods import TERMS
from model import Llama, LlamaConfig
from plan import Config, Plan, Stage, describe, make_plan
from rope import skipped_positions


def parse_args(argv=None):
    """train.py's command line, generated from plan.Config."""
    return planning.parse_args(argv, description=__doc__)


# ---- one micro-step: the teacher's targets, then the student's loss --------------------------

class Call(nn.Module):
    """Routes the wrapper's forward to fn(model, ...) so that DDP/FSDP2 hooks run around the whole
    micro-step (forward_hidden plus the loss through the LM head)."""
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


def shift(x):
    """Next-token targets for windows x (B,T): x[:, 1:] and -100 at the end. -> (B*T,)"""
    return torch.cat((x[:, 1:], torch.full_like(x[:, :1], -100)), 1).flatten()


def cross_entropy(model, x, pos):
    """Next-token CE of model on windows x (B,T), chunked through the LM head."""
    hidden = model.forward_hidden(x, pos)[0].flatten(0, 1)
    return distill.logit_kd(hidden, None, model.lm_head.weight, None, targets=shift(x),
                            ce_weight=1.0)


def documents_alone(model, x, eos):
    """SDLC's teacher: the final hidden state of each document of the packed windows x (B,T), each
    read alone from position 0, as the original model was trained. One forward over the packed
    windows: each document's positions restart at 0 and its attention stays within it
    (model.document_attention), so nothing is padded. -> (B*T, D)"""
    positions, documents = document_layout(x, eos)
    return model.forward_hidden(x, positions, documents=documents)[0].flatten(0, 1)


def document_layout(x, eos):
    """The documents of packed windows x (B,T): a document ends at its EOS or at its row's end.
    -> (positions (B,T) from 0 in each document, cumulative lengths (n+1,) int32 over B*T)"""
    positions, is_start = document_positions(x, eos)
    starts = is_start.nonzero().flatten()  # (n,): the one host sync, for the kernel's bounds
    last = torch.tensor([x.numel()], device=x.device)
    cumulative = torch.cat((starts, last)).to(torch.int32)
    return positions, cumulative


def document_positions(x, eos):
    """Each token's position in its document (B,T), and whether it starts one (B*T,), with no
    host sync: the start of a token's document is the running max of the starts so far."""
    B, T = x.shape
    ends = (x == eos).clone()
    ends[:, -1] = True  # a row's last document ends with the row
    is_end = ends.flatten()
    is_start = torch.roll(is_end, 1)  # the token after an end starts a document
    is_start[0] = True
    token = torch.arange(B * T, device=x.device)
    start_of_document = torch.cummax(torch.where(is_start, token, 0), 0).values
    positions = token - start_of_document
    return positions.view(B, T), is_start


@torch.no_grad()
def teacher_targets(kind, weights, teacher, x, pos, plan):
    """What the frozen teacher (original RoPE) gives the loss terms that read this kind. -> dict"""
    terms = [term for term in weights if TERMS[term].kind == kind]
    targets = {}
    if "L_short" in terms:  # selected blocks' residuals; the last entry is the final norm
        blocks = plan.layers[:-1]
        final, cap = teacher(lambda m: m.forward_hidden(x, pos, hidden_layers=blocks))
        targets["short"] = [cap["hidden"][i] for i in blocks] + [final]
    if "L_s2l" in terms:  # the teacher reads the T_orig text at 0..T_orig-1
        targets["s2l"] = teacher(lambda m: m.forward_hidden(x, pos)[0])
    if "L_rel" in terms:
        every = tuple(range(teacher.model.cfg.n_layers))
        targets["qkv"] = teacher(lambda m: m.forward_hidden(x, pos, qkv_layers=every)[1])
    if "L_kd" in terms:  # SDLC: each packed document alone, from position 0
        targets["kd"] = teacher(lambda m: (documents_alone(m, x, plan.eos), m.lm_head.weight))
    return targets


def student_loss(model, kind, weights, targets, x, pos, plan, cfg, gen):
    """sum_term weight x term over the terms that read this micro-step's kind, and the terms'
    values. The student's forwards happen here, inside the DDP/FSDP2 wrapper. -> (loss, {})"""
    terms = [term for term in weights if TERMS[term].kind == kind]
    values = {}
    if "L_long" in terms:
        values["L_long"] = cross_entropy(model, x, pos)
    if "L_short_ce" in terms:
        values["L_short_ce"] = cross_entropy(model, x, pos)
    if "L_orig_ce" in terms:
        values["L_orig_ce"] = cross_entropy(model, x, pos)
    if "L_short" in terms:
        blocks = plan.layers[:-1]
        final, cap = model.forward_hidden(x, pos, hidden_layers=blocks)
        student = [cap["hidden"][i] for i in blocks] + [final]
        values["L_short"] = distill.hidden_cosine_loss(student, targets["short"])
    if "L_s2l" in terms:  # per sequence ids (B, T_orig)
        ids = skipped_positions(x.shape[1], cfg.target, plan.skip, gen, x.shape[0])
        final = model.forward_hidden(x, ids.to(x.device))[0]
        values["L_s2l"] = distill.s2l_loss(final, targets["s2l"])
    if "L_rel" in terms:
        every = tuple(range(model.cfg.n_layers))
        cap = model.forward_hidden(x, pos, qkv_layers=every)[1]
        values["L_rel"] = distill.relation_loss(targets["qkv"], cap, every, norm=cfg.rel_norm)
    if "L_kd" in terms:
        hidden_t, head_t = targets["kd"]
        hidden_s = model.forward_hidden(x, pos)[0].flatten(0, 1)
        ce_targets = shift(x) if cfg.kd_ce else None
        values["L_kd"] = distill.logit_kd(hidden_s, hidden_t, model.lm_head.weight, head_t,
                                          targets=ce_targets, temperature=cfg.kd_temperature,
                                          ce_weight=cfg.kd_ce)
    loss = sum(weights[term] * value for term, value in values.items())
    # hidden-state terms never reach the LM head; FSDP2 reduce-scatters only parameters with a
    # gradient, so ranks on different kinds would issue different collectives and hang
    if model.lm_head.weight.requires_grad:
        loss = loss + 0.0 * model.lm_head.weight.sum()
    return loss, values


def batch_for(kind, stage, plan, cfg, tokens, starts, window, j, device):
    """The micro-batch of global micro-step j: a pure function of (seed, j)."""
    rows = stage.rows[kind]
    if kind == "kd":
        rows = max(stage.rows[kind] * stage.windows[kind] // window, 1)
        x, pos = data.packed(tokens, starts, window, rows, cfg.seed, j, max_doc=plan.orig)
    else:
        doc_starts = starts if kind == "short" else None
        x, pos = data.windows(tokens, stage.windows[kind], rows, cfg.seed, j, 0, starts=doc_starts)
    return torch.as_tensor(x, device=device), torch.as_tensor(pos, device=device)


# ---- set-up ----------------------------------------------------------------------------------

def select_layers(plan, cfg, student, teacher, tokens, device, rank, world, autocast):
    """LongReD: per layer, KL(A_teacher || A_student) of the attention rows, averaged over
    cfg.select_texts T_orig texts (split over ranks, then all-reduced); the M largest plus the
    last layer. -> tuple of block indices"""
    n_layers = teacher.model.cfg.n_layers
    every = tuple(range(n_layers))
    kl_sum = torch.zeros(n_layers, dtype=torch.float64, device=device)
    texts = range(rank, cfg.select_texts, world)
    for text in tqdm(texts, desc="LongReD layer selection (attention KL)", disable=rank != 0):
        x, pos = data.windows(tokens, plan.orig, 1, cfg.seed, 2**62 + text, 0)
        x = torch.as_tensor(x, device=device)
        pos = torch.as_tensor(pos, device=device)
        with torch.no_grad(), autocast:  # as training runs: bf16 maps, fp32 sums
            cap_t = teacher(lambda m: m.forward_hidden(x, pos, qkv_layers=every)[1])
            cap_s = student(lambda m: m.forward_hidden(x, pos, qkv_layers=every)[1])
            kl_sum += torch.tensor(distill.attention_kl_per_layer(cap_t, cap_s, every),
                                   dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(kl_sum)
    kl = (kl_sum / cfg.select_texts).tolist()
    layers = tuple(distill.select_layers(kl, plan.distill_layers - 1))
    if rank == 0:
        print(f"attention KL per layer ({cfg.select_texts} texts x {plan.orig} tokens):",
              " ".join(f"{k:.3g}" for k in kl), "-> layers", list(layers))
    return layers


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


def build(cfg, plan, dtype, device):
    """Frozen teacher (original RoPE, `dtype`) and student (fp32 master weights, scaled RoPE),
    each behind `Call`; the student sharded by FSDP2 (per block, then the root) if asked."""
    if cfg.init.startswith("random:"):  # random weights of a named shape, made on the device
        torch.manual_seed(cfg.seed)
        with torch.device(device):
            student = Llama(LlamaConfig.of(cfg.init)).init_random()
        teacher = copy.deepcopy(student).to(dtype)
    else:
        student = Llama.from_pretrained(cfg.init, dtype=torch.float32)
        teacher = Llama.from_pretrained(cfg.init, dtype=dtype)
    teacher.requires_grad_(False).eval()
    if plan.phases:
        student.set_rope(plan.phases[0][1], None, max_pos=cfg.target)
    else:
        student.set_rope(plan.theta, plan.scaling, max_pos=cfg.target)
    student.checkpointing = cfg.checkpointing
    teacher.checkpointing = cfg.checkpointing
    if compile_blocks(cfg, device):
        for block in [*student.layers, *teacher.layers]:
            block.compile()  # in place: names and state_dict keys stay the HF ones
    student = Call(student.to(device))
    teacher = Call(teacher.to(device))
    if cfg.fsdp:  # the frozen teacher stays whole on every GPU (bf16: 16 GB for 8B)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in student.model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(student, mp_policy=mp)
    return student, teacher


def compile_blocks(cfg, device):
    """Whether to torch.compile each block: on CUDA unless --no-compile, on CPU with --compile.
    Where torch.compile cannot run (no Triton, no C compiler) one line says why and the run goes
    on eager."""
    wanted = cfg.compile or (device.type == "cuda" and not cfg.no_compile)
    if not wanted:
        return False
    problem = compile_problem(device)
    if problem and int(os.environ.get("RANK", "0")) == 0:
        print(f"train.py: torch.compile cannot run here ({problem}); running eager "
              f"(--no-compile skips this trial)", file=sys.stderr)
    return problem is None


def compile_trial(t):
    return F.silu(t) * t


def compile_problem(device):
    """None if a trial torch.compile runs on device, else the error in one line."""
    try:
        trial = torch.compile(compile_trial, fullgraph=True)
        trial(torch.ones(8, device=device))
    except Exception as error:  # any failure: eager is correct, only slower
        lines = str(error).strip().splitlines() or [""]
        return f"{type(error).__name__}: {lines[0][:160]}"
    return None


def optimizer(student):
    """AdamW on every student parameter (a stage's frozen ones get no gradient, and AdamW skips
    them); no weight decay on norms (1-D). Each stage sets its own decay and betas."""
    params = list(student.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups)  # each step sets the learning rate (lr_at)


@dataclass
class Run:
    """The state of a training run: the plan, the models, the data, the optimizer."""
    cfg: Config
    plan: Plan
    rank: int
    world: int
    device: torch.device
    student: nn.Module        # Call(student core), maybe in DDP or sharded by FSDP2
    teacher: Call
    core: Llama               # the student itself
    opt: torch.optim.Optimizer
    tokens: object            # --data: every stream but the long windows
    starts: object
    long_tokens: object       # --long-data (or --data): the long windows
    long_starts: object
    autocast: object
    meta: dict = None         # what a --resume must match (ckpt.meta_of)
    init_cfg: LlamaConfig = None
    stage: Stage = None
    stop: bool = False        # set by SIGTERM: save after this step


def stage_at(plan, step):
    for stage in plan.stages:
        if step < stage.first_step + stage.steps:
            return stage
    return plan.stages[-1]


def enter_stage(run, stage, fresh):
    """Train the stage's parameters with its decay and betas; `fresh`: the stage starts here, so
    AdamW's moments start at zero, as a separate training run would. DDP is rebuilt around the
    new set of trained parameters."""
    pattern = re.compile(stage.train_params or ".")
    for name, p in run.core.named_parameters():
        p.requires_grad_(bool(pattern.search(name)))
    if not any(p.requires_grad for p in run.core.parameters()):
        raise ValueError(f"--train-params {stage.train_params!r} matches no parameter name")
    matrices, vectors = run.opt.param_groups
    matrices["weight_decay"] = stage.weight_decay
    for group in run.opt.param_groups:
        group["betas"] = (0.9, stage.beta2)
    if fresh:
        run.opt.state.clear()
    if run.world > 1 and not run.cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        call = run.student.module if isinstance(run.student, DDP) else run.student
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        run.student = DDP(call, device_ids=device_ids)
    run.stage = stage


def lr_at(local_step, stage):
    """Linear warm-up to the stage's peak lr, then cosine from lr to final_lr x lr (final_lr = 1:
    constant, LongReD)."""
    if local_step < stage.warmup:
        return stage.lr * (local_step + 1) / stage.warmup
    t = (local_step - stage.warmup) / max(stage.steps - stage.warmup, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * t))
    return stage.lr * (stage.final_lr + (1 - stage.final_lr) * cosine)


def tokens_through(plan, step):
    """Training tokens of steps 0..step, all stages."""
    total = 0
    for stage in plan.stages:
        steps_here = min(max(step + 1 - stage.first_step, 0), stage.steps)
        total += steps_here * stage.batch_tokens
    return total


def phase_at(plan, stage, step):
    """SDLC: (window, theta) of the phase holding `step`; phases split the stage evenly."""
    local = step - stage.first_step
    k = min(local * len(plan.phases) // stage.steps, len(plan.phases) - 1)
    return plan.phases[k]


def flops(kind, B, T, c, teacher_attention=None):
    """Model FLOPs of a micro-step of B windows of T tokens (config c). The student does
    6N + 6 L T d_attn per token (attention causal-halved). The teacher does 2N per token and
    2 L d_attn n^2 per sequence of n tokens it attends over: teacher_attention = sum n^2, by
    default B T^2 (SDLC's teacher attends within each packed document). N counts the matmul
    weights: per layer q, o (D d_attn each), k, v (D K hd each), gate, up, down (D F each), and
    the head V D."""
    d_attn = c.n_heads * c.head_dim
    N = c.n_layers * (2 * c.dim * d_attn + 2 * c.dim * c.n_kv_heads * c.head_dim
                      + 3 * c.dim * c.ffn_dim) + c.vocab_size * c.dim
    if teacher_attention is None:
        teacher_attention = B * T * T
    student = B * T * (6 * N + 6 * c.n_layers * T * d_attn)
    teacher = B * T * 2 * N + 2 * c.n_layers * d_attn * teacher_attention
    if kind == "long":
        teacher = 0
    return student + teacher


def all_reduce_step(sums, rank, world, stop):
    """One collective per step: loss sums and counts (2, terms), and per-rank slots (4, world):
    column r holds rank r's bad-loss flag, peak GiB allocated and reserved, and its stop flag
    (SIGTERM), so that every rank skips or stops at the same step. -> (sums, slots)"""
    slots = torch.zeros(4, world, device=sums.device, dtype=sums.dtype)
    slots[0, rank] = (~torch.isfinite(sums)).any()
    slots[3, rank] = float(stop)
    if sums.device.type == "cuda":
        slots[1, rank] = torch.cuda.max_memory_allocated() / 2**30
        slots[2, rank] = torch.cuda.max_memory_reserved() / 2**30
    if dist.is_initialized():
        flat = torch.cat((sums.flatten(), slots.flatten()))
        dist.all_reduce(flat)
        sums = flat[:sums.numel()].view_as(sums)
        slots = flat[sums.numel():].view_as(slots)
    return sums, slots


# ---- the training step -----------------------------------------------------------------------

def micro_step(run, stage, step, i, window):
    """Rank's i-th micro-step of `step`: its batch, the teacher's targets, the student's weighted
    loss inside the DDP/FSDP2 wrapper, backward (scaled by 1/accum). -> (kind, values, flops)"""
    cfg = run.cfg
    j = (step * stage.accum + i) * run.world + run.rank  # global micro index: as 1 process
    kind = stage.kinds[i * run.world + run.rank]
    tokens = run.tokens
    starts = run.starts
    if kind == "long":
        tokens = run.long_tokens
        starts = run.long_starts
    x, pos = batch_for(kind, stage, run.plan, cfg, tokens, starts, window, j, run.device)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + j)  # the skipped ids of j
    sync = nullcontext()
    if i < stage.accum - 1 and hasattr(run.student, "no_sync"):
        sync = run.student.no_sync()  # DDP: all-reduce the gradients once, at the last one
    with sync, run.autocast:
        targets = teacher_targets(kind, stage.weights, run.teacher, x, pos, run.plan)
        loss, values = run.student(student_loss, kind, stage.weights, targets, x, pos,
                                   run.plan, cfg, gen)
        (loss / stage.accum).backward()
    teacher_attention = None
    if kind == "kd":  # the teacher attends within each document: sum of length^2
        positions = document_positions(x, run.plan.eos)[0]
        teacher_attention = (2 * positions + 1).sum()  # sum_{p<n} (2p + 1) = n^2; read later
    return kind, values, flops(kind, *x.shape, run.core.cfg, teacher_attention)


def train_step(step, run):
    """One optimizer step: accum micro-steps per rank, clip, one all-reduce of the loss sums,
    AdamW (skipped on every rank if any loss or the gradient norm is non-finite).
    -> (the log row or None for a skipped step, whether any rank was told to stop)"""
    stage = stage_at(run.plan, step)
    if stage is not run.stage:
        enter_stage(run, stage, fresh=step == stage.first_step and step > 0)
    t0 = time.perf_counter()
    window = run.cfg.target
    if run.plan.phases:  # SDLC: the phase's window and theta
        window, theta = phase_at(run.plan, stage, step)
        run.core.set_rope(theta, None, max_pos=run.cfg.target)
    for group in run.opt.param_groups:
        group["lr"] = lr_at(step - stage.first_step, stage)
    terms = list(stage.weights)
    sums = torch.zeros(2, len(terms), device=run.device, dtype=torch.float64)  # sum, count
    model_flops = 0.0
    for i in range(stage.accum):
        kind, values, micro_flops = micro_step(run, stage, step, i, window)
        for term, value in values.items():
            sums[0, terms.index(term)] += value.detach().double()
            sums[1, terms.index(term)] += 1
        model_flops += micro_flops
    trained = [p for p in run.core.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(trained, stage.clip)  # the same on every rank
    sums, slots = all_reduce_step(sums, run.rank, run.world, run.stop)
    skip = bool(slots[0].any()) or not torch.isfinite(torch.as_tensor(norm)).all()
    if skip and run.rank == 0:
        print(f"step {step + 1}: non-finite {culprit(slots)}; step skipped on all ranks")
    if not skip:
        run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    stop = bool(slots[3].any())
    if skip:
        return None, stop
    return log_row(run, stage, step, terms, sums, slots, norm, seconds, model_flops), stop


def culprit(slots):
    """Which non-finite value skipped the step: the ranks with a bad loss, else the gradient."""
    if slots[0].any():
        return f"loss on rank(s) {slots[0].nonzero().flatten().tolist()}"
    return "gradient"


def log_row(run, stage, step, terms, sums, slots, norm, seconds, model_flops):
    """The step's row of log.jsonl: mean loss per term over all ranks, speed, memory (max over
    ranks: they run different micro-steps)."""
    row = {"step": step + 1, "stage": stage.name, "lr": run.opt.param_groups[0]["lr"],
           "grad_norm": float(norm), "tokens": tokens_through(run.plan, step),
           "tok_s": stage.batch_tokens / seconds,
           "tok_s_gpu": stage.batch_tokens / seconds / run.world, "sec": seconds}
    for i, term in enumerate(terms):
        if sums[1, i] > 0:
            row[f"loss_{term[2:]}"] = float(sums[0, i] / sums[1, i])
    if run.device.type == "cuda":
        row["mfu"] = float(model_flops) / seconds / 989.4e12
        row["mem_gb"] = slots[1].max().item()
        row["mem_reserved_gb"] = slots[2].max().item()
    return row


# ---- the run: build, loop, finish ------------------------------------------------------------

def prepare(cfg):
    """Everything before the first step. -> Run"""
    rank, world, device = setup_dist()
    torch.manual_seed(cfg.seed)
    dtypes = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
              "bfloat16": torch.bfloat16, "float32": torch.float32}
    dtype = dtypes[cfg.dtype]
    init_cfg = LlamaConfig.of(cfg.init)
    tokens, tok_hash, eos = data.load_tokens(cfg.data, cfg.init, init_cfg.vocab_size)
    long_tokens = tokens  # the long windows' text: --data's, or --long-data's
    if cfg.long_data:  # read before the models, so a missing folder fails at once
        long_tokens = data.load_tokens(cfg.long_data, cfg.init, init_cfg.vocab_size,
                                       flag="--long-data")[0]
    plan = make_plan(cfg, init_cfg, world, data_tokens=len(tokens))
    plan = replace(plan, eos=eos)
    student, teacher = build(cfg, plan, dtype, device)
    # the optimizer before any forward: FSDP2 leaves root parameters unsharded after a no-grad one
    opt = optimizer(student)
    autocast = nullcontext()
    if dtype != torch.float32:
        autocast = torch.autocast(device.type, dtype)
    if any("L_short" in st.weights for st in plan.stages):
        layers = select_layers(plan, cfg, student, teacher, tokens, device, rank, world,
                               autocast)
        plan = replace(plan, layers=layers)
        if cfg.fsdp:
            student.reshard()
    starts = data.doc_starts(tokens, eos)
    long_starts = starts
    if cfg.long_data:
        long_starts = data.doc_starts(long_tokens, eos)
    run = Run(cfg=cfg, plan=plan, rank=rank, world=world, device=device, student=student,
              teacher=teacher, core=student.model, opt=opt, tokens=tokens, starts=starts,
              long_tokens=long_tokens, long_starts=long_starts, autocast=autocast)
    run.meta = ckpt.meta_of(cfg, plan, world, tok_hash, tokens, init_cfg)
    if cfg.long_data:
        run.meta["long_data_tokens"] = ckpt.data_id(long_tokens)
    run.init_cfg = init_cfg
    if rank == 0:
        print(f"world {world}, device {device}, dtype {dtype}, {len(tokens):,} training tokens")
        if cfg.long_data:
            print(f"long windows from --long-data {cfg.long_data}: {len(long_tokens):,} tokens")
        if cfg.long_data and not any("long" in stage.kinds for stage in plan.stages):
            print(f"note: --long-data is unused: {cfg.method} trains on no long windows")
        print(describe(plan, cfg, world))
    return run


def check_out(cfg):
    """Refuse to mix two runs in one --out: a used folder needs --resume or --overwrite. Runs on
    every rank before the rendezvous, so before anything is written."""
    run_files = ("log.jsonl", "ckpt", "final")
    if cfg.no_save:  # a speed run's log replaces an earlier log; checkpoints and exports stay safe
        run_files = ("ckpt", "final")
    used = [name for name in run_files if os.path.exists(f"{cfg.out}/{name}")]
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if cfg.resume and not os.path.isfile(f"{cfg.out}/ckpt/state.pt") \
            and not os.path.isfile(f"{cfg.out}/ckpt.old/state.pt"):
        raise FileNotFoundError(f"--resume: no checkpoint in {cfg.out}/ckpt; drop --resume to "
                                f"start a new run")
    if used and not cfg.resume and not cfg.overwrite:
        raise ValueError(f"--out {cfg.out} already holds a run ({', '.join(used)}); add --resume "
                         f"to continue it, --overwrite to start over, or choose another --out")


class StopSignals:
    """SIGTERM (a scheduler's pre-emption) and the first Ctrl-C ask the run to save after the
    current step and exit; a second Ctrl-C exits at once."""
    def __init__(self, run):
        self.run = run
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self.stop)
        return self

    def stop(self, sig, frame):
        if sig == signal.SIGINT and self.run.stop:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.run.stop = True
        if self.run.rank == 0 and sig == signal.SIGINT:
            print("\nCtrl-C: saving after this step (press it again to quit without saving)",
                  flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def main(argv=None):
    cfg = parse_args(argv)
    check_out(cfg)
    run = prepare(cfg)
    if cfg.overwrite and run.rank == 0:
        ckpt.clear(cfg.out)
    os.makedirs(cfg.out, exist_ok=True)
    start = 0
    if cfg.resume:
        start = ckpt.load(f"{cfg.out}/ckpt", run.student, run.opt, run.meta)
    log_path = f"{cfg.out}/log.jsonl"
    if cfg.resume and run.rank == 0:
        ckpt.trim_log(log_path, start)
    log = None
    if run.rank == 0:
        log = open(log_path, "a" if cfg.resume else "w")
    with StopSignals(run):
        done = loop(run, start, log)
    finish(run, done, log, log_path)


def loop(run, start, log):
    """The optimizer steps from `start`: log each, save every --save-every, stop when told.
    -> the number of steps done"""
    cfg = run.cfg
    plan = run.plan
    enter_stage(run, stage_at(plan, start), fresh=False)
    bar = tqdm(range(start, plan.steps), initial=start, total=plan.steps,
               disable=run.rank != 0, dynamic_ncols=True)
    done = start
    for step in bar:
        row, stop = train_step(step, run)
        done = step + 1
        if row and log:
            log.write(json.dumps(row) + "\n")
            log.flush()
            shown = {k[5:]: f"{v:.4g}" for k, v in row.items() if k.startswith("loss_")}
            shown["tok/s"] = f"{row['tok_s']:.0f}"
            if "mfu" in row:
                shown["mfu"] = f"{row['mfu']:.1%}"
            bar.set_postfix(shown)
        state = None  # gathered at most once a step
        if due(cfg.export_every, done, plan.steps) and not cfg.no_save:
            state = ckpt.gather(run.student, run.opt)  # the student as it is now, for eval.py
            ckpt.export(f"{cfg.out}/step-{done}", state[0], run.core.cfg, run.init_cfg,
                        run.rank, cfg.init)
        if stop or done == cfg.stop_at:
            break
        if due(cfg.save_every, done, plan.steps):
            if state is None:
                state = ckpt.gather(run.student, run.opt)
            ckpt.save(f"{cfg.out}/ckpt", state, done, run.meta, run.rank)
    return done


def due(every, done, steps):
    """Whether a periodic save or export falls after step `done` (the last step has its own)."""
    return every > 0 and done % every == 0 and done < steps


def finish(run, done, log, log_path):
    """Save the checkpoint, export the student when every step ran, plot the log."""
    cfg = run.cfg
    rank = run.rank
    if not cfg.no_save:  # one gather serves the checkpoint and the export
        state = ckpt.gather(run.student, run.opt)
        ckpt.save(f"{cfg.out}/ckpt", state, done, run.meta, rank)
        if done == run.plan.steps:
            ckpt.export(f"{cfg.out}/final", state[0], run.core.cfg, run.init_cfg, rank, cfg.init)
    if rank == 0:
        log.close()
        ckpt.plot(log_path, f"{cfg.out}/loss.png")
        if cfg.no_save:
            print("done (--no-save)")
        elif done == run.plan.steps:
            print(f"exported {cfg.out}/final")
        else:
            print(f"stopped at step {done}; continue with the same command and --resume")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: the message says what to fix
        print(f"train.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
