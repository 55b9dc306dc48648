"""What a PEFT LoRA adapter_config.json may say for the adapter to be merged exactly here: its fields (the ones
that change the merge are refused by name), the rank and α, per module through rank_pattern / alpha_pattern."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..errors import AdapterError, CorruptWeightsError, WeightsNotFoundError
from .base import Weights

PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")  # initialise A/B only, never the base
BASE_ALTERING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")  # subtract their init from the base
REFUSED_FIELDS = {
    "layer_replication": "it duplicates base layers, so the merged model has tensors the base lacks",
    "target_parameters": "LoRA on bare nn.Parameters (e.g. fused MoE experts) is not supported",
    "trainable_token_indices": "trainable-token rows are not supported",
    "use_qalora": "QALoRA's A acts on pooled inputs and has no dense merge",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens and cannot be merged",
    "arrow_config": "Arrow routes tokens between experts and cannot be merged",
    "use_bdlora": "block-diagonal LoRA factors are not supported",
    "kasa_config": "KaSA truncates the base weight's SVD and adds a learned diagonal",
}
# Fields that select modules, configure training or are bookkeeping: they do not change the merge.
HARMLESS_FIELDS = set(
    "task_type peft_type auto_mapping peft_version base_model_name_or_path revision inference_mode r "
    "target_modules exclude_modules lora_alpha lora_dropout fan_in_fan_out bias use_rslora modules_to_save "
    "init_lora_weights layers_to_transform layers_pattern rank_pattern alpha_pattern megatron_config "
    "megatron_core loftq_config eva_config corda_config lora_ga_config use_dora velora_config "
    "qalora_group_size monteclora_config runtime_config lora_bias ensure_weight_tying".split()
)


def read_config(path: Path) -> dict:
    file = path / "adapter_config.json"
    if not file.exists():
        raise WeightsNotFoundError(
            f"{file} does not exist: pass a PEFT adapter directory saved by save_pretrained"
        )
    try:
        config = json.loads(file.read_text())
    except ValueError as exc:
        raise CorruptWeightsError(f"{file} is not valid JSON ({exc}); save the adapter again") from exc
    if not isinstance(config, dict):
        raise CorruptWeightsError(f"{file} holds a JSON {type(config).__name__}, not an object")
    return config


def check_config(config: dict, path: Path, *, residual_base: bool) -> None:
    """Refuse every config field that changes the merge in a way this module does not reproduce exactly."""
    file = path / "adapter_config.json"
    if config.get("peft_type") != "LORA":
        raise AdapterError(
            f"{file}: peft_type is {config.get('peft_type')!r}; only LoRA adapters (peft_type "
            "'LORA') can be merged"
        )
    init = config.get("init_lora_weights", True)
    init = init.lower() if isinstance(init, str) else init
    if isinstance(init, str) and init.startswith(BASE_ALTERING_INITS):
        if not residual_base:
            raise AdapterError(
                f"{file}: init_lora_weights={init!r} subtracts the initial adapter from the base weights, so "
                "the adapter only means something over that residual model: pass it with AdapterWeights("
                "adapter_dir, base=residual_model, residual_base=True), or convert the adapter to a plain "
                "LoRA of the original base with save_pretrained(..., "
                "path_initial_model_for_weight_conversion=...)"
            )
    elif init not in PLAIN_INITS:
        raise AdapterError(
            f"{file}: unknown init_lora_weights={init!r}; it may alter the base weights, so the "
            "adapter cannot be merged safely"
        )
    for field, why in REFUSED_FIELDS.items():
        if config.get(field):
            raise AdapterError(
                f"{file}: `{field}` is set ({config[field]!r}): {why}, so this adapter cannot be "
                "merged exactly here; if PEFT can merge it, analyse the checkpoint merge_and_unload() saves"
            )
    for field, value in config.items():
        if field not in HARMLESS_FIELDS and field not in REFUSED_FIELDS and value:
            raise AdapterError(
                f"{file}: unknown field `{field}`={value!r} (a newer PEFT?); it may change how the "
                "adapter merges, so it is refused rather than ignored"
            )


def per_module(config: dict, pattern_field: str, field: str, path: str) -> tuple[float, str]:
    """r or α of one module, PEFT's way (utils/other.py `get_pattern_key`): the first pattern key k with
    re.match(rf"(.*\\.)?({k})$", path), else the module's exact name, else the global field (which
    `check_rank_fields` has made sure is there)."""
    pattern = config.get(pattern_field) or {}
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", path):
            return pattern[key], f"{pattern_field}[{key!r}]"
    if path in pattern:
        return pattern[path], f"{pattern_field}[{path!r}]"
    return config[field], field


def check_rank_fields(config: dict, path: Path, file: Weights) -> None:
    """`r` and `lora_alpha` are in the config (PEFT writes both; a default would silently change the merge)
    and `r` is a positive integer."""
    where = path / "adapter_config.json"
    factor = next((k for k in file.keys() if k.endswith((".lora_A.weight", ".lora_embedding_A"))), None)
    rank = file.shape(factor)[0] if factor is not None else None
    if "r" not in config:
        add = f'"r": {rank}, the rank of {factor} in {file.source}' if rank else '"r": <the LoRA rank>'
        raise AdapterError(f"{where} has no `r` field (the LoRA rank), so the merge's scale α/r is unknown: "
                           f"add {add}")
    if "lora_alpha" not in config:
        raise AdapterError(f"{where} has no `lora_alpha` field (LoRA's α, the update's scale is α/r): add "
                           '"lora_alpha": <the α the adapter was trained with> (PEFT would assume 8)')
    check_rank(config["r"], "r", path)


def check_rank(r, field: str, path: Path) -> None:
    """A LoRA rank is a positive integer; r = 0 is refused (as PEFT does) rather than read as "no update"."""
    where = f"{path / 'adapter_config.json'}: r = {r!r} (from `{field}`)"
    if not isinstance(r, bool) and r == 0:
        raise AdapterError(f"{where}: a LoRA adapter needs a positive rank (PEFT refuses r = 0 too), and a rank-0 "
                           "adapter changes nothing: analyse the base model itself, or set r to the rank the "
                           "adapter was trained with")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise AdapterError(f"{where}: a LoRA rank must be a positive integer; fix adapter_config.json")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
