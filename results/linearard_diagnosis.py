"""LinearARD, diagnosed: where a scaled student's Q/Q, K/K and V/V relations differ from the
original's, per layer and per relation, with LinearARD's own loss (distill.relation_loss).

    python results/linearard_diagnosis.py OUT [--students pi,abf,yarn,PATH...] [--length 4096]

For each student (a RoPE scaling of the original to --target, untrained, or an HF folder, e.g. a
trained LinearARD student) and --texts windows of --length tokens from --data:

    KL_rel(X_l) / (B T heads_X)     per layer l and relation X in {q, k, v}

(distill.relation_kl, heads_X the relation's own heads), their mean over layers, and LinearARD's
L_rel (the sum over X of those means, as distill.relation_loss computes it; a test checks they
agree) under both normalisations, own and query (K/K and V/V divided by the query heads). Writes
OUT/linearard_diagnosis.json and .md. A trained student's row against its untrained start shows
which relations the training restored.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules

import data  # noqa: E402
import distill  # noqa: E402
from model import Llama  # noqa: E402
from rope import extend  # noqa: E402

KINDS = ("q", "k", "v")


def student_model(name, base, target, t_orig, dtype):
    """A scaling of the base (pi, abf, yarn, ...), or an HF folder as it is."""
    if os.path.isdir(name):
        return Llama.from_pretrained(name, dtype=dtype)
    model = Llama.from_pretrained(base, dtype=dtype)
    theta, scaling = extend(name, model.cfg.rope_theta, model.cfg.head_dim, t_orig, target)
    return model.set_rope(theta, scaling, max_pos=target)


@torch.no_grad()
def captures(model, windows, device):
    """{"q"|"k"|"v": {layer: (B, heads, T, hd)}} of the windows (B, T)."""
    every = tuple(range(model.cfg.n_layers))
    x = torch.as_tensor(windows, device=device)
    return model.forward_hidden(x, qkv_layers=every)[1]


def per_layer(cap_teacher, cap_student, layers):
    """{kind: [KL_rel(X_l) / (B T heads_X) for l in layers]}."""
    table = {}
    for kind in KINDS:
        values = []
        for layer in layers:
            kl = distill.relation_kl(cap_teacher[kind][layer], cap_student[kind][layer])
            rows = cap_student[kind][layer][..., 0].numel()  # B heads T
            values.append(kl.item() / rows)
        table[kind] = values
    return table


def losses(table, cfg):
    """LinearARD's L_rel from the per-layer values: own, the mean over layers of the three
    relations' values; query, K/K and V/V divided by the query heads instead (x K / H)."""
    layers = len(table["q"])
    own = sum(sum(values) for values in table.values()) / layers
    kv_scale = cfg.n_kv_heads / cfg.n_heads
    query = (sum(table["q"]) + kv_scale * (sum(table["k"]) + sum(table["v"]))) / layers
    return {"loss_own": own, "loss_query": query}


def markdown(results, layers):
    """The summary table, then the per-layer tables."""
    lines = ["| student | L_rel (own) | L_rel (query) | mean Q/Q | mean K/K | mean V/V | "
             "largest layers (Q/Q) |", "|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        means = [sum(result["per_layer"][k]) / len(layers) for k in KINDS]
        q_values = result["per_layer"]["q"]
        largest = sorted(layers, key=lambda layer: -q_values[layer])[:5]
        lines.append(f"| {name} | {result['loss_own']:.4f} | {result['loss_query']:.4f} | "
                     + " | ".join(f"{m:.4f}" for m in means) + f" | {largest} |")
    for name, result in results.items():
        lines += ["", f"{name}, per layer:", "", "| layer | Q/Q | K/K | V/V |", "|---|---|---|---|"]
        for layer in layers:
            cells = [f"{result['per_layer'][k][layer]:.4f}" for k in KINDS]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for linearard_diagnosis.json and .md")
    parser.add_argument("--base", default="assets/smollm2-135m", help="the original model")
    parser.add_argument("--students", default="pi,abf,yarn",
                        help="comma-separated: RoPE scalings of the base, or HF folders")
    parser.add_argument("--target", type=int, default=32768, help="the scalings' target window")
    parser.add_argument("--t-orig", type=int, default=0, help="0 = the base's max_pos")
    parser.add_argument("--data", default="assets/tokens", help="token shards of the texts")
    parser.add_argument("--length", type=int, default=4096, help="tokens per text (LinearARD: "
                        "4096)")
    parser.add_argument("--texts", type=int, default=2, help="texts (one window each)")
    options = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = Llama.from_pretrained(options.base, dtype=dtype).to(device).eval()
    t_orig = options.t_orig or teacher.cfg.max_pos
    tokens = data.load_tokens(options.data, options.base, teacher.cfg.vocab_size)[0]
    windows = data.windows(tokens, options.length, options.texts, 0, 2**61, 0)[0]
    cap_teacher = captures(teacher, windows, device)
    layers = list(range(teacher.cfg.n_layers))
    results = {}
    for name in options.students.split(","):
        student = student_model(name, options.base, options.target, t_orig, dtype)
        cap_student = captures(student.to(device).eval(), windows, device)
        table = per_layer(cap_teacher, cap_student, layers)
        results[name] = {"per_layer": table, **losses(table, teacher.cfg)}
        print(f"{name}: L_rel own {results[name]['loss_own']:.4f}, query "
              f"{results[name]['loss_query']:.4f}", flush=True)
        del student, cap_student
    Path(options.out).mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(options).items() if k != "out"}
    with open(Path(options.out, "linearard_diagnosis.json"), "w") as f:
        json.dump({"settings": settings, "device": str(device), "results": results}, f, indent=1)
    table = markdown(results, layers)
    Path(options.out, "linearard_diagnosis.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
