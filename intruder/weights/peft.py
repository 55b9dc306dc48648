"""A PEFT LoRA adapter merged lazily over its base model, one tensor at a time.

`AdapterWeights(adapter_dir, base=...)` checks `adapter_config.json` (`peft_config.py`) and the shapes of the
LoRA factors, then serves the merged model with PEFT's `merge_and_unload` semantics (PEFT 0.21,
`peft/tuners/lora/`), reading each module's factors when it is used:

- ΔW = s · B @ A, B (out, r), A (r, in), s = α/r, or α/√r with `use_rslora`; r and α per module from
  `rank_pattern` / `alpha_pattern` (PEFT's `get_pattern_key` matching).
- `fan_in_fan_out` (GPT-2 `Conv1D`): the base stores W as (in, out), so ΔW is added transposed.
- Embeddings: `lora_embedding_A` (r, num_embeddings), `lora_embedding_B` (dim, r), ΔW = s · (B @ A)ᵀ.
- DoRA: W' = (m / ‖W + ΔW‖ per output unit) · (W + ΔW), the norm taken over the input axis; for embeddings
  "output unit" is the embedding dimension (a column of the stored (num_embeddings, dim) matrix).
- `lora_bias`: b' = b + s · lora_B.bias.
- Full tensors saved with the adapter (`modules_to_save`, `bias="all"`/`"lora_only"`, saved embedding layers
  `<module>.base_layer.weight`) replace the base tensor before any LoRA update is added.

Everything is computed in float64. Adapters whose merge this module cannot reproduce exactly are refused
with an `AdapterError` naming the config field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AdapterError, OfflineError, ShapeMismatchError, WeightsNotFoundError
from .base import LowRankUpdate, Weights
from .hub import looks_like_hub_id
from .peft_config import check_config, check_rank, check_rank_fields, is_number, per_module, read_config
from .safetensors import SafetensorsWeights
from .torch_bin import TorchBinWeights

_PEFT_PREFIX = "base_model.model."
_FACTOR_SUFFIXES = {  # checkpoint key suffix -> (_LoraModule field, embedding layer?)
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_B.bias": ("bias", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
    ".lora_magnitude_vector": ("magnitude", None),
}
# State of LoRA variants whose merge is plain LoRA (PEFT variants.py: VeLoRA, MonteCLoRA): not part of ΔW.
_IGNORED_PARTS = (".lora_velora_embed", ".lora_monteclora_sampler.")


@dataclass(frozen=True)
class _Stored:
    """One tensor of the adapter file, read when it is used: an analysis holds one module's factors at a time,
    not the whole adapter (88 MB at r = 64 on Gemma 3 270M, GBs on a 7B model)."""

    file: Weights
    key: str
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def read(self) -> torch.Tensor:
        """The tensor, in float64."""
        return self.file.get(self.key).double()


@dataclass
class _LoraModule:
    """The LoRA factors of one adapted module; `path` is PEFT's module name, e.g. `model.layers.0.mlp.fc1`."""

    path: str
    embedding: bool = False
    A: _Stored | None = None  # (r, in)
    B: _Stored | None = None  # (out, r)
    bias: _Stored | None = None  # (out,) lora_B.bias
    magnitude: _Stored | None = None  # (out,) DoRA's m
    scale: float = 1.0
    weight_key: str = ""  # the base tensor it updates
    bias_key: str | None = None
    transposed: bool = False  # the base stores W as (in, out): fan_in_fan_out, or an embedding


class AdapterWeights(Weights):
    """A PEFT LoRA adapter directory, read as the merged model it defines over `base`.

    path: the adapter directory (`adapter_config.json` and `adapter_model.safetensors` or `.bin`).
    base: the model it was trained on, anything `open_weights` accepts; defaults to the config's
        `base_model_name_or_path`.
    residual_base: set True when `base` is the residual model a PiSSA / OLoRA / CorDA / LoftQ / LoRA-GA
        adapter was trained against (those inits subtract their factors from the base); requires `base`.
    """

    def __init__(self, path: Path, base=None, *, residual_base: bool = False):
        from . import open_weights  # the dispatcher sits above the readers

        self.path = Path(path)
        self.source = str(path)
        self.config = config = read_config(self.path)  # as saved: the checks below only read it
        if residual_base and base is None:
            raise AdapterError(
                "residual_base=True needs base=: the residual model the adapter was trained on"
            )
        check_config(config, self.path, residual_base=residual_base)
        self._file = _open_adapter_file(self.path)  # before the base, which may be a download
        check_rank_fields(config, self.path, self._file)
        self._owns_base = not isinstance(base, Weights)
        self._base = open_weights(base) if base is not None else _open_default_base(config, self.path)
        self._base_keys = self._base.keys()
        self._base_key_set = set(self._base_keys)
        self._heads = {k.split(".", 1)[0] for k in self._base_keys if "." in k}
        self._untouched: dict[str, bool] = {}  # replaced tensor equals the base's? (see _base_kept)
        self._replaced: dict[str, str] = {}  # base key -> adapter key of a full tensor that replaces it
        modules, self._replaced = self._parse(self._file)
        self._by_weight: dict[str, _LoraModule] = {}
        self._by_bias: dict[str, _LoraModule] = {}
        self._bind_all(modules, config)

    # -- reading the checkpoint ------------------------------------------------------------------------------

    def _parse(self, file: Weights) -> tuple[list[_LoraModule], dict[str, str]]:
        """Read the LoRA factors of each module (as stored); note the full tensors that replace base tensors."""
        modules: dict[str, _LoraModule] = {}
        replaced: dict[str, str] = {}
        unknown = []
        for key in file.keys():
            name = key.removeprefix(_PEFT_PREFIX)
            suffix = next((s for s in _FACTOR_SUFFIXES if name.endswith(s)), None)
            if suffix is not None:
                field, embedding = _FACTOR_SUFFIXES[suffix]
                path = name[: -len(suffix)]
                module = modules.setdefault(path, _LoraModule(path))
                setattr(module, field, _Stored(file, key, tuple(file.shape(key))))
                module.embedding = module.embedding or bool(embedding)
            elif any(part in name for part in _IGNORED_PARTS):
                continue
            elif ".lora_" in name or "token_adapter." in name or name.startswith("lora_"):
                unknown.append(key)
            else:  # modules_to_save, trained biases, saved embedding layers (`<module>.base_layer.weight`)
                full = name.replace(".base_layer.", ".")
                replaced[self._resolve(full) or full] = key
        if unknown:
            raise AdapterError(
                f"{self.path}: {len(unknown)} adapter tensors of a kind this reader does not know, e.g. "
                f"{', '.join(unknown[:4])}; only plain LoRA, DoRA and modules_to_save adapters can be merged"
            )
        return list(modules.values()), replaced

    def _resolve(self, key: str) -> str | None:
        """The base key for an adapter module's `key`, allowing one leading component to differ, as
        transformers does when it loads a checkpoint saved with or without `base_model_prefix`."""
        known = self._base_key_set
        if key in known or key in self._replaced:
            return key
        rest = key.partition(".")[2]
        if rest in known:
            return rest
        return next((f"{head}.{key}" for head in sorted(self._heads) if f"{head}.{key}" in known), None)

    def _bind_all(self, modules: list[_LoraModule], config: dict) -> None:
        """Resolve every module to its base tensor, then check ranks and shapes against the config."""
        unmatched = []
        for module in modules:
            module.weight_key = self._resolve(f"{module.path}.weight") or ""
            if not module.weight_key:
                unmatched.append(f"{module.path}.weight")
        if unmatched:
            raise AdapterError(
                f"{self.path}: {len(unmatched)} adapted modules match no tensor of the base "
                f"{self._base.source}, e.g. {', '.join(unmatched[:3])}; the base has "
                f"{', '.join(self._base_keys[:3])}, ...: pass the base model the adapter was trained on "
                "(base=...)"
            )
        for module in modules:
            self._bind(module, config)
            self._by_weight[module.weight_key] = module
            if module.bias_key is not None:
                self._by_bias[module.bias_key] = module

    def _bind(self, module: _LoraModule, config: dict) -> None:
        """Set the module's scale and orientation; raise if its factors disagree with the config or base."""
        where = f"{self.path}: module {module.path!r}"
        if module.A is None or module.B is None:
            raise AdapterError(
                f"{where} has only one of its LoRA factors A and B: the adapter file is incomplete"
            )
        if module.A.ndim != 2 or module.B.ndim != 2:
            raise AdapterError(
                f"{where} has LoRA factors of shape {tuple(module.A.shape)}: convolution LoRA "
                "layers are not supported"
            )
        r, r_field = per_module(config, "rank_pattern", "r", module.path)
        alpha, alpha_field = per_module(config, "alpha_pattern", "lora_alpha", module.path)
        check_rank(r, r_field, self.path)
        if not is_number(alpha):
            raise AdapterError(f"{self.path / 'adapter_config.json'}: `{alpha_field}` is {alpha!r}; LoRA's α "
                               "must be a number: fix adapter_config.json")
        if module.A.shape[0] != r or module.B.shape[1] != r:
            raise AdapterError(
                f"{where}: adapter_config.json gives r={r} (from `{r_field}`) but lora_A has shape "
                f"{tuple(module.A.shape)} and lora_B {tuple(module.B.shape)}: fix the config or the weights"
            )
        module.scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        module.transposed = self._orientation(module, bool(config.get("fan_in_fan_out")))
        out = module.B.shape[0]
        if bool(config.get("use_dora")) != (module.magnitude is not None):
            raise AdapterError(
                f"{where}: `use_dora` is {bool(config.get('use_dora'))} in adapter_config.json "
                "but the weights disagree about lora_magnitude_vector"
            )
        if module.magnitude is not None and tuple(module.magnitude.shape) != (out,):
            raise ShapeMismatchError(
                f"{where}: lora_magnitude_vector has shape {tuple(module.magnitude.shape)}, "
                f"expected ({out},) for a weight of shape {self.shape(module.weight_key)}"
            )
        if module.bias is not None:
            self._bind_bias(module, out, where)

    def _orientation(self, module: _LoraModule, fan_in_fan_out: bool) -> bool:
        """True when the stored base weight is ΔW transposed: (in, out) for fan_in_fan_out, and always for
        embeddings. PEFT picks fan_in_fan_out per layer type, so a non-square weight decides by its shape."""
        out, inp = module.B.shape[0], module.A.shape[1]
        shape = self.shape(module.weight_key)
        fits, fits_transposed = shape == (out, inp), shape == (inp, out)
        if module.embedding:
            fits, fan_in_fan_out = False, True
        if not (fits or fits_transposed):
            expected = f"({inp}, {out})" if module.embedding else f"({out}, {inp}) or ({inp}, {out})"
            raise ShapeMismatchError(
                f"{self.path}: LoRA factors of {module.path!r} (A {tuple(module.A.shape)}, B "
                f"{tuple(module.B.shape)}) need a base weight of shape {expected}, but {module.weight_key!r} "
                f"in {self._base.source} has shape {shape}: pass the base model the adapter was trained on"
            )
        return fits_transposed and (not fits or fan_in_fan_out)

    def _bind_bias(self, module: _LoraModule, out: int, where: str) -> None:
        module.bias_key = self._resolve(f"{module.path}.bias")
        if module.bias_key is None:
            raise AdapterError(
                f"{where} has a lora_B bias (`lora_bias`) but the base has no "
                f"{module.path}.bias to add it to; PEFT cannot merge it either"
            )
        if tuple(module.bias.shape) != (out,) or self.shape(module.bias_key) != (out,):
            raise ShapeMismatchError(
                f"{where}: lora_B.bias has shape {tuple(module.bias.shape)} and the base "
                f"bias {self.shape(module.bias_key)}; both should be ({out},)"
            )

    # -- the Weights interface -------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """The base's keys, then any tensor the adapter adds (e.g. a new `modules_to_save` head)."""
        return self._base_keys + [k for k in self._replaced if k not in self._base_key_set]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._replaced:
            return self._file.shape(self._replaced[name])
        return self._base.shape(name)

    def get(self, name: str) -> torch.Tensor:
        """The merged tensor: float64 when the adapter changes it, the base's own tensor otherwise."""
        if name in self._by_weight:
            return self._merged_weight(self._by_weight[name])
        if name in self._by_bias:
            module = self._by_bias[name]
            return self._effective_base(name) + module.scale * module.bias.read()
        if name in self._replaced:
            return self._effective_base(name)
        if name not in self._base_key_set:
            raise self._missing(name)
        return self._base.get(name)

    def _effective_base(self, name: str) -> torch.Tensor:
        """The tensor LoRA is added to: the adapter's saved copy if it has one, else the base's; float64."""
        if name in self._replaced:
            return self._file.get(self._replaced[name]).to(torch.float64)
        return self._base.get(name).to(torch.float64)

    def _merged_weight(self, module: _LoraModule) -> torch.Tensor:
        """W' = W + s·B@A, or DoRA's (m / ‖W + s·B@A‖ per output row) · (W + s·B@A); in the stored layout."""
        weight = self._effective_base(module.weight_key)
        weight = weight.T if module.transposed else weight  # (out, in)
        merged = weight + module.scale * (module.B.read() @ module.A.read())
        if module.magnitude is not None:
            merged = (module.magnitude.read() / torch.linalg.norm(merged, dim=1))[:, None] * merged
        return (merged.T if module.transposed else merged).contiguous()

    def low_rank_update(self, name: str) -> LowRankUpdate | None:
        """ΔW = left @ right in the base's stored layout, scale folded into `left`; None for DoRA layers, for
        tensors the adapter replaces outright, and for tensors it leaves unchanged."""
        module = self._by_weight.get(name)
        if module is None or module.magnitude is not None or not self._base_kept(name):
            return None
        if module.transposed:  # (s·B@A)ᵀ = (s·Aᵀ) @ Bᵀ: left (in, r), right (r, out)
            return LowRankUpdate(left=(module.scale * module.A.read().T).contiguous(),
                                 right=module.B.read().T.contiguous())
        return LowRankUpdate(left=module.scale * module.B.read(), right=module.A.read())

    def _base_kept(self, name: str) -> bool:
        """Whether the tensor under a LoRA update is the base's own (a saved embedding layer usually is)."""
        if name not in self._replaced:
            return True
        if name not in self._untouched:
            base = self._base.get(name).to(torch.float64) if name in self._base_key_set else None
            self._untouched[name] = base is not None and torch.equal(base, self._effective_base(name))
        return self._untouched[name]

    def changed_keys(self) -> set[str]:
        return set(self._by_weight) | set(self._by_bias) | set(self._replaced)

    def fingerprint(self, name: str) -> str | None:
        if name in self._by_weight or name in self._by_bias or name in self._replaced:
            return None
        return self._base.fingerprint(name)

    def close(self) -> None:
        self._file.close()
        if self._owns_base:
            self._base.close()


def _open_default_base(config: dict, path: Path) -> Weights:
    """The base named by adapter_config.json's `base_model_name_or_path`; errors say where the name came from."""
    from . import open_weights

    file = path / "adapter_config.json"
    base = config.get("base_model_name_or_path")
    if not base:
        raise AdapterError(
            f"{file} names no base_model_name_or_path: pass the model the adapter was trained on, e.g. "
            "open_weights(adapter_dir, base='path/or/hub-id')"
        )
    instead = ("pass the model the adapter was trained on instead: open_weights(adapter_dir, "
               "base='path/or/hub-id'), as `intruder analyze BASE ADAPTER` does")
    if not Path(str(base)).expanduser().exists() and not looks_like_hub_id(str(base)):
        raise WeightsNotFoundError(f"the base model {base!r}, named by `base_model_name_or_path` in {file}, "
                                   f"does not exist here: {instead}")
    try:
        return open_weights(base)
    except (WeightsNotFoundError, OfflineError) as exc:
        raise type(exc)(f"the base model {base!r}, named by `base_model_name_or_path` in {file}, cannot be "
                        f"opened: {exc}. Or {instead}") from exc


def _open_adapter_file(path: Path) -> Weights:
    """adapter_model.safetensors, or else adapter_model.bin (read with weights_only=True), opened lazily."""
    for name, reader in (("adapter_model.safetensors", SafetensorsWeights), ("adapter_model.bin", TorchBinWeights)):
        if (path / name).exists():
            return reader([path / name], source=str(path / name))
    present = ", ".join(sorted(p.name for p in path.iterdir())[:8])
    raise WeightsNotFoundError(
        f"{path} has an adapter_config.json but no adapter_model.safetensors or "
        f"adapter_model.bin (found: {present}): copy the adapter weights there"
    )
