"""The methods as their papers define them: loss terms, and methods as weighted sums of terms over
stages. The maths of each term: docs/METHODS.md ("Methods as weighted loss terms").

    LongReD (Dong et al., ACL 2025):      L = L_long + alpha1 L_short + alpha2 L_s2l
    LinearARD (Yang et al., 2026):        L = L_rel, then (linearard+cpt) L = L_long
    SDLC (Huber et al., 2026):            L = L_kd
    CPT and mix-CPT (LongReD's baselines): L = L_long, L = L_long + L_short_ce + L_orig_ce

Each term reads one kind of micro-step data: long (T_target windows), short (1K texts), orig
(T_orig texts), rel (LinearARD's windows), kd (short documents packed into a long window). A
recipe's mix gives each kind's share of a step's tokens.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Term:
    kind: str      # the micro-step data the term reads
    paper: str
    formula: str


TERMS = {
    "L_long": Term("long", "CPT", "next-token CE of the student on T_target windows"),
    "L_short": Term("short", "LongReD", "sum over the selected layers l of 1 - mean_t "
                    "cos(h_s,l, h_t,l); 1K texts, positions 0..1023 for both"),
    "L_s2l": Term("orig", "LongReD", "1 - mean_t cos of the final-norm states; T_orig texts, "
                  "teacher at 0..T_orig-1, student at skipped ids"),
    "L_short_ce": Term("short", "mix-CPT", "next-token CE on 1K texts"),
    "L_orig_ce": Term("orig", "mix-CPT", "next-token CE on T_orig texts"),
    "L_rel": Term("rel", "LinearARD", "relation KL(teacher || student) of Q/Q, K/K, V/V, "
                  "mean over layers"),
    "L_kd": Term("kd", "SDLC", "KL(teacher || student) of next-token distributions; teacher "
                 "sees each document alone"),
}


@dataclass(frozen=True)
class Recipe:
    """One stage of a method as its paper runs it. Weights may name "alpha1"/"alpha2" (LongReD,
    derived from the target). mix: each kind's share of the stage's tokens."""
    name: str
    weights: dict
    mix: dict
    steps: int = 0            # the paper's step count; 0 = from the token budget
    batch_tokens: int = 2 * 2**20  # LongReD: ~2M tokens per optimizer step
    train_params: str = ""    # regex; "" = all parameters
    lr: float = 2e-5          # peak AdamW learning rate (LongReD's and LinearARD's)
    warmup: int = 0
    final_lr: float = 1.0     # 1 = constant learning rate (LongReD)
    clip: float = 1.0
    weight_decay: float = 0.1
    beta2: float = 0.95


LONGRED = Recipe(name="longred", weights={"L_long": 1.0, "L_short": "alpha1", "L_s2l": "alpha2"},
                 mix={"long": 4, "short": 3, "orig": 1})  # LongReD's 8 : 6 : 2 micro-steps
LINEARARD = Recipe(name="relation", weights={"L_rel": 1.0}, mix={"rel": 1}, steps=144, batch_tokens=16384,
                   train_params=r"\.(q|k|v)_proj\.", warmup=4, final_lr=0.9, clip=5.0,
                   weight_decay=0.01, beta2=0.999)  # LinearARD's train.py and scripts
CPT = Recipe(name="cpt", weights={"L_long": 1.0}, mix={"long": 1})


@dataclass(frozen=True)
class Preset:
    rope: str                 # the student's RoPE scaling
    stages: tuple
    skip: str = ""            # LongReD short-to-long ids: uniform | cream


PRESETS = {
    "cpt": Preset("abf", (CPT,)),
    "mix-cpt": Preset("abf", (Recipe(name="mix-cpt", mix=LONGRED.mix, weights={
        "L_long": 1.0, "L_short_ce": 1.0, "L_orig_ce": 1.0}),)),
    "longred-u": Preset("abf", (LONGRED,), skip="uniform"),
    "longred-c": Preset("abf", (LONGRED,), skip="cream"),
    "linearard": Preset("pi", (LINEARARD,)),
    "linearard+cpt": Preset("pi", (LINEARARD, CPT)),
    "kd": Preset("phase", (Recipe(name="kd", weights={"L_kd": 1.0}, mix={"kd": 1}),)),
}



def longred_defaults(target):
    """LongReD's per-target choice: (layers M+1, alpha1, alpha2) = (6, 5, 10) for its 32K runs,
    (3, 2, 15) for 128K; targets up to 64K take the 32K choice (ours: the boundary)."""
    if target <= 65536:
        return 6, 5.0, 10.0
    return 3, 2.0, 15.0
