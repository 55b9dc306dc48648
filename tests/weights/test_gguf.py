"""GGUFWeights against known arrays, against transformers' own GGUF loader, and on broken files."""

import json
import sys
import time

import numpy as np
import pytest
import torch

from intruder import IntruderError, open_weights
from intruder.errors import CorruptWeightsError, WeightsNotFoundError
from intruder.weights.gguf import GGUFWeights
from tests.conftest import USER_CACHE

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def write_gguf(path, arch, tensors, metadata=None):
    """Write `tensors` {gguf name: (float32 array in numpy order, ggml type)} and `metadata` {key: value}."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        add = {int: writer.add_uint32, float: writer.add_float32, str: writer.add_string}[type(value)]
        add(key, value)
    for name, (array, kind) in tensors.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        if kind == Q.F32:
            writer.add_tensor(name, array)
        elif kind == Q.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def round_trip(array, kind):
    """What a tensor of this ggml type reads back as: float32, numpy order."""
    if kind == Q.F32:
        return array.astype(np.float32)
    if kind == Q.F16:
        return array.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(array.astype(np.float32), kind), kind)


# --- known answers --------------------------------------------------------------------------------------------


def test_llama_q_and_k_rows_are_unpermuted(tmp_path):
    """llama.cpp stores each head's rows (half, i) as (i, half): rows 0..3 of a 4-row head as 0, 2, 1, 3."""
    hf_q = np.arange(16, dtype=np.float32)[:, None] * np.ones((1, 32), np.float32)  # 2 heads × 8 rows
    hf_k = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 32), np.float32)   # 1 kv head × 8 rows
    order_q = [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    order_k = [0, 4, 1, 5, 2, 6, 3, 7]
    path = write_gguf(tmp_path / "m.gguf", "llama", {
        "blk.0.attn_q.weight": (hf_q[order_q], Q.F32),
        "blk.0.attn_k.weight": (hf_k[order_k], Q.F16),
        "blk.0.attn_v.weight": (hf_k[order_k], Q.Q8_0),
    }, {"llama.attention.head_count": 2, "llama.attention.head_count_kv": 1})
    with GGUFWeights(path) as weights:
        assert weights.keys() == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                                  "model.layers.0.self_attn.v_proj.weight"]
        assert weights.shape("model.layers.0.self_attn.q_proj.weight") == (16, 32)
        q = weights.get("model.layers.0.self_attn.q_proj.weight")
        assert q.dtype == torch.float32 and torch.equal(q, torch.from_numpy(hf_q))
        assert torch.equal(weights.get("model.layers.0.self_attn.k_proj.weight"), torch.from_numpy(hf_k))
        v = weights.get("model.layers.0.self_attn.v_proj.weight")  # no permutation for v
        assert torch.allclose(v, torch.from_numpy(hf_k[order_k]), atol=0.03)


def test_llama_without_head_count_kv_has_as_many_kv_heads(tmp_path):
    """GGUF's rule (transformers instead skips the un-permutation when head_count_kv is missing)."""
    hf_k = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 32), np.float32)
    path = write_gguf(tmp_path / "m.gguf", "llama", {"blk.0.attn_k.weight": (hf_k[[0, 2, 1, 3, 4, 6, 5, 7]], Q.F32)},
                      {"llama.attention.head_count": 2})
    assert torch.equal(GGUFWeights(path).get("model.layers.0.self_attn.k_proj.weight"), torch.from_numpy(hf_k))


def test_gemma3_norms_lose_their_plus_one(tmp_path):
    rng = np.random.default_rng(0)
    norm, q_norm, q = rng.normal(size=32), rng.normal(size=8), rng.normal(size=(32, 64))
    path = write_gguf(tmp_path / "m.gguf", "gemma3", {
        "output_norm.weight": (norm + 1, Q.F32),
        "blk.0.attn_q_norm.weight": (q_norm + 1, Q.F32),
        "blk.0.ffn_norm.weight": (norm + 1, Q.F32),
        "blk.0.post_attention_norm.weight": (norm + 1, Q.F32),
        "blk.0.post_ffw_norm.weight": (norm + 1, Q.F32),
        "blk.0.attn_q.weight": (q, Q.Q8_0),
    }, {"gemma3.attention.head_count": 4})
    with GGUFWeights(path) as weights:
        assert weights.keys() == [
            "model.norm.weight", "model.layers.0.self_attn.q_norm.weight",
            "model.layers.0.pre_feedforward_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
            "model.layers.0.post_feedforward_layernorm.weight", "model.layers.0.self_attn.q_proj.weight"]
        expected_norm = torch.from_numpy((norm + 1).astype(np.float32) - np.float32(1))
        assert torch.equal(weights.get("model.norm.weight"), expected_norm)
        assert torch.allclose(weights.get("model.layers.0.self_attn.q_norm.weight"),
                              torch.from_numpy(q_norm).float(), atol=1e-6)
        got_q = weights.get("model.layers.0.self_attn.q_proj.weight")  # gemma: no row permutation
        assert torch.equal(got_q, torch.from_numpy(round_trip(q, Q.Q8_0)))
        assert (got_q - torch.from_numpy(q).float()).abs().max() < 0.02


def test_keys_and_shapes_never_dequantize(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "m.gguf", "llama", {"token_embd.weight": (np.ones((8, 32)), Q.Q8_0)})

    def refuse(*args):
        raise AssertionError("dequantized")

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    weights = open_weights(path)
    assert isinstance(weights, GGUFWeights)
    assert weights.keys() == ["model.embed_tokens.weight"]
    assert weights.shape("model.embed_tokens.weight") == (8, 32)
    assert "model.embed_tokens.weight" in weights
    fingerprint = weights.fingerprint("model.embed_tokens.weight")
    assert fingerprint.startswith(str(path.resolve()) + "|") and fingerprint.endswith("|model.embed_tokens.weight")
    assert weights.fingerprint("nope") is None


def test_directory_with_one_gguf_and_missing_tensor(tmp_path):
    write_gguf(tmp_path / "m.gguf", "qwen2", {"blk.1.attn_k.bias": (np.arange(4.0), Q.F32)})
    with open_weights(tmp_path) as weights:
        assert torch.equal(weights.get("model.layers.1.self_attn.k_proj.bias"), torch.arange(4.0))
        with pytest.raises(WeightsNotFoundError, match="q_proj"):
            weights.get("model.layers.1.self_attn.q_proj.weight")
    assert torch.equal(weights.get("model.layers.1.self_attn.k_proj.bias"), torch.arange(4.0))  # after close


# --- the same answers as transformers ----------------------------------------------------------------------


def _tiny_config(arch):
    import transformers as tf

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return {
        "llama": lambda: tf.LlamaConfig(**sizes, tie_word_embeddings=False),
        "qwen2": lambda: tf.Qwen2Config(**sizes, tie_word_embeddings=False),
        "qwen3": lambda: tf.Qwen3Config(**sizes, head_dim=128),  # transformers reads no head_dim for qwen3
        "gemma2": lambda: tf.Gemma2Config(**sizes, head_dim=8),
        "gemma3": lambda: tf.Gemma3TextConfig(**sizes, head_dim=8, sliding_window=16),
    }[arch]()


def _metadata(arch, config):
    """The hyperparameters transformers reads back from a GGUF file."""
    meta = {"context_length": 64, "embedding_length": 32, "block_count": 2, "feed_forward_length": 64,
            "attention.head_count": 4, "attention.head_count_kv": 2, "attention.layer_norm_rms_epsilon": 1e-6,
            "vocab_size": 96, "rope.freq_base": 10000.0}
    if arch == "llama":
        meta["rope.dimension_count"] = 8
    if arch.startswith("gemma") or arch == "qwen3":
        head_dim = config.head_dim
        meta.update({"attention.key_length": head_dim, "attention.value_length": head_dim})
    if arch.startswith("gemma"):
        meta["attention.sliding_window"] = 16
    return {f"{arch}.{key}": value for key, value in meta.items()}


def _to_gguf(arch, state, config):
    """Convert a HF state dict as llama.cpp's convert_hf_to_gguf.py does: names, q/k permutation, norm + 1."""
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), 2)
    tensors, kinds = {}, [Q.F32, Q.F16, Q.Q8_0]
    for i, (hf_name, value) in enumerate(state.items()):
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        value = value.numpy().astype(np.float32)
        if arch == "llama" and stem.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if "q_proj" in stem else config.num_key_value_heads
            value = value.reshape(heads, 2, -1, value.shape[-1]).swapaxes(1, 2).reshape(value.shape)
        if arch.startswith("gemma") and "norm" in stem:
            value = value + 1
        kind = kinds[i % 3] if value.ndim == 2 else kinds[i % 2]
        tensors[f"{names.get_name(stem)}.{suffix}"] = (value, kind)
    return tensors


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_same_tensors_as_transformers(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    config = _tiny_config(arch)
    torch.manual_seed(0)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    state = {k: torch.randn(v.shape) for k, v in skeleton.state_dict().items()}
    tensors = _to_gguf(arch, state, config)
    write_gguf(tmp_path / "tiny.gguf", arch, tensors, _metadata(arch, config))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").state_dict()
    with GGUFWeights(tmp_path / "tiny.gguf") as weights:
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        assert sorted(weights.keys()) == sorted(set(reference) - tied)
        for name in weights.keys():
            got = weights.get(name)
            assert got.dtype == torch.float32 and weights.shape(name) == tuple(got.shape)
            assert torch.equal(got, reference[name]), name
            assert torch.allclose(got, state[name], atol=0.05), name  # the original, up to quantization


# --- broken input ----------------------------------------------------------------------------------------------


@pytest.fixture
def small_file(tmp_path):
    return write_gguf(tmp_path / "small.gguf", "llama", {
        "token_embd.weight": (np.ones((16, 64)), Q.Q8_0), "output_norm.weight": (np.ones(64), Q.F32)},
        {"llama.attention.head_count": 2, "general.name": "x" * 40})


@pytest.mark.parametrize("keep", [0, 3, 12, 40, 200, -100, -1])
def test_truncated_file(small_file, keep):
    data = small_file.read_bytes()
    small_file.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(CorruptWeightsError, match="small.gguf"):
        GGUFWeights(small_file)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CorruptWeightsError, match="junk.gguf.*magic"):
        open_weights(tmp_path / "junk.gguf")


def test_unsupported_architecture_says_what_to_do(tmp_path):
    path = write_gguf(tmp_path / "phi.gguf", "phi3", {"token_embd.weight": (np.ones((4, 32)), Q.F32)})
    with pytest.raises(CorruptWeightsError, match="'phi3'.*safetensors"):
        GGUFWeights(path)


def test_unknown_tensor_is_refused_and_rope_factors_ignored(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "llama", {
        "rope_freqs.weight": (np.ones(4), Q.F32), "blk.0.attn_q.weight": (np.ones((8, 32)), Q.F32)},
        {"llama.attention.head_count": 2})
    assert GGUFWeights(path).keys() == ["model.layers.0.self_attn.q_proj.weight"]
    path = write_gguf(tmp_path / "n.gguf", "llama", {"blk.0.ssm_conv1d.weight": (np.ones((8, 4)), Q.F32)})
    with pytest.raises(CorruptWeightsError, match="ssm_conv1d"):
        GGUFWeights(path)


def test_missing_head_count_is_a_clear_error(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "llama", {"blk.0.attn_q.weight": (np.ones((8, 32)), Q.F32)})
    with pytest.raises(CorruptWeightsError, match="llama.attention.head_count"):
        GGUFWeights(path).get("model.layers.0.self_attn.q_proj.weight")


def test_missing_gguf_package(small_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(IntruderError, match="pip install gguf"):
        GGUFWeights(small_file)


# --- the real Gemma 3 270M ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma():
    """(GGUF path, converted directory, cache): converted once into the user's cache, shared with the demo."""
    from intruder.weights.models import gemma_270m_dir, gemma_270m_gguf

    return gemma_270m_gguf(), gemma_270m_dir(USER_CACHE), USER_CACHE


@pytest.mark.real_model
def test_gemma_270m_tensors_equal_transformers(gemma):
    from safetensors import safe_open

    gguf_path, directory, _ = gemma
    started = time.perf_counter()
    weights = GGUFWeights(gguf_path)
    assert time.perf_counter() - started < 5  # gguf.GGUFReader needs ~30 s for the tokenizer metadata
    with safe_open(directory / "model.safetensors", framework="pt") as reference:
        assert sorted(weights.keys()) == sorted(reference.keys())
        assert len(weights.keys()) == 236
        for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.17.mlp.down_proj.weight",
                     "model.layers.5.self_attn.k_proj.weight", "model.layers.3.input_layernorm.weight",
                     "model.layers.9.self_attn.k_norm.weight", "model.norm.weight"]:
            assert weights.shape(name) == tuple(reference.get_slice(name).get_shape())
            assert torch.equal(weights.get(name), reference.get_tensor(name)), name


@pytest.mark.real_model
def test_gemma_270m_dir_is_cached_and_loads(gemma):
    """The converted directory: found again at once, reloads with transformers, same logits as the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from intruder.weights.models import gemma_270m_dir

    gguf_path, directory, cache = gemma
    started = time.perf_counter()
    assert gemma_270m_dir(cache) == directory
    assert time.perf_counter() - started < 1
    assert not list(directory.parent.glob(".*.tmp"))
    marker = json.loads((directory / ".intruder-complete.json").read_text())
    assert marker["max_logit_gap"] <= 1e-4  # against the model transformers loaded from the GGUF
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = AutoTokenizer.from_pretrained(directory)("Xin chào, thế giới!", return_tensors="pt").input_ids
    # an independent path: the same architecture filled from GGUFWeights
    twin = AutoModelForCausalLM.from_config(model.config).eval()
    with GGUFWeights(gguf_path) as weights:
        missing, unexpected = twin.load_state_dict({k: weights.get(k) for k in weights.keys()}, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    assert twin.lm_head.weight.data_ptr() == twin.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, twin(ids).logits, atol=1e-4, rtol=0)
