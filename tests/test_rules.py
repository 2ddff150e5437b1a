"""The papers' rules as train.py runs them, each pinned by a test that fails when the rule is broken.

Every test here runs the real training code (train.main / train.prepare on a tiny random Llama
saved as an HF folder, real token shards) and watches what the models are given through a spy on
Llama.forward_hidden, or compares with an independent computation (transformers' Llama, the
formula of the paper's released code written anew in numpy). Each rule was broken on purpose in
the code and the named test failed (README, "The papers' rules and their tests").

| rule (paper) | test |
|---|---|
| s2l: student at skipped ids, teacher at 0..T_orig-1, original RoPE (LongReD) | test_s2l_positions_and_ropes |
| s2l: r and end_id drawn per sequence, head/tail once per micro-batch (LongReD code) | test_s2l_positions_and_ropes |
| s2l distils the final-norm state only, 1 - mean cos (LongReD) | test_s2l_targets_are_final_norm_states |
| L_short: the attention-KL layers, last entry = final-norm state (LongReD) | test_short_distils_the_selected_layers |
| layer selection averages the KL over --select-texts T_orig texts (ours: LongReD is silent) | test_layer_selection_averages_texts |
| alpha1, alpha2 weight L_short, L_s2l in the loss (LongReD) | test_weights_reach_the_loss |
| defaults by target: 6 layers, 5, 10 at 32K; 3, 2, 15 at 128K; ABF thetas (LongReD) | test_longred_defaults_by_target |
| 4:3:1 long:short:s2l tokens in every optimizer step, any accumulation (LongReD) | test_longred_mix_at_every_accumulation |
| teacher frozen, outside the optimizer, original RoPE, every preset | test_teacher_is_frozen |
| trained parameters of every preset and stage; per-stage optimizer (LinearARD, CPT) | test_trained_parameters_per_stage |
| LinearARD: 144 steps x 16,384 tokens of 4K windows, warm-up 4, cosine to 0.9, clip 5 | test_linearard_recipe |
| linearard+cpt: the relation stage keeps its recipe at any --batch-tokens; lr per stage | test_linearard_then_cpt_schedule |
| SDLC: teacher sees each document alone, student the packed window, positions continue | test_kd_teacher_alone_student_packed |
| SDLC: the phase's window and theta change at the phase boundaries | test_kd_phases_change_at_boundaries |
| KL directions: KL(teacher || student) for relation KL, attention KL, logit KD | test_kl_directions |
CREAM's and Uniform's id distributions are pinned in tests/test_rope.py.
"""
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import distill
import test_train
import methods
import train
from model import Llama, LlamaConfig
from test_train import run

tiny = test_train.tiny  # a 3-layer GQA Llama (window 64) as an HF folder and a token shard
T_ORIG, TARGET, SHORT = 64, 256, 32  # tiny's window, ARGS' --target and --short-len


@dataclass
class Call:
    """One Llama.forward_hidden call as the spy saw it."""
    role: str            # "teacher" (no parameter trains) or "student"
    tokens: torch.Tensor
    positions: torch.Tensor
    hidden_layers: tuple
    qkv_layers: tuple
    theta: float
    scaling: dict
    grad: bool
    documents: list = None  # cumulative document lengths over the flattened tokens, if given


@pytest.fixture
def spy(monkeypatch):
    """Records every Llama.forward_hidden call (teacher and student, any wrapper)."""
    calls = []
    real = Llama.forward_hidden

    def watched(self, tokens, positions=None, hidden_layers=(), qkv_layers=(), documents=None):
        trains = any(p.requires_grad for p in self.parameters())
        pos = positions
        if pos is None:
            pos = torch.arange(tokens.shape[1])
        bounds = None
        if documents is not None:
            bounds = documents.tolist()
        calls.append(Call("student" if trains else "teacher", tokens.clone(),
                          pos.clone().cpu(), tuple(hidden_layers), tuple(qkv_layers),
                          self.cfg.rope_theta, self.cfg.rope_scaling, torch.is_grad_enabled(),
                          bounds))
        return real(self, tokens, positions, hidden_layers, qkv_layers, documents)
    monkeypatch.setattr(Llama, "forward_hidden", watched)
    return calls


def original(tiny):
    return LlamaConfig.from_json(tiny / "model" / "config.json")


def plain_calls(calls, role, length):
    """Calls without captures on `length`-token texts: the s2l forwards."""
    return [c for c in calls if c.role == role and c.tokens.shape[1] == length
            and not c.hidden_layers and not c.qkv_layers]


def test_s2l_positions_and_ropes(tiny, tmp_path, spy):
    """LongReD L_s2l: the teacher reads each T_orig text at 0..T_orig-1 with the original RoPE;
    the student reads it at skipped ids (head 0.., tail ending at T_target-1, strictly
    increasing) with the scaled RoPE; r and end_id differ per sequence, head/tail do not."""
    run(tiny, tmp_path, "--method", "longred-c", "--steps", "1", "--no-save")
    cfg = original(tiny)
    teacher = plain_calls(spy, "teacher", T_ORIG)
    student = plain_calls(spy, "student", T_ORIG)
    assert teacher and len(teacher) == len(student)
    for t, s in zip(teacher, student):
        B = t.tokens.shape[0]
        assert B == 4 and torch.equal(t.tokens, s.tokens)
        assert torch.equal(t.positions.expand(B, -1), torch.arange(T_ORIG).expand(B, -1))
        assert (t.theta, t.scaling) == (cfg.rope_theta, cfg.rope_scaling)
        assert s.theta != cfg.rope_theta and s.grad and not t.grad
        ids = s.positions
        assert ids.shape == (B, T_ORIG)
        assert (ids.diff() > 0).all() and (ids[:, 0] == 0).all()
        assert (ids[:, -1] == TARGET - 1).all() and not torch.equal(ids[0], torch.arange(T_ORIG))
        shared = [h for h in (T_ORIG // 3, 4 * TARGET // T_ORIG)  # head = tail, once a batch
                  if (ids[:, :h] == torch.arange(h)).all()
                  and (ids[:, -h:] == torch.arange(TARGET - h, TARGET)).all()]
        assert shared, ids
        h = T_ORIG // 3  # a row with the short head cannot also have the long head and tail
        long_head = {bool((row[:h] == torch.arange(h)).all()
                          and (row[-h:] == torch.arange(TARGET - h, TARGET)).all()) for row in ids}
        assert len(long_head) == 1, ids
    mids = {tuple(row.tolist()) for s in student for row in s.positions}
    assert len(mids) > len(student)  # per sequence: the rows of a micro-batch differ


def hf_model(path, theta=None):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    if theta is not None:  # the student's ABF RoPE
        model.config.rope_parameters["rope_theta"] = theta
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    return model.eval()


def test_s2l_targets_are_final_norm_states(tiny, tmp_path, spy, monkeypatch):
    """L_s2l compares final-norm hidden states: the teacher's at 0..T_orig-1 with the original
    RoPE, the student's at the skipped ids with the ABF RoPE, as transformers' Llama computes them
    (an independent model), and the loss is 1 - mean_t cos."""
    seen, real = [], distill.s2l_loss
    monkeypatch.setattr(distill, "s2l_loss", lambda hs, ht: seen.append((hs, ht)) or real(hs, ht))
    run(tiny, tmp_path, "--method", "longred-c", "--steps", "1", "--no-save")
    students = plain_calls(spy, "student", T_ORIG)
    assert students, "no student forward on T_orig texts without captures (the s2l forward)"
    student = students[0]
    assert not torch.equal(student.positions[0], torch.arange(T_ORIG))  # skipped ids
    hs, ht = seen[0]
    teacher_hf = hf_model(tiny / "model")
    student_hf = hf_model(tiny / "model", theta=student.theta)
    with torch.no_grad():
        ref_t = teacher_hf.model(student.tokens).last_hidden_state
        ref_s = student_hf.model(student.tokens, position_ids=student.positions).last_hidden_state
    torch.testing.assert_close(ht, ref_t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hs.detach(), ref_s, rtol=1e-4, atol=1e-4)
    cos = F.cosine_similarity(ref_s.double(), ref_t.double(), dim=-1)
    assert real(hs, ht).item() == pytest.approx(1 - cos.mean().item(), rel=1e-4)


def test_short_distils_the_selected_layers(tiny, tmp_path, spy, monkeypatch):
    """L_short distils exactly the layers the attention KL chose (here layer 1 by a planted KL,
    plus the last), the last entry being the final-norm state, on 1K-style texts at positions
    0..T-1 for both models; checked against transformers' hidden states."""
    monkeypatch.setattr(distill, "attention_kl_per_layer", lambda ct, cs, layers: [0.1, 5.0, 0.2])
    seen, real = [], distill.hidden_cosine_loss
    monkeypatch.setattr(distill, "hidden_cosine_loss",
                        lambda hs, ht: seen.append((hs, ht)) or real(hs, ht))
    run(tiny, tmp_path, "--method", "longred-c", "--steps", "1", "--no-save")
    short = [c for c in spy if c.tokens.shape[1] == SHORT]
    assert short and all(c.hidden_layers == (1,) for c in short), [(c.role, c.hidden_layers, c.tokens.shape) for c in short]
    assert all(torch.equal(c.positions[..., :], torch.arange(SHORT).expand_as(c.tokens))
               for c in short)
    teacher_call = [c for c in short if c.role == "teacher"][0]
    hs, ht = [pair for pair in seen if len(pair[0]) == 2][0]
    with torch.no_grad():
        out = hf_model(tiny / "model").model(teacher_call.tokens, output_hidden_states=True)
    torch.testing.assert_close(ht[0], out.hidden_states[2], rtol=1e-4, atol=1e-4)  # after block 1
    torch.testing.assert_close(ht[1], out.last_hidden_state, rtol=1e-4, atol=1e-4)  # final norm


def test_layer_selection_averages_texts(tiny, tmp_path, spy, monkeypatch):
    """The layers come from the attention KL averaged over --select-texts distinct T_orig texts:
    planted per-text KLs whose mean picks layer 0 while the first text alone (or the maximum)
    would pick layer 1."""
    planted = iter([[0.0, 3.0, 0.0], [2.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    monkeypatch.setattr(distill, "attention_kl_per_layer", lambda ct, cs, layers: next(planted))
    run(tiny, tmp_path, "--method", "longred-c", "--steps", "1", "--no-save", "--select-texts",
        "3")
    texts = [c.tokens for c in spy if c.qkv_layers and c.role == "teacher"]
    assert len(texts) == 3 and len({tuple(t.flatten().tolist()) for t in texts}) == 3
    assert all(t.shape == (1, T_ORIG) for t in texts)
    short = [c for c in spy if c.tokens.shape[1] == SHORT]
    assert all(c.hidden_layers == (0,) for c in short)


def test_weights_reach_the_loss(tiny, tmp_path, losses_seen):
    """Each micro-step's loss is sum_term weight x term: alpha1 on L_short, alpha2 on L_s2l, 1 on
    L_long (LongReD: L = L_long + a1 L_short + a2 L_s2l)."""
    seen = losses_seen
    run(tiny, tmp_path, "--method", "longred-u", "--steps", "1", "--no-save", "--alpha1", "3",
        "--alpha2", "7")
    weights = {"L_long": 1.0, "L_short": 3.0, "L_s2l": 7.0}
    kinds = set()
    for loss, values in seen:
        kinds |= set(values)
        assert loss == pytest.approx(sum(weights[k] * v for k, v in values.items()), rel=1e-6)
    assert kinds == set(weights)


def test_longred_defaults_by_target():
    """LongReD's choices by target length: 6 layers, alpha 5 / 10 for its 32K runs, 3 layers,
    2 / 15 for 128K; ABF theta 2e7 (Llama-3 8K -> 32K), 1e8 (-> 128K), 2e7 (Mistral 32K -> 128K);
    other models theta x 10 s."""
    llama3 = LlamaConfig(vocab_size=256, dim=64, n_layers=32, n_heads=4, n_kv_heads=2,
                         head_dim=16, ffn_dim=128, rope_theta=5e5, max_pos=8192)
    mistral = LlamaConfig(vocab_size=256, dim=64, n_layers=32, n_heads=4, n_kv_heads=2,
                          head_dim=16, ffn_dim=128, rope_theta=1e6, max_pos=32768)
    smol = LlamaConfig(vocab_size=256, dim=64, n_layers=30, n_heads=4, n_kv_heads=2,
                       head_dim=16, ffn_dim=128, rope_theta=1e5, max_pos=8192)
    for model_cfg, target, want in [(llama3, 32768, (6, 5.0, 10.0, 2e7)),
                                    (llama3, 131072, (3, 2.0, 15.0, 1e8)),
                                    (mistral, 131072, (3, 2.0, 15.0, 2e7)),
                                    (smol, 32768, (6, 5.0, 10.0, 4e6))]:
        cfg = train.parse_args(["--target", str(target)])
        plan = train.make_plan(cfg, model_cfg, 1)
        assert (plan.distill_layers, plan.alpha1, plan.alpha2, plan.theta) == want
        assert plan.stages[0].weights == {"L_long": 1.0, "L_short": want[1], "L_s2l": want[2]}


@pytest.mark.parametrize("world", [1, 2, 8])
def test_longred_mix_at_every_accumulation(world):
    """LongReD's step: 8 long, 6 short, 2 s2l micro-steps = tokens 4:3:1. At every asked
    accumulation 1..64 each optimizer step holds whole cycles of that mix (the batch rounds up,
    never down) with the right windows."""
    model_cfg = LlamaConfig(vocab_size=256, dim=64, n_layers=30, n_heads=4, n_kv_heads=2,
                            head_dim=16, ffn_dim=128, rope_theta=1e5, max_pos=8192)
    for accum in range(1, 65):
        asked = accum * 32768 * world
        cfg = train.parse_args(["--batch-tokens", str(asked)])
        stage = train.make_plan(cfg, model_cfg, world).stages[0]
        long_tokens = stage.tokens_of("long")
        assert (stage.tokens_of("short") * 4, stage.tokens_of("orig") * 4) == \
            (long_tokens * 3, long_tokens), accum
        assert stage.windows == {"long": 32768, "short": 1024, "orig": 8192}
        assert stage.batch_tokens >= asked and len(stage.kinds) == stage.accum * world
        assert stage.batch_tokens < asked + 8 * 32768


@pytest.mark.parametrize("method", list(methods.PRESETS))
def test_teacher_is_frozen(tiny, tmp_path, method):
    """Every preset: the teacher has the original config's RoPE, no parameter that trains, none
    in the optimizer, and is unchanged after a training step."""
    cfg = train.parse_args(["--init", str(tiny / "model"), "--data", str(tiny / "tokens"),
                            "--out", str(tmp_path), *test_train.ARGS, "--method", method])
    r = train.prepare(cfg)
    teacher = r.teacher.model
    want = original(tiny)
    assert (teacher.cfg.rope_theta, teacher.cfg.rope_scaling) == (want.rope_theta,
                                                                  want.rope_scaling)
    assert (r.core.cfg.rope_theta, r.core.cfg.rope_scaling) != (want.rope_theta,
                                                                want.rope_scaling)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    in_optimizer = {id(p) for g in r.opt.param_groups for p in g["params"]}
    train.enter_stage(r, r.plan.stages[0], fresh=False)
    train.train_step(0, r)
    for p in teacher.parameters():
        assert not p.requires_grad and p.grad is None and id(p) not in in_optimizer
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


QKV = ("q_proj", "k_proj", "v_proj")


@pytest.mark.parametrize("method,trained", [
    ("cpt", ["all"]), ("mix-cpt", ["all"]), ("longred-u", ["all"]), ("longred-c", ["all"]),
    ("kd", ["all"]), ("linearard", ["qkv"]), ("linearard+cpt", ["qkv", "all"])])
def test_trained_parameters_per_stage(tiny, tmp_path, method, trained):
    """Each stage trains its own parameters (LinearARD: q, k, v; CPT after it: all) and starts
    with fresh AdamW moments: after the stage's first step exactly those weights moved, and every
    moment counts one step."""
    cfg = train.parse_args(["--init", str(tiny / "model"), "--data", str(tiny / "tokens"),
                            "--out", str(tmp_path), *test_train.ARGS, "--method", method])
    r = train.prepare(cfg)
    assert len(r.plan.stages) == len(trained)
    for stage, which in zip(r.plan.stages, trained):
        before = {k: v.clone() for k, v in r.core.state_dict().items()}
        train.train_step(stage.first_step, r)
        moved = {k for k, v in r.core.state_dict().items() if not torch.equal(v, before[k])}
        names = set(before)
        if which == "qkv":
            names = {k for k in before if any(p in k for p in QKV)}
        assert moved == names, (stage.name, sorted(moved ^ names))
        assert all(s["step"] == 1 for s in r.opt.state.values())


def test_linearard_recipe():
    """LinearARD's released recipe: 144 optimizer steps of 16,384 tokens in 4,096-token windows,
    AdamW (0.9, 0.999) wd 0.01, warm-up 4, cosine to 0.9 lr, clip 5, q/k/v only; at any number
    of ranks that divides the batch into whole windows."""
    model_cfg = LlamaConfig(vocab_size=256, dim=64, n_layers=30, n_heads=4, n_kv_heads=2,
                            head_dim=16, ffn_dim=128, rope_theta=1e5, max_pos=8192)
    for world in (1, 2, 4):
        cfg = train.parse_args(["--method", "linearard"])
        plan = train.make_plan(cfg, model_cfg, world)
        (stage,) = plan.stages
        assert plan.rope == "pi" and plan.scaling == {"rope_type": "linear", "factor": 4.0}
        assert (stage.steps, stage.batch_tokens, stage.windows) == (144, 16384, {"rel": 4096})
        assert stage.rows["rel"] * stage.accum * world == 4
        assert (stage.warmup, stage.final_lr, stage.clip) == (4, 0.9, 5.0)
        assert (stage.weight_decay, stage.beta2) == (0.01, 0.999)
        assert stage.train_params == r"\.(q|k|v)_proj\."


def test_linearard_then_cpt_schedule(tiny, tmp_path):
    """linearard+cpt: the relation stage runs its recipe (steps from --rel-tokens at
    --rel-batch-tokens, warm-up 4) whatever --batch-tokens says; the CPT stage takes
    --batch-tokens, --steps and --lr, with its own constant learning rate; the relation stage
    keeps its recipe's learning rate whatever --lr says."""
    model_cfg = LlamaConfig(vocab_size=256, dim=64, n_layers=30, n_heads=4, n_kv_heads=2,
                            head_dim=16, ffn_dim=128, rope_theta=1e5, max_pos=8192)
    cfg = train.parse_args(["--method", "linearard+cpt", "--batch-tokens", "262144",
                            "--tokens", "4194304"])
    relation, cpt = train.make_plan(cfg, model_cfg, 1).stages
    assert (relation.steps, relation.batch_tokens) == (144, 16384)
    assert (cpt.first_step, cpt.steps, cpt.batch_tokens) == (144, 16, 262144)
    rows = run(tiny, tmp_path, "--method", "linearard+cpt", "--steps", "2", "--no-save")
    assert [r["stage"] for r in rows] == ["relation", "relation", "cpt", "cpt"]
    recipe_lr = methods.LINEARARD.lr  # 2e-5: --lr (1e-3 here) is the last stage's alone
    assert [r["lr"] for r in rows] == pytest.approx([recipe_lr / 4, 2 * recipe_lr / 4, 1e-3, 1e-3])
    assert [r["tokens"] for r in rows] == [1024, 2048, 3072, 4096]


def strip(document, eos=0):
    """A document's tokens without its closing EOS (the window's last one is cut, no EOS)."""
    tokens = document.tolist()
    if tokens and tokens[-1] == eos:
        tokens = tokens[:-1]
    return tuple(tokens)


def test_kd_teacher_alone_student_packed(tiny, tmp_path, spy):
    """SDLC: the student reads short documents packed into the window with positions continuing
    across documents; the teacher reads each of those documents alone from position 0."""
    run(tiny, tmp_path, "--method", "kd", "--steps", "1", "--no-save", "--phases", "256")
    student = [c for c in spy if c.role == "student"]
    teacher = [c for c in spy if c.role == "teacher"]
    assert student and teacher
    eos = 0
    documents = []
    for call in student:
        assert call.tokens.shape[1] == TARGET
        assert torch.equal(call.positions.expand_as(call.tokens),
                           torch.arange(TARGET).expand_as(call.tokens))
        for row in call.tokens:
            ends = (row == eos).nonzero().flatten().tolist()
            assert len(ends) >= 2  # several documents in one window
            starts = [0] + [e + 1 for e in ends]
            stops = [e + 1 for e in ends] + [TARGET]
            documents += [strip(row[a:b]) for a, b in zip(starts, stops) if b > a]
    alone = []  # each document as the teacher reads it: positions from 0, attention within it
    for call in teacher:
        assert call.documents is not None  # attention kept within each document
        tokens = call.tokens.flatten()
        positions = call.positions.flatten()
        for start, end in zip(call.documents[:-1], call.documents[1:]):
            assert torch.equal(positions[start:end], torch.arange(end - start))
            alone.append(strip(tokens[start:end]))
    assert sorted(alone) == sorted(documents)


def test_kd_phases_change_at_boundaries(tiny, tmp_path, spy):
    """SDLC phase-wise scaling: steps of phase k run at its window and theta; the change
    happens at the boundary (4 steps, 2 phases: steps 1-2, then 3-4)."""
    rows = run(tiny, tmp_path, "--method", "kd", "--steps", "4", "--no-save", "--phases",
               "128,256")
    cfg = train.parse_args(["--init", str(tiny / "model"), *test_train.ARGS, "--method", "kd",
                            "--phases", "128,256", "--steps", "4"])
    plan = train.make_plan(cfg, original(tiny), 1)
    (w0, theta0), (w1, theta1) = plan.phases
    assert (w0, w1) == (128, 256) and theta1 > theta0
    student = [c for c in spy if c.role == "student"]
    per_step = len(student) // 4
    seen = [(c.tokens.shape[1], c.theta) for c in student[::per_step]]
    assert seen == [(128, theta0), (128, theta0), (256, theta1), (256, theta1)]
    assert len(rows) == 4


def dense_kl(p_teacher_logits, p_student_logits):
    lt = p_teacher_logits.log_softmax(-1)
    ls = p_student_logits.log_softmax(-1)
    return (lt.exp() * (lt - ls)).sum()


def test_kl_directions():
    """Every KL is KL(teacher || student) = sum p_t (log p_t - log p_s) (LinearARD's kernel,
    SDLC), and the reverse direction gives a different number on these inputs."""
    g = torch.Generator().manual_seed(3)
    xt = torch.randn(1, 1, 6, 4, dtype=torch.float64, generator=g) * 2
    xs = torch.randn(1, 1, 6, 4, dtype=torch.float64, generator=g) * 2
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    def logits(x):
        return (x[0, 0] @ x[0, 0].T / 2.0).masked_fill(~causal, -math.inf)
    forward = sum(dense_kl(logits(xt)[i, :i + 1], logits(xs)[i, :i + 1]) for i in range(6))
    reverse = sum(dense_kl(logits(xs)[i, :i + 1], logits(xt)[i, :i + 1]) for i in range(6))
    ours = distill.relation_kl(xt, xs, block=(2, 2), compile=False)
    assert ours.item() == pytest.approx(forward.item(), rel=1e-9)
    assert abs(forward.item() - reverse.item()) > 0.1
    cap_t = {"q": {0: xt}, "k": {0: xt}}
    cap_s = {"q": {0: xs}, "k": {0: xs}}
    attention = distill.attention_kl_per_layer(cap_t, cap_s, [0], block=(2, 2), compile=False)
    assert attention[0] == pytest.approx(forward.item() / 6, rel=1e-9)
    hs = torch.randn(5, 3, dtype=torch.float64, generator=g)
    ht = torch.randn(5, 3, dtype=torch.float64, generator=g)
    head = torch.randn(7, 3, dtype=torch.float64, generator=g)
    kd_forward = sum(dense_kl(ht[n] @ head.T, hs[n] @ head.T) for n in range(5)) / 5
    kd_reverse = sum(dense_kl(hs[n] @ head.T, ht[n] @ head.T) for n in range(5)) / 5
    kd = distill.logit_kd(hs, ht, head, head, chunk=2)
    assert kd.item() == pytest.approx(kd_forward.item(), rel=1e-9)
    assert abs(kd_forward.item() - kd_reverse.item()) > 1e-3
