import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from intruder import IntruderError, find_intruders, open_weights
from intruder.analysis._reference import brute_force_count
from intruder.training import lora
from intruder.training.lora import LoraEmbedding, LoraLinear, LoraSpec, add_lora, lora_layers, save_adapter

PROMPT = "Câu hỏi: Thiết bị nào dùng để nhập dữ liệu?\nĐáp án:"


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _randomise(model, seed=1):
    """Nonzero B (and A for embeddings), so the adapter changes the logits and the test can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in layer.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _logits(model, tokenizer_dir):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)([PROMPT, "Hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


@pytest.mark.parametrize("fixture, spec", [
    ("tiny_lm", LoraSpec(rank=4, alpha=8)),
    ("tiny_lm", LoraSpec(rank=3, alpha=5, rslora=True, dropout=0.1, targets=("attention", "embed_tokens"))),
    ("tiny_llama", LoraSpec(rank=2, alpha=4, targets=("mlp", "lm_head"))),
])
def test_saved_adapter_gives_peft_identical_logits(request, tmp_path, fixture, spec):
    peft = pytest.importorskip("peft")
    base_dir = request.getfixturevalue(fixture)
    model = _model(base_dir)
    add_lora(model, spec)
    _randomise(model)
    model.eval()
    ours = _logits(model, base_dir)
    save_adapter(model, spec, tmp_path / "adapter", base_model=str(base_dir))
    theirs = _logits(peft.PeftModel.from_pretrained(_model(base_dir), tmp_path / "adapter").eval(), base_dir)
    assert not torch.equal(ours, _logits(_model(base_dir), base_dir))  # the adapter does something
    assert torch.equal(ours, theirs)


def test_adapter_merges_exactly_in_the_analysis(tiny_lm, tmp_path):
    model = _model(tiny_lm)
    layers = add_lora(model, LoraSpec(rank=4, alpha=8, targets=("all-linear", "embed_tokens")))
    _randomise(model)
    save_adapter(model, LoraSpec(rank=4, alpha=8), tmp_path / "adapter")
    base = open_weights(tiny_lm)
    merged = open_weights(tmp_path / "adapter", base=base)
    for name, layer in layers.items():
        w0 = base.get(f"{name}.weight").double()
        expected = w0 + layer.delta().detach().double()
        torch.testing.assert_close(merged.get(f"{name}.weight").double(), expected, rtol=0, atol=1e-6)
    report = find_intruders(tiny_lm, tmp_path / "adapter", top_k=4, cache_dir=False, progress=False)
    name = "model.layers.1.mlp.down_proj.weight"
    w0 = base.get(name).double()
    wt = w0 + layers[name.removesuffix(".weight")].delta().detach().double()
    assert report[name].n_intruders == brute_force_count(w0, wt, k=4, threshold=0.5)


def test_resolve_presets_and_short_target_names(tiny_lm, tmp_path):
    model = _model(tiny_lm)
    attention = lora.resolve_targets(model, ("attention",))
    mlp = lora.resolve_targets(model, ("mlp",))
    assert len(attention) == 8 and all("self_attn" in n for n in attention)
    assert len(mlp) == 6 and all(".mlp." in n for n in mlp)
    assert sorted(lora.resolve_targets(model, ("all-linear",))) == sorted(attention + mlp)  # no output head
    q_proj = [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert lora.resolve_targets(model, ("q_proj",)) == q_proj
    add_lora(model, LoraSpec(rank=2, targets=("model.layers.0.self_attn.q_proj",)))
    save_adapter(model, LoraSpec(rank=2), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]  # a short name would adapt layer 1 too


def test_layers_start_as_the_identity(tiny_lm):
    model = _model(tiny_lm)
    before = _logits(model, tiny_lm)
    layers = add_lora(model, LoraSpec(rank=4, targets=("all-linear", "embed_tokens")))
    assert torch.equal(_logits(model, tiny_lm), before)
    assert {type(m) for m in layers.values()} == {LoraLinear, LoraEmbedding}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_bad_specs_are_refused(tiny_lm):
    with pytest.raises(IntruderError, match="rank=0"):
        LoraSpec(rank=0)
    with pytest.raises(IntruderError, match="alpha"):
        LoraSpec(alpha=0)
    with pytest.raises(IntruderError, match="dropout"):
        LoraSpec(dropout=1.0)
    model = _model(tiny_lm)
    with pytest.raises(IntruderError, match=r"'qkv' matches no .* one of: .*down_proj.*q_proj"):
        add_lora(model, LoraSpec(targets=("qkv",)))
    with pytest.raises(IntruderError, match=r"rank 17 exceeds layer model.layers.0.self_attn.k_proj of shape \(16, "):
        add_lora(model, LoraSpec(rank=17))
    assert not lora_layers(model)  # nothing was wrapped before the error


def test_interrupted_save_keeps_the_old_adapter(tiny_lm, tmp_path, monkeypatch):
    model = _model(tiny_lm)
    add_lora(model, LoraSpec(rank=2))
    target = save_adapter(model, LoraSpec(rank=2), tmp_path / "adapter")
    before = (target / "adapter_model.safetensors").read_bytes()
    _randomise(model)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("intruder.training.lora.write_safetensors", fail)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, LoraSpec(rank=2), target)
    assert (target / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left


def test_load_adapter_state_round_trip_and_mismatch(tiny_lm, tmp_path):
    model = _model(tiny_lm)
    add_lora(model, LoraSpec(rank=2))
    _randomise(model, seed=5)
    save_adapter(model, LoraSpec(rank=2), tmp_path / "a")
    other = _model(tiny_lm)
    add_lora(other, LoraSpec(rank=2))
    lora.load_adapter_state(other, tmp_path / "a")
    assert torch.equal(_logits(other.eval(), tiny_lm), _logits(model.eval(), tiny_lm))
    mismatched = _model(tiny_lm)
    add_lora(mismatched, LoraSpec(rank=2, targets=("mlp",)))
    with pytest.raises(IntruderError, match="do not match this run"):
        lora.load_adapter_state(mismatched, tmp_path / "a")
