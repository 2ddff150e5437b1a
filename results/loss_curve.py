"""One training loss against steps for several rows, from their training logs.

    python results/loss_curve.py OUT ROW [ROW ...] [--loss loss_rel] [--name NAME]
        ->  OUT/loss_NAME.md, OUT/loss_NAME.png

Reads OUT/runs/ROW/log.jsonl (train.py writes one line per optimizer step). The table gives the
loss, averaged over the 5 steps ending at each checkpoint step (1, 10, 36, 72, 144, then every
144), so one noisy step does not decide a reading; the plot shows every step. LinearARD's
diagnosis uses it for L_rel: the recipe (144 steps), 4x its steps, another learning rate, the
query normalisation, other scalings.
"""
import argparse
import json
from pathlib import Path

SMOOTHING = 5  # steps averaged per table reading


def loss_by_step(out, row, loss):
    """{step: loss} of the steps that logged it (a two-stage run logs each stage's terms)."""
    path = Path(out, "runs", row, "log.jsonl")
    values = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry.get(loss) is not None:
            values[entry["step"]] = entry[loss]
    return values


def reading(values, step):
    """The mean loss over the SMOOTHING steps ending at step (fewer at the start)."""
    window = [values[s] for s in range(step - SMOOTHING + 1, step + 1) if s in values]
    return sum(window) / len(window)


def checkpoints(last_step):
    """1, 10, 36, 72, 144, then every 144 up to last_step."""
    steps = [s for s in (1, 10, 36, 72) if s <= last_step]
    steps += list(range(144, last_step + 1, 144))
    return steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the folder of results/table.sh (or forget.sh)")
    parser.add_argument("rows", nargs="+", help="rows with OUT/runs/ROW/log.jsonl")
    parser.add_argument("--loss", default="loss_rel", help="the logged loss (loss_rel, "
                        "loss_long, ...)")
    parser.add_argument("--name", default="", help="file name part; default: the loss")
    options = parser.parse_args(argv)
    name = options.name or options.loss.removeprefix("loss_")
    curves = {}
    for row in options.rows:
        if not Path(options.out, "runs", row, "log.jsonl").exists():
            raise SystemExit(f"loss_curve.py: no {options.out}/runs/{row}/log.jsonl")
        values = loss_by_step(options.out, row, options.loss)
        if not values:
            raise SystemExit(f"loss_curve.py: {row} logged no {options.loss}")
        curves[row] = values
    last = max(max(values) for values in curves.values())
    steps = checkpoints(last)
    lines = [f"| row | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|" + "---|" * (len(steps) + 1)]
    for row, values in curves.items():
        cells = [f"{reading(values, s):.3f}" if s <= max(values) else "" for s in steps]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    Path(options.out, f"loss_{name}.md").write_text(table)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for row, values in curves.items():
        ax.plot(list(values), list(values.values()), label=row, linewidth=1)
    ax.set(xlabel="optimizer step", ylabel=options.loss, title=f"{options.loss} against steps")
    ax.legend(fontsize=7)
    fig.savefig(Path(options.out, f"loss_{name}.png"), dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(table)


if __name__ == "__main__":
    main()
