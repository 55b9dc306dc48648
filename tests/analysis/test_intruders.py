"""find_intruders against planted ground truth and the brute-force reference (two float64 SVDs)."""

import re

import numpy as np
import pytest
import torch

from intruder import IntruderError, effective_rank, find_intruders
from intruder.analysis._reference import brute_force
from intruder.synthetic import planted
from intruder.weights import LowRankUpdate, StateDictWeights


class LowRankTuned(StateDictWeights):
    """A tuned model that exposes its update as factors, as a LoRA adapter does."""

    def __init__(self, base: dict, factors: dict):
        super().__init__({k: base[k] + (factors[k][0] @ factors[k][1] if k in factors else 0) for k in base})
        self.factors = factors

    def low_rank_update(self, name):
        return LowRankUpdate(*self.factors[name]) if name in self.factors else None

    def changed_keys(self):
        return set(self.factors)


def analyse(w0, wt, factors=None, **kw):
    kw.setdefault("progress", False)
    tuned = {"w": wt} if factors is None else LowRankTuned({"w": w0}, {"w": factors})
    return find_intruders({"w": w0}, tuned, **kw).layers[0]


SHAPES = [(64, 48), (48, 64), (60, 60), (400, 300), (300, 420)]  # the last two take the Lanczos path


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("structured", [True, False], ids=["low-rank", "dense"])
@pytest.mark.parametrize("rank", [None, 40], ids=["full-rank", "rank-deficient"])
def test_planted_intruders_are_found_exactly(shape, structured, rank):
    w0, wt, left, right = planted(*shape, n_intruders=3, rank=rank, seed=1)
    for side in ("left", "right", "both"):
        layer = analyse(w0, wt, (left, right) if structured else None, side=side)
        assert layer.n_intruders == 3
        assert layer.indices == [0, 1, 2]
        np.testing.assert_allclose(layer.max_cos, [0.25] * 3 + [1.0] * 7, atol=1e-9)
        np.testing.assert_allclose(layer.singular_values[:4], [30, 29, 28, 10], rtol=1e-12)
        ref, sigma = brute_force(w0, wt, 10, "right" if side == "right" else "left")
        np.testing.assert_allclose(layer.max_cos, ref.numpy(), atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_random_lora_update_matches_brute_force(shape, side):
    g = torch.Generator().manual_seed(sum(shape))
    m, n = shape
    w0 = torch.randn(m, n, generator=g, dtype=torch.float64) / n**0.5
    for r, strength in [(1, 4.0), (4, 2.0), (8, 0.7)]:
        b = torch.randn(m, r, generator=g, dtype=torch.float64) * strength / m**0.5
        a = torch.randn(r, n, generator=g, dtype=torch.float64)
        wt = w0 + b @ a
        ref, sigma = brute_force(w0, wt, 10, side)
        for factors in [(b, a), None]:
            layer = analyse(w0, wt, factors, side=side)
            np.testing.assert_allclose(layer.singular_values, sigma.numpy(), rtol=1e-10)
            assert layer.n_intruders == int((ref < 0.5).sum())
            gap = np.abs(np.diff(sigma.numpy())) / sigma.numpy()[0]
            clear = np.r_[gap > 1e-3, True] & np.r_[True, gap > 1e-3]  # vectors with a clear spectral gap
            np.testing.assert_allclose(layer.max_cos[clear], ref.numpy()[clear], atol=1e-4)


def test_dense_full_fine_tuning_update_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(320, 280, generator=g, dtype=torch.float64)
    wt = w0 + 0.8 * torch.randn(320, 280, generator=g, dtype=torch.float64)  # full-rank update
    layer = analyse(w0, wt)
    ref, sigma = brute_force(w0, wt)
    assert layer.update == "dense"
    assert layer.n_intruders == int((ref < 0.5).sum())
    np.testing.assert_allclose(layer.singular_values, sigma.numpy(), rtol=1e-10)
    delta_sigma = torch.linalg.svdvals(wt - w0).numpy()
    assert layer.delta_effective_rank == pytest.approx(effective_rank(delta_sigma), rel=1e-9)
    assert layer.delta_effective_rank > 150  # a full-rank update


def test_delta_metrics_of_a_lora_update():
    w0, wt, left, right = planted(50, 70, n_intruders=2)
    layer = analyse(w0, wt, (left, right))
    sigma = torch.linalg.svdvals(wt - w0)
    sigma = sigma[sigma > 1e-9]
    assert layer.delta_fro_norm == pytest.approx(float((wt - w0).norm()), rel=1e-10)
    assert layer.delta_effective_rank == pytest.approx(effective_rank(sigma), rel=1e-8)
    assert layer.delta_stable_rank == pytest.approx(float((sigma**2).sum() / sigma[0] ** 2), rel=1e-8)
    np.testing.assert_allclose(layer.base_singular_values, torch.linalg.svdvals(w0).numpy(), atol=1e-10)


def test_counts_at_other_thresholds_need_no_recomputation():
    g = torch.Generator().manual_seed(5)
    base = {f"layer.{i}.weight": torch.randn(40, 30, generator=g, dtype=torch.float64) for i in range(3)}
    tuned = {k: v + torch.randn(40, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 30, generator=g,
             dtype=torch.float64) for k, v in base.items()}
    report = find_intruders(base, tuned, progress=False)
    thresholds = [0.1, 0.3, 0.5, 0.7, 0.9]
    counts = report.counts_at(thresholds)
    assert list(counts) == thresholds
    assert counts[0.5] == report.total
    for t in thresholds:
        assert counts[t] == find_intruders(base, tuned, threshold=t, progress=False).total
    assert list(counts.values()) == sorted(counts.values())


def test_selection_order_and_unchanged_tensors():
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(20, 30, generator=g), "b.weight": torch.randn(30, 20, generator=g),
            "c.weight": torch.randn(16, 16, generator=g), "norm.weight": torch.randn(30, generator=g)}
    tuned = dict(base, **{"b.weight": base["b.weight"] * 1.5, "a.weight": base["a.weight"] + 0.1})
    report = find_intruders(base, tuned, progress=False)
    assert [lr.name for lr in report.layers] == ["a.weight", "b.weight"]  # checkpoint order, 2-D only
    assert report.unchanged == ["c.weight"]
    assert [lr.name for lr in find_intruders(base, tuned, layers="^b", progress=False).layers] == ["b.weight"]
    assert [lr.name for lr in find_intruders(base, tuned, layers=["b.weight"], progress=False).layers] == [
        "b.weight"]
    report = find_intruders(base, tuned, top_k=50, progress=False)  # k is capped by min(m, n)
    assert len(report["a.weight"].max_cos) == 20


def test_bad_options_are_refused():
    w = {"w": torch.randn(8, 8)}
    for kw in [{"side": "up"}, {"threshold": 0.0}, {"threshold": 1.5}, {"top_k": 0}]:
        with pytest.raises(IntruderError, match=list(kw)[0]):
            find_intruders(w, w, progress=False, **kw)


@pytest.mark.parametrize("kw, message", [
    ({"threshold": "abc"}, "threshold='abc' is a str: give a number in (0, 1]"),
    ({"threshold": True}, "threshold=True is a bool"),
    ({"threshold": float("nan")}, "threshold=nan: a cosine threshold must lie in (0, 1]"),
    ({"top_k": True}, "top_k=True"),
    ({"top_k": 2.5}, "top_k=2.5"),
    ({"layers": "("}, "layers='(' is not a valid regular expression"),
    ({"device": "foo"}, "device='foo' is not a torch device"),
    ({"device": "meta"}, "on 'cpu' or 'cuda' only"),
])
def test_options_of_the_wrong_kind_are_refused_with_what_to_do(kw, message):
    w = torch.randn(8, 8)
    with pytest.raises(IntruderError, match=re.escape(message)):
        find_intruders({"w": w}, {"w": w + 1}, progress=False, cache_dir=False, **kw)


def test_cuda_on_a_cpu_only_torch_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    w = torch.randn(8, 8)
    for device in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(IntruderError, match="sees no CUDA GPU; leave the device out"):
            find_intruders({"w": w}, {"w": w + 1}, progress=False, cache_dir=False, device=device)


def test_effective_rank_known_values():
    assert effective_rank(torch.eye(7)) == pytest.approx(7)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1)
    assert effective_rank(np.ones(5)) == pytest.approx(5)
    assert effective_rank(torch.zeros(4)) == 0.0
    rank2 = torch.randn(30, 2, dtype=torch.float64) @ torch.randn(2, 40, dtype=torch.float64)
    assert 1 < effective_rank(rank2) <= 2 + 1e-9
    with pytest.raises(ValueError):
        effective_rank(torch.tensor([1.0, -1.0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    w0, wt, left, right = planted(300, 500, n_intruders=4)
    cpu = analyse(w0, wt, (left, right))
    gpu = analyse(w0, wt, (left, right), device="cuda")
    np.testing.assert_allclose(gpu.max_cos, cpu.max_cos, atol=1e-8)


def test_top_k_close_to_the_matrix_size_on_the_lanczos_path():
    w0, wt, left, right = planted(200, 160, n_intruders=2)
    layer = analyse(w0, wt, (left, right), top_k=159)
    ref, _ = brute_force(w0, wt, 159)
    assert layer.n_intruders == int((ref < 0.5).sum())
