"""Result objects: tables, files and notebook display, all from stored values."""

import csv
import json

import numpy as np
import pytest
import torch

from intruder import IntruderReport, find_intruders
from intruder.analysis.results import LayerResult
from intruder.synthetic import planted


@pytest.fixture
def report():
    base, tuned = {}, {}
    for i, shape in enumerate([(40, 60), (60, 40)]):
        w0, wt, _, _ = planted(*shape, n_intruders=i + 1, seed=i)
        base[f"model.layers.{i}.self_attn.q_proj.weight"] = w0
        tuned[f"model.layers.{i}.self_attn.q_proj.weight"] = wt
    return find_intruders(base, tuned, progress=False)


def test_fields(report):
    assert report.total == 3
    first = report.layers[0]
    assert first.name == "model.layers.0.self_attn.q_proj.weight"
    assert first.shape == (40, 60) and first.layer_index == 0 and first.module == "q_proj"
    assert first.indices == [0] and first.n_intruders == 1
    assert len(first.max_cos) == len(first.singular_values) == 10
    assert first.similarity.shape == (10, 40)
    assert np.all(np.diff(first.singular_values) <= 0)


def test_rows_csv_and_json_round_trip(report, tmp_path):
    rows = report.to_rows()
    assert [r["n_intruders"] for r in rows] == [1, 2]
    report.to_csv(tmp_path / "r.csv")
    with open(tmp_path / "r.csv") as f:
        assert [int(r["n_intruders"]) for r in csv.DictReader(f)] == [1, 2]
    report.to_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["total"] == 3
    back = IntruderReport.from_json(tmp_path / "r.json")
    assert back.total == report.total and back.counts_at([0.3, 0.9]) == report.counts_at([0.3, 0.9])
    for a, b in zip(back.layers, report.layers):
        np.testing.assert_array_equal(a.max_cos, b.max_cos)
        assert a.delta_effective_rank == pytest.approx(b.delta_effective_rank)


def test_text_and_html(report):
    text = report.summary()
    assert "model.layers.1.self_attn.q_proj.weight" in text and "total: 3 intruders" in text
    assert "total=3" in repr(report)
    assert "<table>" in report._repr_html_() and "3 intruders" in report._repr_html_()
    assert report["model.layers.1.self_attn.q_proj.weight"].n_intruders == 2
    with pytest.raises(KeyError):
        report["nope"]


def test_sides_recount_without_recomputation(report):
    assert report.counts_at([0.5], side="right") == {0.5: 3}
    assert report.counts_at([0.2], side="both") == {0.2: 0}


def test_pandas(report):
    import pandas as pd  # in the `test` extra: a missing pandas fails here rather than skipping

    frame = report.to_pandas()
    assert isinstance(frame, pd.DataFrame) and frame["n_intruders"].sum() == 3


def test_not_a_report(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an intruder report"):
        IntruderReport.from_json(tmp_path / "x.json")


def test_both_sides_flags_either():
    w0 = torch.randn(30, 40, dtype=torch.float64)
    report = find_intruders({"w": w0}, {"w": w0 * 2}, side="both", progress=False)
    assert report.total == 0  # a rescaled matrix keeps every direction


def layer_with(left, right, *, threshold=0.5, side="left") -> LayerResult:
    """A LayerResult holding exactly the cosines given: what the counts decide from, and nothing else."""
    left, right = np.asarray(left, dtype=np.float64), np.asarray(right, dtype=np.float64)
    k = len(left)
    return LayerResult(name="model.layers.0.mlp.up_proj.weight", shape=(64, 32), threshold=threshold, side=side,
                       update="low-rank", singular_values=np.linspace(3, 1, k), max_cos_left=left,
                       max_cos_right=right, best_match_left=np.arange(k), best_match_right=np.arange(k),
                       similarity=np.zeros((k, 4), dtype=np.float32), base_singular_values=np.ones(32),
                       delta_singular_values=np.ones(2))


BELOW = np.nextafter(0.5, 0)  # the largest double below 0.5


def test_a_cosine_exactly_at_the_threshold_is_not_an_intruder():
    # y_j is an intruder when max |cos| < ε, strictly: 0.5 at ε = 0.5 is not one, the double just below is
    layer = layer_with([0.5, BELOW, np.nextafter(0.5, 1), 0.9], [0.5, 0.5, BELOW, 0.9])
    assert layer.indices == [1] and layer.n_intruders == 1
    assert layer.count_at(0.5) == 1 and layer.count_at(0.5, side="right") == 1
    assert layer.count_at(0.5, side="both") == 2  # rows 1 and 2, each below on one side
    assert layer_with(layer.max_cos_left, layer.max_cos_right, side="right").indices == [2]
    assert layer_with(layer.max_cos_left, layer.max_cos_right, side="both").indices == [1, 2]
    report = IntruderReport([layer], 0.5, 4, "left")
    assert report.total == 1 and report.counts_at([0.5, np.nextafter(0.5, 1), 0.9]) == {
        0.5: 1, float(np.nextafter(0.5, 1)): 2, 0.9: 3}
    assert report.to_rows()[0]["n_intruders"] == 1 and report.to_rows()[0]["indices"] == "1"
    back = IntruderReport.from_json(report.to_json())  # the stored cosines decide the same way after a round trip
    assert back.total == 1 and back.layers[0].indices == [1]


def test_at_threshold_one_only_cosines_below_one_count():
    layer = layer_with([1.0, np.nextafter(1.0, 0), 1.0, 0.25], [1.0, 1.0, 1.0, 1.0], threshold=1.0)
    assert layer.indices == [1, 3] and layer.n_intruders == 2
    assert layer.count_at(1.0, side="right") == 0 and layer.count_at(1.0, side="both") == 2
    assert IntruderReport([layer], 1.0, 4, "left").counts_at([1.0]) == {1.0: 2}
