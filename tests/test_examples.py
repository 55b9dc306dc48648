"""The examples run as a user runs them; the notebook is saved executed, with small outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


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
