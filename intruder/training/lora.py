"""Minimal LoRA layers for the bundled trainer, saved in PEFT's adapter format.

A wrapped `nn.Linear` computes  y = W x + s · B (A dropout(x)),  A (r, in), B (out, r), s = α/r (α/√r with
rsLoRA); an `nn.Embedding` adds  s · (B A)ᵀ[ids]  with A (r, vocab), B (dim, r). Initialisation and the
order of operations follow PEFT, so `peft.PeftModel.from_pretrained` on a saved adapter gives the same logits,
and `intruder.find_intruders(base, adapter_dir)` merges it exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IntruderError
from ..outputs import atomic_dir
from ..weights.safetensors import read_safetensors, write_safetensors

PRESETS = ("attention", "mlp", "all-linear")
_ATTENTION_PARENTS = ("attn", "attention")
_MLP_PARENTS = ("mlp", "feed_forward", "ffn")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how: rank r, scale α (s = α/r, or α/√r with rsLoRA), dropout on the LoRA input.

    targets: presets "attention", "mlp", "all-linear" (every linear layer but the output head), and/or
    module names such as "q_proj", "embed_tokens", "lm_head" or a full dotted path.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("all-linear",)
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise IntruderError(f"LoRA rank={self.rank!r}: must be a positive integer")
        if not self.alpha > 0:
            raise IntruderError(f"LoRA alpha={self.alpha!r}: must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise IntruderError(f"LoRA dropout={self.dropout!r}: must lie in [0, 1)")
        if not self.targets:
            raise IntruderError(f"LoRA targets: name at least one of {', '.join(PRESETS)} or a module name")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoraLinear(nn.Module):
    """`base` (out, in) frozen, plus trainable A (r, in) and B (out, r); B starts at zero, so ΔW = 0."""

    def __init__(self, base: nn.Linear, spec: LoraSpec):
        super().__init__()
        self.base = base
        self.scaling = spec.scaling
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(spec.rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, spec.rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta(self) -> torch.Tensor:
        """ΔW (out, in) = s · B A."""
        return (self.lora_B @ self.lora_A) * self.scaling


class LoraEmbedding(nn.Module):
    """`base` (vocab, dim) frozen, plus A (r, vocab) starting at zero and B (dim, r) ~ N(0, 1), as in PEFT.

    Embeddings that scale their output (Gemma's `embed_scale`) scale the LoRA term too, as PEFT does.
    """

    def __init__(self, base: nn.Embedding, spec: LoraSpec):
        super().__init__()
        self.base = base
        self.scaling = spec.scaling
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_embedding_A = nn.Parameter(torch.zeros(spec.rank, base.num_embeddings, **kw))
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, spec.rank, **kw))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids (...) -> (..., dim)
        after_a = F.embedding(ids, self.lora_embedding_A.T, padding_idx=self.base.padding_idx)
        out = (after_a @ self.lora_embedding_B.T) * self.scaling
        scale = getattr(self.base, "embed_scale", None)
        if scale is not None:
            out = out * scale.to(out.dtype) if torch.is_tensor(scale) else out * scale
        return self.base(ids) + out

    def delta(self) -> torch.Tensor:
        """ΔW (vocab, dim) = s · (B A)ᵀ."""
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling


LoraLayer = LoraLinear | LoraEmbedding


def resolve_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Full module names of the layers `targets` select; an unknown name lists the ones that exist."""
    modules = dict(model.named_modules())
    head = _output_head_name(model)
    linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    chosen: set[str] = set()
    for target in targets:
        if target == "all-linear":
            found = [n for n in linear if n != head]
        elif target in ("attention", "mlp"):
            parents = _ATTENTION_PARENTS if target == "attention" else _MLP_PARENTS
            found = [n for n in linear if any(p in _parent(n) for p in parents)]
        else:
            found = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Embedding))
                     and (n == target or n.endswith("." + target))]
        if not found:
            raise IntruderError(f"LoRA target {target!r} matches no linear or embedding layer of the model; "
                                f"use a preset ({', '.join(PRESETS)}) or one of: {', '.join(_short_names(model))}")
        chosen.update(found)
    return [name for name in modules if name in chosen]  # in model order


def add_lora(model: nn.Module, spec: LoraSpec) -> dict[str, LoraLayer]:
    """Freeze every parameter of `model`, wrap the targeted layers in place, return them by module name."""
    names = resolve_targets(model, spec.targets)
    modules = dict(model.named_modules())
    for name in names:
        shape = tuple(modules[name].weight.shape)
        if spec.rank > min(shape):
            raise IntruderError(f"LoRA rank {spec.rank} exceeds layer {name} of shape {shape}; "
                                f"use a rank of at most {min(shape)}")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = LoraEmbedding(base, spec) if isinstance(base, nn.Embedding) else LoraLinear(base, spec)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names (`base_model.model.<module>.lora_A.weight`, ...)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in _lora_parameters(model).items()}


def save_adapter(model: nn.Module, spec: LoraSpec, out_dir, *, base_model: str = "") -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` to `out_dir` atomically (a temporary
    directory renamed into place), so an interrupted save never leaves a half-written adapter."""
    out_dir = Path(out_dir)
    layers = lora_layers(model)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.rslora,
        "target_modules": _config_targets(model, layers), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "use_dora": False, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
        "revision": None,
    }
    with atomic_dir(out_dir) as tmp:
        write_safetensors(tmp / ADAPTER_WEIGHTS, lora_state(model), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def load_adapter_state(model: nn.Module, adapter_dir) -> None:
    """Copy the tensors of a saved adapter back into the LoRA layers of `model` (for resuming a run)."""
    state, _ = read_safetensors(Path(adapter_dir) / ADAPTER_WEIGHTS)
    params = _lora_parameters(model)
    if set(state) != set(params):
        raise IntruderError(f"{adapter_dir}: adapter tensors do not match this run's LoRA layers; "
                            "resume with the settings the run was started with")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key])


def _lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable LoRA parameters by their PEFT key."""
    params = {}
    for name, layer in lora_layers(model).items():
        for attr, param in layer.named_parameters(recurse=False):
            suffix = ".weight" if attr in ("lora_A", "lora_B") else ""
            params[f"base_model.model.{name}.{attr}{suffix}"] = param
    return params


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The LoRA layers of a model prepared by `add_lora`, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraEmbedding))}


def _config_targets(model: nn.Module, layers: dict[str, LoraLayer]) -> list[str]:
    """Short names ("q_proj") when PEFT's suffix rule would select exactly these layers, else full names."""
    short = {name.rsplit(".", 1)[-1] for name in layers}
    others = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))
              and n not in layers and not any(n.startswith(w + ".") for w in layers)]
    clash = any(n.rsplit(".", 1)[-1] in short for n in others)
    return sorted(layers) if clash else sorted(short)


def _parent(name: str) -> str:
    """"model.layers.0.self_attn.q_proj" -> "self_attn"."""
    return name.rpartition(".")[0].rpartition(".")[2].lower()


def _output_head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def _short_names(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, (nn.Linear, nn.Embedding)) and n})
