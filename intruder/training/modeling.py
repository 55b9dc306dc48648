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
    if path.is_file() and path.suffix == ".gguf":
        return gguf_dir(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsNotFoundError(f"{path} has no config.json; point --model at a Hugging Face model "
                                       "directory, a .gguf file or a hub id")
        return path
    if not path.exists() and looks_like_hub_id(str(name)):
        return download(str(name), patterns=("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"))
    raise WeightsNotFoundError(f"model {name}: no such directory, .gguf file or hub id; pass a Hugging Face "
                               f"model directory, a .gguf file, a hub id, or {DEFAULT_MODEL!r}")


def load_model(name: str | Path, *, device: torch.device | str = "cpu"):
    """(model in float32 on `device`, tokenizer with a pad token, local model directory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise IntruderError(f"{path} cannot be loaded as a causal language model with its tokenizer: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer, path
