import json

import pytest

from intruder import IntruderError
from intruder.cli import main
from intruder.report.sweep_page import write_sweep_report
from intruder.study import Grid, RunSpec, collect, sweep
from intruder.study import runner as sweep_module
from intruder.study.grid import parse_alpha_rules
from intruder.study.runner import load_grid

TRAIN = {"context": False, "max_length": 192, "batch_size": 8}


def _grid(tiny_lm, **overrides):
    options = dict(methods=("lora", "full"), ranks=(1, 4), lrs=(5e-3,), full_lrs=(1e-3,), epochs=2, lams=(1.0,),
                   train=TRAIN | {"model": str(tiny_lm)})
    return Grid(**(options | overrides))


def test_run_names_scales_and_alpha_rules():
    assert RunSpec("lora", 1e-3, 8, "2r").name == "lora-r8-a2r-lr1e-3"
    assert RunSpec("lora", 2e-4, 64, "rslora").name == "lora-r64-rslora-lr2e-4"
    assert RunSpec("full", 2e-5).name == "full-lr2e-5"
    assert RunSpec("lora", 1e-3, 8, "2r").scale == 2.0
    assert RunSpec("lora", 1e-3, 8, "16").scale == 2.0 and RunSpec("lora", 1e-3, 32, "16").scale == 0.5
    assert RunSpec("lora", 1e-3, 16, "rslora").scale == pytest.approx(0.5)  # 2/√16
    assert RunSpec("lora", 1e-3, 16, "rslora:8").scale == pytest.approx(2.0)
    assert parse_alpha_rules("2r, 16,rslora:4") == ("2r", "16", "rslora:4")
    for bad in ("3r", "rslora:x", "-1", "0"):
        with pytest.raises(IntruderError, match="α rule"):
            parse_alpha_rules(bad)
    with pytest.raises(IntruderError, match="set by the grid"):
        Grid(train={"lr": 1e-3})
    with pytest.raises(IntruderError, match="lams"):
        Grid(lams=(0.5, -1.0))


def test_grid_shards_cover_every_run_once():
    grid = Grid(ranks=(1, 2, 4, 8, 16), alphas=("2r", "16"), full_lrs=(1e-5, 2e-5))
    names = [spec.name for spec in grid.runs()]
    shards = [spec.name for i in (1, 2, 3) for spec in grid.shard(i, 3)]
    assert len(names) == 12 and sorted(shards) == sorted(names)
    with pytest.raises(IntruderError, match="between 1 and N"):
        grid.shard(4, 3)


@pytest.fixture(scope="module")
def swept(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    rows = sweep(out, _grid(tiny_lm), progress=False)
    return out, rows


def test_sweep_writes_a_row_per_run_and_epoch(swept):
    out, rows = swept
    epochs = [(r["run"], r["epoch"]) for r in rows if r["kind"] == "epoch"]
    runs = ["lora-r1-a2r-lr5e-3", "lora-r4-a2r-lr5e-3", "full-lr1e-3"]
    assert epochs == [(name, e) for name in runs for e in (0, 1, 2)]
    assert [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()] == rows
    for r in rows:
        if r["kind"] == "epoch" and r["epoch"] > 0:
            assert r["intruders"] == r["counts"]["0.5"]  # the ε-curve holds the headline count
            assert 0 <= r["min_max_cos"] <= 1 and r["seconds"] > 0
    last = {r["run"]: r for r in rows if r["kind"] == "epoch" and r["epoch"] == 2}
    assert last["lora-r1-a2r-lr5e-3"]["median_erank"] == pytest.approx(1.0)  # a rank-1 update
    assert last["full-lr1e-3"]["mean_erank"] > last["lora-r4-a2r-lr5e-3"]["mean_erank"]
    assert (out / "runs" / "full-lr1e-3" / "epoch-02" / "model.safetensors").is_file()
    base = json.loads((out / "base_eval.json").read_text())
    assert all(r["accuracy"] == base["accuracy"] for r in rows if r["epoch"] == 0)


def test_the_same_sweep_again_redoes_nothing(swept, tiny_lm, monkeypatch):
    out, rows = swept
    def refuse(*args, **kwargs):
        raise AssertionError("retrained or re-analysed a finished run")

    monkeypatch.setattr(sweep_module, "train", refuse)
    monkeypatch.setattr(sweep_module, "find_intruders", refuse)
    assert sweep(out, _grid(tiny_lm), progress=False) == rows


def test_a_changed_grid_is_refused_naming_the_difference(swept, tiny_lm):
    out, _ = swept
    with pytest.raises(IntruderError, match=r"ranks 1,4 -> 1,8.*--extend"):
        sweep(out, _grid(tiny_lm, ranks=(1, 8)), progress=False)
    with pytest.raises(IntruderError, match="cannot change epochs"):
        sweep(out, _grid(tiny_lm, epochs=3), extend=True, progress=False)


def test_an_interrupted_sweep_continues_where_it_stopped(tiny_lm, tmp_path, monkeypatch):
    real, calls = sweep_module.train, []

    def interrupted(config, **kwargs):
        calls.append((config.out, kwargs["resume"]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(config, **kwargs)

    monkeypatch.setattr(sweep_module, "train", interrupted)
    grid = _grid(tiny_lm, methods=("lora",))
    with pytest.raises(KeyboardInterrupt):
        sweep(tmp_path, grid, progress=False)
    first = (tmp_path / "runs" / "lora-r1-a2r-lr5e-3" / "epoch-02" / "adapter_model.safetensors").read_bytes()
    rows = sweep(tmp_path, grid, progress=False)
    assert [c[0].rsplit("/", 1)[1] for c in calls] == ["lora-r1-a2r-lr5e-3", "lora-r4-a2r-lr5e-3",
                                                       "lora-r4-a2r-lr5e-3"]
    assert (tmp_path / "runs" / "lora-r1-a2r-lr5e-3" / "epoch-02" / "adapter_model.safetensors").read_bytes() == first
    assert sorted({r["run"] for r in rows}) == ["lora-r1-a2r-lr5e-3", "lora-r4-a2r-lr5e-3"]


def test_shards_share_a_directory_and_report_only_merges_them(tiny_lm, tmp_path, capsys):
    common = ["sweep", "--out", str(tmp_path), "--model", str(tiny_lm), "--methods", "lora", "--ranks", "1,2",
              "--lrs", "5e-3", "--epochs", "1", "--lams", "1", "--no-context", "--max-length", "192", "--quiet"]
    assert main(common + ["--shard", "1/2"]) == 0
    assert _last_runs(collect(tmp_path)) == ["lora-r1-a2r-lr5e-3"]
    assert main(common + ["--shard", "2/2"]) == 0
    assert main(common + ["--report-only"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    assert _last_runs(rows) == ["lora-r1-a2r-lr5e-3", "lora-r2-a2r-lr5e-3"]
    page = (tmp_path / "report.html").read_text()
    assert "lora-r2-a2r-lr5e-3" in page and "Findings" in page
    assert (tmp_path / "figures" / "intruders-vs-rank.png").is_file()
    assert "wrote" in capsys.readouterr().out


def _last_runs(rows):
    return sorted(r["run"] for r in rows if r["kind"] == "epoch" and r["epoch"] == 1)


def test_lambda_rows_and_every_figure(tiny_lm, tmp_path):
    grid = _grid(tiny_lm, ranks=(2,), full_lrs=(1e-3,), epochs=1, lams=(1.0, 0.0))
    rows = sweep(tmp_path, grid, progress=False)
    lams = {r["lam"]: r for r in rows if r["kind"] == "lambda"}
    last = next(r for r in rows if r["kind"] == "epoch" and r["run"] == "lora-r2-a2r-lr5e-3" and r["epoch"] == 1)
    assert set(lams) == {0.0, 1.0} and lams[1.0]["accuracy"] == last["accuracy"]  # λ = 1: the tuned model
    assert lams[0.0]["directions"] == last["intruders"] > 0  # every flagged direction, none other
    assert lams[0.0]["forget_loss"] != last["forget_loss"]
    page = write_sweep_report(rows, load_grid(tmp_path).to_dict(), tmp_path, command="intruder sweep ...")
    figures = {p.stem for p in (tmp_path / "figures").glob("*.png")}
    assert figures == {"intruders-vs-rank", "intruders-vs-epoch", "epsilon-curves", "erank-vs-rank",
                       "learning-curves", "learning-vs-forgetting", "lambda"}
    text = page.with_name("report.md").read_text()
    assert "scaling its" in text and "directions below ε = 0.5 from λ = 1 to 0" in text
    assert f"{last['intruders']}" in text and "lora-r2-a2r-lr5e-3" in text


def test_demo_runs_its_grid_and_prints_findings(tiny_lm, tmp_path, monkeypatch, capsys):
    from intruder.study import demo

    small = _grid(tiny_lm, methods=("lora",), ranks=(1,), epochs=1, lams=(1.0, 0.5))
    monkeypatch.setattr(demo, "DEMO_GRID", small)
    assert main(["demo", "--out", str(tmp_path / "d"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Findings of this run:" in printed and "Intruders at ε = 0.5" in printed
    assert "took" in printed and (tmp_path / "d" / "report.html").is_file()
