"""Forgetting measure on Gemma 3 270M: the chunked general-text loss against the full-logits computation it
replaced (logits of every position at once, then log-softmax), measured in the same process.

    .venv/bin/python benchmarks/bench_eval.py            # prints a Markdown table; ~3 minutes on 2 cores
"""

from __future__ import annotations

import time

import torch

from intruder.training.data import load_general_text
from intruder.training.evaluate import continuation_logprobs, pad_id, text_loss
from intruder.training.modeling import load_model


def full_logits_loss(model, tokenizer, texts, max_length=256) -> tuple[float, int]:
    """The previous method: one text at a time, logits of every position, float log-softmax."""
    encoded = [ids[:max_length] for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    total, tokens, pad = 0.0, 0, pad_id(tokenizer)
    with torch.no_grad():
        for ids in encoded:
            summed, count = continuation_logprobs(model, [ids[:1]], [ids[1:]], pad)
            total -= float(summed.sum())
            tokens += int(count.sum())
    return total / tokens, tokens


def main() -> None:
    model, tokenizer, _ = load_model("gemma-3-270m")
    model.eval()
    texts = load_general_text()
    rows = []
    for name, run in (("full logits, one text at a time (before)", lambda: full_logits_loss(model, tokenizer, texts)),
                      ("chunked head, length-sorted batches of 4 (now)",
                       lambda: (lambda r: (r["loss"], r["tokens"]))(text_loss(model, tokenizer, texts)))):
        start = time.perf_counter()
        loss, tokens = run()
        rows.append((name, time.perf_counter() - start, loss, tokens))
    base = rows[0][1]
    print(f"torch threads: {torch.get_num_threads()}")
    print("| method | seconds | speed-up | loss (nats) | tokens |\n|---|---|---|---|---|")
    for name, seconds, loss, tokens in rows:
        print(f"| {name} | {seconds:.1f} | {base / seconds:.2f}× | {loss:.6f} | {tokens} |")


if __name__ == "__main__":
    main()
