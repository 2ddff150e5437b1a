"""results/table.sh and results/forget.sh pass each row the flags its recipe and the regime give.

A `python` first on PATH writes down its arguments and does nothing else, so these tests read the
commands the scripts would run (the training and evaluation themselves are tested elsewhere)."""
import os
import shlex
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commands(tmp_path, script, rows, env):
    """Run results/SCRIPT on ROWS with a recording python. -> [argument list per python call]"""
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    record = tmp_path / "calls.txt"
    python = shim / "python"
    python.write_text(f'#!/usr/bin/env bash\nprintf "%q " "$@" >> {record}\necho >> {record}\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    run_env = {k: v for k, v in os.environ.items()
               if k not in ("LR", "WARMUP", "TOKENS", "BATCH", "LIMIT", "LONG_DATA",
                            "EXPORT_EVERY", "SMOKE")}
    run_env.update(env)
    run_env["PATH"] = f"{shim}:{run_env['PATH']}"
    work = tmp_path / "work"  # the scripts' working directory, with the regime's long text
    (work / "assets" / "tokens-tech").mkdir(parents=True, exist_ok=True)
    subprocess.run(["bash", str(ROOT / "results" / script), str(tmp_path / "out"), *rows],
                   cwd=work, env=run_env, check=True, capture_output=True, text=True)
    return [shlex.split(line) for line in record.read_text().splitlines()]


def training_of(calls, row):
    """The train.py call whose --out ends in runs/ROW."""
    for call in calls:
        if call[0] == "train.py" and call[call.index("--out") + 1].endswith(f"runs/{row}"):
            return call
    raise AssertionError(f"no train.py call for {row}")


def value(call, flag):
    return call[call.index(flag) + 1] if flag in call else None


def test_table_sh_gives_the_regime_to_every_row_but_linearards_recipe(tmp_path):
    calls = commands(tmp_path, "table.sh",
                     ["cpt", "cpt@1e-3", "linearard", "linearard+cpt", "longred-c.s1"],
                     {"LR": "2e-3", "WARMUP": "8", "TOKENS": "1000", "BATCH": "500",
                      "LONG_DATA": "assets/tokens-tech"})
    cpt = training_of(calls, "cpt")
    assert (value(cpt, "--lr"), value(cpt, "--warmup")) == ("2e-3", "8")
    assert (value(cpt, "--tokens"), value(cpt, "--batch-tokens")) == ("1000", "500")
    assert value(cpt, "--long-data") == "assets/tokens-tech"
    at_rate = training_of(calls, "cpt@1e-3")  # ROW@LR: that rate, the regime's warm-up
    assert (value(at_rate, "--lr"), value(at_rate, "--warmup")) == ("1e-3", "8")
    recipe = training_of(calls, "linearard")  # its paper's learning rate and warm-up
    assert value(recipe, "--lr") is None and value(recipe, "--warmup") is None
    assert value(recipe, "--method") == "linearard"
    two_stages = training_of(calls, "linearard+cpt")  # the flags reach its last (CPT) stage
    assert (value(two_stages, "--lr"), value(two_stages, "--warmup")) == ("2e-3", "8")
    seeded = training_of(calls, "longred-c.s1")
    assert (value(seeded, "--method"), value(seeded, "--seed")) == ("longred-c", "1")
    evaluations = [call for call in calls if call[0] == "eval.py"]
    assert len(evaluations) == 5
    assert all(value(call, "--reference").endswith("eval/original/results.json")
               for call in evaluations)


def test_table_sh_linearard_diagnosis_rows_change_one_thing_each(tmp_path):
    rows = ["linearard", "linearard-query", "linearard-abf", "linearard-yarn", "linearard-long",
            "linearard@2e-4"]
    calls = commands(tmp_path, "table.sh", rows, {"LR": "2e-3", "WARMUP": "8"})
    recipe = training_of(calls, "linearard")
    at_rate = training_of(calls, "linearard@2e-4")  # the rate changes, the recipe's warm-up stays
    out = at_rate.index("--out")
    assert at_rate[:out] == recipe[:out]
    assert at_rate[out + 2:] == recipe[out + 2:] + ["--lr", "2e-4"]
    for row, change in [("linearard-query", ["--rel-norm", "query"]),
                        ("linearard-abf", ["--rope", "abf"]), ("linearard-yarn", ["--rope", "yarn"]),
                        ("linearard-long", ["--steps", "576", "--export-every", "144"])]:
        call = training_of(calls, row)
        out = call.index("--out")
        assert call[:out] == recipe[:out]  # the same init and target
        assert call[out + 2:] == recipe[out + 2:] + change  # the recipe, and one change
    assert value(recipe, "--lr") is None and value(recipe, "--warmup") is None


def test_forget_sh_defaults_are_the_measured_regime(tmp_path):
    calls = commands(tmp_path, "forget.sh", ["cpt", "longred-c", "cpt-general"], {})
    cpt = training_of(calls, "cpt")
    assert (value(cpt, "--lr"), value(cpt, "--warmup")) == ("2e-3", "8")
    assert (value(cpt, "--tokens"), value(cpt, "--batch-tokens")) == ("8388608", "262144")
    assert value(cpt, "--long-data") == "assets/tokens-tech"
    assert value(cpt, "--export-every") == "8"  # the curve
    longred = training_of(calls, "longred-c")
    assert value(longred, "--export-every") is None
    assert value(longred, "--lr") == "2e-3"
    general = training_of(calls, "cpt-general")  # the regime's lr, the general corpus
    assert value(general, "--long-data") is None and value(general, "--method") == "cpt"
    assert (value(general, "--lr"), value(general, "--tokens")) == ("2e-3", "8388608")
    assert value(longred, "--long-data") == "assets/tokens-tech"
    evaluations = [call for call in calls if call[0] == "eval.py"]
    assert {value(call, "--limit") for call in evaluations} == {"1000"}


def test_scripts_refuse_bad_calls_in_one_line(tmp_path):
    """No OUT: a usage line; forget.sh without the technical text: the set-up to run, before any
    row runs."""
    for script in ("table.sh", "forget.sh"):
        result = subprocess.run(["bash", str(ROOT / "results" / script)], cwd=tmp_path,
                                capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.startswith("usage:"), result.stderr
    result = subprocess.run(["bash", str(ROOT / "results" / "forget.sh"), str(tmp_path / "out")],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert "python data.py setup --tech" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "out").exists()
