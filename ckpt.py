"""What train.py leaves in its --out folder: the checkpoint (what a resume must match, an atomic
save, a resume that refuses a changed run), the log and its plot, and the HF export.

A checkpoint is one file, runs/NAME/ckpt/state.pt: the whole (gathered) model and optimizer state,
the step, and `meta`. It is written to ckpt.tmp and renamed into place, so a crash at any moment
leaves the last complete checkpoint (as ckpt, or as ckpt.old between the two renames).
"""
import json
import os
import re
import shutil
import zlib

import torch
import torch.distributed as dist

from model import save_pretrained

META = ("method", "target", "orig", "rope", "abf_theta", "batch_tokens", "micro_tokens", "seed",
        "train_params", "fsdp")


def meta_of(cfg, plan, world, tok_hash, tokens, init_cfg):
    """What a --resume must match: the config, world size, tokenizer, data (crc32: 4 GB in 1 s)."""
    m = {k: getattr(cfg, k) for k in META}
    m.update(world=world, tokenizer=tok_hash, data=data_id(tokens),
             model=json.dumps(init_cfg.to_hf(), sort_keys=True),
             rope_derived=json.dumps([plan.theta, plan.scaling, plan.phases]))
    return m


def data_id(tokens):
    """The token data as a --resume checks it: its size and crc32."""
    return f"{len(tokens)} tokens, crc32 {zlib.crc32(tokens):08x}"


def gather(student, opt):
    """(model, optimizer) state dicts, gathered whole (FSDP2) onto the CPU under torchrun."""
    if not dist.is_initialized():
        return student.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(student, opt,
                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save(path, state, step, meta, rank):
    """Rank 0 writes path.tmp and renames it: a crash never leaves half a checkpoint."""
    if rank == 0:
        tmp = path + ".tmp"
        old = path + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        torch.save({"model": state[0], "optim": state[1], "step": step, "meta": meta},
                   f"{tmp}/state.pt")
        if os.path.isdir(path):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def load(path, student, opt, meta):
    """-> the step to continue from; refuses a checkpoint whose config differs, naming the field."""
    for p in (path, path + ".old"):  # .old: a crash between the two renames of save
        if os.path.isfile(f"{p}/state.pt"):
            break
    else:
        raise FileNotFoundError(f"--resume: no checkpoint at {path}/state.pt")
    ck = torch.load(f"{p}/state.pt", map_location="cpu", weights_only=False, mmap=True)
    for k in {**ck["meta"], **meta}:  # a key on one side only (e.g. --long-data) differs too
        if ck["meta"].get(k) != meta.get(k):
            raise ValueError(f"--resume: checkpoint {p} was made with {k}={ck['meta'].get(k)!r}, "
                             f"this run has {k}={meta.get(k)!r}; use the same setting or another "
                             f"--out")
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(student, opt, model_state_dict=ck["model"], optim_state_dict=ck["optim"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        student.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
    return ck["step"]


def export(path, msd, model_cfg, init_cfg, rank, init=""):
    """The final student as an HF folder with its RoPE (save_pretrained), in the init's dtype,
    with the init folder's tokenizer files beside it."""
    if rank == 0:
        save_pretrained(model_cfg, {k.removeprefix("model."): v.to(init_cfg.dtype)
                                    for k, v in msd.items()}, path)
        for f in os.listdir(init) if os.path.isdir(init) else []:
            if f.startswith(("tokenizer", "tiktoken", "special_tokens")):
                shutil.copy2(os.path.join(init, f), path)


def clear(out):
    """--overwrite: remove an earlier run's checkpoint, export, log and plot from `out`."""
    exports = []
    if os.path.isdir(out):
        exports = [name for name in os.listdir(out) if re.fullmatch(r"step-\d+", name)]
    for name in ("ckpt", "ckpt.tmp", "ckpt.old", "final", *exports):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    for name in ("log.jsonl", "loss.png"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def trim_log(log_path, step):
    """Drop the log rows past `step`: a killed run's, redone after --resume."""
    if os.path.exists(log_path):
        rows = [r for r in open(log_path) if r.endswith("\n")]  # a half-written last row too
        open(log_path, "w").writelines(r for r in rows if json.loads(r)["step"] <= step)


PANELS = (("cross-entropy and KD (nats)", ("long", "short_ce", "orig_ce", "kd")),
          ("distillation losses", ("short", "s2l", "rel")))


def plot(log_path, png):
    """loss.png: the log's losses against the step, CE-like and distillation losses on separate
    panels (their scales differ by 100x), integer step ticks (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return
    rows = [json.loads(line) for line in open(log_path)]
    logged = {k[5:] for r in rows for k in r if k.startswith("loss_")}
    panels = [(title, [n for n in names if n in logged]) for title, names in PANELS]
    panels = [(title, names) for title, names in panels if names]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3 * len(panels)), sharex=True,
                             squeeze=False)
    for ax, (title, names) in zip(axes[:, 0], panels):
        for name in names:
            points = [(r["step"], r[f"loss_{name}"]) for r in rows if f"loss_{name}" in r]
            ax.plot(*zip(*points), label=name)
        ax.set(ylabel="loss", yscale="log", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle(os.path.dirname(log_path) or ".")
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)  # in-process runs (tests) would keep every figure open
