"""The analysis of many matrices side by side: the same report whatever the number of workers and blocks, the
first failure in order, and the float64 products of matrices converted a block at a time."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import intruder.analysis.projection as projection
import intruder.analysis.spectra as spectra
from intruder import IntruderError, find_intruders
from intruder.analysis._runtime import worker_count
from intruder.analysis.intruders import check_workers
from intruder.analysis.spectra import base_factors
from intruder.synthetic import random_adapter, random_base


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base of 2 layers x 7 projections whose small side (160) takes the structured solver, an r = 4 adapter,
    and the same adapter with a NaN in two of its B factors."""
    root = tmp_path_factory.mktemp("models")
    base = random_base(root / "base", n_layers=2, hidden=160, intermediate=320)
    adapter = random_adapter(base, root / "adapter", rank=4, alpha=8)
    bad = random_adapter(base, root / "bad", rank=4, alpha=8)
    tensors = load_file(bad / "adapter_model.safetensors")
    for layer, module in (("0", "mlp.up_proj"), ("1", "mlp.down_proj")):
        tensors[f"base_model.model.model.layers.{layer}.{module}.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    return base, adapter, bad


def _report(base, tuned, cache, workers, **kw):
    report = json.loads(find_intruders(base, tuned, cache_dir=cache, progress=False, workers=workers, **kw).to_json())
    report.pop("meta")
    return report


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_write_the_report_one_worker_writes(models, tmp_path, workers):
    base, adapter, _ = models
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker decomposes with every thread: one here, as each of several does
    try:
        one = _report(base, adapter, tmp_path / "c1", 1)
    finally:
        torch.set_num_threads(before)
    cold = _report(base, adapter, tmp_path / f"c{workers}", workers)  # decompositions side by side
    warm = _report(base, adapter, tmp_path / f"c{workers}", workers)
    assert json.dumps(one) == json.dumps(cold) == json.dumps(warm)  # every number, every name, in order
    assert len(one["layers"]) == 14


def test_the_first_failure_in_order_is_raised_naming_its_tensor(models, tmp_path):
    base, _, bad = models
    with pytest.raises(IntruderError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' .* NaN/Inf"):
        find_intruders(base, bad, cache_dir=tmp_path / "c", progress=False, workers=3)


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_a_bad_number_of_workers_is_refused_before_any_work(models, tmp_path, workers):
    base, adapter, _ = models
    with pytest.raises(IntruderError, match=r"workers=.*positive whole number"):
        find_intruders(base, adapter, cache_dir=tmp_path / "c", progress=False, workers=workers)
    assert not (tmp_path / "c").exists()


def test_workers_are_capped_by_the_matrices_and_one_on_a_gpu():
    assert worker_count(torch.device("cpu"), 3, 8) == 3
    assert worker_count(torch.device("cpu"), 100, 1) == 1
    assert worker_count(torch.device("cpu"), 100) == min(torch.get_num_threads(), 8)
    assert worker_count(torch.device("cuda"), 100, 4) == 1
    with pytest.raises(IntruderError, match="a GPU analyses one matrix at a time"):
        check_workers(2, "cuda")


def test_progress_counts_every_matrix_once(models, tmp_path):
    base, adapter, _ = models
    counts = []
    names = [n for n in load_file(base / "model.safetensors") if "proj" in n]
    results, unchanged = projection.analyse_all(
        names, *_opened(base, adapter), 10, 0.5, "left", torch.device("cpu"), None, counts.append, workers=2)
    assert sum(counts) == len(names) == len(results) + len(unchanged)


def _opened(base, adapter):
    from intruder import open_weights

    b = open_weights(base)
    return b, open_weights(adapter, base=b)


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_of_a_matrix_converted_a_block_at_a_time_are_float64_exact(left, dtype):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(70, 130, generator=g).to(dtype)
    w0 = w0 if left else w0.T.contiguous()  # the small side is its rows, or its columns
    ro = torch.randn(5, 130, generator=g, dtype=torch.float64)
    block = torch.empty(3 * w0.shape[1], dtype=torch.float64).view(3, w0.shape[1])  # 3 rows at a time
    wide = w0.to(torch.float64)
    expected = ro @ (wide.T if left else wide)
    np.testing.assert_allclose(projection._times_base(ro, w0, left, block), expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape", [(40, 300), (300, 40)])
def test_base_factors_of_a_matrix_summed_in_blocks(shape, monkeypatch):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    whole = base_factors(w.to(torch.float64))
    monkeypatch.setattr(spectra, "GRAM_BLOCK", 8 * 40 * 7)  # 7 rows or columns per block
    blocks = base_factors(w)  # float32 in, converted block by block
    np.testing.assert_allclose(blocks.sigma, whole.sigma, rtol=1e-12)
    np.testing.assert_allclose((blocks.basis.T @ whole.basis).abs().diagonal(), np.ones(40), atol=1e-8)
