"""Synthetic material: the stand-in base has the shapes and spectrum it promises."""

import torch

from intruder import open_weights
from intruder.synthetic import random_base


def test_random_base_shapes_and_spectrum(tmp_path):
    path = random_base(tmp_path / "base", n_layers=2, hidden=16, intermediate=24, decay=0.5)
    with open_weights(path) as weights:
        assert len(weights.keys()) == 2 * 7
        assert weights.shape("model.layers.1.mlp.up_proj.weight") == (24, 16)
        assert weights.shape("model.layers.1.mlp.down_proj.weight") == (16, 24)
        s = torch.linalg.svdvals(weights.get("model.layers.0.self_attn.q_proj.weight").double())
    torch.testing.assert_close(s, torch.arange(1, 17, dtype=torch.float64) ** -0.5, rtol=1e-5, atol=1e-6)
