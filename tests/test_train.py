"""train.py on a tiny random Llama and synthetic token shards: real processes, real files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import methods
import train
from model import Llama, LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--target", "256", "--batch-tokens", "1024", "--micro-tokens", "256", "--short-len", "32",
        "--rel-tokens", "2048", "--rel-batch-tokens", "1024", "--lr", "1e-3",
        "--distill-layers", "2", "--select-texts", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-layer GQA Llama (window 64) saved as an HF folder, and a shard of 400 documents."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = LlamaConfig(vocab_size=256, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16,
                      ffn_dim=128, max_pos=64, tie_embeddings=True)
    torch.manual_seed(0)
    Llama(cfg).init_random(std=0.1).save_pretrained(root / "model")
    (root / "model" / "tokenizer_config.json").write_text("{}")  # export copies it
    rng = np.random.default_rng(0)
    docs = np.concatenate([np.append(rng.integers(1, 256, rng.integers(10, 60)), 0)
                           for _ in range(400)])
    (root / "tokens").mkdir()
    data.write_shard(root / "tokens" / "a.bin", docs, "00" * 16, 256)
    return root


def run(tiny, out, *extra):
    train.main(["--init", str(tiny / "model"), "--data", str(tiny / "tokens"), "--out", str(out),
                *ARGS, *extra])
    return [json.loads(x) for x in open(out / "log.jsonl")]


def losses(rows):
    return [sum(v for k, v in r.items() if k.startswith("loss_")) for r in rows]


@pytest.mark.parametrize("method", list(methods.PRESETS))
def test_preset_learns_a_repeated_batch(tiny, tmp_path, monkeypatch, method):
    same = train.batch_for
    monkeypatch.setattr(train, "batch_for", lambda *a: same(*a[:7], 0, a[8]))  # j = 0 always
    rows = run(tiny, tmp_path, "--method", method, "--steps", "6", "--rel-tokens", "3072")
    first, last = losses(rows)[0], losses(rows)[-1]
    if method == "linearard+cpt":  # stage 1 relation KL (3 steps), then CE
        first, last = losses(rows)[0], losses(rows)[2]
    assert last < first, (method, losses(rows))
    out = Llama.from_pretrained(tmp_path / "final")
    assert (tmp_path / "final" / "tokenizer_config.json").exists()
    assert out.cfg.max_pos == 256 and (out.cfg.rope_theta, out.cfg.rope_scaling) != (10000.0, None)


def test_resume_is_bit_identical(tiny, tmp_path):
    full = run(tiny, tmp_path / "a", "--method", "longred-c", "--steps", "4")
    run(tiny, tmp_path / "b", "--method", "longred-c", "--steps", "4", "--stop-at", "2")
    assert not (tmp_path / "b" / "final").exists()
    resumed = run(tiny, tmp_path / "b", "--method", "longred-c", "--steps", "4", "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert losses(resumed) == losses(full)  # exact: the data and ids are functions of the step
    a, b = Llama.from_pretrained(tmp_path / "a" / "final"), Llama.from_pretrained(tmp_path / "b" / "final")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="target=256.*target=512"):
        run(tiny, tmp_path / "b", "--method", "longred-c", "--steps", "4", "--resume",
            "--target", "512")


def two_process_command(tiny, model, method):
    """train.py's arguments for the 2-process test: 2 steps of 512 tokens in 256-token micro-steps
    (1 micro-step on each of 2 ranks, or 2 on one)."""
    return [os.path.join(ROOT, "train.py"), "--init", str(model), "--data", str(tiny / "tokens"),
            *ARGS, "--method", method, "--steps", "2", "--batch-tokens", "512",
            "--micro-tokens", "256"]


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    """method -> (the untied model, the folder of its 1-process run). Each method's reference run
    is made once and shared by the DDP and FSDP cases."""
    root = tmp_path_factory.mktemp("one_process")
    cfg = LlamaConfig.from_json(tiny / "model" / "config.json")
    cfg.tie_embeddings = False
    torch.manual_seed(1)
    Llama(cfg).init_random(std=0.1).save_pretrained(root / "untied")
    runs = {}

    def reference(method):
        if method not in runs:
            out = root / method
            subprocess.run([sys.executable, *two_process_command(tiny, root / "untied", method),
                            "--out", str(out)], check=True, cwd=ROOT, capture_output=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
            runs[method] = out
        return root / "untied", runs[method]
    return reference


@pytest.mark.parametrize("shard,method", [("ddp", "longred-c"), ("fsdp", "longred-c"),
                                          ("ddp", "linearard+cpt"), ("fsdp", "linearard+cpt")])
@pytest.mark.slow
def test_two_processes_equal_one_with_accumulation(tiny, one_process, tmp_path, shard, method):
    """torchrun, 2 gloo processes x 1 micro-step == 1 process x 2 micro-steps (same optimisation),
    with DDP and with FSDP2. LongReD-C: CE, both cosine losses, layer selection; the LM head is
    untied, so the rank on an s2l micro-step has no head gradient of its own (it hung FSDP2).
    linearard+cpt: the trained parameters change between stages (DDP is rebuilt around them);
    there AdamW's first CPT steps turn the reduction order's rounding on near-zero gradients
    (|g| ~ eps) into differences below one step (lr 1e-3) in a few weights: at most 1% of them
    may differ, the losses and gradient norms agree to 1e-5."""
    model, one = one_process(method)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flag = ["--fsdp"] if shard == "fsdp" else []
    port = 29541 + 2 * (shard == "fsdp") + (method != "longred-c")  # one per case
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(port),
                          *two_process_command(tiny, model, method), *flag,
                          "--out", str(tmp_path / "two")], env=env, cwd=ROOT, capture_output=True,
                         text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a = Llama.from_pretrained(tmp_path / "two" / "final").state_dict()
    b = Llama.from_pretrained(one / "final").state_dict()
    for k in a:
        if method == "linearard+cpt":
            gap = (a[k] - b[k]).abs()
            assert gap.max() < 1e-3 and (gap > 1e-5).float().mean() < 1e-2, k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    rows_two = [json.loads(x) for x in open(tmp_path / "two" / "log.jsonl")]
    rows_one = [json.loads(x) for x in open(one / "log.jsonl")]
    assert [r["grad_norm"] for r in rows_two] == pytest.approx([r["grad_norm"] for r in rows_one],
                                                               rel=1e-5)
    assert losses(rows_two) == pytest.approx(losses(rows_one), rel=1e-5)


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        run(tiny, tmp_path, "--data", str(tmp_path / "nothing"))
    big = tmp_path / "big"
    big.mkdir()
    data.write_shard(big / "a.bin", np.arange(1000), "00" * 16, 1000)
    with pytest.raises(ValueError, match="vocab 1000 > the model's 256"):
        run(tiny, tmp_path, "--data", str(big))
    with pytest.raises(ValueError, match="must exceed the original window 64"):
        run(tiny, tmp_path, "--target", "64")
    with pytest.raises(SystemExit):
        train.parse_args(["--methd", "cpt"])
    with pytest.raises(SystemExit):
        train.parse_args(["--method", "longrope"])


def test_document_positions_restart_and_sum_to_the_squares():
    """Positions restart after each EOS and at each row; sum (2p + 1) = sum of length^2 (the
    KD teacher's attention in train.flops)."""
    x = torch.tensor([[5, 6, 0, 7, 8, 9, 10, 0, 3, 4, 5], [1, 2, 3, 4, 5, 0, 6, 7, 8, 9, 0]])
    positions, cumulative = train.document_layout(x, 0)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2],
                                  [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]]
    assert cumulative.tolist() == [0, 3, 8, 11, 17, 22]
    lengths = [3, 5, 3, 6, 5]
    assert (2 * positions + 1).sum().item() == sum(n * n for n in lengths)


def test_per_document_hidden_equals_each_document_alone(tiny):
    """SDLC teacher: each packed document runs alone from position 0 (one forward over the packed
    windows, positions restarting and attention kept within each document)."""
    m = Llama.from_pretrained(tiny / "model").eval()
    x = torch.tensor([[5, 6, 0, 7, 8, 9, 10, 0, 3, 4, 5], [1, 2, 3, 4, 5, 0, 6, 7, 8, 9, 0]])
    with torch.no_grad():
        h = train.documents_alone(m, x, 0).view(2, 11, -1)
        for b, s, e in [(0, 0, 3), (0, 3, 8), (0, 8, 11), (1, 0, 6), (1, 6, 11)]:
            alone = m.forward_hidden(x[b:b + 1, s:e])[0][0]
            torch.testing.assert_close(h[b, s:e], alone, rtol=1e-5, atol=1e-5)


def interrupt(tiny, tmp_path, sig):
    """Start a 400-step run, send `sig` once its first step is logged. -> (its output, the step
    its checkpoint holds); the run must have exited 0."""
    import time
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--init", str(tiny / "model"),
            "--data", str(tiny / "tokens"), *ARGS, "--method", "cpt", "--steps", "400",
            "--out", str(tmp_path)]
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while (not log.exists() or not log.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(sig)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-2000:]
    step = torch.load(tmp_path / "ckpt" / "state.pt", weights_only=False)["step"]
    assert 1 <= step < 400 and f"stopped at step {step}; continue with" in out
    return out, step


@pytest.mark.slow
def test_sigterm_saves_and_resumes(tiny, tmp_path):
    """A pre-empted run (SIGTERM) finishes its step, saves, exits 0; --resume completes it."""
    import signal
    out, step = interrupt(tiny, tmp_path, signal.SIGTERM)
    rows = run(tiny, tmp_path, "--method", "cpt", "--steps", str(step + 2), "--resume")
    assert [r["step"] for r in rows][-3:] == [step, step + 1, step + 2]
    assert (tmp_path / "final" / "config.json").exists()


def test_non_finite_step_is_skipped(tiny, tmp_path, monkeypatch, capsys):
    """A NaN loss skips that step's update (no row, weights stay finite); training goes on."""
    calls, real = [], train.student_loss
    def poisoned(*a):
        calls.append(1)
        loss, values = real(*a)
        if len(calls) == 3:
            return loss * float("nan"), {k: v * float("nan") for k, v in values.items()}
        return loss, values
    monkeypatch.setattr(train, "student_loss", poisoned)
    rows = run(tiny, tmp_path, "--method", "cpt", "--steps", "4", "--batch-tokens", "512")
    assert [r["step"] for r in rows] == [1, 3, 4]  # step 2 held micro-step 3: skipped
    assert "step 2: non-finite loss on rank(s) [0]; step skipped on all ranks" in \
        capsys.readouterr().out
    m = Llama.from_pretrained(tmp_path / "final")
    assert all(torch.isfinite(p).all() for p in m.parameters())


@pytest.mark.slow
def test_compile_gives_the_same_steps(tiny, tmp_path, monkeypatch):
    """--compile: the same losses and gradient norms as eager (on CPU through dynamo + AOT
    autograd with the eager backend, as inductor's C++ build takes minutes on 2 cores)."""
    compile_, compiled = torch.nn.Module.compile, []
    backend = {} if torch.cuda.is_available() else {"backend": "aot_eager"}
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: compiled.append(compile_(self, **backend)))
    monkeypatch.setattr(train, "compile_problem", lambda device: None)  # skip the C++ trial
    rows = [run(tiny, tmp_path / str(len(c)), "--method", "longred-c", "--steps", "2", *c)
            for c in ([], ["--compile"])]
    assert len(compiled) == 6  # every block of student and teacher
    for a, b in zip(*rows):
        for k in ("loss_long", "loss_short", "loss_s2l", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), k


def test_compile_default_and_when_it_cannot_run(monkeypatch, capsys):
    """CUDA compiles by default (--no-compile: eager), CPU only with --compile; where
    torch.compile fails, one line says so and the run goes on eager."""
    monkeypatch.setattr(train, "compile_problem", lambda device: None)
    cuda = torch.device("cuda")
    cpu = torch.device("cpu")
    assert train.compile_blocks(train.parse_args([]), cuda)
    assert not train.compile_blocks(train.parse_args(["--no-compile"]), cuda)
    assert not train.compile_blocks(train.parse_args([]), cpu)
    assert train.compile_blocks(train.parse_args(["--compile"]), cpu)

    def no_triton(*args, **kwargs):
        raise RuntimeError("Cannot find a working triton installation\nmore detail")
    monkeypatch.undo()
    monkeypatch.setattr(torch, "compile", no_triton)
    assert not train.compile_blocks(train.parse_args(["--compile"]), cpu)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train.py: torch.compile cannot run here (RuntimeError: Cannot find a working "
                   "triton installation); running eager (--no-compile skips this trial)"]
    with pytest.raises(SystemExit):
        train.parse_args(["--compile", "--no-compile"])


@pytest.mark.parametrize("tie", [True, False])
def test_flops_count_every_matmul_weight(tie):
    """MFU's N (from the config) = the model's 2-D weights, the LM head counted even when tied."""
    cfg = LlamaConfig(vocab_size=96, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8,
                      ffn_dim=80, tie_embeddings=tie)
    m = Llama(cfg)
    N = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and "embed" not in n)
    N += 96 * 48 if tie else 0  # the tied head is the embedding, listed once
    d_attn, T = 6 * 8, 5
    assert train.flops("long", 3, T, cfg) == 3 * T * (6 * N + 6 * 2 * T * d_attn)
    assert train.flops("short", 3, T, cfg) == 3 * T * (8 * N + 8 * 2 * T * d_attn)
    lengths = [2, 3]  # the teacher's documents: 2 L d_attn n^2 each
    kd = train.flops("kd", 1, T, cfg, sum(n * n for n in lengths))
    assert kd == T * (8 * N + 6 * 2 * T * d_attn) + 2 * 2 * d_attn * (4 + 9)



@pytest.mark.slow
def test_ctrl_c_saves_and_resumes(tiny, tmp_path):
    """Ctrl-C (SIGINT) is handled as SIGTERM: the step finishes, the checkpoint is saved, exit 0,
    and the message says how to resume; --resume completes the run."""
    import signal
    out, step = interrupt(tiny, tmp_path, signal.SIGINT)
    assert "Traceback" not in out and "Ctrl-C: saving after this step" in out
    rows = run(tiny, tmp_path, "--method", "cpt", "--steps", str(step + 1), "--resume")
    assert [r["step"] for r in rows][-2:] == [step, step + 1]


def test_second_ctrl_c_exits_at_once():
    """The first Ctrl-C asks for a save after the step; a second one raises KeyboardInterrupt."""
    import signal
    class FakeRun:
        rank = 0
        stop = False
    fake = FakeRun()
    with train.StopSignals(fake) as signals:
        signals.stop(signal.SIGINT, None)
        assert fake.stop
        with pytest.raises(KeyboardInterrupt):
            signals.stop(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_used_out_is_refused_before_any_work(tiny, tmp_path):
    """A second run into a used --out is refused (naming what is there) unless --resume or
    --overwrite; --overwrite starts over; --resume without a checkpoint is refused at once."""
    first = run(tiny, tmp_path, "--method", "cpt", "--steps", "2")
    with pytest.raises(ValueError, match=r"already holds a run \(log.jsonl, ckpt, final\)"):
        run(tiny, tmp_path, "--method", "cpt", "--steps", "3")
    assert len([json.loads(x) for x in open(tmp_path / "log.jsonl")]) == len(first)
    again = run(tiny, tmp_path, "--method", "cpt", "--steps", "1", "--overwrite")
    assert [r["step"] for r in again] == [1]
    assert torch.load(tmp_path / "ckpt" / "state.pt", weights_only=False)["step"] == 1
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(tiny, tmp_path / "new", "--method", "cpt", "--steps", "1", "--resume")


def test_no_save_runs_replace_only_a_log(tiny, tmp_path):
    """--no-save (speed runs) into a folder holding only an earlier log replaces the log; a
    folder with a checkpoint or an export is still refused."""
    speed = tmp_path / "speed"
    run(tiny, speed, "--method", "cpt", "--steps", "2", "--no-save")
    again = run(tiny, speed, "--method", "cpt", "--steps", "1", "--no-save")
    assert [r["step"] for r in again] == [1]
    saved = tmp_path / "saved"
    run(tiny, saved, "--method", "cpt", "--steps", "1")
    with pytest.raises(ValueError, match=r"already holds a run \(ckpt, final\)"):
        run(tiny, saved, "--method", "cpt", "--steps", "1", "--no-save")


def test_written_files_are_readable_json_and_0644(tiny, tmp_path):
    """log.jsonl is strict JSON (no NaN: mfu is left out on CPU); files get the umask's mode."""
    run(tiny, tmp_path, "--method", "longred-c", "--steps", "1")
    def no_constants(name):
        raise ValueError(f"{name} in log.jsonl")
    for line in open(tmp_path / "log.jsonl"):
        row = json.loads(line, parse_constant=no_constants)
        assert "mfu" not in row
    for path in [tmp_path / "log.jsonl", tmp_path / "loss.png", *(tmp_path / "final").iterdir(),
                 tmp_path / "ckpt" / "state.pt"]:
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_default_budget_reads_the_data_a_few_times():
    """With no --tokens/--steps the budget is LongReD's 2^30 tokens, capped at 4 passes over the
    training data; more passes than that are printed with a warning."""
    model_cfg = LlamaConfig(vocab_size=256, dim=64, n_layers=30, n_heads=4, n_kv_heads=2,
                            head_dim=16, ffn_dim=128, rope_theta=1e5, max_pos=8192)
    cfg = train.parse_args([])
    plan = train.make_plan(cfg, model_cfg, 1, data_tokens=4_500_000)
    (stage,) = plan.stages
    assert stage.steps * stage.batch_tokens <= 4 * 4_500_000 < (stage.steps + 1) * stage.batch_tokens
    assert "passes over the 4,500,000-token data" in train.describe(plan, cfg, 1)
    assert train.make_plan(cfg, model_cfg, 1, data_tokens=10**10).stages[0].steps == 512
    many = train.make_plan(train.parse_args(["--steps", "100"]), model_cfg, 1,
                           data_tokens=4_500_000)
    assert "warning: 47 passes" in train.describe(many, cfg, 1)


def test_loss_terms_compose(tiny, tmp_path, losses_seen):
    """--loss adds any term to a method (LongReD plus relation KL): every term is computed on its
    kind of data with its weight, the mix gives the new kind 1 share; bad terms are refused."""
    seen = losses_seen
    rows = run(tiny, tmp_path, "--method", "longred-c", "--steps", "1",
               "--loss", "L_long=1,L_short=5,L_s2l=10,L_rel=2")
    assert {"loss_long", "loss_short", "loss_s2l", "loss_rel"} <= set(rows[0])
    weights = {"L_long": 1.0, "L_short": 5.0, "L_s2l": 10.0, "L_rel": 2.0}
    for loss, values in seen:
        assert loss == pytest.approx(sum(weights[k] * v for k, v in values.items()), rel=1e-6)
    cfg = train.parse_args(["--init", str(tiny / "model"), *ARGS, "--loss",
                            "L_long=1,L_rel=1", "--mix", "long=2,rel=3"])
    (stage,) = train.make_plan(cfg, LlamaConfig.from_json(tiny / "model" / "config.json"),
                               1).stages
    assert stage.mix == {"long": 2, "rel": 3} and stage.formula() == "L = 1 L_long + 1 L_rel"
    for bad, message in [(["--loss", "L_foo=1"], "unknown term"),
                         (["--loss", "L_long"], "name=number"),
                         (["--loss", "L_long=1", "--mix", "rel=1"], "no loss term reads")]:
        with pytest.raises(ValueError, match=message):
            train.make_plan(train.parse_args(bad), LlamaConfig.from_json(
                tiny / "model" / "config.json"), 1)


def test_long_data_feeds_the_long_windows_alone(tiny, tmp_path, monkeypatch):
    """--long-data: the long windows (L_long) read it; short, T_orig, KD and relation streams
    read --data. The long shard holds tokens 200..255 only, --data tokens 1..255."""
    rng = np.random.default_rng(1)
    docs = np.concatenate([np.append(rng.integers(200, 256, 300), 0) for _ in range(40)])
    (tmp_path / "long").mkdir()
    data.write_shard(tmp_path / "long" / "a.bin", docs, "00" * 16, 256)
    seen = []
    real = train.batch_for

    def watched(kind, *args):
        x, pos = real(kind, *args)
        seen.append((kind, x))
        return x, pos
    monkeypatch.setattr(train, "batch_for", watched)
    run(tiny, tmp_path / "run", "--method", "longred-c", "--steps", "2",
        "--long-data", str(tmp_path / "long"))
    kinds = {kind for kind, _ in seen}
    assert kinds == {"long", "short", "orig"}
    for kind, x in seen:
        from_long_shard = bool(((x >= 200) | (x == 0)).all())
        assert from_long_shard == (kind == "long"), kind
    monkeypatch.undo()
    out = tmp_path / "stopped"
    run(tiny, out, "--method", "cpt", "--steps", "2", "--stop-at", "1",
        "--long-data", str(tmp_path / "long"))
    with pytest.raises(ValueError, match="long_data_tokens"):  # a resume without it is refused
        run(tiny, out, "--method", "cpt", "--steps", "2", "--resume")
    with pytest.raises(FileNotFoundError, match="--long-data .*setup --tech"):
        run(tiny, tmp_path / "other", "--long-data", str(tmp_path / "missing"))
    monkeypatch.setattr(train, "build", lambda *a: pytest.fail("models built before the check"))
    with pytest.raises(FileNotFoundError, match="--long-data"):  # before the models load
        run(tiny, tmp_path / "other", "--long-data", str(tmp_path / "missing"))


def test_export_every_writes_the_student_along_the_way(tiny, tmp_path):
    """--export-every 2 of 4 steps: out/step-2 is the student after step 2 (an HF folder with
    the scaled RoPE), final/ after step 4; --overwrite removes them."""
    run(tiny, tmp_path, "--method", "cpt", "--steps", "4", "--export-every", "2")
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-2"]
    middle = Llama.from_pretrained(tmp_path / "step-2")
    final = Llama.from_pretrained(tmp_path / "final")
    assert middle.cfg.rope_theta == final.cfg.rope_theta and middle.cfg.max_pos == 256
    assert not torch.equal(middle.layers[0].mlp.up_proj.weight, final.layers[0].mlp.up_proj.weight)
    run(tiny, tmp_path, "--method", "cpt", "--steps", "1", "--overwrite")
    assert not list(tmp_path.glob("step-*"))
    run(tiny, tmp_path, "--method", "cpt", "--steps", "4", "--export-every", "2", "--stop-at",
        "2", "--overwrite")  # a stop on an export step still exports it
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-2"]
