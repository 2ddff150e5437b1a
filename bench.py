"""Performance goals (README, "Performance goals"): both sides of every ratio in one run.

P1: relation KL (Q/Q self, causal, exact) fwd+bwd vs SDPA fwd+bwd (cuDNN, flash, efficient) and a
dense fp32 reference; `--blocks` sweeps its tile, `--profile` lists its kernels.
P2: chunked logit KD vs a GEMM-only chunk loop and a naive full-vocab KL.
P8 rel (`--only rel`): LinearARD's relation loss on one micro-step of SmolLM2, per tile.
P4: the model's own attention call (GQA without repeat, q/k/v as views) vs the best backend.
P3 (`--only p3 -- TRAIN_ARGS`): train.py's 2nd optimizer step, its GPU time split into attention,
GEMMs, teacher forward and each loss.
P8 (`--only presets -- TRAIN_ARGS`): every preset trained by train.py as a user runs it, side by
side: tokens/s, MFU and peak memory from each run's log.jsonl.
`python bench.py --quick` is a CPU smoke test.
"""
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import distill
import model

LINEARARD_32K_MS = 16386.0  # LinearARD's published Triton kernel, n = 32768, measured on an H100
BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")


# ---- timing ----------------------------------------------------------------------------------

def measure(fn, make, reps, device):
    """(median ms, peak extra GiB) of fn(*make()): CUDA events, reps fresh inputs after 2 warm-up
    calls (torch.compile included), peak = max_memory_allocated after reset_peak_memory_stats minus
    memory_allocated just before the call ("n/a" on CPU); "oom"/"n/a" when it cannot run."""
    cuda = device.type == "cuda"
    times = []
    peaks = []
    try:
        for _ in range(reps + 2):  # 2 warm-up calls first
            args = make()
            milliseconds, peak = one_call(fn, args, cuda)
            times.append(milliseconds)
            peaks.append(peak)
            del args
    except torch.OutOfMemoryError:
        return "oom", "oom"
    except RuntimeError as error:  # e.g. "No available kernel" for an SDPA backend here
        print(f"  n/a: {str(error).splitlines()[0][:120]}")
        return "n/a", "n/a"
    finally:
        torch.cuda.empty_cache()  # a no-op without CUDA
    if not cuda:
        return statistics.median(times[2:]), "n/a"
    return statistics.median(times[2:]), max(peaks[2:])


def one_call(fn, args, cuda):
    """(ms, peak extra GiB or None) of fn(*args)."""
    if not cuda:
        t0 = time.perf_counter()
        fn(*args)
        return 1e3 * (time.perf_counter() - t0), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn(*args)
    end.record()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30
    return start.elapsed_time(end), peak


def ratio(a, b):
    """a / b, or "n/a" when either did not run."""
    if isinstance(a, float) and isinstance(b, float):
        return a / b
    return "n/a"


def sdpa_rows(timed, goal, shape, device, dtype, tag=""):
    """Causal SDPA fwd+bwd on fresh (B,H,T,hd) q, k, v, grad_out, one row per backend."""
    def make():  # q, k, v (with grad), grad_out
        return [torch.randn(*shape, device=device, dtype=dtype, requires_grad=i < 3)
                for i in range(4)]

    rows = {}
    for backend in BACKENDS:
        def run(q, k, v, grad_out, backend=backend):
            kernel = getattr(torch.nn.attention.SDPBackend, backend)
            with torch.nn.attention.sdpa_kernel(kernel):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad_out)
        what = f"SDPA {backend.split('_')[0].lower()} fwd+bwd{tag}"
        rows[backend] = timed(goal, what, shape[2], run, make)
    return rows


# ---- P1: relation KL -------------------------------------------------------------------------

def dense_relation_kl(xt, xs):
    """Reference: full (B,H,T,T) fp32 maps, sum_{b,h,i} KL(P_t,i || P_s,i) (in place where
    autograd allows, so that n = 8192 fits)."""
    T = xt.shape[2]
    s = xt.shape[-1] ** -0.5
    causal = torch.ones(T, T, dtype=torch.bool, device=xt.device).tril()
    logits_teacher = (xt.float() @ xt.float().mT).mul_(s).masked_fill_(~causal, -math.inf)
    logits_student = (xs.float() @ xs.float().mT).mul_(s).masked_fill_(~causal, -math.inf)
    log_p_teacher = logits_teacher.log_softmax(-1)
    log_p_student = logits_student.log_softmax(-1)
    kl = log_p_teacher.exp() * (log_p_teacher - log_p_student)
    return torch.where(causal, kl, 0.0).sum()


def exactness(xt, xs, keywords):
    """Relative error of our loss and gradient (bf16 in, fp32 accumulation) vs dense fp32 maps."""
    try:
        loss = distill.relation_kl(xt, xs, **keywords)
        grad, = torch.autograd.grad(loss, xs)
        xs_fp32 = xs.detach().float().requires_grad_()
        reference = dense_relation_kl(xt, xs_fp32)
        grad_reference, = torch.autograd.grad(reference, xs_fp32)
    except torch.OutOfMemoryError:
        return "oom", "oom"
    loss_error = abs(loss.item() - reference.item()) / reference.item()
    grad_error = (grad.float() - grad_reference).norm() / grad_reference.norm()
    return loss_error, grad_error.item()


def relation_pair(heads, n, d, device, dtype):
    """A fresh teacher and student (1, heads, n, d); the student requires grad."""
    teacher = torch.randn(1, heads, n, d, device=device, dtype=dtype)
    student = torch.randn(1, heads, n, d, device=device, dtype=dtype, requires_grad=True)
    return [teacher, student]


def relation_step(xt, xs, keywords):
    distill.relation_kl(xt, xs, **keywords).backward()


def bench_p1(options, device, dtype, timed, out):
    heads = 2 if options.quick else 32
    d = 32 if options.quick else 128
    sizes = options.sizes or ((128, 256, 512) if options.quick else (4096, 8192, 16384, 32768))
    keywords = {}
    if options.blocks:
        keywords["block"] = options.blocks[0]
    out["p1_lse_source"] = distill.lse_kernel(device, dtype, d) or "tiles"  # pass 1's lse
    ours = {}
    for n in sizes:
        ours[n] = timed("P1", "relation_kl Q/Q fwd+bwd (ours)", n,
                        lambda xt, xs: relation_step(xt, xs, keywords),
                        lambda: relation_pair(heads, n, d, device, dtype))
        sdpa = sdpa_rows(timed, "P1", (1, heads, n, d), device, dtype)
        out[f"p1_ours_over_cudnn_{n}"] = ratio(ours[n][0], sdpa["CUDNN_ATTENTION"][0])
        if n <= 8192 and not options.sizes:  # dense fp32: 14 GiB at 4096, 56 GiB at 8192
            timed("P1", "relation KL dense fp32 fwd+bwd", n,
                  lambda xt, xs: dense_relation_kl(xt, xs).backward(),
                  lambda: relation_pair(heads, n, d, device, dtype))
    largest = sizes[-1]
    for block in options.blocks[1:]:  # the tile sweep, at the largest size
        timed("P1", f"relation_kl Q/Q fwd+bwd, tile {block}", largest,
              lambda xt, xs, block=block: relation_step(xt, xs, {"block": block}),
              lambda: relation_pair(heads, largest, d, device, dtype))
    if len(sizes) > 1:
        out["p1_peak_ratio_last_two_n"] = ratio(ours[sizes[-1]][1], ours[sizes[-2]][1])
    if largest == 32768:
        out["p1_linearard_over_ours_32k"] = ratio(LINEARARD_32K_MS, ours[32768][0])
    smallest = sizes[0]
    errors = exactness(*relation_pair(heads, smallest, d, device, dtype), keywords)
    out[f"p1_rel_err_loss_{smallest}"] = errors[0]
    out[f"p1_rel_err_grad_{smallest}"] = errors[1]
    if options.profile and device.type == "cuda":
        profile_call(lambda xt, xs: relation_step(xt, xs, keywords),
                     relation_pair(heads, largest, d, device, dtype))


def profile_call(fn, args):
    """The GPU kernels of one fn(*args) after a warm-up call, by total time."""
    from torch.profiler import ProfilerActivity, profile
    fn(*args)
    args[1].grad = None
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    print_kernels(prof, 20)


def print_kernels(prof, count):
    """The profile's GPU kernels: the total, then the top `count` by self time."""
    kernels = [e for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels)
    print(f"\nGPU kernels: {total / 1e3:.1f} ms in all")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:count]:
        share = e.self_device_time_total / max(total, 1)
        print(f"  {e.self_device_time_total / 1e3:9.2f} ms {share:6.1%} x{e.count:<5} "
              f"{e.key[:90]}")


# ---- P8's relation loss: LinearARD's micro-step ---------------------------------------------

def relation_captures(B, T, shape, device, dtype):
    """Teacher and student q/k/v of every layer, {"q": {l: (B,H,T,hd)}, "k", "v": (B,K,T,hd)},
    as train.py hands them to relation_loss (the student's require grad); shape as model.SHAPES."""
    heads = {"q": shape["n_heads"], "k": shape["n_kv_heads"], "v": shape["n_kv_heads"]}
    captures = []
    for requires_grad in (False, True):
        cap = {kind: {} for kind in heads}
        for kind, count in heads.items():
            for layer in range(shape["n_layers"]):
                cap[kind][layer] = torch.randn(B, count, T, shape["head_dim"], device=device,
                                               dtype=dtype, requires_grad=requires_grad)
        captures.append(cap)
    return captures


def bench_rel(options, device, dtype, timed, out):
    """distill.relation_loss fwd+bwd on one LinearARD micro-step of SmolLM2 (Q/Q, K/K, V/V of 30
    layers, --rel-batch windows of --rel-len positions) for each tile of --blocks (default:
    relation_loss's own, distill.RELATION_TILE) and each --tile-elements (how many relations
    one relation_kl call stacks; default relation_loss's own)."""
    shape = model.SHAPES["smollm2-135m"]
    if options.quick:
        shape = {"n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16}
    T = options.rel_len
    B = options.rel_batch
    layers = list(range(shape["n_layers"]))
    blocks = options.blocks or (None,)
    budgets = options.tile_elements or (None,)

    def step(cap_t, cap_s, block, budget):
        keywords = {}
        if block is not None:
            keywords["block"] = block
        if budget is not None:
            keywords["tile_elements"] = budget
        distill.relation_loss(cap_t, cap_s, layers, **keywords).backward()
    for block in blocks:
        for budget in budgets:
            label = "its own tile" if block is None else f"tile {block}"
            name = f"p8_rel_ms_{T}_{tile_name(block)}"
            if budget is not None:
                label += f", tile_elements {budget:,}"
                name += f"_{budget}"
            milliseconds, _ = timed(
                "P8", f"relation_loss, {B} x {T}, {label}", T,
                lambda cap_t, cap_s, block=block, budget=budget: step(cap_t, cap_s, block, budget),
                lambda: relation_captures(B, T, shape, device, dtype))
            out[name] = milliseconds


# ---- P2: logit KD ----------------------------------------------------------------------------

def gemm_only(hs, ht, ws, wt, chunk):
    """The floor of chunked KD: 4 GEMMs per chunk (teacher logits, student logits, dH, dW)."""
    grad_h = torch.empty_like(hs)
    grad_w = torch.zeros_like(ws)
    for c0 in range(0, hs.shape[0], chunk):
        h = hs[c0:c0 + chunk]
        ht[c0:c0 + chunk] @ wt.T  # the teacher's logits (discarded)
        logits_student = h @ ws.T
        torch.mm(logits_student, ws, out=grad_h[c0:c0 + chunk])
        grad_w.addmm_(logits_student.T, h)


def naive_kd(hs, ht, ws, wt):
    """Full-vocabulary KL with (T,V) fp32 logits and autograd."""
    log_p_teacher = (ht @ wt.T).float().log_softmax(-1)
    log_p_student = (hs @ ws.T).float().log_softmax(-1)
    kl = log_p_teacher.exp() * (log_p_teacher - log_p_student)
    kl.sum(-1).mean().backward()


def kd_inputs(tokens, hidden, vocab, grad, device, dtype):
    """hs, ht (tokens, hidden), ws, wt (vocab, hidden); the student's may require grad."""
    hs = (0.02 * torch.randn(tokens, hidden, device=device)).to(dtype)
    ht = (0.02 * torch.randn(tokens, hidden, device=device)).to(dtype)
    ws = (0.02 * torch.randn(vocab, hidden, device=device)).to(dtype)
    wt = (0.02 * torch.randn(vocab, hidden, device=device)).to(dtype)
    return hs.requires_grad_(grad), ht, ws.requires_grad_(grad), wt


def kd_step(hs, ht, ws, wt, chunk):
    distill.logit_kd(hs, ht, ws, wt, chunk=chunk).backward()


def bench_p2(options, device, dtype, timed, out):
    T = 512 if options.quick else 32768
    V = 1000 if options.quick else 128256
    H = 64 if options.quick else 4096
    naive_T = 128 if options.quick else 4096
    ours = timed("P2", "logit_kd fwd+bwd (ours)", T,
                 lambda *x: kd_step(*x, options.chunk),
                 lambda: kd_inputs(T, H, V, True, device, dtype))
    gemm = timed("P2", "GEMM-only chunk loop", T,
                 lambda *x: gemm_only(*x, options.chunk),
                 lambda: kd_inputs(T, H, V, False, device, dtype))
    naive = timed("P2", "naive full-vocab KL fwd+bwd", naive_T, naive_kd,
                  lambda: kd_inputs(naive_T, H, V, True, device, dtype))
    out["p2_ours_over_gemm"] = ratio(ours[0], gemm[0])
    out["p2_ours_peak_gib"] = ours[1]
    out[f"p2_naive_extrapolated_{T}_ms"] = ratio(naive[0], naive_T / T)  # both linear in T
    out[f"p2_naive_extrapolated_{T}_gib"] = ratio(naive[1], naive_T / T)


# ---- P4: attention inside the model ----------------------------------------------------------

def bench_p4(options, device, dtype, timed, out):
    """The SDPA call of model.Attention on a Llama-1B layer at 32K (32 q / 8 kv heads, d 64), as
    the model makes it, vs each backend on contiguous, repeated k/v (the usual standalone call)."""
    B = 1
    T = 32768
    H = 32
    K = 8
    hd = 64
    if options.quick:
        T = 256
        H = 4
        K = 2
        hd = 16

    def model_like():  # (B,T,heads*hd) projections viewed as (B,heads,T,hd), as the model does
        projections = [torch.randn(B, T, heads * hd, device=device, dtype=dtype,
                                   requires_grad=True) for heads in (H, K, K)]
        grad_out = torch.randn(B, H, T, hd, device=device, dtype=dtype)
        views = [p.view(B, T, -1, hd).transpose(1, 2) for p in projections]
        return views + [grad_out]

    def ours(q, k, v, grad_out):
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(grad_out)
    model_call = timed("P4", "model attention (GQA views) fwd+bwd", T, ours, model_like)
    sdpa = sdpa_rows(timed, "P4", (B, H, T, hd), device, dtype, f" (H = {H} k/v)")
    timings = [row[0] for row in sdpa.values() if isinstance(row[0], float)]
    best = min(timings, default="n/a")
    out["p4_best_over_model"] = ratio(best, model_call[0])


# ---- P3: a training step's profile -----------------------------------------------------------

def profile_p3(train_args):
    """Profile the 2nd optimizer step of `train.py TRAIN_ARGS`; GPU time by category."""
    import train
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    def label(owner, name, tag):  # run owner.name inside a profiler range named tag()
        original = getattr(owner, name)

        def labelled(*args, **kwargs):
            with record_function(tag()):
                return original(*args, **kwargs)
        setattr(owner, name, labelled)
    losses = {"hidden_cosine_loss": "loss short", "s2l_loss": "loss s2l",
              "relation_loss": "loss rel", "logit_kd": "loss CE/KD (LM head)"}
    for function, tag in losses.items():  # train.py calls distill.X
        label(distill, function, lambda tag=tag: tag)

    def model_tag():  # the teacher runs without grad, the student with
        if torch.is_grad_enabled():
            return "student fwd"
        return "teacher fwd"
    label(train.Llama, "forward_hidden", model_tag)
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=1, warmup=0, active=1))
    adamw_step = torch.optim.AdamW.step

    def step_and_tick(self, *args, **kwargs):
        result = adamw_step(self, *args, **kwargs)
        prof.step()
        return result
    torch.optim.AdamW.step = step_and_tick
    with prof:
        train.main(train_args)
    print_p3(prof, ["teacher fwd", "student fwd", *losses.values()])


def print_p3(prof, ranges):
    """GPU time of the profiled step: attention and GEMM kernels, and each labelled range."""
    events = prof.key_averages()
    cuda = torch.autograd.DeviceType.CUDA
    cpu = torch.autograd.DeviceType.CPU
    gpu = [e for e in events if e.device_type == cuda  # kernels, memcpy
           and e.key not in ranges and not e.key.startswith("ProfilerStep")]
    total = sum(e.self_device_time_total for e in gpu) or float("nan")
    print(f"\nP3 profile of one optimizer step: GPU busy {total / 1e3:.0f} ms")
    attention = r"flash|fmha|cudnn|attention|sdpa"
    gemm = r"gemm|cutlass|nvjet|xmma"
    parts = {}
    parts["attention kernels"] = sum(e.self_device_time_total for e in gpu
                                     if re.search(attention, e.key, re.I))
    parts["GEMM kernels"] = sum(e.self_device_time_total for e in gpu
                                if re.search(gemm, e.key, re.I)
                                and not re.search(attention, e.key, re.I))
    for name in ranges:  # forward ranges only: device time under the CPU-side range
        parts[name + " (fwd range)"] = sum(e.device_time_total for e in events
                                           if e.key == name and e.device_type == cpu)
    for name, t in parts.items():
        print(f"  {name:34} {t / 1e3:9.1f} ms {t / total:6.1%}")
    print("  top kernels:")
    for e in sorted(gpu, key=lambda e: -e.self_device_time_total)[:15]:
        print(f"  {e.self_device_time_total / 1e3:9.1f} ms x{e.count:<6} {e.key[:90]}")


# ---- P8: the presets side by side ------------------------------------------------------------

PRESET_ORDER = ("cpt", "mix-cpt", "longred-u", "longred-c", "linearard", "kd")


def bench_presets(train_args, presets, out):
    """Each preset: `train.py --method P TRAIN_ARGS --no-save` in its own process; tokens/s, MFU
    and peak memory are the medians (the peak: the max) over its steps after the first (which
    compiles)."""
    rows = []
    for preset in presets:
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, "train.py", "--method", preset, *train_args,
                       "--no-save", "--out", folder]
            print("$", " ".join(command), flush=True)
            started = time.perf_counter()
            finished = subprocess.run(command)
            seconds = time.perf_counter() - started
            log = read_log(f"{folder}/log.jsonl")
        if finished.returncode or len(log) < 2:
            rows.append({"preset": preset, "status": f"exit {finished.returncode}"})
            continue
        after_first = log[1:]
        rows.append({"preset": preset, "steps": len(log), "seconds": seconds,
                     "tok_s": statistics.median(r["tok_s"] for r in after_first),
                     "mfu": statistics.median(r.get("mfu", float("nan")) for r in after_first),
                     "mem_gb": max(r.get("mem_gb", float("nan")) for r in after_first)})
    out["presets"] = rows
    out["train_args"] = train_args
    table(("preset", "tokens/s", "MFU", "peak GiB", "steps", "wall s"),
          [(r["preset"], r.get("tok_s", r.get("status")), r.get("mfu", ""), r.get("mem_gb", ""),
            r.get("steps", ""), r.get("seconds", "")) for r in rows])


def read_log(path):
    """The rows of a log.jsonl ([] if there is none)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- command line ----------------------------------------------------------------------------

def table(head, rows):
    """A markdown table; floats with 3 significant digits."""
    print(f"\n| {' | '.join(head)} |\n|{'---|' * len(head)}")
    for row in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in row]
        print("| " + " | ".join(cells) + " |")


def tile(text):
    """'2048x1024' -> (2048, 1024); '1024' -> 1024."""
    if "x" in text:
        rows, cols = text.split("x")
        return int(rows), int(cols)
    return int(text)


def tile_name(block):
    """None -> 'own'; 1024 -> '1024x1024'; (2048, 1024) -> '2048x1024'."""
    if block is None:
        return "own"
    if isinstance(block, int):
        return f"{block}x{block}"
    return f"{block[0]}x{block[1]}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__)
    parser.add_argument("--only", choices=("p1", "p2", "p3", "p4", "rel", "presets"),
                        help="run one goal only (p3, presets: train.py arguments after --)")
    parser.add_argument("train_args", nargs="*", help="with --only p3 or presets: train.py "
                        "arguments")
    parser.add_argument("--presets", default=",".join(PRESET_ORDER),
                        help="with --only presets: which, comma-separated")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--json", default="out/bench.json", help="where to write the results")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--sizes", type=lambda s: tuple(int(v) for v in s.split(",")),
                        help="P1 sequence lengths, comma-separated (default 4K..32K)")
    parser.add_argument("--blocks", type=lambda s: tuple(tile(v) for v in s.split(",")),
                        default=(), help="relation_kl tiles ROWSxCOLS, comma-separated. P1: the "
                        "first for every size, the rest at the largest; rel: each (default: its own)")
    parser.add_argument("--profile", action="store_true", help="P1: kernels of one call at the "
                        "largest size")
    parser.add_argument("--rel-batch", type=int, default=8, help="rel: windows per micro-step "
                        "(8 x 4096 = one 32K micro-step of the LinearARD preset)")
    parser.add_argument("--tile-elements", type=lambda s: tuple(int(v) for v in s.split(",")),
                        help="rel: relation_loss's stacking budgets, comma-separated (fp32 "
                        "elements of one stacked tile; default its own, 2^28)")
    parser.add_argument("--rel-len", type=int, help="rel: positions per window (default "
                        "LinearARD's 4096; 64 with --quick)")
    parser.add_argument("--chunk", type=int, default=2048, help="logit_kd tokens per chunk")
    options = parser.parse_args(argv)
    if options.reps < 1:
        parser.error("--reps must be >= 1")
    if options.rel_len is None:
        options.rel_len = 64 if options.quick else 4096
    if options.rel_batch < 1 or options.rel_len < 1 or min(options.tile_elements or (1,)) < 1:
        parser.error("--rel-batch, --rel-len and --tile-elements must be >= 1")
    return parser, options


def main(argv=None):
    parser, options = parse_args(argv)
    out = {"torch": torch.__version__, "quick": options.quick}
    if options.only == "p3":
        return profile_p3(options.train_args)
    if options.only == "presets":
        bench_presets(options.train_args, options.presets.split(","), out)
        return write_json(out, options.json)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not options.quick:
        parser.error("full shapes need CUDA; use --quick on CPU")
    dtype = torch.float32 if options.quick else torch.bfloat16  # bf16 in, fp32 accumulation
    out["device"] = "cpu"
    if device.type == "cuda":
        out["device"] = torch.cuda.get_device_name()
    rows = []

    def timed(goal, what, n, fn, make):  # measure fn(*make()) and add its row to the table
        rows.append((goal, what, n, *measure(fn, make, options.reps, device)))
        return rows[-1][3:]
    for goal, bench in (("p1", bench_p1), ("p2", bench_p2), ("p4", bench_p4), ("rel", bench_rel)):
        if options.only in (None, goal):
            bench(options, device, dtype, timed, out)
    print(f"\n{out['device']}, torch {out['torch']}")
    table(("goal", "what", "n / T", "ms", "peak GiB"), rows)
    table(("ratio", "value"), [(k, v) for k, v in out.items() if k.startswith("p")])
    out["rows"] = [dict(zip(("goal", "what", "n", "ms", "peak_gib"), r)) for r in rows]
    write_json(out, options.json)


def write_json(out, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
