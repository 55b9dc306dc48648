"""open_weights over every source form, and the clear errors bad input gets."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from intruder import IntruderError, find_intruders, open_weights
from intruder.errors import (
    CorruptWeightsError,
    NoCommonTensorsError,
    NonFiniteError,
    OfflineError,
    ShapeMismatchError,
    WeightsNotFoundError,
)
from tests.conftest import save_model_dir


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {"model.a.weight": torch.randn(12, 8, generator=g), "model.b.weight": torch.randn(8, 12, generator=g),
            "model.norm.weight": torch.randn(8, generator=g)}


def tiny_llama():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def check(weights, tensors):
    assert sorted(weights.keys()) == sorted(tensors)
    for name, value in tensors.items():
        assert weights.shape(name) == tuple(value.shape)
        assert torch.equal(weights.get(name), value)


@pytest.mark.parametrize("shards", [1, 2])
def test_safetensors_directory(tmp_path, tensors, shards):
    with open_weights(save_model_dir(tmp_path / "m", tensors, shards=shards)) as weights:
        check(weights, tensors)
        assert weights.fingerprint("model.a.weight")


def test_single_files_and_bin_checkpoints(tmp_path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "w.safetensors")
    torch.save(tensors, tmp_path / "w.bin")
    (tmp_path / "bin").mkdir()
    torch.save(tensors, tmp_path / "bin" / "pytorch_model.bin")
    for source in [tmp_path / "w.safetensors", tmp_path / "w.bin", tmp_path / "bin", str(tmp_path / "bin")]:
        with open_weights(source) as weights:
            check(weights, tensors)


def test_state_dict_and_module(tensors):
    check(open_weights(tensors), tensors)
    model = tiny_llama()
    weights = open_weights(model)
    assert "model.layers.0.self_attn.q_proj.weight" in weights
    assert torch.equal(weights.get("lm_head.weight"), model.lm_head.weight)


def test_a_hugging_face_model_saved_with_save_pretrained(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "llama")
    with open_weights(tmp_path / "llama") as weights:
        down = weights.get("model.layers.1.mlp.down_proj.weight")
        assert torch.equal(down, model.model.layers[1].mlp.down_proj.weight)


def test_find_intruders_leaves_the_callers_tensors_alone(tensors):
    base = {k: v.double() for k, v in tensors.items()}
    tuned = {k: v + 1 for k, v in base.items()}
    before = {k: v.clone() for k, v in base.items()}
    find_intruders(base, tuned, progress=False)
    assert all(torch.equal(base[k], before[k]) for k in base)


def test_missing_path(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        open_weights(tmp_path / "nope")
    with pytest.raises(WeightsNotFoundError, match="holds no model weights"):
        open_weights(tmp_path)


def test_a_hub_id_while_offline_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OfflineError, match="'some-org/some-model' cannot be downloaded.*local directory"):
        open_weights("some-org/some-model")
    with pytest.raises(OfflineError) as info:  # a mistyped local folder looks like a hub id
        open_weights("fx/basee")
    assert str(info.value).startswith(f"no local path fx/basee (relative to {tmp_path}), and 'fx/basee' cannot")


@pytest.mark.parametrize("cut", [4, 100, -20])
def test_truncated_safetensors(tmp_path, tensors, cut):
    path = save_model_dir(tmp_path / "m", tensors) / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(CorruptWeightsError, match="model.safetensors"):
        with open_weights(path.parent) as weights:
            for name in weights.keys():
                weights.get(name)


def test_garbage_bin(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptWeightsError, match="pytorch_model.bin"):
        open_weights(tmp_path)


def test_no_tensor_in_common(tensors):
    other = {"transformer.h.0.weight": torch.randn(4, 4)}
    with pytest.raises(NoCommonTensorsError, match="no 2-D tensor in common"):
        find_intruders(tensors, other, progress=False)


def test_identical_models(tensors):
    with pytest.raises(NoCommonTensorsError, match="identical"):
        find_intruders(tensors, dict(tensors), progress=False)


def test_shape_mismatch_names_both_shapes(tensors):
    tuned = dict(tensors, **{"model.a.weight": torch.randn(12, 9)})
    with pytest.raises(ShapeMismatchError, match=r"model\.a\.weight.*\(12, 8\).*\(12, 9\)"):
        find_intruders(tensors, tuned, progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_tensor(tensors, bad):
    tuned = {k: v.clone() for k, v in tensors.items()}
    tuned["model.b.weight"][3, 4] = bad
    with pytest.raises(NonFiniteError, match="model.b.weight"):
        find_intruders(tensors, tuned, progress=False)
    with pytest.raises(NonFiniteError, match="model.b.weight"):
        find_intruders(tuned, tensors, progress=False)


def test_unknown_source_type():
    with pytest.raises(IntruderError, match="cannot open weights from a int"):
        open_weights(3)


class _RunsCode:
    """Pickles as a call to os.system: a checkpoint holding it runs a shell command when unpickled freely."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def test_a_bin_whose_pickle_would_run_code_is_refused_and_the_code_never_runs(tmp_path, tensors, capsys):
    import shlex

    from intruder.cli import main
    from intruder.synthetic import random_adapter

    marker = tmp_path / "the-code-ran"
    payload = dict(tensors, extra=_RunsCode(f"touch {shlex.quote(str(marker))}"))
    (tmp_path / "model").mkdir()
    torch.save(payload, tmp_path / "model" / "pytorch_model.bin")
    torch.save(payload, tmp_path / "w.bin")
    adapter = random_adapter(tensors, tmp_path / "adapter", rank=2, targets=("a",))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(payload, adapter / "adapter_model.bin")
    for source in (tmp_path / "w.bin", tmp_path / "model"):
        with pytest.raises(CorruptWeightsError, match=r"(?s)weights_only=True .*pickled code: re-save it as safet"):
            open_weights(source)
        with pytest.raises(CorruptWeightsError, match="weights_only=True"):
            find_intruders(tensors, source, progress=False)
    with pytest.raises(CorruptWeightsError, match="adapter_model.bin"):
        find_intruders(tensors, adapter, progress=False)
    assert main(["analyze", str(tmp_path / "model"), str(tmp_path / "w.bin"), "--quiet"]) == 2
    assert "pytorch_model.bin" in capsys.readouterr().err
    assert not marker.exists()  # refused before anything in the pickle was called
    torch.load(tmp_path / "w.bin", weights_only=False)  # what a free unpickling would have done
    assert marker.exists()
