"""bench.py runs: the CPU smoke test of the loss goals, and the presets side by side."""
import json
import os
import subprocess
import sys

import pytest

from test_train import ARGS, tiny  # noqa: F401  (the tiny model and shard fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(*args):
    result = subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_quick_relation_kl_with_a_tile_sweep(tmp_path):
    out = tmp_path / "bench.json"
    stdout = bench("--quick", "--only", "p1", "--sizes", "64,128", "--blocks", "32x16,64",
                   "--reps", "1", "--json", str(out))
    results = json.loads(out.read_text())
    whats = [row["what"] for row in results["rows"]]
    assert "relation_kl Q/Q fwd+bwd, tile 64" in whats
    assert results["p1_rel_err_loss_64"] < 1e-6  # fp32 on CPU vs the dense fp32 maps
    assert "p1_ours_over_cudnn_128" in stdout


def test_quick_relation_loss_tile_sweep(tmp_path):
    """--only rel: LinearARD's relation loss on one micro-step, one row per tile."""
    out = tmp_path / "bench.json"
    bench("--quick", "--only", "rel", "--rel-len", "48", "--rel-batch", "2", "--blocks",
          "16x8,48x48", "--tile-elements", "1000,100000", "--reps", "1", "--json", str(out))
    results = json.loads(out.read_text())
    whats = [row["what"] for row in results["rows"]]
    assert whats == [f"relation_loss, 2 x 48, tile {tile}, tile_elements {budget}"
                     for tile in ("(16, 8)", "(48, 48)") for budget in ("1,000", "100,000")]
    assert results["p8_rel_ms_48_16x8_1000"] > 0


@pytest.mark.slow
def test_presets_side_by_side(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "presets.json"
    bench("--only", "presets", "--presets", "linearard", "--json", str(out), "--",
          "--init", str(tiny / "model"), "--data", str(tiny / "tokens"), *ARGS, "--steps", "2")
    rows = json.loads(out.read_text())["presets"]
    assert [row["preset"] for row in rows] == ["linearard"]
    assert rows[0]["tok_s"] > 0 and rows[0]["steps"] == 2
