"""Issue 8: what can go wrong in a long run (NaN on one rank, a kill mid-save, a changed resume,
underflow) and a soak of save/resume cycles. Real processes and files, CPU, tiny shapes."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import data
import distill
from model import Llama, LlamaConfig
import test_train
from test_train import ARGS, ROOT, losses, run

tiny = test_train.tiny  # the fixture: a 3-layer Llama (window 64) and a shard of 400 documents

POISON = """import os, sys
sys.path.insert(0, {root!r})
import train
real, calls = train.student_loss, []
def poisoned(*a):  # NaN loss on rank 1 at step NAN_AT (one micro-step per step and rank)
    calls.append(1)
    loss, values = real(*a)
    if os.environ["RANK"] == "1" and len(calls) == int(os.environ.get("NAN_AT", 0)):
        return loss * float("nan"), {{k: v * float("nan") for k, v in values.items()}}
    return loss, values
train.student_loss = poisoned
train.main()
"""


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_on_all(tiny, tmp_path):
    """torchrun, 2 gloo processes: rank 1's NaN at step 2 (= --stop-at) is named, both ranks skip
    it (no row, optimizer untouched, finite checkpoint), stop there, and --resume finishes."""
    (tmp_path / "poison.py").write_text(POISON.format(root=ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           "29533", str(tmp_path / "poison.py"), "--init", str(tiny / "model"), "--data",
           str(tiny / "tokens"), *ARGS, "--method", "cpt", "--steps", "3", "--batch-tokens", "512",
           "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*cmd, "--stop-at", "2"], env={**env, "NAN_AT": "2"}, cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("non-finite") == 1, p.stdout[-3000:]  # rank 0 says it, once
    assert "step 2: non-finite loss on rank(s) [1]; step skipped on all ranks" in p.stdout
    ck = torch.load(tmp_path / "ckpt" / "state.pt", weights_only=False)
    assert ck["step"] == 2 and all(s["step"] == 1 for s in ck["optim"]["state"].values())
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    p = subprocess.run([*cmd, "--resume"], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [json.loads(r)["step"] for r in open(tmp_path / "log.jsonl")] == [1, 3]
    assert all(torch.isfinite(v).all() for v in Llama.from_pretrained(tmp_path / "final")
               .state_dict().values())


def same_weights(a, b):
    a, b = Llama.from_pretrained(a).state_dict(), Llama.from_pretrained(b).state_dict()
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_soak_save_resume_cycles_bit_identical(tiny, tmp_path):
    """1,000 steps in one job == the same in 6 jobs (--stop-at, --resume): weights and log rows."""
    torch.manual_seed(0)  # a 1-layer, 16-wide Llama (window 16) on tiny's tokens: ~4 ms a step
    cfg = LlamaConfig(vocab_size=256, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                      ffn_dim=32, max_pos=16, tie_embeddings=True)
    Llama(cfg).save_pretrained(tmp_path / "model")
    os.symlink(tiny / "tokens", tmp_path / "tokens")
    args = ["--method", "cpt", "--target", "32", "--micro-tokens", "32", "--batch-tokens", "32",
            "--steps", "1000", "--save-every", "125"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds synchronisation
    try:
        full = run(tmp_path, tmp_path / "a", *args)
        for i, stop in enumerate((75, 250, 499, 700, 875, 0)):
            rows = run(tmp_path, tmp_path / "b", *args, "--stop-at", str(stop),
                       *["--resume"] * (i > 0))
    finally:
        torch.set_num_threads(threads)
    assert [r["step"] for r in rows] == list(range(1, 1001))
    assert losses(rows) == losses(full) and len(set(losses(full))) > 500
    assert same_weights(tmp_path / "a" / "final", tmp_path / "b" / "final")


@pytest.mark.parametrize("where", ["write", "rename"])
def test_kill_mid_save_resumes_from_last_complete_checkpoint(tiny, tmp_path, monkeypatch, where):
    """A process dies inside the save at step 4 (half a state.pt written, or between the two
    renames): --resume continues from step 2's checkpoint, bit-identical to an unbroken run."""
    args = ["--method", "cpt", "--steps", "6", "--save-every", "2", "--batch-tokens", "256"]
    full = run(tiny, tmp_path / "a", *args)
    mod, name, n = (torch, "save", 2) if where == "write" else (os, "replace", 3)
    real, calls, handler = getattr(mod, name), [], signal.getsignal(signal.SIGTERM)

    def die(*a):  # call n: the save at step 4, or its second rename (step 2's save has one)
        calls.append(1)
        if len(calls) < n:
            return real(*a)
        if where == "write":
            open(a[1], "wb").write(b"half a checkpoint")
        raise SystemExit("killed")
    monkeypatch.setattr(mod, name, die)
    with pytest.raises(SystemExit, match="killed"):
        run(tiny, tmp_path / "b", *args)
    monkeypatch.undo()
    signal.signal(signal.SIGTERM, handler)
    rows = run(tiny, tmp_path / "b", *args, "--resume")
    assert [r["step"] for r in rows] == list(range(1, 7)) and losses(rows) == losses(full)
    assert same_weights(tmp_path / "a" / "final", tmp_path / "b" / "final")


def test_resume_refuses_other_world_tokenizer_data(tiny, tmp_path):
    """--resume with other data (same length), world size or tokenizer: refused, naming it."""
    args = ["--method", "cpt", "--steps", "2", "--stop-at", "1", "--batch-tokens", "256"]
    run(tiny, tmp_path, *args)
    other = tmp_path / "other"
    other.mkdir()
    data.write_shard(other / "a.bin", data.read_shard(tiny / "tokens" / "a.bin")[::-1], "00" * 16,
                     256)  # the same tokens, reversed
    with pytest.raises(ValueError, match=r"made with data='\d+ tokens, crc32 \w+', this run"):
        run(tiny, tmp_path, *args, "--resume", "--data", str(other))
    path = tmp_path / "ckpt" / "state.pt"
    ck = torch.load(path, weights_only=False)
    for key, value in (("world", 2), ("tokenizer", "11" * 16)):
        torch.save({**ck, "meta": {**ck["meta"], key: value}}, path)
        with pytest.raises(ValueError, match=f"made with {key}={value!r}, this run"):
            run(tiny, tmp_path, *args, "--resume")


def test_losses_finite_when_probabilities_underflow():
    """Logits 1e4 apart (exp underflows to 0 in both models) and a batch whose targets are all
    masked: every loss is a finite float32 with finite gradients (log-sum-exp, no 0 log 0)."""
    g = torch.Generator().manual_seed(0)
    hs, ht = (torch.randn(6, 8, generator=g) * 100 for _ in range(2))  # logits ~ +-1e4
    ws, wt = (torch.randn(16, 8, generator=g) * 10 for _ in range(2))
    for h, w in ((hs, ws), (hs.bfloat16(), ws.bfloat16())):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        for loss in (distill.logit_kd(h, ht.to(h.dtype), w, wt.to(w.dtype), chunk=4),
                     distill.logit_kd(h, None, w, None, targets=torch.full((6,), -100),
                                      ce_weight=1.0)):
            h.grad = w.grad = None
            loss.backward()
            assert loss.dtype == torch.float32 and torch.isfinite(loss)
            assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    x = [(torch.randn(1, 2, 16, 8, generator=g) * 40).requires_grad_() for _ in range(4)]
    loss = [distill.relation_kl(x[0].detach(), x[1]),  # self: q.q / sqrt(8) ~ 1e4
            distill.relation_kl(x[0].detach(), x[1], x[2].detach(), x[3], block=4),
            distill.hidden_cosine_loss([x[1] * 0], [x[0]])]  # a zero hidden state
    sum(loss).backward()
    assert all(torch.isfinite(v) for v in loss) and torch.isfinite(x[1].grad + x[3].grad).all()
