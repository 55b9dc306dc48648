"""The examples run as a user runs them, on tiny models; the notebook is saved executed, with small outputs, and
runs again to the same numbers."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from intruder import IntruderReport, open_weights
from tests.conftest import assert_cosines_match

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args, cwd, timeout: int = 300) -> str:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_walkthrough_script_writes_the_figures_and_a_report(tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, str(EXAMPLES / "walkthrough.py"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "total: " in done.stdout and "intruders at other thresholds" in done.stdout
    figures = tmp_path / "out" / "figures"
    for name in ("overview.png", "overview.svg", "intruders-per-layer.png", "threshold-sweep.png"):
        assert (figures / name).stat().st_size > 1000, name
    assert json.loads((tmp_path / "out" / "report.json").read_text())["total"] > 0
    assert "<img src=\"data:image/png;base64," in (tmp_path / "out" / "report" / "report.html").read_text()


def test_notebook_is_saved_executed_and_small():
    path = EXAMPLES / "walkthrough.ipynb"
    assert path.stat().st_size < 300_000
    notebook = json.loads(path.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and [cell["execution_count"] for cell in code] == list(range(1, len(code) + 1))  # in order
    outputs = [out for cell in code for out in cell["outputs"]]
    assert not [out for out in outputs if out["output_type"] == "error"]
    assert any("image/png" in out.get("data", {}) for out in outputs)  # the figures
    assert any("text/html" in out.get("data", {}) for out in outputs)  # the report's summary table
    script = (EXAMPLES / "walkthrough.py").read_text()
    for step in ("find_intruders(base, adapter", "report.summary(", "plot_intruder_map(report, ax=a)",
                 "save_figure(", "write_report("):
        assert step in script and any(step in "".join(cell["source"]) for cell in code), step


def _outputs(cells) -> str:
    """The text a notebook's code cells printed, in order."""
    return "".join("".join(out.get("text", "")) for cell in cells if cell["cell_type"] == "code"
                   for out in cell["outputs"] if out["output_type"] == "stream")


def test_notebook_runs_to_the_numbers_it_was_saved_with(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    saved = nbformat.read(EXAMPLES / "walkthrough.ipynb", as_version=4)
    notebook = nbformat.read(EXAMPLES / "walkthrough.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on a cell's error
    printed = _outputs(notebook.cells)
    assert re.search(r"total: \d+ intruders in 28 matrices \(k=10, ε=0.5, side=left\)", printed)
    for line in printed.splitlines():  # the summary, the counts and what was written, as saved
        if line.startswith(("total:", "intruders at other thresholds:", "wrote 5 figure files")):
            assert line in _outputs(saved.cells), line
    report = IntruderReport.from_json(tmp_path / "out" / "walkthrough" / "report.json")
    assert f"total: {report.total} intruders in 28 matrices" in printed
    assert (tmp_path / "out" / "walkthrough" / "report" / "report.html").stat().st_size > 10_000
    shown = [out for cell in notebook.cells if cell["cell_type"] == "code" for out in cell["outputs"]]
    assert any("image/png" in out.get("data", {}) for out in shown)
    assert any(f"{report.total} intruders in 28 matrices" in out.get("data", {}).get("text/html", "") for out in shown)


def test_analyze_gemma_example_on_a_tiny_base_matches_brute_force(tiny_lm, tmp_path):
    printed = _run("analyze_gemma.py", "--base", tiny_lm, "--out", tmp_path / "out", cwd=tmp_path)
    report = IntruderReport.from_json(tmp_path / "out" / "report.json")
    assert len(report.layers) == 14 and report.total > 0
    assert f"total: {report.total} intruders in 14 matrices (k=10, ε=0.5, side=left)" in printed
    assert f"intruders at other thresholds: {report.counts_at([0.1, 0.3, 0.5, 0.7, 0.9])}" in printed
    worst = max(report.layers, key=lambda layer: layer.n_intruders)
    assert f"most intruders: {worst.name}, ranks {worst.indices}" in printed
    assert (tmp_path / "out" / "report.csv").read_text().count("\n") == 15  # a header and a row per matrix
    adapter = tmp_path / "out" / "random-r8-adapter"
    with open_weights(tiny_lm) as base, open_weights(adapter, base=base) as tuned:
        for layer in report.layers:  # every stored cosine, against two float64 SVDs of W_0 and W_0 + s·B A
            w0 = base.get(layer.name).double()
            update = tuned.low_rank_update(layer.name)
            wt = w0 + update.left.double() @ update.right.double()
            sigma = torch.linalg.svdvals(wt)[:10].numpy()
            np.testing.assert_allclose(layer.singular_values, sigma, rtol=1e-9)
            gap = np.abs(np.diff(sigma)) / sigma[0]
            clear = np.flatnonzero(np.r_[gap > 1e-3, True] & np.r_[True, gap > 1e-3])
            assert_cosines_match(layer, w0, wt, rows=clear, atol=1e-7)


def test_train_and_analyze_example_on_a_tiny_model(tiny_lm, tmp_path):
    out = tmp_path / "run"
    printed = _run("train_and_analyze.py", "--model", tiny_lm, "--epochs", "1", "--rank", "2", "--out", out,
                   cwd=tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    report = IntruderReport.from_json(out / "analysis-epoch-01.json")
    assert summary["config"]["rank"] == 2 and summary["config"]["alpha"] == 4 and summary["checkpoints"] == ["epoch-01"]
    lines = printed.splitlines()
    assert lines[0].split() == ["epoch", "accuracy", "forget", "loss", "intruders", "matrices", "ΔW", "erank"]
    before, after = summary["evals"]
    assert lines[1].split() == ["0", f"{before['accuracy']:.3f}", f"{before['forget_loss']:.4f}"]
    erank = sum(layer.delta_effective_rank for layer in report.layers) / len(report.layers)
    assert lines[2].split() == ["1", f"{after['accuracy']:.3f}", f"{after['forget_loss']:.4f}", str(report.total),
                                "14", f"{erank:.2f}"]
    assert lines[3] == f"forgetting (general-text loss after - before): {summary['forgetting']:+.4f} nats"
    again = _run("train_and_analyze.py", "--model", tiny_lm, "--out", out, cwd=tmp_path)  # nothing to redo
    assert again == printed
