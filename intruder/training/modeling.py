"""Load a causal LM and its tokenizer for training or evaluation: a local directory, a hub id, a .gguf file,
or the default Gemma 3 270M."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import IntruderError, WeightsNotFoundError
from ..weights.hub import download, looks_like_hub_id
from ..weights.models import GEMMA_270M, gemma_270m_dir, gguf_dir

DEFAULT_MODEL = GEMMA_270M


def resolve_model(name: str | Path) -> Path:
    """The local Hugging Face directory `name` stands for; converts a .gguf once, downloads a hub id."""
    if str(name) == DEFAULT_MODEL:
        return gemma_270m_dir()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_dir(path)
    if path.is_file():
        raise IntruderError(f"{path} is a file, not a model: point --model at the Hugging Face model directory "
                            "that holds it (with config.json and the tokenizer files), a .gguf file or a hub id")
    if path.is_dir():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            raise IntruderError(f"{path} is a LoRA adapter, not a model: point --model at the model it was "
                                "trained on (adapter_config.json's base_model_name_or_path)")
        if not (path / "config.json").is_file():
            raise WeightsNotFoundError(f"{path} has no config.json; point --model at a Hugging Face model "
                                       "directory, a .gguf file or a hub id")
        return path
    if not path.exists() and looks_like_hub_id(str(name)):
        return download(str(name), patterns=("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"),
                        local_path=path)
    raise WeightsNotFoundError(f"model {name}: no such directory, .gguf file or hub id; pass a Hugging Face "
                               f"model directory, a .gguf file, a hub id, or {DEFAULT_MODEL!r}")


def load_model(name: str | Path, *, device: torch.device | str = "cpu"):
    """(model in float32 on `device`, tokenizer with a pad token, local model directory)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    _require_tokenizer(path)
    try:
        config = AutoConfig.from_pretrained(path)
        _drop_stale_gguf_quantization(config, path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise IntruderError(f"{path} cannot be loaded as a causal language model with its tokenizer: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer, path


# Files a tokenizer is built from: fast (tokenizer.json), SentencePiece, BPE/WordPiece vocabularies, tiktoken;
# tokenizer_config.json alone suffices for byte-level tokenizers (ByT5).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model", "tekken.json")


def _require_tokenizer(path: Path) -> None:
    """Refuse a model directory without tokenizer files before transformers guesses (for some architectures
    it builds an empty tokenizer of a handful of tokens; for others it blames sentencepiece or tiktoken)."""
    if any((path / name).is_file() for name in _TOKENIZER_FILES) or any(path.glob("*.tiktoken")):
        return
    raise IntruderError(f"no tokenizer files in {path} (none of {', '.join(_TOKENIZER_FILES)}): copy the "
                        "tokenizer files of the model it came from into that directory, e.g. with "
                        "AutoTokenizer.from_pretrained(original).save_pretrained(directory)")


def _drop_stale_gguf_quantization(config, path: Path) -> None:
    """Drop `quantization_config: gguf` from `config` when `path` holds dense safetensors weights.

    transformers writes that block into config.json when it saves a model loaded from a .gguf, whose weights it
    had already dequantised; left in place it attaches a GGUF quantizer, and save_pretrained refuses the model
    ("quantized with gguf and is not serializable") only after a whole epoch of full fine-tuning.
    """
    quantization = getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(
        quantization, "quant_method", None)
    dense = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    if dense and str(getattr(method, "value", method)).lower() == "gguf":
        del config.quantization_config
