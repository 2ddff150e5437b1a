"""The results table from the outputs of results/table.sh.

    python results/table.py OUT   ->  OUT/table.md, OUT/retention.png, OUT/needles.png

One row per OUT/eval/ROW/results.json (eval.py), in table.sh's order, with the training cost from
OUT/runs/ROW/log.jsonl (train.py): tokens, GPU minutes (sum of step times), peak memory. Scores in
%; the short average carries its binomial standard error (items independent, per task n).
"""
import json
import re
import sys
from pathlib import Path

import numpy as np

ORDER = ["original", "pi_x4", "abf", "yarn", "cpt", "cpt-general", "mix-cpt", "longred-u",
         "longred-c", "linearard", "linearard+cpt", "linearard+cpt_rel-lr-2e-3", "kd",
         "longred-c+rel", "longred-c+kd", "linearard-query", "linearard-abf", "linearard-yarn",
         "linearard-long"]


def row_order(row):
    """ORDER's place of the row's method; its seeds (ROW.sN) and rates (ROW@LR) just after it."""
    method = re.sub(r"(\.s\d+|@.*)$", "", row)
    place = ORDER.index(method) if method in ORDER else len(ORDER)
    return place, row != method, row


def load(out):
    """-> [(row, eval results, training log rows)] for each evaluated row."""
    found = {p.parent.name: p for p in Path(out, "eval").glob("*/results.json")}
    rows = sorted(found, key=row_order)
    logs = {r: Path(out, "runs", r, "log.jsonl") for r in rows}
    return [(r, json.loads(found[r].read_text()),
             [json.loads(x) for x in logs[r].open()] if logs[r].exists() else []) for r in rows]


def kilo(n):
    return f"{int(n) / 1024:g}K"


def columns(res, log):
    """One row's cells: training cost, short tasks, perplexities, needles, drift."""
    on_gpu = any("mem_gb" in r for r in log)  # train.py logs GPU memory only on a GPU
    c = {"tokens": f"{log[-1]['tokens'] / 1e6:.3g}M" if log else "0",
         "GPU min": f"{sum(r['sec'] for r in log) / 60:.1f}" if on_gpu else "-",
         "peak GB": f"{max(r.get('mem_gb', 0) for r in log):.1f}" if on_gpu else "-"}
    s, l, d = res["short"], res["long"], res["drift"]
    c.update({t: f"{100 * v[v['primary']]:.1f}" for t, v in s["tasks"].items()})
    se = np.sqrt(sum(v[v["primary"]] * (1 - v[v["primary"]]) / v["n"] for v in
                     s["tasks"].values())) / len(s["tasks"])  # binomial, tasks independent
    c["short avg"] = f"{100 * s['avg']:.2f} +- {100 * se:.2f}"
    c["% of orig."] = f"{s.get('ratio', 100):.1f}"
    c.update({f"ppl {kilo(w)}": f"{p:.1f}" for w, p in s["ppl"].items()})
    acc = np.asarray(l["needles"])  # (kinds, lengths, depths)
    k = l["kinds"].index("passkey") if "passkey" in l["kinds"] else None
    lengths = "/".join(kilo(n) for n in l["lengths"])
    if k is not None:
        c[f"passkey {lengths}"] = " / ".join(f"{100 * a:.0f}" for a in acc[k].mean(-1))
    rest = np.delete(acc, [k] if k is not None else [], axis=0)
    c[f"needles {lengths}"] = " / ".join(f"{100 * a:.0f}" for a in rest.mean((0, 2)))
    b = np.asarray(l["ppl_by_2k"])  # per 2K bucket of one target-length window
    c[f"ppl {kilo(res['t_orig'])}-{kilo(res['target'])}"] = \
        f"{np.exp(np.log(b[res['t_orig'] // 2048:]).mean()):.1f}"
    c["hidden cos"] = f"{np.mean(d['cos'][:-1]):.4f}"
    return c


def pearson(x, y):
    """Pearson r, or nan below 3 points."""
    if len(x) < 3:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def retention_points(table):
    """-> [(row, mean hidden-state cosine to the original, short average as % of the original,
    trained?)] per row: LongReD's claim is that the first predicts the second."""
    return [(row, float(np.mean(res["drift"]["cos"][:-1])), res["short"].get("ratio", 100),
             bool(log)) for row, res, log in table]


def correlation_line(points):
    """One line for table.md: Pearson r over every row and over the trained rows alone."""
    trained = [p for p in points if p[3]]
    r_all = pearson([p[1] for p in points], [p[2] for p in points])
    r_trained = pearson([p[1] for p in trained], [p[2] for p in trained])
    if len(trained) < 3:
        return (f"Hidden cosine vs % of the original: Pearson r = {r_all:.2f} over "
                f"{len(points)} rows (fewer than 3 trained rows for their own r).\n")
    return (f"Hidden cosine vs % of the original: Pearson r = {r_all:.2f} over {len(points)} "
            f"rows, {r_trained:.2f} over the {len(trained)} trained rows.\n")


def plots(table, out):
    """retention.png: short-average retention vs hidden-state similarity (LongReD's correlation);
    needles.png: accuracy by length x depth (mean over kinds) per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    points = retention_points(table)
    x = [cosine for _, cosine, _, _ in points]
    y = [ratio for _, _, ratio, _ in points]
    colours = ["tab:blue" if trained else "tab:gray" for _, _, _, trained in points]
    ax.scatter(x, y, c=colours)
    for (row, _, _, _), a, b in zip(points, x, y):
        ax.annotate(row, (a, b), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set(xlabel="mean hidden-state cosine to the original (8K texts)",
           ylabel="short average, % of the original",
           title=f"Pearson r = {pearson(x, y):.2f} (blue: trained rows)")
    fig.savefig(Path(out, "retention.png"), dpi=120, bbox_inches="tight")
    fig, axes = plt.subplots(1, len(table), figsize=(2 * len(table) + 1, 3), squeeze=False,
                             sharey=True)
    for ax, (row, res, _) in zip(axes[0], table):
        l = res["long"]
        a = np.asarray(l["needles"]).mean(0)  # (lengths, depths)
        im = ax.imshow(a.T, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(f"{row}\nmean {a.mean():.2f}", fontsize=8)
        ax.set(xticks=range(len(l["lengths"])),
               xticklabels=[kilo(n) for n in l["lengths"]],
               yticks=range(len(l["depths"])), yticklabels=[f"{d:.0%}" for d in l["depths"]])
    axes[0, 0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist())
    fig.savefig(Path(out, "needles.png"), dpi=120, bbox_inches="tight")
    plt.close("all")


def main(out):
    table = load(out)
    if not table:
        raise SystemExit(f"table.py: no {out}/eval/*/results.json; run results/table.sh {out}")
    cells = [columns(res, log) for _, res, log in table]
    head = ["row"] + list(cells[0])
    md = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n" + "".join(
        f"| {row} | " + " | ".join(c.get(h, "-") for h in head[1:]) + " |\n"
        for (row, _, _), c in zip(table, cells))
    md += "\n" + correlation_line(retention_points(table))
    Path(out, "table.md").write_text(md)
    plots(table, out)
    print(md)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0)
    main(sys.argv[1] if len(sys.argv) > 1 else "out/table")
