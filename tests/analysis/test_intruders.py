"""find_intruders against planted ground truth and the brute-force reference (two float64 SVDs)."""

import re

import numpy as np
import pytest
import torch

from intruder import IntruderError, IntruderReport, effective_rank, find_intruders
from intruder.analysis._reference import brute_force
from intruder.synthetic import _hadamard, planted
from intruder.weights import LowRankUpdate, StateDictWeights
from tests.conftest import assert_cosines_match


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
        assert_cosines_match(layer, w0, wt, atol=1e-9)  # both sides, best matches, similarity


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
    gap = np.abs(np.diff(sigma.numpy())) / sigma.numpy()[0]
    clear = np.flatnonzero(np.r_[gap > 1e-3, True] & np.r_[True, gap > 1e-3])  # a clear spectral gap
    assert len(clear) >= 5
    assert_cosines_match(layer, w0, wt, rows=clear, atol=1e-6)


def test_dense_update_cosines_reach_base_vectors_past_the_first_128():
    """A full fine-tune that lifts weak base directions (numbers 150, 200 and 250 of 280) to the top: each such
    tuned vector is an old direction (max |cos| near 1, best match past 128), not an intruder."""
    g = torch.Generator().manual_seed(4)
    m, n = 320, 280
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = 10 * torch.arange(1, n + 1, dtype=torch.float64) ** -0.5  # gaps between the top values
    w0 = (u * s) @ v.T
    lifted = {150: 12.0, 200: 8.0, 250: 6.5}  # tuned σ between the base's 10, 7.07, 5.77, ...
    wt = w0 + 0.02 * torch.randn(m, n, generator=g, dtype=torch.float64) / n**0.5  # dense, full rank
    for i, sigma in lifted.items():
        wt += (sigma - s[i]) * torch.outer(u[:, i], v[:, i])
    layer = analyse(w0, wt)
    assert layer.update == "dense" and layer.n_intruders == 0
    assert layer.best_match_left[[0, 2, 4]].tolist() == list(lifted)
    assert layer.best_match_right[[0, 2, 4]].tolist() == list(lifted)
    assert layer.max_cos_left[[0, 2, 4]].min() > 0.99
    assert_cosines_match(layer, w0, wt, atol=1e-7)


def one_sided(m: int, n: int, *, left_new: int, right_new: int, seed: int = 0):
    """W_0 (m, n) and W_t whose top tuned vectors are new on one side only.

    Two blocks of 16 of W_0's weakest singular pairs: block A's left vectors are rotated by H/4 (a Hadamard
    matrix, every entry ±1/4) and its right vectors kept, block B the other way round; the first `left_new` of
    block A and `right_new` of block B are lifted to σ = 30, 29, ... So tuned vectors 0..left_new-1 have left
    max |cos| 1/4 and right max |cos| 1; the next `right_new` the reverse; every other top vector is W_0's own.
    Returns (w0, wt, left (m, 32), right (32, n), the base indices of block A and of block B), ΔW = left @ right.
    """
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))
    s = torch.linspace(10, 1, p, dtype=torch.float64)
    w0 = (u * s) @ v.T
    h = _hadamard(16) / 4
    a, b = torch.arange(p - 16, p), torch.arange(p - 32, p - 16)
    lifts = torch.arange(30, 30 - left_new - right_new, -1, dtype=torch.float64)
    ta, tb = s[a].clone(), s[b].clone()
    ta[:left_new], tb[:right_new] = lifts[:left_new], lifts[left_new:]
    core_a = h @ torch.diag(ta) - torch.diag(s[a])  # U_a (H diag(t_a)) V_aᵀ: left rotated, right kept
    core_b = torch.diag(tb) @ h.T - torch.diag(s[b])  # U_b (diag(t_b) Hᵀ) V_bᵀ: right rotated, left kept
    left = torch.cat([u[:, a] @ core_a, u[:, b] @ core_b], dim=1)
    right = torch.cat([v[:, a].T, v[:, b].T], dim=0)
    return w0, w0 + left @ right, left, right, a, b


@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (300, 420)])
@pytest.mark.parametrize("structured", [True, False], ids=["low-rank", "dense"])
def test_left_and_right_sides_can_disagree_and_both_flags_either(shape, structured):
    w0, wt, left, right, a, b = one_sided(*shape, left_new=2, right_new=1)
    expected = {"left": [0, 1], "right": [2], "both": [0, 1, 2]}
    for side, indices in expected.items():
        layer = analyse(w0, wt, (left, right) if structured else None, side=side)
        assert layer.indices == indices and layer.n_intruders == len(indices), side
        np.testing.assert_allclose(layer.max_cos_left, [0.25, 0.25] + [1.0] * 8, atol=1e-9)
        np.testing.assert_allclose(layer.max_cos_right, [1.0, 1.0, 0.25] + [1.0] * 7, atol=1e-9)
        assert layer.best_match_right[:2].tolist() == a[:2].tolist()  # new on the left, old on the right
        assert layer.best_match_left[2] == b[0]  # and the other way round
        assert_cosines_match(layer, w0, wt, atol=1e-9)
        report = IntruderReport([layer], 0.5, 10, side)
        # a recount on another side reads that side's stored cosines, whichever side was analysed
        assert report.counts_at([0.5], side="left") == {0.5: 2}
        assert report.counts_at([0.5], side="right") == {0.5: 1}
        assert report.counts_at([0.5], side="both") == {0.5: 3}
        assert report.counts_at([0.2, 0.3]) == {0.2: 0, 0.3: len(indices)}


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
