"""`intruder analyze` end to end, on files, as a user runs it."""

import json
import subprocess
import sys

import torch

from intruder.cli import main
from intruder.synthetic import planted, random_adapter
from tests.conftest import save_model_dir


def models(tmp_path):
    w0, wt, _, _ = planted(48, 64, n_intruders=2)
    base = save_model_dir(tmp_path / "base", {"model.layers.0.mlp.up_proj.weight": w0.float()})
    tuned = save_model_dir(tmp_path / "tuned", {"model.layers.0.mlp.up_proj.weight": wt.float()})
    return base, tuned


def test_analyze_prints_a_table_and_writes_json(tmp_path, capsys):
    base, tuned = models(tmp_path)
    assert main(["analyze", str(base), str(tuned), "--out", str(tmp_path / "r.json"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.up_proj.weight" in out and "total: 2 intruders" in out
    assert json.loads((tmp_path / "r.json").read_text())["total"] == 2


def test_analyze_an_adapter_with_options(tmp_path, capsys):
    base, _ = models(tmp_path)
    adapter = random_adapter(base, tmp_path / "adapter", rank=4, strength=5.0, targets=("up_proj",))
    code = main(["analyze", str(base), str(adapter), "--top-k", "5", "--side", "both", "--threshold", "0.3",
                 "--layers", "up_proj", "--out", str(tmp_path / "r.csv"), "--quiet"])
    assert code == 0
    assert "k=5, ε=0.3, side=both" in capsys.readouterr().out
    assert (tmp_path / "r.csv").read_text().startswith("name,")


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing"), str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    base, tuned = models(tmp_path)
    assert main(["analyze", str(base), str(tuned), "--out", str(tmp_path / "r.txt")]) == 2


def test_console_script_runs(tmp_path):
    base, tuned = models(tmp_path)
    done = subprocess.run([sys.executable, "-m", "intruder.cli", "analyze", str(base), str(tuned), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "total: 2 intruders" in done.stdout
    assert torch.__version__  # the subprocess imported the same environment
