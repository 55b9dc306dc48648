"""Scaling intruder dimensions down (the paper's intervention; PEFT's `reduce_intruder_dimension`), exactly.

For W_t = W_0 + ΔW (m, n) with top-k singular triplets (σ_j, u_j, v_j) and intruder set I, exactly the set
`find_intruders` flags (same ε, k and side), the mitigated matrix is

    W' = W_t + (λ − 1) Σ_{j∈I} σ_j u_j v_jᵀ,

so λ = 1 gives W_t back and λ = 0 leaves no component along a flagged u_j (u_jᵀ W' = 0). For a LoRA adapter
ΔW = s·B A (B (m, r), A (r, n)), W' − W_0 = B' A' with

    B' = [s·B, (λ − 1) U_I diag(√σ_I)],   A' = [A; diag(√σ_I) V_Iᵀ],   rank r + |I|, scale 1,

which is written as a PEFT adapter as it is: never projected back to rank r, as PEFT does. Any other tuned
model is written as a safetensors model directory holding W' in place of W_t.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterError, IntruderError
from ..outputs import atomic_dir, versions, write_text
from ..weights import Weights, open_weights
from ..weights.peft import AdapterWeights
from ..weights.safetensors import write_safetensors
from .intruders import check_options, find_intruders, tuned_triplets
from .results import IntruderReport
from .spectra import FactorCache

RECORD = "intruder_mitigation.json"  # in every output: marks a directory that scale_intruders may replace
_PEFT_PREFIX = "base_model.model."
_FACTOR_KEYS = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
_SHARD_BYTES = 2 * 2**30  # a model is written in safetensors shards of at most this size
_SIDE_FILES = ("config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json",
               "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json")


@dataclass(eq=False)
class MitigationResult:
    """What `scale_intruders` wrote: W' = W_t + (λ − 1) Σ_{j∈I} σ_j u_j v_jᵀ for every matrix with intruders.

    kind: "adapter" (an exact PEFT adapter of rank r + |I| per changed module) or "model" (safetensors).
    flagged: {matrix name: the indices j < k of its scaled tuned singular vectors}, matrices with intruders only.
    ranks: for an adapter, the new rank r + |I| of each changed LoRA module, by PEFT module path.
    report: the `find_intruders` result whose intruders were scaled.
    """

    out: Path | None
    kind: str
    lam: float
    threshold: float
    top_k: int
    side: str
    flagged: dict[str, list[int]]
    ranks: dict[str, int] = field(default_factory=dict)
    report: IntruderReport | None = field(default=None, repr=False)

    @property
    def counts(self) -> dict[str, int]:
        return {name: len(indices) for name, indices in self.flagged.items()}

    @property
    def total(self) -> int:
        return sum(len(indices) for indices in self.flagged.values())

    def to_dict(self) -> dict:
        return {"format": "intruder-mitigation/1", "out": None if self.out is None else str(self.out),
                "kind": self.kind, "lam": self.lam, "threshold": self.threshold, "top_k": self.top_k,
                "side": self.side, "total": self.total, "counts": self.counts, "flagged": self.flagged,
                "ranks": self.ranks, "analysed": None if self.report is None else len(self.report.layers)}

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            write_text(path, text + "\n")
        return text

    def summary(self) -> str:
        """One line: what was scaled, by how much, and where it went."""
        analysed = f" of {len(self.report.layers)}" if self.report is not None else ""
        what = "a PEFT adapter (rank r + |I| per changed module)" if self.kind == "adapter" else "a safetensors model"
        return (f"scaled {self.total} intruder directions in {len(self.flagged)}{analysed} matrices by λ={self.lam:g} "
                f"(k={self.top_k}, ε={self.threshold:g}, side={self.side}); wrote {what} to {self.out}")

    def __repr__(self) -> str:
        return (f"MitigationResult(kind={self.kind!r}, lam={self.lam:g}, matrices={len(self.flagged)}, "
                f"directions={self.total}, out={str(self.out)!r})")


def scale_intruders(base, tuned, out, *, lam: float = 0.5, threshold: float = 0.5, top_k: int = 10,
                    side: str = "left", layers=None, device=None, cache_dir=None,
                    progress: bool = True, workers: int | None = None) -> MitigationResult:
    """Scale the intruder dimensions of `tuned` by λ and write the result to the directory `out`.

    base, tuned: as for `find_intruders` (anything `open_weights` accepts; tuned may be a PEFT LoRA adapter).
    out: a new or empty directory, or one this function wrote before; it is replaced atomically. A LoRA
        adapter in gives an exact PEFT adapter out (rank r + |I| per changed module, via rank_pattern and
        alpha_pattern); any other model gives a safetensors model directory with the tuned directory's
        config, generation config and tokenizer files.
    lam: λ >= 0, the factor on each flagged σ_j (1: unchanged, 0: removed).
    threshold, top_k, side, layers, device, cache_dir, progress, workers: as for `find_intruders`, which
        decides I.
    """
    check_lam(lam)
    check_options(threshold, top_k, side)
    out = _check_out(out, base, tuned)
    with ExitStack() as stack:
        base_w, tuned_w = _open(base, tuned, stack)
        adapter = isinstance(tuned_w, AdapterWeights)
        config = _adapter_config(tuned_w) if adapter else None  # refuses DoRA before any work
        scaler = _Scaler.analyse(base_w, tuned_w, lam, threshold=threshold, top_k=top_k, side=side, layers=layers,
                                 device=device, cache_dir=cache_dir, progress=progress, workers=workers)
        result = MitigationResult(out, "adapter" if adapter else "model", float(lam), threshold, top_k, side,
                                  dict(scaler.flagged), report=scaler.report)
        with atomic_dir(out) as tmp:
            if adapter:
                result.ranks = _write_adapter(tmp, scaler, config, progress)
            else:
                _write_model(tmp, scaler, progress)
            _copy_side_files(Path(tuned_w.source), tmp)
            (tmp / RECORD).write_text(json.dumps(result.to_dict() | {"versions": versions()}, indent=2) + "\n",
                                      encoding="utf-8")
    return result


def scaled_matrices(base, tuned, *, lam: float = 0.5, threshold: float = 0.5, top_k: int = 10, side: str = "left",
                    layers=None, device=None, cache_dir=None, progress: bool = True,
                    workers: int | None = None) -> Iterator[tuple[str, torch.Tensor, int]]:
    """Yield (name, W' float32 in the tensor's stored layout (out, in), |I|) for each analysed matrix with at
    least one intruder, without writing anything; the options are those of `scale_intruders`."""
    check_lam(lam)
    check_options(threshold, top_k, side)
    return _scaled_matrices(base, tuned, lam, dict(threshold=threshold, top_k=top_k, side=side, layers=layers,
                                                   device=device, cache_dir=cache_dir, progress=progress,
                                                   workers=workers))


def _scaled_matrices(base, tuned, lam: float, options: dict) -> Iterator[tuple[str, torch.Tensor, int]]:
    with ExitStack() as stack:
        scaler = _Scaler.analyse(*_open(base, tuned, stack), lam, **options)
        for name, indices in scaler.flagged.items():
            yield name, scaler.scaled(name).to(torch.float32), len(indices)


def check_lam(lam) -> None:
    """Raise IntruderError unless λ is a finite real number >= 0."""
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam < 0:
        raise IntruderError(f"lam={lam!r}: λ must be a finite number >= 0 (1 keeps the intruders, 0 removes them, "
                            "the paper scales them by values in between)")


class _Scaler:
    """The mitigated matrices of one (base, tuned) pair, for the intruders its `find_intruders` report flags."""

    def __init__(self, base: Weights, tuned: Weights, report: IntruderReport, lam: float, device,
                 cache: FactorCache | None):
        self.base, self.tuned, self.report, self.lam = base, tuned, report, float(lam)
        self.device, self.cache = device, cache
        self.flagged = {layer.name: layer.indices for layer in report.layers if layer.indices}

    @classmethod
    def analyse(cls, base: Weights, tuned: Weights, lam: float, *, threshold, top_k, side, layers, device,
                cache_dir, progress, workers) -> _Scaler:
        report = find_intruders(base, tuned, threshold=threshold, top_k=top_k, side=side, layers=layers,
                                device=device, cache_dir=cache_dir, progress=progress, workers=workers)
        return cls(base, tuned, report, lam, device, None if cache_dir is False else FactorCache(cache_dir))

    def correction(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ − 1) Σ_{j∈I} σ_j u_j v_jᵀ = left @ right: left (m, |I|), right (|I|, n), float64 on the CPU,
        σ_j split evenly between the two as √σ_j."""
        sigma, u, v = tuned_triplets(self.base, self.tuned, name, self.report.top_k, device=self.device,
                                     cache=self.cache)
        expected = torch.from_numpy(self.report[name].singular_values)
        # the same computation as find_intruders', so index j is its tuned vector j
        assert torch.allclose(sigma.cpu(), expected, rtol=1e-9, atol=1e-12 * float(expected.max())), name
        idx = torch.tensor(self.flagged[name], device=sigma.device)
        root = sigma[idx].sqrt()
        return ((self.lam - 1) * u[:, idx] * root).cpu(), (root[:, None] * v[:, idx].T).cpu()

    def scaled(self, name: str, wt: torch.Tensor | None = None) -> torch.Tensor:
        """W' (m, n) float64 for a flagged matrix, in its stored layout; `wt`: W_t when already read."""
        left, right = self.correction(name)
        wt = self.tuned.get(name) if wt is None else wt
        return wt.to(torch.float64, copy=True).addmm_(left, right)


def _open(base, tuned, stack: ExitStack) -> tuple[Weights, Weights]:
    """Open both sources; those opened here (not passed in as `Weights`) are closed with `stack`."""
    base_w = open_weights(base)
    if not isinstance(base, Weights):
        stack.enter_context(base_w)
    tuned_w = open_weights(tuned, base=base_w)
    if not isinstance(tuned, Weights):
        stack.enter_context(tuned_w)
    return base_w, tuned_w


def _check_out(out, *inputs) -> Path:
    """`out` as a Path, unless writing it would replace an input, a file, or a directory not written here."""
    out = Path(out).expanduser()
    target = out.resolve()
    for source in inputs:
        source = source.source if isinstance(source, Weights) else source
        if isinstance(source, (str, os.PathLike)) and Path(source).expanduser().exists():
            path = Path(source).expanduser().resolve()
            if target == path or target in path.parents:
                raise IntruderError(f"out={out} would replace {source}, an input of this run: "
                                    "write the mitigated model to another directory")
    if out.exists() and not out.is_dir():
        raise IntruderError(f"out={out} is a file: name a directory to write the mitigated model or adapter into")
    if out.is_dir() and any(out.iterdir()) and not (out / RECORD).exists():
        raise IntruderError(f"out={out} is a non-empty directory that scale_intruders did not write (it has no "
                            f"{RECORD}): name a new or empty directory, or delete this one first")
    return out


def _adapter_config(adapter: AdapterWeights) -> dict:
    """The adapter's config (already validated by AdapterWeights), refusing what no exact adapter can hold."""
    file = adapter.path / "adapter_config.json"
    config = adapter.config
    if config.get("use_dora"):
        raise AdapterError(f"{file}: a DoRA adapter (use_dora) rescales whole rows of W + ΔW, so W' − W_0 is not "
                           "the sum of its LoRA update and the intruder terms and cannot be written as an exact "
                           "adapter: merge it (PEFT merge_and_unload), save the merged model and pass that instead")
    if config.get("lora_bias"):
        raise AdapterError(f"{file}: `lora_bias` adapters are not supported by scale_intruders (the new scale of a "
                           "changed module would change its bias): merge it and pass the merged model instead")
    return config


def _write_model(tmp: Path, scaler: _Scaler, progress: bool) -> None:
    """Every tensor of the tuned model, the flagged matrices replaced by W' in their dtype; read one tensor at a
    time and written as safetensors shards of at most _SHARD_BYTES (one `model.safetensors` when it fits)."""
    shards: list[list[str]] = []  # the names in each shard written so far
    part, size = {}, 0
    for name in _progress(scaler.tuned.keys(), "writing", progress):
        tensor = scaler.tuned.get(name)
        if name in scaler.flagged:
            tensor = scaler.scaled(name, tensor).to(tensor.dtype)
        tensor = tensor.detach().cpu().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if part and size + nbytes > _SHARD_BYTES:
            shards.append(_write_shard(tmp, len(shards) + 1, part))
            part, size = {}, 0
        part[name] = tensor
        size += nbytes
    shards.append(_write_shard(tmp, len(shards) + 1, part))
    if len(shards) == 1:
        os.replace(tmp / "model-00001.safetensors", tmp / "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp / f"model-{i:05d}.safetensors", tmp / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _write_shard(tmp: Path, number: int, tensors: dict[str, torch.Tensor]) -> list[str]:
    write_safetensors(tmp / f"model-{number:05d}.safetensors", tensors, metadata={"format": "pt"})
    return list(tensors)


def _write_adapter(tmp: Path, scaler: _Scaler, config: dict, progress: bool) -> dict[str, int]:
    """The adapter with each flagged module's factors extended by its intruder terms (scale 1 through
    rank_pattern and alpha_pattern); every other tensor as it was. Returns {module path: new rank}."""
    adapter: AdapterWeights = scaler.tuned
    tensors = _read_adapter_tensors(adapter.path)
    modules = _lora_modules(tensors)
    ranks = {}
    for name in _progress(list(scaler.flagged), "scaling", progress):
        left, right = scaler.correction(name)
        update = adapter.low_rank_update(name)
        if update is None:  # a full tensor saved with the adapter (modules_to_save): W' = (saved + C) [+ s·B A]
            key = _full_tensor_key(name, tensors, adapter)
            tensors[key] = (tensors[key].double() + left @ right).to(tensors[key].dtype)
            continue
        path, transposed = _module_of(name, update, modules, tensors, adapter)
        new_left, new_right = torch.cat([update.left, left], 1), torch.cat([update.right, right], 0)
        # stored W += new_left @ new_right; PEFT adds s·B A, or s·(B A)ᵀ for fan_in_fan_out and embeddings
        a, b = (new_left.T, new_right.T) if transposed else (new_right, new_left)
        a_key, b_key = modules[path]
        dtype = torch.promote_types(tensors[a_key].dtype, torch.float32)
        tensors[a_key], tensors[b_key] = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        ranks[path] = a.shape[0]
    pattern = {"^" + re.escape(path): rank for path, rank in ranks.items()}  # matches exactly this module
    alpha = {key: math.sqrt(rank) if config.get("use_rslora") else rank for key, rank in pattern.items()}
    # PEFT takes the first pattern key that matches: the new, exact ones go before the adapter's own
    config = config | {"rank_pattern": pattern | (config.get("rank_pattern") or {}),
                       "alpha_pattern": alpha | (config.get("alpha_pattern") or {})}
    write_safetensors(tmp / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return ranks


def _read_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter file (adapter_model.safetensors, else .bin): an adapter is small."""
    file = path / "adapter_model.safetensors"
    file = file if file.exists() else path / "adapter_model.bin"
    with open_weights(file) as weights:
        return {key: weights.get(key) for key in weights.keys()}


def _lora_modules(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """{PEFT module path: (key of its A factor, key of its B factor)}."""
    modules = {}
    for key in tensors:
        for a_suffix, b_suffix in _FACTOR_KEYS:
            if key.endswith(a_suffix):
                path = key.removeprefix(_PEFT_PREFIX)[: -len(a_suffix)]
                modules[path] = (key, key[: -len(a_suffix)] + b_suffix)
    return modules


def _module_of(name: str, update, modules: dict, tensors: dict, adapter: AdapterWeights) -> tuple[str, bool]:
    """The LoRA module whose factors make `update`, and whether the base stores its weight transposed.

    The reader folds the scale into update.left and keeps update.right as stored: A (r, in), or Bᵀ (r, out)
    when the weight is stored (in, out) (fan_in_fan_out, embeddings); comparing it identifies both.
    """
    for path, (a_key, b_key) in modules.items():
        if not _same_tensor(name, f"{path}.weight"):
            continue
        a, b = tensors[a_key].double(), tensors[b_key].double()
        if a.shape == update.right.shape and torch.equal(a, update.right):
            return path, False
        if b.T.shape == update.right.shape and torch.equal(b.T, update.right):
            return path, True
    raise AdapterError(f"{adapter.path}: no LoRA module of the adapter file matches the update of {name!r}; "
                       "the adapter cannot be rewritten exactly (was it changed while being read?)")


def _full_tensor_key(name: str, tensors: dict, adapter: AdapterWeights) -> str:
    """The key of the full tensor the adapter saves for `name` (modules_to_save, a saved base layer)."""
    shape = tuple(adapter.shape(name))
    for key, tensor in tensors.items():
        saved = key.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
        if ".lora_" not in key and _same_tensor(name, saved) and tuple(tensor.shape) == shape:
            return key
    raise AdapterError(f"{adapter.path}: {name!r} has intruders but is changed by neither plain LoRA factors nor a "
                       "full tensor saved with the adapter, so no exact adapter can hold W': merge the adapter "
                       "(PEFT merge_and_unload), save the merged model and pass that instead")


def _same_tensor(base_name: str, adapter_name: str) -> bool:
    """Whether an adapter's tensor name refers to the base's, allowing one leading component to differ, as the
    adapter reader (and transformers, for `base_model_prefix`) does."""
    return (adapter_name == base_name or adapter_name.partition(".")[2] == base_name
            or base_name.partition(".")[2] == adapter_name)


def _copy_side_files(source: Path, tmp: Path) -> None:
    """Config, generation config and tokenizer files of the tuned directory, so the output loads on its own."""
    if not source.is_dir():
        return
    for file in sorted(source.iterdir()):
        if file.is_file() and (file.name in _SIDE_FILES or file.name.startswith("tokenizer")):
            shutil.copy2(file, tmp / file.name)


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor", leave=False)
