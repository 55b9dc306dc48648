import copy
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from intruder import IntruderError
from intruder.training.data import ANSWER_CUE, LETTERS, load_general_text, load_mcq
from intruder.training.evaluate import TruncationWarning, encode_prompts, letter_token_ids, mcq_accuracy, text_loss


@pytest.fixture(scope="module")
def lm(tiny_lm):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_lm)


def _alone(model, ids):
    """Logits of one unpadded sequence, (T, V): the reference that batching must reproduce."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_letter_scoring_matches_unbatched_argmax(lm):
    model, tokenizer = lm
    questions = load_mcq("sample", split="test")[:12]
    letters = letter_token_ids(tokenizer)
    prompts = encode_prompts(tokenizer, [q.prompt(context=True) for q in questions], 512)
    expected = [LETTERS[int(_alone(model, p)[-1, letters].argmax())] for p in prompts]
    for batch_size in (1, 5, 12):  # left padding must not change a row's answer
        result = mcq_accuracy(model, tokenizer, questions, batch_size=batch_size)
        assert result["predictions"] == expected
    assert result["accuracy"] == sum(e == q.answer_key for e, q in zip(expected, questions)) / len(questions)


def test_mean_loglik_scoring_matches_unbatched(lm):
    model, tokenizer = lm
    questions = load_mcq("sample", split="test")[:5]
    expected = []
    for q in questions:
        prompt = encode_prompts(tokenizer, [q.prompt(context=False)], 512)[0]
        means = []
        for letter, option in zip(LETTERS, q.options):
            cont = tokenizer(f" {letter}. {option}", add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(_alone(model, prompt + cont), -1)
            means.append(sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(cont)) / len(cont))
        expected.append(LETTERS[max(range(4), key=means.__getitem__)])
    result = mcq_accuracy(model, tokenizer, questions, context=False, scoring="mean-loglik", batch_size=8)
    assert result["predictions"] == expected


def test_text_loss_is_token_weighted_next_token_loss(lm):
    model, tokenizer = lm
    model = copy.deepcopy(model)
    with torch.no_grad():  # spread the logits, so that tokens (and texts) have clearly different losses
        model.get_output_embeddings().weight.mul_(40)
    texts = [text[:length] for text, length in zip(load_general_text()[:4], (30, 60, 90, 1000))]
    total, tokens, per_text = 0.0, 0, []
    for text in texts:
        ids = tokenizer(text)["input_ids"][:64]
        with torch.no_grad():
            loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
        total += float(loss) * (len(ids) - 1)
        tokens += len(ids) - 1
        per_text.append(float(loss))
    assert len({len(tokenizer(t)["input_ids"][:64]) for t in texts}) == 4  # unequal lengths
    assert abs(sum(per_text) / 4 - total / tokens) > 0.05  # a mean of per-text means would be caught
    for batch_size, chunk in ((1, 128), (3, 7), (4, 1)):
        result = text_loss(model, tokenizer, texts, batch_size=batch_size, max_length=64, chunk=chunk)
        assert result["tokens"] == tokens
        assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)


def test_long_prompts_keep_their_end(lm):
    _, tokenizer = lm
    q = load_mcq("sample")[0]
    full = encode_prompts(tokenizer, [q.prompt(context=True)], 10_000)[0]
    n = len(full) - 5  # the context loses its start
    with pytest.warns(TruncationWarning, match=f"1 of 1 prompts are longer than max_length={n} tokens"):
        cut = encode_prompts(tokenizer, [q.prompt(context=True)], n)[0]
    assert len(cut) == n and cut[1:] == full[-(n - 1):] and cut[0] == full[0] == tokenizer.bos_token_id


def test_truncation_never_cuts_the_options_or_the_answer_cue(lm):
    _, tokenizer = lm
    questions = load_mcq("sample")[:8]
    prompts = [q.prompt(context=True) for q in questions]
    with pytest.raises(IntruderError, match=r"max_length=1 tokens would cut into the options or the answer cue "
                                            r"'Đáp án:' of 8 of 8 prompts") as refused:
        encode_prompts(tokenizer, prompts, 1)
    need = int(re.search(r"use max_length >= (\d+) \(--max-length \1\)", str(refused.value)).group(1))
    tails = [len(tokenizer(p[p.rindex("\nA. ") + 1:], add_special_tokens=False)["input_ids"]) for p in prompts]
    assert max(tails) < need <= max(tails) + 3  # BOS, and a token or two across the line break
    with pytest.warns(TruncationWarning, match=r"\d+ of 8 prompts are longer"):
        kept = encode_prompts(tokenizer, prompts, need)
    for ids, q in zip(kept, questions):  # the smallest max_length that works keeps every option and the cue
        text = tokenizer.decode(ids[1:], clean_up_tokenization_spaces=False)
        assert all(f"{letter}. {option}" in text for letter, option in zip(LETTERS, q.options))
        assert text.endswith(ANSWER_CUE)
    with pytest.raises(IntruderError, match=f"use max_length >= {need} "):
        encode_prompts(tokenizer, prompts, need - 1)


def test_bad_evaluation_input(lm):
    model, tokenizer = lm
    with pytest.raises(IntruderError, match="scoring='best'"):
        mcq_accuracy(model, tokenizer, load_mcq("sample")[:2], scoring="best")
    with pytest.raises(IntruderError, match="test split is empty"):
        mcq_accuracy(model, tokenizer, [])
    with pytest.raises(IntruderError, match="corpus is empty"):
        text_loss(model, tokenizer, [])
