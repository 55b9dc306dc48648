"""AdapterWeights against PEFT's own merge_and_unload, on tiny random models (no network)."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from intruder.errors import AdapterError, OfflineError, ShapeMismatchError, WeightsNotFoundError  # noqa: E402
from intruder.weights import open_weights  # noqa: E402
from intruder.weights.peft import AdapterWeights  # noqa: E402

LLAMA_LINEAR = ["q_proj", "v_proj", "down_proj"]


# PEFT warns about fan_in_fan_out fix-ups, saved embedding layers and the like: expected here.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(autouse=True)
def _seeded(seed):
    torch.manual_seed(seed)


def tiny_llama(intermediate: int = 64):
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def train(model, tmp_path, save_kwargs=None, **lora):
    """Save `model` as the base, wrap it with LoRA, perturb every trainable tensor (as training would: PEFT
    initialises B, or DoRA's m, so that the adapter starts as a no-op), save the adapter and merge it.

    Returns (base_dir, adapter_dir, merged state dict).
    """
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base_dir)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(adapter_dir, **(save_kwargs or {}))
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return base_dir, adapter_dir, merged


def check_against_peft(adapter_dir, base_dir, merged, *, low_rank: bool = True) -> AdapterWeights:
    """Every tensor of the lazy merge equals PEFT's; changed_keys is exactly what PEFT changed."""
    weights = AdapterWeights(adapter_dir, base=base_dir)
    base = open_weights(base_dir)
    assert weights.keys() == base.keys()
    changed = weights.changed_keys()
    assert changed, "the adapter should change something"
    for name in weights.keys():
        assert weights.shape(name) == base.shape(name)
        if name not in changed:
            assert torch.equal(weights.get(name), merged[name]), f"{name} changed but is not in changed_keys"
            assert weights.fingerprint(name) == base.fingerprint(name)
            assert weights.low_rank_update(name) is None
            continue
        got = weights.get(name)
        assert got.dtype == torch.float64
        assert not torch.equal(merged[name], base.get(name)), f"PEFT left {name} unchanged"
        torch.testing.assert_close(got.float(), merged[name], rtol=1e-5, atol=1e-6, msg=name)
        assert weights.fingerprint(name) is None
        update = weights.low_rank_update(name)
        if update is not None:
            assert update.left.dtype == update.right.dtype == torch.float64
            dense = base.get(name).double() + update.dense()
            torch.testing.assert_close(dense, got, rtol=1e-12, atol=1e-12, msg=name)
    has_low_rank = any(weights.low_rank_update(name) is not None for name in changed)
    assert has_low_rank == low_rank
    return weights


def edit_config(adapter_dir, **fields):
    file = adapter_dir / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(fields)
    file.write_text(json.dumps(config))


# -- merges that must equal PEFT's --------------------------------------------------------------------------


def test_plain_lora(tmp_path):
    base_dir, adapter_dir, merged = train(tiny_llama(), tmp_path, r=4, lora_alpha=8, target_modules=LLAMA_LINEAR)
    weights = check_against_peft(adapter_dir, base_dir, merged)
    assert weights.changed_keys() == {
        f"model.layers.{i}.{m}.weight"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    }
    update = weights.low_rank_update("model.layers.0.mlp.down_proj.weight")
    assert update.rank == 4 and update.left.shape == (32, 4) and update.right.shape == (4, 64)


def test_rslora(tmp_path):
    base_dir, adapter_dir, merged = train(
        tiny_llama(), tmp_path, r=4, lora_alpha=16, use_rslora=True, target_modules=LLAMA_LINEAR
    )
    check_against_peft(adapter_dir, base_dir, merged)


def test_rank_and_alpha_patterns(tmp_path):
    base_dir, adapter_dir, merged = train(
        tiny_llama(), tmp_path, r=4, lora_alpha=8, target_modules=LLAMA_LINEAR,
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"v_proj": 3},
    )
    weights = check_against_peft(adapter_dir, base_dir, merged)
    rank = {name: weights.low_rank_update(name).rank for name in weights.changed_keys()}
    assert rank["model.layers.0.self_attn.q_proj.weight"] == 2
    assert rank["model.layers.1.mlp.down_proj.weight"] == 6
    assert rank["model.layers.0.mlp.down_proj.weight"] == 4


@pytest.mark.parametrize("targets", [LLAMA_LINEAR, ["embed_tokens", "q_proj"]])
def test_dora(tmp_path, targets):
    base_dir, adapter_dir, merged = train(tiny_llama(), tmp_path, r=4, use_dora=True, target_modules=targets)
    check_against_peft(adapter_dir, base_dir, merged, low_rank=False)


def test_embedding_adapter(tmp_path):
    base_dir, adapter_dir, merged = train(tiny_llama(), tmp_path, r=4, target_modules=["embed_tokens"])
    weights = check_against_peft(adapter_dir, base_dir, merged)
    assert weights.changed_keys() == {"model.embed_tokens.weight"}
    update = weights.low_rank_update("model.embed_tokens.weight")
    assert update.left.shape == (64, 4) and update.right.shape == (4, 32)


def test_saved_embedding_layer_replaces_the_base(tmp_path):
    """PEFT loads a saved `embed_tokens.base_layer.weight` over the base's (e.g. after resizing the vocab):
    the merge builds on it, and the update is then no longer base + low rank."""
    from safetensors.torch import load_file, save_file

    base_dir, adapter_dir, merged = train(tiny_llama(), tmp_path, r=4, target_modules=["embed_tokens"])
    file = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.model.embed_tokens.base_layer.weight"] += 1.0
    save_file(tensors, file)
    weights = AdapterWeights(adapter_dir, base=base_dir)
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(weights.get(name).float(), merged[name] + 1.0, rtol=1e-5, atol=1e-6)
    assert weights.low_rank_update(name) is None


@pytest.mark.parametrize("use_dora", [False, True])
def test_fan_in_fan_out_gpt2(tmp_path, use_dora):
    # c_attn is (32, 96): its shape decides the orientation; c_proj is square: the config flag decides.
    base_dir, adapter_dir, merged = train(
        tiny_gpt2(), tmp_path, r=4, fan_in_fan_out=True, use_dora=use_dora, target_modules=["c_attn", "c_proj"]
    )
    weights = check_against_peft(adapter_dir, base_dir, merged, low_rank=not use_dora)
    if not use_dora:
        update = weights.low_rank_update("transformer.h.0.attn.c_attn.weight")
        assert update.left.shape == (32, 4) and update.right.shape == (4, 96)


def test_modules_to_save(tmp_path):
    base_dir, adapter_dir, merged = train(
        tiny_llama(), tmp_path, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    weights = check_against_peft(adapter_dir, base_dir, merged)
    assert "lm_head.weight" in weights.changed_keys()
    assert weights.low_rank_update("lm_head.weight") is None


@pytest.mark.parametrize("bias", ["none", "all"])
def test_lora_bias(tmp_path, bias):
    base_dir, adapter_dir, merged = train(
        tiny_gpt2(), tmp_path, r=4, lora_bias=True, bias=bias, target_modules=["c_attn"]
    )
    weights = check_against_peft(adapter_dir, base_dir, merged)
    assert "transformer.h.1.attn.c_attn.bias" in weights.changed_keys()
    assert ("transformer.h.0.ln_1.bias" in weights.changed_keys()) == (bias == "all")


def test_adapter_model_bin(tmp_path):
    base_dir, adapter_dir, merged = train(
        tiny_llama(), tmp_path, save_kwargs={"safe_serialization": False}, r=4, target_modules=LLAMA_LINEAR
    )
    assert (adapter_dir / "adapter_model.bin").exists()
    assert not (adapter_dir / "adapter_model.safetensors").exists()
    check_against_peft(adapter_dir, base_dir, merged)


@pytest.mark.parametrize("variant", ["orthogonal", "mica", "velora"])
def test_variants_that_merge_as_plain_lora(tmp_path, variant):
    """Inits that leave the base alone, and VeLoRA (a backward-pass trick whose merge is plain LoRA)."""
    if variant == "velora":
        options = {"velora_config": peft.tuners.lora.config.VeloraConfig()}
    else:
        options = {"init_lora_weights": variant}
    model = tiny_llama()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base_dir)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=LLAMA_LINEAR, **options))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(adapter_dir)
    merged = peft_model.merge_and_unload().state_dict()
    check_against_peft(adapter_dir, base_dir, merged)


def test_open_weights_and_default_base(tmp_path):
    base_dir, adapter_dir, merged = train(tiny_llama(), tmp_path, r=4, target_modules=["q_proj"])
    edit_config(adapter_dir, base_model_name_or_path=str(base_dir))
    with open_weights(adapter_dir) as weights:
        assert isinstance(weights, AdapterWeights)
        name = "model.layers.1.self_attn.q_proj.weight"
        torch.testing.assert_close(weights.get(name).float(), merged[name], rtol=1e-5, atol=1e-6)


def test_base_without_model_prefix(tmp_path):
    """A base saved without `model.` (as transformers loads it anyway) still lines up with the adapter."""
    base_dir, adapter_dir, merged = train(tiny_llama(), tmp_path, r=4, target_modules=["q_proj"])
    base = open_weights(base_dir)
    bare = {k.removeprefix("model."): base.get(k) for k in base.keys()}
    weights = AdapterWeights(adapter_dir, base=bare)
    name = "layers.0.self_attn.q_proj.weight"
    assert name in weights.changed_keys()
    torch.testing.assert_close(weights.get(name).float(), merged["model." + name], rtol=1e-5, atol=1e-6)


def test_residual_base_accepts_pissa_with_explicit_base(tmp_path):
    base_dir, adapter_dir, merged = train(tiny_llama(), tmp_path, r=4, target_modules=["q_proj"])
    edit_config(adapter_dir, init_lora_weights="pissa")
    weights = AdapterWeights(adapter_dir, base=base_dir, residual_base=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(weights.get(name).float(), merged[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(AdapterError, match="base="):
        AdapterWeights(adapter_dir, residual_base=True)


# -- adapters that must be refused ---------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A small plain LoRA adapter and its base: (base_dir, adapter_dir)."""
    base_dir, adapter_dir, _ = train(tiny_llama(), tmp_path, r=4, target_modules=["q_proj"])
    return base_dir, adapter_dir


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_base_altering_init_refused(saved, init):
    base_dir, adapter_dir = saved
    edit_config(adapter_dir, init_lora_weights=init)
    with pytest.raises(AdapterError, match="init_lora_weights"):
        AdapterWeights(adapter_dir, base=base_dir)


@pytest.mark.parametrize(
    "field, value",
    [
        ("layer_replication", [[0, 2], [1, 2]]),
        ("target_parameters", ["mlp.experts.gate_up_proj"]),
        ("trainable_token_indices", [1, 2]),
        ("use_qalora", True),
        ("alora_invocation_tokens", [5, 6]),
        ("kasa_config", {"beta": 1.0}),
        ("use_fancy_new_merge", True),
    ],
)
def test_unsupported_fields_refused(saved, field, value):
    base_dir, adapter_dir = saved
    edit_config(adapter_dir, **{field: value})
    with pytest.raises(AdapterError, match=field):
        AdapterWeights(adapter_dir, base=base_dir)


def test_non_lora_peft_type_refused(saved):
    base_dir, adapter_dir = saved
    edit_config(adapter_dir, peft_type="IA3")
    with pytest.raises(AdapterError, match="peft_type"):
        AdapterWeights(adapter_dir, base=base_dir)


def test_wrong_base_refused(saved, tmp_path):
    _, adapter_dir = saved
    other = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(other)
    with pytest.raises(AdapterError, match="match no tensor") as info:
        AdapterWeights(adapter_dir, base=other)
    message = str(info.value)
    assert "model.layers.0.self_attn.q_proj.weight" in message and "transformer." in message
    assert "base model the adapter was trained on" in message


def test_shape_mismatch_names_both_shapes(tmp_path):
    base_dir, adapter_dir, _ = train(tiny_llama(), tmp_path, r=4, target_modules=["down_proj"])
    other = tmp_path / "wider"
    tiny_llama(intermediate=48).save_pretrained(other)
    with pytest.raises(ShapeMismatchError, match=r"\(32, 64\).*\(32, 48\)"):
        AdapterWeights(adapter_dir, base=other)


def test_rank_disagreeing_with_config_refused(saved):
    base_dir, adapter_dir = saved
    edit_config(adapter_dir, rank_pattern={"q_proj": 3})
    with pytest.raises(AdapterError, match=r"r=3 \(from `rank_pattern\['q_proj'\]`\)"):
        AdapterWeights(adapter_dir, base=base_dir)


def test_unknown_adapter_tensor_refused(saved):
    from safetensors.torch import load_file, save_file

    base_dir, adapter_dir = saved
    file = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_diag"] = torch.ones(4)
    save_file(tensors, file)
    with pytest.raises(AdapterError, match="lora_diag"):
        AdapterWeights(adapter_dir, base=base_dir)


def test_missing_adapter_weights(saved):
    base_dir, adapter_dir = saved
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(WeightsNotFoundError, match="adapter_model.safetensors"):
        AdapterWeights(adapter_dir, base=base_dir)


def test_no_base_anywhere(saved):
    _, adapter_dir = saved
    edit_config(adapter_dir, base_model_name_or_path=None)
    with pytest.raises(AdapterError, match="base="):
        AdapterWeights(adapter_dir)


def test_uncached_hub_base_fails_offline(saved):
    _, adapter_dir = saved
    edit_config(adapter_dir, base_model_name_or_path="nobody/not-a-cached-model")  # conftest sets HF_HUB_OFFLINE
    with pytest.raises(OfflineError, match="nobody/not-a-cached-model"):
        AdapterWeights(adapter_dir)


def test_zero_rank_adapter_is_refused_clearly(saved):
    from safetensors.torch import load_file, save_file

    base_dir, adapter_dir = saved
    file = adapter_dir / "adapter_model.safetensors"
    tensors = {k: v[:0] if ".lora_A." in k else v[:, :0] for k, v in load_file(file).items()}  # r = 0 factors
    save_file(tensors, file)
    edit_config(adapter_dir, r=0)
    key = next(k for k in tensors if ".lora_A." in k)
    with open_weights(file) as weights:  # 0-element tensors read fine
        assert weights.get(key).shape == (0, 32)
    with pytest.raises(AdapterError, match=r"adapter_config.json: r = 0 \(from `r`\).*positive") as info:
        AdapterWeights(adapter_dir, base=base_dir)
    assert "base model" in str(info.value)  # what to analyse instead


@pytest.mark.parametrize("field, rank", [("r", 4), ("lora_alpha", None)])
def test_missing_rank_or_alpha_is_named_not_assumed(saved, field, rank):
    base_dir, adapter_dir = saved
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    del config[field]
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=rf"adapter_config.json has no `{field}`") as info:
        AdapterWeights(adapter_dir, base=base_dir)
    message = str(info.value)
    assert "r=8" not in message and "from `r`" not in message
    if rank is not None:  # the rank the factors have, as the value to add
        assert f'"r": {rank}' in message


@pytest.mark.parametrize("field, value", [("r", "4"), ("lora_alpha", "eight"), ("rank_pattern", {"q_proj": 2.5})])
def test_non_numeric_rank_or_alpha_is_named(saved, field, value):
    base_dir, adapter_dir = saved
    edit_config(adapter_dir, **{field: value})
    with pytest.raises(AdapterError, match=rf"adapter_config.json.*{field}"):
        AdapterWeights(adapter_dir, base=base_dir)


@pytest.mark.parametrize("missing", ["path", "hub id"])
def test_missing_default_base_says_where_it_came_from(saved, tmp_path, missing, monkeypatch):
    _, adapter_dir = saved
    monkeypatch.chdir(tmp_path)
    base = str(tmp_path / "moved-away") if missing == "path" else "fx/basee"
    edit_config(adapter_dir, base_model_name_or_path=base)
    error = WeightsNotFoundError if missing == "path" else OfflineError
    with pytest.raises(error) as info:
        open_weights(adapter_dir)
    message = str(info.value)
    assert base in message and "adapter_config.json" in message and "`base_model_name_or_path`" in message
    assert "base=" in message
