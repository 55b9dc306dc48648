"""find_intruders on adapters written by PEFT itself: counts equal brute force on PEFT's own merged weights,
and detection agrees with the one inside PEFT's `reduce_intruder_dimension`."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from intruder import find_intruders  # noqa: E402
from intruder.analysis._reference import brute_force  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def tiny_llama():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=80, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def peft_adapter(tmp_path, *, strength: float = 1.0, **lora):
    """A tiny base (saved), a PEFT LoRA model on it with trained-looking random factors (saved), the merge."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    peft_model = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if not param.requires_grad:
                continue
            if "magnitude" in name:  # DoRA's m starts at the row norms; training moves it a little
                param.mul_(1 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) * (strength if "lora_B" in name or "embedding_B" in name else 1.0))
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model


CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "o_proj", "gate_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2},
                     alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32}),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"]),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_counts_equal_brute_force_on_peft_merged_weights(tmp_path, case):
    peft_model = peft_adapter(tmp_path, strength=0.05, **CASES[case])
    base = {k: v.detach().clone() for k, v in peft_model.get_base_model().state_dict().items() if "lora" not in k}
    merged = peft_model.merge_and_unload().state_dict()
    report = find_intruders(tmp_path / "base", tmp_path / "adapter", progress=False, top_k=8)
    names = [lr.name for lr in report.layers]
    assert names and all(name in merged for name in names)
    for layer in report.layers:
        w0 = _base_weight(base, layer.name)
        ref, sigma = brute_force(w0, merged[layer.name].double(), k=8)
        # PEFT merges in float32, we in float64: cosines agree to that precision, counts exactly
        np.testing.assert_allclose(layer.singular_values, sigma.numpy(), rtol=1e-5)
        assert layer.n_intruders == int((ref < 0.5).sum()), layer.name
        np.testing.assert_allclose(layer.max_cos, ref.numpy(), atol=1e-4)
    if case == "dora":
        assert {lr.update for lr in report.layers} == {"dense"}
    else:
        assert {lr.update for lr in report.layers} == {"low-rank"}
    assert 0 < report.total < 8 * len(report.layers)


def _base_weight(base: dict, name: str) -> torch.Tensor:
    key = name if name in base else name.replace(".weight", ".base_layer.weight")
    return base[key].double()


@pytest.mark.parametrize("top_k,eps", [(10, 0.5), (5, 0.3)])
def test_detection_agrees_with_peft_reduce_intruder_dimension(tmp_path, top_k, eps):
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    peft_model = peft_adapter(tmp_path, strength=0.05, r=4, lora_alpha=8,
                              target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    lines = []
    reduce_intruder_dimension(peft_model, top_k=top_k, threshold_epsilon=eps, logging_sink=lines.append)
    theirs = {}
    for line in lines:
        match = re.match(r"base_model\.model\.(\S+): (?:Intruders: (\d+)|No intruders)", line)
        if match:
            theirs[match.group(1) + ".weight"] = int(match.group(2) or 0)
    report = find_intruders(tmp_path / "base", tmp_path / "adapter", top_k=top_k, threshold=eps, progress=False)
    ours = {lr.name: lr.n_intruders for lr in report.layers}
    assert len(theirs) == 10 and ours == theirs
    assert 0 < sum(ours.values()) < top_k * len(ours)  # a non-trivial mix of intruders and matches
