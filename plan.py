"""What the one dial implies: the user's Config (argparse is generated from it) and the Plan, every
value derived from --target, the method's recipe, the model and the data; printed once at start.
The rules: docs/METHODS.md ("Data mix and the one dial").
"""
import math
from dataclasses import dataclass, replace

import cli
from cli import knob
from methods import PRESETS, TERMS, longred_defaults
from rope import extend, phase_thetas


@dataclass(frozen=True)
class Config:
    """What the user sets. 0, -1 or "" means: derived from --target and the method's recipe."""
    method: str = knob("longred-c", "cpt | mix-cpt | longred-u | longred-c | linearard | "
                       "linearard+cpt | kd")
    loss: str = knob("", "the last stage's loss as term=weight pairs, e.g. "
                     "'L_long=1,L_short=5,L_s2l=10,L_rel=1' (LongReD plus relation KL); terms: "
                     "L_long, L_short, L_s2l, L_short_ce, L_orig_ce, L_rel, L_kd; \"\" = the "
                     "method's")
    mix: str = knob("", "the last stage's token shares per data kind, e.g. 'long=4,short=3,"
                    "orig=1,rel=1'; \"\" = the method's, and 1 share for a kind it lacks")
    target: int = knob(32768, "the one dial: the context window to reach")
    init: str = knob("assets/smollm2-135m", "HF folder of the original model, or random:SHAPE")
    data: str = knob("assets/tokens", "folder of token shards from `python data.py prepare`")
    long_data: str = knob("", "token shards for the long windows (L_long, the CE on T_target "
                          "windows) alone, e.g. assets/tokens-tech; \"\" = --data. Every "
                          "other stream (short, T_orig, LinearARD's, KD's) reads --data")
    out: str = knob("runs/default", "checkpoints, log.jsonl, loss.png, final/ (the student)")
    orig: int = knob(0, "original window; 0 = the model's max_position_embeddings")
    rope: str = knob("", "none | pi | abf | ntk | yarn | llama3; \"\" = the method's")
    abf_theta: float = knob(0.0, "ABF theta; 0 = LongReD's choice (Llama-3 8K: 2e7 at 32K, 1e8 "
                            "at 128K; Mistral 32K: 2e7 at 128K), else theta x 10 s (ours; = "
                            "LongReD's Llama-3 32K choice)")
    tokens: int = knob(0, "training budget of the last stage in tokens; 0 = the method's "
                       "(LongReD 2^30; LinearARD 144 x 16384), at most 4 passes over the data")
    batch_tokens: int = knob(0, "tokens per optimizer step of the last stage, all ranks; 0 = "
                             "the method's (2M; LinearARD 16384)")
    micro_tokens: int = knob(0, "tokens per micro-step per rank; 0 = target (a micro-step "
                             "holds whole windows of its kind)")
    steps: int = knob(0, "optimizer steps of the last stage; 0 = tokens // batch_tokens")
    lr: float = knob(0.0, "peak AdamW learning rate of the last stage; 0 = the stage's "
                          "(LongReD, LinearARD: 2e-5)")
    final_lr: float = knob(0.0, "cosine decay to final_lr x lr; 0 = the stage's (1 = constant)")
    warmup: int = knob(0, "linear warm-up steps; 0 = the stage's (LinearARD: 4)")
    wd: float = knob(-1.0, "AdamW weight decay on matrices; -1 = the stage's (0.1; LinearARD "
                     "0.01)")
    beta2: float = knob(-1.0, "AdamW beta2 (beta1 = 0.9); -1 = the stage's (0.95; LinearARD "
                        "0.999)")
    clip: float = knob(0.0, "gradient-norm clip; 0 = the stage's (1.0; LinearARD 5.0)")
    alpha1: float = knob(-1.0, "LongReD weight of L_short; -1 = 5 (target <= 64K) or 2")
    alpha2: float = knob(-1.0, "LongReD weight of L_s2l; -1 = 10 (target <= 64K) or 15")
    distill_layers: int = knob(0, "LongReD M+1 layers (M by attention KL + the last); 0 = 6 "
                               "(target <= 64K) or 3")
    select_texts: int = knob(16, "T_orig texts whose attention KL, averaged, picks the layers")
    short_len: int = knob(1024, "LongReD short texts (tokens)")
    rel_len: int = knob(0, "LinearARD window; 0 = min(orig, 4096)")
    rel_norm: str = knob("own", "own: each relation by its own head count | query: by the "
                         "query heads, as LinearARD's code")
    rel_tokens: int = knob(0, "linearard+cpt: tokens of the relation stage; 0 = 144 x 16384")
    rel_batch_tokens: int = knob(16384, "linearard+cpt: tokens per step of the relation stage")
    kd_temperature: float = knob(1.0, "SDLC logit-KD temperature")
    kd_ce: float = knob(0.0, "weight of CE mixed into the SDLC logit KD")
    phases: str = knob("", "kd: comma-separated window lengths; \"\" = doubling up to target")
    train_params: str = knob("", "regex on parameter names to train in the last stage; \"\" = "
                             "the stage's (all; LinearARD q, k, v)")
    dtype: str = knob("auto", "bfloat16 | float32; auto = bf16 on CUDA, fp32 on CPU")
    fsdp: bool = knob(False, "FSDP2: shard the student (the bf16 teacher is replicated)")
    checkpointing: bool = knob(False, "per-block activation checkpointing")
    compile: bool = knob(False, "torch.compile each block on CPU too (CUDA compiles by default)")
    no_compile: bool = knob(False, "run eager on CUDA; by default each block is torch.compiled "
                            "there (fuses RoPE, SwiGLU, norms, casts; the first steps compile)")
    save_every: int = knob(0, "optimizer steps between checkpoints; 0 = only at the end")
    export_every: int = knob(0, "also export the student every N steps to out/step-N (HF "
                             "folders for eval.py: a curve over training; not with --no-save); "
                             "0 = only final/")
    resume: bool = knob(False, "continue from out/ckpt (refused if the config differs)")
    overwrite: bool = knob(False, "start over in a used --out (its ckpt/, final/ and log go)")
    stop_at: int = knob(0, "save and stop after this step (a job's time limit); 0 = run all")
    no_save: bool = knob(False, "no checkpoint and no export (speed and memory runs)")
    seed: int = knob(0, "seed of the data order, the skipped ids and random weights")


@dataclass(frozen=True)
class Stage:
    """One stage as this run executes it. kinds[i * world + rank] is the kind of rank's i-th
    micro-step of every optimizer step; rows[kind] sequences of windows[kind] tokens each."""
    name: str
    weights: dict
    mix: dict
    kinds: tuple
    requested_batch: int
    rows: dict
    windows: dict
    accum: int
    batch_tokens: int
    first_step: int
    steps: int
    train_params: str
    warmup: int
    lr: float
    final_lr: float
    clip: float
    weight_decay: float
    beta2: float

    def formula(self):
        """e.g. 'L = 1 L_long + 5 L_short + 10 L_s2l'"""
        return "L = " + " + ".join(f"{w:g} {term}" for term, w in self.weights.items())

    def tokens_of(self, kind):
        return self.kinds.count(kind) * self.rows[kind] * self.windows[kind]


@dataclass(frozen=True)
class Plan:
    """Every value derived from Config and the model; printed once at start."""
    orig: int
    s: float
    rope: str
    theta: float
    scaling: dict
    phases: tuple             # SDLC: ((window, theta), ...); () otherwise
    skip: str
    alpha1: float
    alpha2: float
    distill_layers: int
    rel_len: int
    stages: tuple
    steps: int                # all stages
    data_tokens: int = 0      # the training data's size
    eos: int = 0
    layers: tuple = ()        # LongReD's distilled layers, chosen at start by attention KL


def parse_pairs(text, flag):
    """'a=1,b=2.5' -> {"a": 1.0, "b": 2.5}; a one-line error naming the flag otherwise."""
    pairs = {}
    for item in text.split(","):
        name, _, value = item.strip().partition("=")
        try:
            pairs[name] = float(value)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: write name=number pairs separated by commas, "
                             f"e.g. {flag} L_long=1,L_short=5") from None
    return pairs


def custom_recipe(recipe, cfg):
    """The last stage with the user's --loss terms and --mix shares. A kind the recipe lacks gets
    1 share unless --mix names it."""
    weights = dict(recipe.weights)
    if cfg.loss:
        weights = parse_pairs(cfg.loss, "--loss")
    unknown = sorted(set(weights) - set(TERMS))
    if unknown:
        raise ValueError(f"--loss: unknown term(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(TERMS)}")
    kinds = []
    for term in weights:
        if TERMS[term].kind not in kinds:
            kinds.append(TERMS[term].kind)
    shares = {kind: recipe.mix.get(kind, 1) for kind in kinds}
    if cfg.mix:
        for kind, share in parse_pairs(cfg.mix, "--mix").items():
            if kind not in kinds:
                raise ValueError(f"--mix {kind}: no loss term reads {kind!r} data; the terms "
                                 f"read {', '.join(kinds)}")
            if share != int(share) or share < 1:
                raise ValueError(f"--mix {kind}={share:g}: shares are whole numbers >= 1")
            shares[kind] = int(share)
    return replace(recipe, weights=weights, mix=shares)


def mix_period(mix):
    """Micro-steps in the smallest whole cycle of a token mix (4:3:1 -> 8)."""
    return sum(mix.values()) // math.gcd(*mix.values())


def micro_kinds(mix, n):
    """n micro-step kinds, each kind's count n x share (n a multiple of mix_period)."""
    total = sum(mix.values())
    kinds = []
    for kind, share in mix.items():
        kinds += [kind] * (n * share // total)
    return tuple(kinds)


DEFAULT_PASSES = 4  # the default budget reads the training data at most this often


def plan_stage(recipe, last, cfg, windows, weights, world, first_step, data_tokens):
    """A Recipe sized for this run. The last stage takes the user's budget, batch, schedule and
    parameter flags; an earlier stage (LinearARD before CPT) runs its recipe's steps."""
    batch = recipe.batch_tokens
    if not last:
        batch = cfg.rel_batch_tokens
    if last and cfg.batch_tokens:
        batch = cfg.batch_tokens
    requested = batch
    largest = max(windows[k] for k in recipe.mix)
    micro = min(cfg.micro_tokens or cfg.target, max(batch // world, 1))
    micro = max(micro // largest, 1) * largest  # whole windows of the longest kind
    period = mix_period(recipe.mix)
    accum = max(batch // (micro * world), 1)
    while accum * world % period:  # the mix needs whole cycles in every step
        accum += 1
    rows = {k: max(micro // windows[k], 1) for k in recipe.mix}
    kinds = micro_kinds(recipe.mix, accum * world)
    batch = sum(kinds.count(k) * rows[k] * windows[k] for k in recipe.mix)
    if not last and cfg.rel_tokens:
        steps = max(cfg.rel_tokens // batch, 1)
    elif not last:
        steps = recipe.steps
    elif cfg.steps:
        steps = cfg.steps
    elif cfg.tokens:
        steps = max(cfg.tokens // batch, 1)
    elif recipe.steps:
        steps = recipe.steps
    else:  # LongReD's 2^30 tokens (512 steps of 2M), at most a few passes over the data
        budget = 2**30
        if data_tokens:
            budget = min(budget, DEFAULT_PASSES * data_tokens)
        steps = max(budget // batch, 1)
    user = last  # flags of the schedule and parameters apply to the last stage
    return Stage(name=recipe.name, weights=weights, mix=dict(recipe.mix), kinds=kinds,
                 requested_batch=requested, rows=rows,
                 windows={k: windows[k] for k in recipe.mix}, accum=accum, batch_tokens=batch,
                 first_step=first_step, steps=steps,
                 train_params=(user and cfg.train_params) or recipe.train_params,
                 lr=(user and cfg.lr) or recipe.lr,
                 warmup=(user and cfg.warmup) or recipe.warmup,
                 final_lr=(user and cfg.final_lr) or recipe.final_lr,
                 clip=(user and cfg.clip) or recipe.clip,
                 weight_decay=cfg.wd if user and cfg.wd >= 0 else recipe.weight_decay,
                 beta2=cfg.beta2 if user and cfg.beta2 >= 0 else recipe.beta2)


def make_plan(cfg, model_cfg, world, data_tokens=0):
    """Every value the one dial implies; data_tokens: the size of the training data. -> Plan"""
    orig = cfg.orig or model_cfg.max_pos
    s = cfg.target / orig
    if s <= 1:
        raise ValueError(f"--target {cfg.target} must exceed the original window {orig} (--orig)")
    preset = PRESETS[cfg.method]
    layers, alpha1, alpha2 = longred_defaults(cfg.target)
    alpha1 = cfg.alpha1 if cfg.alpha1 >= 0 else alpha1
    alpha2 = cfg.alpha2 if cfg.alpha2 >= 0 else alpha2
    rope_kind = cfg.rope or preset.rope
    phases = ()
    theta = model_cfg.rope_theta
    scaling = None
    if rope_kind == "phase":
        lengths = [orig * 2**k for k in range(1, 64) if orig * 2**k < cfg.target] + [cfg.target]
        if cfg.phases:
            lengths = [int(x) for x in cfg.phases.split(",")]
        phases = tuple(phase_thetas(model_cfg.rope_theta, model_cfg.head_dim, orig, lengths))
    else:
        theta, scaling = extend(rope_kind, model_cfg.rope_theta, model_cfg.head_dim, orig,
                                cfg.target, cfg.abf_theta or None)
    rel_len = cfg.rel_len or min(orig, 4096)
    kd_window = max(length for length, _ in phases) if phases else cfg.target
    windows = {"long": cfg.target, "short": cfg.short_len, "orig": orig, "rel": rel_len,
               "kd": kd_window}
    symbols = {"alpha1": alpha1, "alpha2": alpha2}
    stages = []
    first_step = 0
    for i, recipe in enumerate(preset.stages):
        last = i == len(preset.stages) - 1
        if last and (cfg.loss or cfg.mix):
            recipe = custom_recipe(recipe, cfg)
        weights = {t: float(symbols.get(w, w)) for t, w in recipe.weights.items()}
        stage = plan_stage(recipe, last, cfg, windows, weights, world, first_step, data_tokens)
        stages.append(stage)
        first_step += stage.steps
    return Plan(orig=orig, s=s, rope=rope_kind, theta=theta, scaling=scaling, phases=phases,
                skip=preset.skip or "cream", alpha1=alpha1, alpha2=alpha2,
                distill_layers=min(cfg.distill_layers or layers, model_cfg.n_layers),
                rel_len=rel_len, stages=tuple(stages), steps=first_step, data_tokens=data_tokens)


def describe(plan, cfg, world):
    """The derived values, each stage's loss formula, micro-step mix and token ratio."""
    lines = [f"  s = {plan.s:g} (orig {plan.orig} -> target {cfg.target}), rope {plan.rope}"]
    if plan.phases:
        lines.append(f"  phases (window, theta): {list(plan.phases)}")
    else:
        lines.append(f"  student rope_theta {plan.theta:g}, rope_scaling {plan.scaling}")
    if plan.layers:
        lines.append(f"  LongReD distilled layers {list(plan.layers)} (last = final-norm state)")
    for st in plan.stages:
        g = math.gcd(*(st.tokens_of(k) for k in st.mix))
        counts = ", ".join(f"{st.kinds.count(k)} {k} ({st.rows[k]} x {st.windows[k]})"
                           for k in st.mix)
        ratio = ":".join(str(st.tokens_of(k) // g) for k in st.mix)
        lines += [f"  stage {st.name}: {st.formula()}",
                  f"    steps {st.first_step + 1}..{st.first_step + st.steps}, "
                  f"{st.batch_tokens:,} tokens/step = {st.accum} micro-steps on each of {world} "
                  f"rank(s)",
                  f"    per step: {counts}; tokens {':'.join(st.mix)} = {ratio}",
                  *[f"    note: {st.requested_batch:,} tokens/step asked; whole windows and "
                    f"whole cycles of the mix on {world} ranks give {st.batch_tokens:,}"]
                  * (st.requested_batch != st.batch_tokens),
                  f"    trains {st.train_params or 'all parameters'}; lr {st.lr:g}, "
                  f"warm-up {st.warmup}, cosine to {st.final_lr:g} x lr, clip {st.clip:g}, "
                  f"wd {st.weight_decay:g}, beta2 {st.beta2:g}"]
    if plan.data_tokens:
        total = sum(st.steps * st.batch_tokens for st in plan.stages)
        passes = total / plan.data_tokens
        lines.append(f"  {total:,} training tokens = {passes:.1f} passes over the "
                     f"{plan.data_tokens:,}-token data")
        if passes > DEFAULT_PASSES:
            lines.append(f"  warning: {passes:.0f} passes over the same text; the papers train "
                         f"on fresh text (LongReD: 1B tokens). Add text with `python data.py "
                         f"prepare`, or lower --tokens / --steps")
    return "\n".join(lines)


def parse_args(argv=None, description=__doc__):
    """argparse generated from Config: --help lists every knob with its metadata, typos fail."""
    parser = cli.parser_for(Config, "train.py", description)
    cfg = Config(**vars(parser.parse_args(argv)))
    if cfg.method not in PRESETS:
        parser.error(f"--method {cfg.method!r}: choose from {', '.join(PRESETS)}")
    if cfg.compile and cfg.no_compile:
        parser.error("--compile and --no-compile exclude each other")
    return cfg
