import pytest
import torch

from intruder.spectra import default_cache_dir

# The user's cache, read before any test points INTRUDER_CACHE elsewhere: real-model tests convert Gemma 3
# 270M into it once (about two minutes), as the demo and the benchmark do.
USER_CACHE = default_cache_dir()


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """Every test: a fixed seed, its own factor cache, and no way to reach a model hub."""
    torch.manual_seed(0)
    monkeypatch.setenv("INTRUDER_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def seed() -> int:
    return 0


def save_model_dir(path, tensors: dict, *, shards: int = 1):
    """Write `tensors` as a Hugging Face style safetensors checkpoint, optionally sharded with an index."""
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, path / "model.safetensors")
        return path
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, path / file)
        weight_map.update({k: file for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path
