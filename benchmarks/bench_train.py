"""Training speed and peak memory of the bundled trainer against PEFT + transformers' Trainer, in one run.

    .venv/bin/python benchmarks/bench_train.py                 # Gemma 3 270M, LoRA r=8 on all linear layers
    .venv/bin/python benchmarks/bench_train.py --steps 12 --model DIR

Both sides train the same thing: LoRA r=8, α=16 on every linear layer of the model, on the bundled training
questions without context (prompts of about 95 tokens), batch 8, loss on the answer letter only, AdamW at
2e-3 with 10% warm-up, the same number of optimizer steps, on the same CPU with the same thread count. Each
side runs in its own fresh process, one after the other, so neither disturbs the other's timing or memory:

- ours: `intruder.training.trainer.train` end to end (one epoch over `steps` batches; its evaluation runs on a
  small held-out set and 2 corpus paragraphs, and its tokens/s comes from the per-step log, which excludes
  evaluation);
- PEFT: `get_peft_model(LoraConfig(target_modules="all-linear"))` and `Trainer` with labels -100 everywhere
  but the answer letter, which is the usual way to train a letter with Trainer.

Tokens/s counts prompt tokens plus the answer token, excluding padding, over the steps after the first.
Peak memory is the process's maximum resident set size. Writes benchmarks/out/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"
sys.path.insert(0, str(Path(__file__).parent))
from bench_analysis import _cpu  # noqa: E402  (one CPU description for every benchmark)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m", help="model directory (default Gemma 3 270M)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", choices=("ours", "peft"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = (_ours if args.child == "ours" else _peft)(args, Path(args.work))
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result))
        return
    from intruder.training.modeling import resolve_model

    model = resolve_model(args.model)  # convert once before timing anything
    work = Path(tempfile.mkdtemp(prefix="intruder-bench-train-"))
    _write_data(work, args.steps * args.batch_size)
    results = {side: _run_child(side, model, args, work) for side in ("ours", "peft")}
    ours, peft = results["ours"], results["peft"]
    speed = ours["tokens_per_s"] / peft["tokens_per_s"]
    memory = ours["peak_rss_mib"] / peft["peak_rss_mib"]
    for side, r in results.items():
        print(f"{side:5s} {r['tokens_per_s']:8.0f} tokens/s  {r['seconds_per_step']:.2f} s/step  "
              f"peak RSS {r['peak_rss_mib']:7.0f} MiB  first/last loss {r['losses'][0]:.3f}/{r['losses'][-1]:.3f}")
    print(f"ours/peft: speed {speed:.2f}x, peak memory {memory:.2f}x")
    OUT.mkdir(exist_ok=True)
    record = {"model": str(model), "steps": args.steps, "batch_size": args.batch_size, "rank": 8,
              "threads": _threads(), "cpu": _cpu(), "results": results, "speed_ratio": speed, "memory_ratio": memory}
    (OUT / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {OUT / 'train.json'}")


def _write_data(work: Path, n_train: int) -> None:
    from intruder.training.data import load_general_text, load_mcq

    train = load_mcq("sample", split="train")[:n_train]
    test = load_mcq("sample", split="test")[:8]
    with (work / "data.jsonl").open("w", encoding="utf-8") as f:
        for q in train + test:
            f.write(json.dumps(q.to_row(), ensure_ascii=False) + "\n")
    with (work / "general.jsonl").open("w", encoding="utf-8") as f:
        for text in load_general_text()[:2]:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def _run_child(side: str, model: Path, args, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--model", str(model), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--work", str(work)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        sys.exit(f"{side} failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]) | {"wall_s": time.perf_counter() - started}


def _ours(args, work: Path) -> dict:
    from intruder.training import TrainConfig, train

    out = work / "ours"
    config = TrainConfig(out=str(out), model=args.model, data=str(work / "data.jsonl"), method="lora", rank=8,
                         alpha=16, targets=("all-linear",), epochs=1, batch_size=args.batch_size, lr=2e-3,
                         warmup=0.1, context=False, general_text=str(work / "general.jsonl"))
    train(config, overwrite=True, progress=False)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["kind"] == "train"]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:])]
    rate = statistics.median(s["tokens_per_s"] for s in steps[1:])
    return {"tokens_per_s": rate, "seconds_per_step": statistics.median(times), "losses": [s["loss"] for s in steps]}


def _peft(args, work: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from intruder.training.data import load_mcq
    from intruder.training.evaluate import letter_token_ids

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    letters = letter_token_ids(tokenizer)
    rows = []
    for q in load_mcq(work / "data.jsonl", split="train"):
        ids = tokenizer(q.prompt(context=False))["input_ids"] + [letters[q.answer_index]]
        rows.append({"input_ids": ids, "labels": [-100] * (len(ids) - 1) + ids[-1:]})

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
        return {"input_ids": torch.tensor([pad(r["input_ids"], tokenizer.pad_token_id) for r in batch]),
                "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in batch]),
                "labels": torch.tensor([pad(r["labels"], -100) for r in batch])}

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.losses = [], []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    clock = Clock()
    training = TrainingArguments(output_dir=str(work / "peft"), per_device_train_batch_size=args.batch_size,
                                 max_steps=args.steps, learning_rate=2e-3, warmup_steps=round(0.1 * args.steps),
                                 lr_scheduler_type="cosine",
                                 logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                                 remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=training, train_dataset=rows, data_collator=collate, callbacks=[clock])
    trainer.train()
    tokens_per_step = sum(len(r["input_ids"]) for r in rows) / (len(rows) / args.batch_size)
    step = statistics.median(clock.times[1:])
    return {"tokens_per_s": tokens_per_step / step, "seconds_per_step": step, "losses": clock.losses}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
