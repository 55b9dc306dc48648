"""`torchrun --nproc_per_node 2 -m intruder sweep`: each of two Gloo processes runs whole runs of the grid, and the
sweep's rows are those of one process."""

import json
import os
import subprocess
import sys

import pytest

from intruder.cli import main
from tests.conftest import sample_questions_file


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 questions: 30 to train on, 10 to test (a quick sweep)."""
    return sample_questions_file(tmp_path_factory.mktemp("data") / "mine.jsonl", 40)


def _common(tiny_lm, data, out) -> list[str]:
    return ["sweep", "--out", str(out), "--model", str(tiny_lm), "--data", str(data), "--test-fraction", "0.25",
            "--methods", "lora", "--ranks", "1,2", "--lrs", "5e-3", "--epochs", "1", "--lams", "1", "--no-context",
            "--max-length", "192", "--forget-texts", "4", "--device", "cpu", "--quiet"]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "intruder", *args], env=os.environ | {"OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


def _rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # timing differs


def _same(a, b) -> bool:
    """Equal, floats to 1e-5 (the processes run with other thread counts)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-5, abs=1e-9)
    return a == b


def test_two_processes_share_a_sweep_and_write_the_rows_of_one(tiny_lm, data, tmp_path, capsys):
    assert main(_common(tiny_lm, data, tmp_path / "one")) == 0
    done = _torchrun(_common(tiny_lm, data, tmp_path / "two"))
    assert done.returncode == 0, done.stderr
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [(r["run"], r["kind"], r["epoch"]) for r in two] == [(r["run"], r["kind"], r["epoch"]) for r in one]
    assert len(one) == 6 and all(_same(a, b) for a, b in zip(two, one))
    assert done.stdout.count("wrote ") == 1 and (tmp_path / "two" / "report.html").is_file()  # rank 0 reported
    for run in ("lora-r1-a2r-lr5e-3", "lora-r2-a2r-lr5e-3"):  # each run trained whole, in one process
        config = json.loads((tmp_path / "two" / "runs" / run / "config.json").read_text())
        assert config["world_size"] == 1


def test_a_shard_or_report_only_under_torchrun_is_refused(tiny_lm, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before any process group is joined
    assert main(_common(tiny_lm, data, tmp_path) + ["--shard", "1/2"]) == 2
    assert "torchrun splits the grid already" in capsys.readouterr().err
    assert main(_common(tiny_lm, data, tmp_path) + ["--report-only"]) == 2
    assert "run it in one process, without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "sweep.json").exists()
