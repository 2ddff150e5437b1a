"""The results scripts' own arithmetic against the project's functions."""
import importlib.util
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import distill
from model import LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "results", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diagnosis_losses_equal_relation_loss():
    """linearard_diagnosis derives L_rel (own and query) from its per-layer values: the same
    numbers as distill.relation_loss."""
    diagnosis = load_script("linearard_diagnosis")
    cfg = LlamaConfig(n_heads=6, n_kv_heads=2, head_dim=4, n_layers=3)
    g = torch.Generator().manual_seed(0)
    cap_t = {}
    cap_s = {}
    for kind, heads in (("q", 6), ("k", 2), ("v", 2)):
        cap_t[kind] = {l: torch.randn(2, heads, 9, 4, generator=g, dtype=torch.float64)
                       for l in range(3)}
        cap_s[kind] = {l: torch.randn(2, heads, 9, 4, generator=g, dtype=torch.float64)
                       for l in range(3)}
    table = diagnosis.per_layer(cap_t, cap_s, [0, 1, 2])
    losses = diagnosis.losses(table, cfg)
    for norm in ("own", "query"):
        reference = distill.relation_loss(cap_t, cap_s, [0, 1, 2], norm=norm).item()
        assert math.isclose(losses[f"loss_{norm}"], reference, rel_tol=1e-12)


def test_table_of_the_regime_orders_seeds_and_reports_the_correlation(tmp_path):
    """table.py on the committed regime results (results/forget-h200): a method's seeds and
    rates follow it, and the correlation line counts every row and the trained rows (those with a
    training log) apart, with Pearson r computed here from the rows' results.json."""
    table = load_script("table")
    source = os.path.join(ROOT, "results", "forget-h200")
    shutil.copytree(os.path.join(source, "eval"), tmp_path / "eval")
    shutil.copytree(os.path.join(source, "runs"), tmp_path / "runs")
    table.main(str(tmp_path))
    text = (tmp_path / "table.md").read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")][1:]
    assert rows[:6] == ["original", "pi_x4", "abf", "yarn", "cpt", "cpt.s1"]
    assert rows.index("longred-c.s1") == rows.index("longred-c") + 1
    assert rows.index("linearard@2e-4") == rows.index("linearard") + 1
    cosines = {}
    ratios = {}
    for row in rows:
        results = json.loads((tmp_path / "eval" / row / "results.json").read_text())
        cosines[row] = sum(results["drift"]["cos"][:-1]) / (len(results["drift"]["cos"]) - 1)
        ratios[row] = results["short"].get("ratio", 100)
    trained = [row for row in rows if (tmp_path / "runs" / row / "log.jsonl").exists()]
    assert "cpt" in trained and "abf" not in trained and "original" not in trained
    r_all = np.corrcoef([cosines[r] for r in rows], [ratios[r] for r in rows])[0, 1]
    r_trained = np.corrcoef([cosines[r] for r in trained], [ratios[r] for r in trained])[0, 1]
    line = (f"Pearson r = {r_all:.2f} over {len(rows)} rows, {r_trained:.2f} over the "
            f"{len(trained)} trained rows.")
    assert line in text
    assert (tmp_path / "retention.png").stat().st_size > 0


def test_loss_curve_reads_the_training_log(tmp_path):
    """loss_curve.py on a committed LinearARD log: each reading is the mean of the 5 steps ending
    there; a row without a log is a one-line error."""
    curve = load_script("loss_curve")
    source = os.path.join(ROOT, "results", "forget-h200", "runs", "linearard-long")
    shutil.copytree(source, tmp_path / "runs" / "linearard-long")
    curve.main([str(tmp_path), "linearard-long"])
    logged = [json.loads(line) for line in open(os.path.join(source, "log.jsonl"))]
    by_step = {entry["step"]: entry["loss_rel"] for entry in logged}
    text = (tmp_path / "loss_rel.md").read_text()
    cells = text.splitlines()[2].split("|")[2:-1]
    head = text.splitlines()[0].split("|")[2:-1]
    assert [h.strip() for h in head] == [f"step {s}" for s in (1, 10, 36, 72, 144, 288, 432, 576)]
    for label, cell in zip(head, cells):
        step = int(label.split()[1])
        window = [by_step[s] for s in range(max(step - 4, 1), step + 1)]
        assert cell.strip() == f"{sum(window) / len(window):.3f}"
    assert (tmp_path / "loss_rel.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="no .*runs/cpt/log.jsonl"):
        curve.main([str(tmp_path), "cpt"])
