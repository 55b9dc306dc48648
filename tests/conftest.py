import numpy as np
import pytest
import torch

from intruder.outputs import default_cache_dir

# The user's cache, read before any test points INTRUDER_CACHE elsewhere: real-model tests convert Gemma 3
# 270M into it once (about two minutes), as the demo and the benchmark do.
USER_CACHE = default_cache_dir()


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """Every test: a fixed seed, its own factor cache, and no way to reach a model hub."""
    torch.manual_seed(0)
    monkeypatch.setenv("INTRUDER_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def seed() -> int:
    return 0


def save_model_dir(path, tensors: dict, *, shards: int = 1):
    """Write `tensors` as a Hugging Face style safetensors checkpoint, optionally sharded with an index."""
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, path / "model.safetensors")
        return path
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, path / file)
        weight_map.update({k: file for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def sample_questions_file(path, n: int):
    """The first n bundled sample questions as a user data file (JSON lines, split left to the trainer)."""
    import json

    from intruder.training.data import load_mcq

    rows = [q.to_row() | {"split": ""} for q in load_mcq("sample")[:n]]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def build_tiny_lm(path, *, arch: str = "gemma3", vocab_size: int = 600, seed: int = 0):
    """A tiny random causal LM (2 layers, hidden 32) with a byte-level BPE tokenizer trained on the bundled
    questions and corpus, saved as a Hugging Face directory; a few seconds, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from intruder.training.data import load_general_text, load_mcq

    texts = [q.prompt(context=True) + q.answer_text(full=True) for q in load_mcq("sample")] + load_general_text()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])  # as Gemma
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>")
    config = _tiny_config(arch, len(tokenizer), tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _tiny_config(arch: str, vocab: int, tokenizer):
    from transformers import Gemma3TextConfig, LlamaConfig

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, sliding_window=64, tie_word_embeddings=True)
    return LlamaConfig(**common, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """Directory of a tiny random Gemma 3 model and its tokenizer (built once per session)."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


def brute_force_cosines(w0: torch.Tensor, wt: torch.Tensor, k: int = 10):
    """The paper's algorithm by brute force, every cosine kept: two full float64 SVDs of W_0 and W_t (m, n) ->
    |cos| of the top-k tuned left vectors with every base left vector (k, p), the same for right vectors
    (k, p), and the tuned singular values (k,); p = min(m, n), base vectors in descending σ."""
    u0, _, v0h = torch.linalg.svd(w0.to(torch.float64), full_matrices=False)
    ut, st, vth = torch.linalg.svd(wt.to(torch.float64), full_matrices=False)
    return (ut[:, :k].T @ u0).abs().numpy(), (vth[:k] @ v0h.T).abs().numpy(), st[:k].numpy()


def assert_cosines_match(layer, w0: torch.Tensor, wt: torch.Tensor, *, rows=None, atol: float = 1e-8):
    """Every cosine a LayerResult stores against the brute force: max_cos_left/right, best_match_left/right
    (the index must attain the maximum, ties allowed) and `similarity` (the analysed side's |cos| with the
    first base vectors). rows: the tuned vectors to check (default all); leave out near-degenerate ones."""
    left, right, _ = brute_force_cosines(w0, wt, len(layer.max_cos_left))
    rows = np.arange(left.shape[0]) if rows is None else np.asarray(rows)
    for cos, max_cos, best in ((left, layer.max_cos_left, layer.best_match_left),
                               (right, layer.max_cos_right, layer.best_match_right)):
        np.testing.assert_allclose(max_cos[rows], cos[rows].max(axis=1), atol=atol)
        np.testing.assert_allclose(cos[rows, best[rows]], cos[rows].max(axis=1), atol=atol)  # best attains it
    shown = right if layer.side == "right" else left
    width = layer.similarity.shape[1]
    assert width == min(128, shown.shape[1])
    np.testing.assert_allclose(layer.similarity[rows], shown[rows, :width], atol=max(atol, 1e-6))
