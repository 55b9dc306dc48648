"""scale_intruders against W' built by brute force (full float64 SVD of W_t, flagged set from two full SVDs),
on dense models, on adapters (merged by our reader and by PEFT itself), and through the command line."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from intruder import IntruderError, find_intruders, open_weights
from intruder.analysis import MitigationResult, scale_intruders, scaled_matrices
from intruder.analysis import mitigation as mitigation_module
from intruder.analysis._reference import brute_force
from intruder.cli import main
from intruder.errors import AdapterError
from intruder.synthetic import planted, random_adapter, random_base
from tests.conftest import save_model_dir

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def brute_force_scaled(w0, wt, lam, k=10, threshold=0.5, side="left"):
    """-> (W' float64, flagged indices, flagged left vectors (m, |I|)) from full float64 SVDs."""
    w0, wt = w0.double(), wt.double()
    u, s, vh = torch.linalg.svd(wt, full_matrices=False)
    left, _ = brute_force(w0, wt, k, "left")
    right, _ = brute_force(w0, wt, k, "right")
    cos = {"left": left, "right": right, "both": torch.minimum(left, right)}[side]
    idx = torch.nonzero(cos < threshold).flatten()
    return wt + (lam - 1) * (u[:, idx] * s[idx]) @ vh[idx], idx.tolist(), u[:, idx]


def assert_close(got, want, rel=1e-5):
    scale = float(want.abs().max())
    err = float((got.double() - want.double()).abs().max())
    assert err <= rel * scale, f"max error {err:.3g} against max |W'| {scale:.3g}"


# -- dense models --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned_lm(tiny_lm, tmp_path_factory):
    """The tiny Gemma 3 model with a strong random LoRA update merged in, saved as a plain model directory."""
    root = tmp_path_factory.mktemp("tuned-lm")
    adapter = random_adapter(tiny_lm, root / "adapter", rank=4, strength=3.0)
    with open_weights(adapter, base=tiny_lm) as merged:
        tensors = {k: merged.get(k).to(torch.float32) for k in merged.keys()}
    tuned = save_model_dir(root / "tuned", tensors)
    for file in tiny_lm.iterdir():
        if not file.name.endswith(".safetensors"):
            shutil.copy(file, tuned / file.name)
    return tuned


def test_dense_model_in_gives_a_model_directory_equal_to_brute_force(tiny_lm, tuned_lm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = scale_intruders(tiny_lm, tuned_lm, tmp_path / "out", lam=0.25, cache_dir=False, progress=False)
    assert result.kind == "model" and result.total > 0
    assert result.flagged == {layer.name: layer.indices for layer in result.report.layers if layer.indices}
    out = tmp_path / "out"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    base, tuned, mitigated = open_weights(tiny_lm), open_weights(tuned_lm), open_weights(out)
    assert mitigated.keys() == tuned.keys()
    for name in tuned.keys():
        got, wt = mitigated.get(name), tuned.get(name)
        assert got.dtype == wt.dtype and got.shape == wt.shape
        if name not in result.flagged:
            assert torch.equal(got, wt), name  # copied bit for bit
            continue
        want, indices, _ = brute_force_scaled(base.get(name), wt, 0.25)
        assert result.flagged[name] == indices, name
        assert_close(got, want)
    model = AutoModelForCausalLM.from_pretrained(out)  # a model directory transformers loads as it is
    AutoTokenizer.from_pretrained(out)
    name = next(iter(result.flagged))
    assert_close(model.state_dict()[name], brute_force_scaled(base.get(name), tuned.get(name), 0.25)[0])
    assert json.loads((out / mitigation_module.RECORD).read_text())["total"] == result.total


def planted_pair(tmp_path, side_dims=(48, 64)):
    w0, wt, _, _ = planted(*side_dims, n_intruders=3, seed=2)
    name = "model.layers.0.mlp.up_proj.weight"
    base = save_model_dir(tmp_path / "base", {name: w0.float()})
    tuned = save_model_dir(tmp_path / "tuned", {name: wt.float(), "model.norm.weight": torch.ones(5)})
    return base, tuned, name


@pytest.mark.parametrize("dims", [(48, 64), (64, 48)], ids=["wide", "tall"])
@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_lam_zero_removes_every_flagged_direction(tmp_path, dims, side):
    base, tuned, name = planted_pair(tmp_path, dims)
    (got_name, w_new, n_flagged), = list(scaled_matrices(base, tuned, lam=0.0, side=side, progress=False))
    w0, wt = open_weights(base).get(name), open_weights(tuned).get(name)
    want, indices, u_flagged = brute_force_scaled(w0, wt, 0.0, side=side)
    assert (got_name, n_flagged, indices) == (name, 3, [0, 1, 2])
    assert w_new.dtype == torch.float32 and w_new.shape == wt.shape
    assert_close(w_new, want)
    assert float((u_flagged.T @ w_new.double()).abs().max()) < 1e-5 * float(wt.abs().max())
    # written and analysed again: none of the planted intruders is left
    scale_intruders(base, tuned, tmp_path / "out", lam=0.0, side=side, progress=False)
    assert find_intruders(base, tmp_path / "out", side=side, progress=False).total == 0
    assert find_intruders(base, tuned, side=side, progress=False).total == 3


def test_lam_one_reproduces_the_tuned_weights(tmp_path):
    base, tuned, name = planted_pair(tmp_path)
    (_, w_new, _), = list(scaled_matrices(base, tuned, lam=1, progress=False))
    wt = open_weights(tuned).get(name)
    assert float((w_new - wt).abs().max()) < 1e-6 * float(wt.abs().max())
    result = scale_intruders(base, tuned, tmp_path / "out", lam=1.0, progress=False)
    assert result.total == 3
    assert_close(open_weights(tmp_path / "out").get(name), wt, rel=1e-6)


def test_a_large_model_is_written_in_shards_with_an_index(tmp_path, monkeypatch):
    base, tuned, name = planted_pair(tmp_path)
    monkeypatch.setattr(mitigation_module, "_SHARD_BYTES", 1)  # every tensor in a shard of its own
    scale_intruders(base, tuned, tmp_path / "out", lam=0.0, progress=False)
    files = sorted(p.name for p in (tmp_path / "out").iterdir() if "model" in p.name)
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"]
    out, original = open_weights(tmp_path / "out"), open_weights(tuned)
    assert out.keys() == original.keys() and torch.equal(out.get("model.norm.weight"), torch.ones(5))
    assert_close(out.get(name), brute_force_scaled(open_weights(base).get(name), original.get(name), 0.0)[0])


# -- adapters ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    base = random_base(root / "base", n_layers=1, hidden=32, intermediate=64)
    return base, random_adapter(base, root / "adapter", rank=4, strength=3.0)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_adapter_in_gives_an_exact_adapter_of_rank_r_plus_intruders(base_and_adapter, tmp_path, lam):
    base, adapter = base_and_adapter
    result = scale_intruders(base, adapter, tmp_path / "out", lam=lam, progress=False)
    assert result.kind == "adapter" and result.total > 0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    original = json.loads((adapter / "adapter_config.json").read_text())
    for key in ("target_modules", "base_model_name_or_path", "r", "lora_alpha", "peft_type"):
        assert config[key] == original[key]
    w_base, tuned = open_weights(base), open_weights(adapter, base=base)
    out = open_weights(tmp_path / "out", base=base)
    for name in tuned.keys():
        wt = tuned.get(name)
        if name not in result.flagged:
            assert_close(out.get(name), wt, rel=1e-6)
            continue
        want, indices, u_flagged = brute_force_scaled(w_base.get(name), wt, lam)
        assert result.flagged[name] == indices
        path = name.removesuffix(".weight")
        assert result.ranks[path] == config["rank_pattern"]["^" + path.replace(".", r"\.")] == 4 + len(indices)
        assert out.low_rank_update(name).rank == 4 + len(indices)
        assert_close(out.get(name), want)
        if lam == 0:
            assert float((u_flagged.T @ out.get(name)).abs().max()) < 1e-5 * float(wt.abs().max())
    if lam == 0:  # the written adapter loads, and the scaled directions are gone from its top-k
        assert find_intruders(base, tmp_path / "out", progress=False).total < result.report.total


# PEFT itself loads what scale_intruders writes: tiny Llama (and GPT-2 for fan_in_fan_out) adapters
PEFT_CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "o_proj", "gate_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2},
                     alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32}),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"]),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "fan_in_fan_out": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
}


def peft_adapter(tmp_path, case: str):
    """A tiny base (saved) and a PEFT adapter on it with trained-looking random factors (saved)."""
    peft = pytest.importorskip("peft")
    import transformers

    if case == "fan_in_fan_out":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=80,
                                                                     n_positions=32))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=80, tie_word_embeddings=False))
    model.save_pretrained(tmp_path / "base")
    peft_model = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **PEFT_CASES[case]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "embedding_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape[0], 1) @ torch.randn(1, param.shape[1]))  # a strong new direction
    peft_model.save_pretrained(tmp_path / "adapter")
    return type(model)


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_merges_the_written_adapter_to_brute_force(tmp_path, case):
    peft = pytest.importorskip("peft")
    model_class = peft_adapter(tmp_path, case)
    result = scale_intruders(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", lam=0.0, top_k=8,
                             progress=False)
    assert result.total > 0
    if case == "modules_to_save":
        assert "lm_head.weight" in result.flagged
    merged = peft.PeftModel.from_pretrained(model_class.from_pretrained(tmp_path / "base"), tmp_path / "out")
    merged = merged.merge_and_unload().state_dict()
    base, tuned = open_weights(tmp_path / "base"), open_weights(tmp_path / "adapter", base=tmp_path / "base")
    for name in result.flagged:
        want, indices, _ = brute_force_scaled(base.get(name), tuned.get(name), 0.0, k=8)
        assert result.flagged[name] == indices, name
        assert_close(merged[name], want, rel=2e-5)  # PEFT merges in float32
        assert_close(open_weights(tmp_path / "out", base=tmp_path / "base").get(name), want, rel=2e-5)


def test_dora_and_lora_bias_adapters_are_refused(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    for field in ("use_dora", "lora_bias"):
        copy = tmp_path / field
        shutil.copytree(adapter, copy)
        config = json.loads((copy / "adapter_config.json").read_text())
        (copy / "adapter_config.json").write_text(json.dumps(config | {field: True}))
        with pytest.raises(AdapterError, match=field):
            scale_intruders(base, copy, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# -- boundaries: λ, where to write, atomic replacement -------------------------------------------------------------


@pytest.mark.parametrize("lam", [-0.1, math.nan, math.inf, "0.5", True, None])
def test_bad_lam_is_refused_before_any_work(tmp_path, lam):
    with pytest.raises(IntruderError, match="λ must be a finite number >= 0"):
        scale_intruders(tmp_path / "missing", tmp_path / "missing", tmp_path / "out", lam=lam)
    with pytest.raises(IntruderError, match="λ must be"):
        scaled_matrices(tmp_path / "missing", tmp_path / "missing", lam=lam)  # raises at the call, not on next()
    with pytest.raises(IntruderError, match="threshold"):
        scaled_matrices(tmp_path / "missing", tmp_path / "missing", threshold=1.5)


def test_out_must_not_replace_an_input_or_a_foreign_directory(tmp_path):
    base, tuned, _ = planted_pair(tmp_path)
    for out in (tuned, base, tmp_path):
        with pytest.raises(IntruderError, match="an input of this run"):
            scale_intruders(base, tuned, out, progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(IntruderError, match="did not write"):
        scale_intruders(base, tuned, tmp_path / "notes", progress=False)
    with pytest.raises(IntruderError, match="is a file"):
        scale_intruders(base, tuned, tmp_path / "notes" / "keep.txt", progress=False)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("kind", ["model", "adapter"])
def test_a_failed_write_leaves_the_previous_output_intact(tmp_path, monkeypatch, kind):
    base, tuned, _ = planted_pair(tmp_path)
    if kind == "adapter":
        tuned = random_adapter(base, tmp_path / "adapter", rank=4, targets=("up_proj",))
    out = tmp_path / "out"
    scale_intruders(base, tuned, out, lam=0.5, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing_write(file, tensors, metadata):
        file.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(mitigation_module, "write_safetensors", failing_write)
    with pytest.raises(OSError, match="disk full"):
        scale_intruders(base, tuned, out, lam=0.0, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_result_reads_well_and_serialises(tmp_path):
    base, tuned, name = planted_pair(tmp_path)
    result = scale_intruders(base, tuned, tmp_path / "out", lam=0.5, progress=False)
    assert isinstance(result, MitigationResult)
    out = tmp_path / "out"
    assert repr(result) == f"MitigationResult(kind='model', lam=0.5, matrices=1, directions=3, out='{out}')"
    data = json.loads(json.dumps(result.to_dict()))
    assert data["flagged"] == {name: [0, 1, 2]} and data["counts"] == {name: 3} and data["total"] == 3
    assert json.loads(result.to_json(tmp_path / "r.json")) == json.loads((tmp_path / "r.json").read_text())
    assert result.report.total == 3


# -- command line --------------------------------------------------------------------------------------------------


def test_cli_mitigate_writes_and_prints_a_summary(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    out = tmp_path / "out"
    code = main(["mitigate", str(base), str(adapter), "--lam", "0", "--out", str(out), "--top-k", "8",
                 "--layers", "layers.0", "--no-cache", "--quiet"])
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("scaled ") and "by λ=0" in line and str(out) in line and "PEFT adapter" in line
    assert (out / "adapter_config.json").exists()
    assert main(["mitigate", str(base), str(adapter), "--lam", "-1", "--out", str(out), "--quiet"]) == 2
    assert "λ must be" in capsys.readouterr().err
