"""Figures: drawn from stored results, with the expected artists, labels and files; clear errors when empty."""

import matplotlib

matplotlib.use("Agg")

import dataclasses  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from intruder import IntruderReport, find_intruders  # noqa: E402
from intruder.plot import (  # noqa: E402
    plot_effective_rank,
    plot_intruder_map,
    plot_intruders_by_epoch,
    plot_intruders_per_layer,
    plot_similarity,
    plot_spectrum,
    plot_threshold_sweep,
    plot_training,
    save_figure,
)
from intruder.synthetic import planted  # noqa: E402
from intruder.training.runs import TrainingRun  # noqa: E402

MODULES = ("self_attn.q_proj", "mlp.up_proj")


def _report(offset: int = 0, extra: dict | None = None) -> IntruderReport:
    """3 layers × 2 modules of 40×60 planted matrices; layer i, module j holds i + j + offset intruders."""
    base, tuned = {}, {}
    for i in range(3):
        for j, module in enumerate(MODULES):
            w0, wt, _, _ = planted(40, 60, n_intruders=i + j + offset, seed=10 * i + j)
            name = f"model.layers.{i}.{module}.weight"
            base[name], tuned[name] = w0.float(), wt.float()
    for name, (w0, wt) in (extra or {}).items():
        base[name], tuned[name] = w0, wt
    return find_intruders(base, tuned, progress=False, cache_dir=False)


@pytest.fixture(scope="module")
def report() -> IntruderReport:
    return _report()


@pytest.fixture(scope="module")
def report_with_head() -> IntruderReport:
    w0, wt, _, _ = planted(40, 60, n_intruders=2, seed=99)
    return _report(extra={"lm_head.weight": (w0.float(), wt.float())})


def _labelled(ax: Axes) -> None:
    assert isinstance(ax, Axes) and isinstance(ax.figure, Figure)
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


def test_report_has_known_counts(report):
    assert [lr.n_intruders for lr in report.layers] == [0, 1, 1, 2, 2, 3]
    assert report.total == 9


def test_spectrum(report):
    layer = report.layers[3]  # two intruders
    ax = plot_spectrum(layer)
    _labelled(ax)
    assert ax.get_yscale() == "log"
    assert len(ax.lines) == 3  # base, tuned, intruders
    base, tuned, marks = ax.lines
    np.testing.assert_allclose(base.get_ydata(), layer.base_singular_values)
    np.testing.assert_allclose(marks.get_xdata(), layer.indices)
    np.testing.assert_allclose(marks.get_ydata(), layer.singular_values[layer.indices])
    assert len(ax.get_legend().get_texts()) == 3
    assert len(plot_spectrum(layer, show_delta=True).lines) == 4
    assert len(plot_spectrum(report.layers[0]).lines) == 2  # no intruder, no intruder markers


def test_spectrum_into_given_axes(report):
    fig = Figure()
    ax = fig.add_subplot()
    assert plot_spectrum(report.layers[1], ax=ax) is ax


def test_similarity(report):
    layer = report.layers[5]
    ax = plot_similarity(layer)
    _labelled(ax)
    assert len(ax.images) == 1
    image = ax.images[0]
    assert image.get_array().shape == layer.similarity.shape == (10, 40)
    assert image.get_clim() == (0.0, 1.0)
    assert len(ax.figure.axes) == 2  # the heat map and its colour bar
    assert ax.figure.axes[1].get_ylabel()
    (marks,) = ax.lines
    np.testing.assert_allclose(marks.get_ydata(), layer.indices)


def test_intruder_map(report):
    ax = plot_intruder_map(report)
    _labelled(ax)
    assert len(ax.images) == 1
    np.testing.assert_array_equal(ax.images[0].get_array(), [[0, 1], [1, 2], [2, 3]])
    assert sorted(t.get_text() for t in ax.texts) == sorted(["0", "1", "1", "2", "2", "3"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["q_proj", "up_proj"]


def test_intruder_map_puts_unindexed_matrices_in_their_own_row(report_with_head):
    ax = plot_intruder_map(report_with_head)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2", "other"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["q_proj", "up_proj", "lm_head"]
    assert len(ax.texts) == 7  # six layer cells and lm_head; the empty cells stay blank


def test_intruders_per_layer(report, report_with_head):
    ax = plot_intruders_per_layer(report)
    _labelled(ax)
    assert len(ax.patches) == 3 * 2  # 3 layers × 2 module kinds
    tops = [max(p.get_y() + p.get_height() for p in ax.patches if abs(p.get_x() + p.get_width() / 2 - i) < 0.01)
            for i in range(3)]
    assert tops == [1, 3, 5]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["q_proj", "up_proj"]
    assert len(plot_intruders_per_layer(report_with_head).patches) == 4 * 3


def test_threshold_sweep(report):
    ax = plot_threshold_sweep(report)
    _labelled(ax)
    curve, marker = ax.lines  # the counts and the analysis ε
    assert len(curve.get_xdata()) == 19
    # planted intruders have max |cos| 0.25, the rest 1: none below 0.25, all nine up to 0.95
    assert curve.get_ydata()[0] == 0 and curve.get_ydata()[-1] == 9
    two = plot_threshold_sweep([report, _report(offset=1)], thresholds=[0.2, 0.5], labels=["a", "b"])
    assert len(two.lines) == 3
    assert [t.get_text() for t in two.get_legend().get_texts()][:2] == ["a", "b"]
    assert list(two.lines[1].get_ydata()) == [0, 15]


def test_effective_rank_one_report(report, report_with_head):
    ax = plot_effective_rank(report)
    _labelled(ax)
    assert len(ax.lines) == 2  # one per module kind
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [lr.delta_effective_rank for lr in report.layers[::2]])
    assert "not shown" in plot_effective_rank(report_with_head).get_title()


def test_effective_rank_several_reports(report):
    other = _report(offset=1)
    ax = plot_effective_rank([report, other], labels=["r=8", "full"])
    _labelled(ax)
    assert len(ax.lines) == 2
    first = [np.mean([lr.delta_effective_rank for lr in report.layers[2 * i: 2 * i + 2]]) for i in range(3)]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), first)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["r=8", "full"]


def test_different_bases_warn_and_name_the_base(report):
    other = dataclasses.replace(report, base="other-base")
    with pytest.warns(UserWarning, match="different base"):
        ax = plot_effective_rank([report, other])
    assert "other-base" in ax.get_legend().get_texts()[1].get_text()


def test_save_figure(report, tmp_path):
    ax = plot_intruder_map(report)
    paths = save_figure(ax, tmp_path / "figs" / "map.layer3")
    assert paths == [tmp_path / "figs" / "map.layer3.png", tmp_path / "figs" / "map.layer3.svg"]
    png, svg = paths
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000
    assert b"<svg" in svg.read_bytes()
    again = save_figure(ax.figure, tmp_path / "again", formats=("svg",))
    assert again[0].name == "again.svg" and b"<dc:date>" not in again[0].read_bytes()  # no timestamp
    with pytest.raises(ValueError, match="formats"):
        save_figure(ax, tmp_path / "x", formats=("nope",))
    with pytest.raises(TypeError):
        save_figure("not a figure", tmp_path / "x")


def test_an_interrupted_save_leaves_the_figure_that_was_there(report, tmp_path, monkeypatch):
    ax = plot_intruder_map(report)
    (png,) = save_figure(ax, tmp_path / "map", formats=("png",))
    before = png.read_bytes()

    def interrupted(path, **kw):
        Path(path).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(ax.figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_figure(ax, tmp_path / "map", formats=("png",))
    assert png.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["map.png"]


def test_empty_inputs_raise(report):
    empty = IntruderReport([], 0.5, 10, "left")
    for plot in (plot_intruder_map, plot_intruders_per_layer, plot_threshold_sweep, plot_effective_rank):
        with pytest.raises(ValueError, match="no analysed matrix"):
            plot(empty)
    with pytest.raises(ValueError, match="no report"):
        plot_threshold_sweep([])
    layer = report.layers[1]
    blank = dataclasses.replace(layer, base_singular_values=np.array([]), similarity=np.zeros((0, 0)))
    with pytest.raises(ValueError, match="base_singular_values is empty"):
        plot_spectrum(blank)
    with pytest.raises(ValueError, match="similarity is empty"):
        plot_similarity(blank)
    with pytest.raises(ValueError, match="labels"):
        plot_threshold_sweep([report, report], labels=["only one"])
    with pytest.raises(ValueError, match="layer index"):
        plot_effective_rank(IntruderReport([dataclasses.replace(layer, name="w")], 0.5, 10, "left"))


def _metrics(epochs: int = 2) -> list[dict]:
    """Trainer records: an eval per epoch (0 = before training), five train steps per epoch."""
    evals = [{"kind": "eval", "step": 5 * e, "epoch": e, "accuracy": 0.25 + 0.2 * e, "forget_loss": 3.0 + 0.1 * e}
             for e in range(epochs + 1)]
    train = [{"kind": "train", "step": s, "epoch": s / 5, "loss": 2.0 / s} for s in range(1, 5 * epochs + 1)]
    return evals + train


def test_training(tmp_path):
    ax = plot_training(_metrics())
    _labelled(ax)
    right = ax.figure.axes[-1]
    assert len(ax.figure.axes) == 2 and right.get_ylabel() == "loss (nats per token)"
    (accuracy,) = ax.lines
    np.testing.assert_allclose(accuracy.get_ydata(), [25, 45, 65])
    train, forget = right.lines
    assert len(train.get_xdata()) == 10 and list(forget.get_xdata()) == [0, 1, 2]
    np.testing.assert_allclose(forget.get_ydata(), [3.0, 3.1, 3.2])
    assert len(ax.get_legend().get_texts()) == 3
    assert ax.get_title() == "accuracy 25% → 65%, forgetting +0.20 nats"
    assert ax.get_ylim() == (0, 100) and right.get_ylim()[0] == 0
    png, svg = save_figure(ax, tmp_path / "training")
    assert png.stat().st_size > 1000 and svg.stat().st_size > 1000


def test_training_reads_a_run_or_a_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _metrics(3)))
    for source in (path, tmp_path, str(tmp_path), TrainingRun(tmp_path, {}, _metrics(3), None, [])):
        assert len(plot_training(source).lines[0].get_xdata()) == 4
    only_train = [r for r in _metrics() if r["kind"] == "train"]
    ax = plot_training(only_train)
    assert not ax.lines and len(ax.figure.axes[-1].lines) == 1
    assert ax.get_title() == "learning and forgetting"


def test_training_without_records_raises(tmp_path):
    with pytest.raises(ValueError, match="no training loss, accuracy or general-text loss"):
        plot_training([{"kind": "other", "epoch": 1}, {"kind": "eval", "epoch": 0, "perplexity": 20.0}])
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        plot_training(TrainingRun(tmp_path, {}, None, None, []))


def test_intruders_by_epoch(report):
    later = _report(offset=1)
    ax = plot_intruders_by_epoch([report, later], [1, 2], thresholds=[0.2, 0.5])
    _labelled(ax)
    below_planted, at_half = ax.lines  # planted intruders have max |cos| 0.25
    assert list(below_planted.get_ydata()) == [0, 0] and list(at_half.get_ydata()) == [9, 15]
    assert list(at_half.get_xdata()) == [1, 2]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ε = 0.2", "ε = 0.5"]
    assert ax.get_xlim()[0] < 0  # epoch 0 in view, as in plot_training
    assert len(plot_intruders_by_epoch([report, later]).lines) == 1  # the analysis ε
    with pytest.raises(ValueError, match="3 epochs for 2 reports"):
        plot_intruders_by_epoch([report, later], [1, 2, 3])
    with pytest.raises(ValueError, match="no analysed matrix"):
        plot_intruders_by_epoch([IntruderReport([], 0.5, 10, "left")])
