"""Learning and forgetting of a causal LM, as the trainer logs them before training and after every epoch.

Learning: accuracy on held-out multiple-choice questions. The model reads the Vietnamese prompt, which ends
with "Đáp án:", and picks the letter whose token has the highest log-probability at that position
(`scoring="letter"`), or the option whose text " B. <option>" has the highest mean token log-likelihood
(`scoring="mean-loglik"`).
Forgetting: mean token loss (nats) and perplexity on a general-text corpus; its rise over training is the
forgetting figure of "LoRA Learns Less and Forgets Less" (Biderman et al. 2024).

Batches are left-padded, with position ids counted from each row's first real token, so a row scores the
same whatever it is batched with; only the logits of the positions that are scored are computed.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..errors import IntruderError
from .data import ANSWER_CUE, LETTERS, MCQ

SCORINGS = ("letter", "mean-loglik")
_FIRST_OPTION = f"\n{LETTERS[0]}. "  # how MCQ.prompt starts the line of the first option


class TruncationWarning(UserWarning):
    """Prompts longer than `max_length` lost the start of their question or context (`encode_prompts`)."""


def letter_token_ids(tokenizer) -> list[int]:
    """Token ids of " A".." D" as the tokenizer writes them after the answer cue; (4,) distinct ids."""
    cue = tokenizer(ANSWER_CUE, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in LETTERS:
        full = tokenizer(f"{ANSWER_CUE} {letter}", add_special_tokens=False)["input_ids"]
        if full[: len(cue)] != cue or len(full) != len(cue) + 1:
            raise IntruderError(f"the tokenizer does not write {letter!r} after {ANSWER_CUE!r} as one token; "
                                "train with loss='answer' and evaluate with scoring='mean-loglik'")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise IntruderError(f"the tokenizer maps the letters A-D to repeated tokens {ids}")
    return ids


def encode_prompts(tokenizer, prompts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each prompt; a prompt over `max_length` loses tokens from its start (after BOS), so its
    end, where the answer goes, always survives.

    Warns (TruncationWarning) how many prompts were cut. Raises IntruderError when `max_length` is too small to
    keep every prompt's end from its options on ("A. ..." to the answer cue), and says the smallest `max_length`
    that keeps them.
    """
    fast = getattr(tokenizer, "is_fast", False)
    batch = tokenizer(prompts, add_special_tokens=True, return_offsets_mapping=fast)
    encoded = batch["input_ids"]
    bos = tokenizer.bos_token_id
    needs = [_tokens_to_keep(tokenizer, prompt, ids, batch["offset_mapping"][i] if fast else None, bos)
             for i, (prompt, ids) in enumerate(zip(prompts, encoded))]
    need = max(needs, default=0)
    if need > max_length:
        short = sum(n > max_length for n in needs)
        raise IntruderError(
            f"max_length={max_length} tokens would cut into the options or the answer cue {ANSWER_CUE!r} of "
            f"{short} of {len(prompts)} prompts, and the model could no longer see what it answers: use "
            f"max_length >= {need} (--max-length {need}), the smallest that keeps every prompt's options and cue")
    cut = [len(ids) for ids in encoded if len(ids) > max_length]
    if cut:
        warnings.warn(f"{len(cut)} of {len(prompts)} prompts are longer than max_length={max_length} tokens and "
                      f"lose the start of their question or context (the longest has {max(cut)} tokens); raise "
                      f"--max-length to {max(cut)} to keep them whole", TruncationWarning, stacklevel=2)
    out = []
    for ids in encoded:
        if len(ids) > max_length:
            keep_bos = bos is not None and ids[0] == bos
            ids = ids[:1] + ids[len(ids) - max_length + 1:] if keep_bos else ids[-max_length:]
        out.append(ids)
    return out


def _tokens_to_keep(tokenizer, prompt: str, ids: list[int], offsets, bos) -> int:
    """How many tokens a truncated `prompt` must keep: its BOS and every token from its options on (the line
    "A. ..." through the answer cue; from the cue when there are no option lines)."""
    start = prompt.rfind(_FIRST_OPTION)
    start = start + 1 if start >= 0 else prompt.rfind(ANSWER_CUE)
    if start < 0:
        return 0
    keep_bos = int(bos is not None and bool(ids) and ids[0] == bos)
    if offsets is not None:  # fast tokenizer: the first token that covers a character of the tail
        first = next((i for i, (s, e) in enumerate(offsets) if e > start and e > s), len(ids))
        return len(ids) - first + keep_bos
    head = len(tokenizer(prompt[:start], add_special_tokens=True)["input_ids"])  # without offsets: estimate
    return min(len(ids), len(ids) - head + 1 + keep_bos)


def left_padded(sequences: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, position_ids, each (B, T), rows right-aligned."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


def last_logits(model, sequences: list[list[int]], pad_id: int, keep: int = 1) -> torch.Tensor:
    """Logits of the last `keep` positions, (B, keep, V), computing no others."""
    batch = left_padded(sequences, pad_id, _device(model))
    return model(**batch, logits_to_keep=keep, use_cache=False).logits[:, -keep:]


def continuation_logprobs(model, prompts: list[list[int]], continuations: list[list[int]], pad_id: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log p of each continuation given its prompt, and its token count; each (B,)."""
    lengths = torch.tensor([len(c) for c in continuations])
    keep = int(lengths.max()) + 1
    logits = last_logits(model, [p + c for p, c in zip(prompts, continuations)], pad_id, keep)  # (B, K, V)
    targets = torch.full((len(prompts), keep - 1), 0, dtype=torch.long)
    scored = torch.zeros((len(prompts), keep - 1), dtype=torch.bool)
    for row, cont in enumerate(continuations):
        targets[row, keep - 1 - len(cont):] = torch.tensor(cont)
        scored[row, keep - 1 - len(cont):] = True
    targets, scored = targets.to(logits.device), scored.to(logits.device)
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets[..., None])[..., 0]  # (B, K-1)
    return (logp * scored).sum(-1), lengths.to(logits.device)


@torch.no_grad()
def mcq_accuracy(model, tokenizer, questions: list[MCQ], *, context: bool = True, scoring: str = "letter",
                 batch_size: int = 8, max_length: int = 512) -> dict:
    """{"accuracy", "n_questions", "predictions"}: the chosen letter per question."""
    if scoring not in SCORINGS:
        raise IntruderError(f"scoring={scoring!r}: choose one of {', '.join(SCORINGS)}")
    if not questions:
        raise IntruderError("no questions to evaluate; the test split is empty")
    prompts = encode_prompts(tokenizer, [q.prompt(context=context) for q in questions], max_length)
    pad = pad_id(tokenizer)
    with _eval_mode(model):
        predictions = _choose(model, tokenizer, questions, prompts, pad, scoring, batch_size)
    correct = sum(p == q.answer_key for p, q in zip(predictions, questions))
    return {"accuracy": correct / len(questions), "n_questions": len(questions), "predictions": predictions}


def _choose(model, tokenizer, questions, prompts, pad: int, scoring: str, batch_size: int) -> list[str]:
    """The letter each question's scores pick."""
    predictions = []
    if scoring == "letter":
        letters = torch.tensor(letter_token_ids(tokenizer))
        for start in range(0, len(prompts), batch_size):
            logits = last_logits(model, prompts[start:start + batch_size], pad)[:, -1]  # (B, V)
            predictions += [LETTERS[i] for i in logits[:, letters.to(logits.device)].argmax(-1).tolist()]
    else:
        per_batch = max(1, batch_size // 4)
        for start in range(0, len(questions), per_batch):
            chunk = range(start, min(start + per_batch, len(questions)))
            conts = [tokenizer(f" {letter}. {questions[i].options[j]}", add_special_tokens=False)["input_ids"]
                     for i in chunk for j, letter in enumerate(LETTERS)]
            total, count = continuation_logprobs(model, [prompts[i] for i in chunk for _ in LETTERS], conts, pad)
            means = (total / count).view(len(chunk), len(LETTERS))
            predictions += [LETTERS[i] for i in means.argmax(-1).tolist()]
    return predictions


@torch.no_grad()
def text_loss(model, tokenizer, texts: list[str], *, batch_size: int = 4, max_length: int = 256,
              chunk: int = 128) -> dict:
    """{"loss", "perplexity", "tokens", "nll"}: mean next-token loss (nats) over every predicted token of `texts`;
    "nll" is their summed loss, which adds up over parts of a corpus (loss = nll / tokens).

    The output layer (a 262,144-way vocabulary on Gemma) dominates the cost: the decoder runs once per
    batch, and the output projection and cross-entropy run on `chunk` positions at a time, so the full
    (tokens, vocabulary) logits never exist at once. Texts are batched by length, which wastes no padding.
    """
    if not texts:
        raise IntruderError("no text to measure forgetting on; the general-text corpus is empty")
    encoded = [ids[:max_length] for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    encoded = sorted((ids for ids in encoded if len(ids) > 1), key=len)
    pad, total, tokens = pad_id(tokenizer), 0.0, 0
    decoder, head, cap = _decoder_and_head(model)
    with _eval_mode(model):
        for start in range(0, len(encoded), batch_size):
            rows = encoded[start:start + batch_size]
            batch = left_padded(rows, pad, _device(model))
            hidden = decoder(**batch, use_cache=False).last_hidden_state  # (B, T, d)
            scored = batch["attention_mask"].bool()
            scored[:, -1] = False  # the last position predicts nothing; every other real one predicts the next
            targets = batch["input_ids"].roll(-1, dims=1)[scored]  # (N,)
            hidden = hidden[scored]  # (N, d)
            for s in range(0, len(targets), chunk):
                logits = head(hidden[s:s + chunk]).float()  # (c, V)
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                total += float(F.cross_entropy(logits, targets[s:s + chunk], reduction="sum"))
            tokens += len(targets)
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "nll": total}


def _decoder_and_head(model):
    """(the decoder stack returning hidden states, the output layer, the final logit soft-cap or None)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings()
    if decoder is None or head is None:
        raise IntruderError(f"{type(model).__name__} exposes no decoder and output layer "
                            "(get_decoder / get_output_embeddings); measure forgetting with a causal LM")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return decoder, head, getattr(config, "final_logit_softcapping", None)


def letter_loss(model, prompts: list[list[int]], answers: list[int], pad_id: int) -> torch.Tensor:
    """Cross-entropy of the answer-letter token at the position after each prompt; a scalar."""
    logits = last_logits(model, prompts, pad_id)[:, -1]  # (B, V)
    return F.cross_entropy(logits.float(), torch.tensor(answers, device=logits.device))


def answer_loss(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over the tokens of each full answer (" B. <option text>"); a scalar."""
    summed, count = continuation_logprobs(model, prompts, answers, pad_id)
    return -summed.sum() / count.sum()


def pad_id(tokenizer) -> int:
    """The id padding is written with: the pad token, else EOS, else 0 (padding is always masked out)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0  # pragma: no cover


@contextmanager
def _eval_mode(model):
    """Dropout off while scoring; the model's previous mode back afterwards, also after an error."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device
