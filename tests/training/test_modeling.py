"""Loading a causal LM for training: clear errors for directories transformers would fail on obscurely."""

import json
import shutil

import pytest

from intruder import IntruderError
from intruder.training.modeling import load_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja")


@pytest.mark.parametrize("model", ["tiny_lm", "tiny_llama"])  # transformers: a 5-token Gemma tokenizer; an error
def test_a_model_folder_without_tokenizer_files_says_so(request, model, tmp_path):
    source = request.getfixturevalue(model)
    bare = shutil.copytree(source, tmp_path / "bare", ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    with pytest.raises(IntruderError, match=r"no tokenizer files in .*bare") as info:
        load_model(bare)
    message = str(info.value)
    assert message.startswith("no tokenizer files in") and "tokenizer.json" in message and "\n" not in message


def test_a_stale_gguf_quantization_config_over_dense_weights_is_dropped(tiny_lm, tmp_path):
    """transformers writes `quantization_config: gguf` into config.json after loading a .gguf; over dense
    safetensors it would make save_pretrained refuse the model after a whole epoch of full fine-tuning."""
    model_dir = shutil.copytree(tiny_lm, tmp_path / "from-gguf")
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf"}
    (model_dir / "config.json").write_text(json.dumps(config))
    model, _, _ = load_model(model_dir)
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())


def test_a_mistyped_model_path_says_no_such_local_path(tmp_path, monkeypatch):
    from intruder.errors import OfflineError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(OfflineError, match=r"^no local path fx/basee \(relative to .*\), and 'fx/basee' cannot"):
        load_model("fx/basee")


def test_a_weights_file_or_an_adapter_is_not_a_model(tiny_lm, tmp_path):
    with pytest.raises(IntruderError, match=r"model.safetensors is a file, not a model.*directory that holds it"):
        load_model(tiny_lm / "model.safetensors")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(IntruderError, match="is a LoRA adapter, not a model"):
        load_model(tmp_path / "adapter")
