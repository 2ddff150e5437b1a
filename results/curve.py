"""The forgetting curve from the outputs of results/forget.sh (or table.sh with EXPORT_EVERY).

    python results/curve.py OUT [ROW [START]]  ->  OUT/curve_ROW.md, OUT/curve_ROW.png

ROW (default cpt) is a trained row; START (default abf) the row evaluated as its step 0: the
original model with the row's RoPE and no training (abf for the ABF rows);
then each exported student (OUT/curve/ROW/step-N) and the final one (OUT/eval/ROW). Per point: the
short average as % of the original's, with its binomial standard error, and passkey accuracy at
each length.
"""
import json
import math
import sys
from pathlib import Path


def point(results):
    """(short average % of the original, its standard error in points, {length: passkey %})."""
    tasks = results["short"]["tasks"].values()
    variance = sum(t[t["primary"]] * (1 - t[t["primary"]]) / t["n"] for t in tasks)
    standard_error = math.sqrt(variance) / len(tasks)  # of the average, tasks independent
    ratio = results["short"].get("ratio", 100.0)
    scale = ratio / results["short"]["avg"]  # average -> % of the original
    long = results["long"]
    passkey = long["needles"][long["kinds"].index("passkey")]  # (lengths, depths)
    by_length = {n: 100 * sum(row) / len(row) for n, row in zip(long["lengths"], passkey)}
    return ratio, standard_error * scale, by_length


def final_step(out, row):
    """The last logged step of OUT/runs/ROW."""
    lines = Path(out, "runs", row, "log.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["step"]


def points(out, row, start_row):
    """[(step, results)] from step 0 (start_row's evaluation) to the final student."""
    found = []
    start = Path(out, "eval", start_row, "results.json")
    if start.exists():
        found.append((0, json.loads(start.read_text())))
    for path in Path(out, "curve", row).glob("step-*/results.json"):
        step = int(path.parent.name.removeprefix("step-"))
        found.append((step, json.loads(path.read_text())))
    final = Path(out, "eval", row, "results.json")
    if final.exists():
        found.append((final_step(out, row), json.loads(final.read_text())))
    return sorted(found, key=lambda pair: pair[0])


def main(out, row="cpt", start_row="abf"):
    curve = points(out, row, start_row)
    if not curve:
        raise SystemExit(f"curve.py: nothing evaluated for {row} in {out}")
    lengths = curve[-1][1]["long"]["lengths"]
    head = ["step", "short avg, % of original", *[f"passkey {n / 1024:g}K" for n in lengths]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    steps = []
    ratios = []
    errors = []
    passkeys = {n: [] for n in lengths}
    for step, results in curve:
        ratio, error, by_length = point(results)
        steps.append(step)
        ratios.append(ratio)
        errors.append(error)
        for n in lengths:
            passkeys[n].append(by_length.get(n, float("nan")))
        cells = [str(step), f"{ratio:.1f} +- {error:.1f}",
                 *[f"{by_length.get(n, float('nan')):.0f}" for n in lengths]]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    Path(out, f"curve_{row}.md").write_text(table)
    print(table)
    plot(out, row, steps, ratios, errors, passkeys)


def plot(out, row, steps, ratios, errors, passkeys):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (short_axis, passkey_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    short_axis.errorbar(steps, ratios, yerr=errors, marker="o", capsize=3)
    short_axis.axhline(100, color="gray", lw=0.8)
    short_axis.set(xlabel="optimizer step", ylabel="short average, % of the original",
                   title=f"{row}: short tasks")
    for n, accuracy in passkeys.items():
        passkey_axis.plot(steps, accuracy, marker="o", label=f"{n / 1024:g}K")
    passkey_axis.set(xlabel="optimizer step", ylabel="passkey accuracy %", ylim=(-5, 105),
                     title=f"{row}: passkey")
    passkey_axis.legend()
    fig.savefig(Path(out, f"curve_{row}.png"), dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0)
    if not 2 <= len(sys.argv) <= 4:
        raise SystemExit("usage: python results/curve.py OUT [ROW [START]]")
    main(*sys.argv[1:])
