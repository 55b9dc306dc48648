"""The bundled trainer: LoRA or full fine-tuning of a causal LM on multiple-choice questions, in one loop.

    from intruder.train import TrainConfig, train
    summary = train(TrainConfig(out="runs/lora-r8", method="lora", rank=8, alpha=16, epochs=3))

A run directory holds `config.json`, `metrics.jsonl` (one JSON object per training step and per evaluation),
`summary.json`, one checkpoint per epoch (`epoch-01/`, ...: a PEFT adapter for LoRA, a safetensors model for
full fine-tuning, both readable by `find_intruders(config["model_path"], run / "epoch-01")`) and `state.pt`,
from which `resume=True` continues an interrupted run exactly. Every checkpoint and state file is written
beside its place and renamed into it, so an interruption never leaves a broken one; a run that stops before
its first epoch ends leaves `out` as it was (an overwritten run is put back).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ..errors import IntruderError
from ..outputs import atomic_dir, check_output_dir, versions, write_text
from ..weights import open_weights
from . import data as mcq_data
from .config import TrainConfig
from .evaluate import (
    TruncationWarning,
    answer_loss,
    encode_prompts,
    letter_loss,
    letter_token_ids,
    mcq_accuracy,
    pad_id,
    text_loss,
)
from .lora import add_lora, load_adapter_state, save_adapter
from .modeling import load_model
from .rundir import RunDirectory, holds_run


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Run `config` to the end and return its summary (also written to `<out>/summary.json`).

    Everything is checked before `out` is touched: the options, the device, the data, the model and the prompt
    length. A run that stops before its first epoch ends leaves `out` as it was: what this call created is
    removed, and the run `overwrite` replaces is put back (it is deleted only once the new run has an epoch).
    """
    out = Path(config.out)
    _check_out(out, config, resume=resume, overwrite=overwrite)
    device = resolve_device(config.device)
    state = _load_state(out) if resume else None
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    questions = mcq_data.load_mcq(config.data)
    train_set, test_set = mcq_data.train_test_split(questions, test_fraction=config.test_fraction, seed=config.seed)
    general = mcq_data.load_general_text(config.general_text, limit=config.forget_texts)
    model, tokenizer, model_path = load_model(config.model, device=device)
    trainable = _prepare(model, config)
    _check_prompt_length(tokenizer, questions, config)
    examples = _encode(tokenizer, train_set, config)

    with RunDirectory(out, new=not resume) as run_dir:
        _write_json(out / "config.json", asdict(config) | {"model_path": str(model_path)})
        pad = pad_id(tokenizer)
        steps_per_epoch = math.ceil(math.ceil(len(examples) / config.batch_size) / config.grad_accum)
        total_steps = steps_per_epoch * config.epochs
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total_steps))
        autocast = _autocast(config, device)
        metrics = out / "metrics.jsonl"
        evaluate = _evaluator(model, tokenizer, test_set, general, config, autocast)

        start_epoch, step = 0, 0
        if state is not None:
            start_epoch, step = _restore(state, model, config, out, optimizer, schedule, metrics)
        else:
            metrics.write_text("", encoding="utf-8")
            if config.eval_before:
                _log(metrics, {"kind": "eval", "step": 0, "epoch": 0, **evaluate()})

        bar = _progress_bar(total_steps, step, progress)
        started = time.perf_counter()
        for epoch in range(start_epoch, config.epochs):
            model.train()
            for batches in _epoch_batches(examples, config, epoch):
                loss, tokens, seconds = _optimizer_step(model, batches, trainable, optimizer, schedule, config, pad,
                                                        autocast)
                step += 1
                record = {"kind": "train", "step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss,
                          "lr": schedule.get_last_lr()[0], "tokens_per_s": tokens / seconds,
                          "elapsed_s": round(time.perf_counter() - started, 3)}
                _log(metrics, record)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                _log(metrics, {"kind": "eval", "step": step, "epoch": epoch + 1, **evaluate()})
            _checkpoint(model, config, out, epoch + 1, model_path)
            _save_state(out, epoch + 1, step, optimizer, schedule, metrics)
            run_dir.keep()  # an epoch is saved: the new run stays, the run it replaces goes
        bar.close()
        return _write_summary(out, config, model_path, trainable, len(train_set), len(test_set))


def saved_config(out: Path) -> dict:
    """The settings a run was started with (`out/config.json`), or an IntruderError saying what is wrong."""
    path = Path(out) / "config.json"
    if not path.is_file():
        raise IntruderError(f"{path} does not exist, so the settings {out} was started with are unknown: put its "
                            "config.json back to resume it, or start the run afresh with --overwrite")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise IntruderError(f"{path} cannot be read ({exc}): restore it to resume the run, or start it afresh "
                            "with --overwrite") from exc
    if not isinstance(values, dict):
        raise IntruderError(f"{path} holds a JSON {type(values).__name__}, not the run's settings: restore it to "
                            "resume the run, or start it afresh with --overwrite")
    return values


def _check_out(out: Path, config: TrainConfig, *, resume: bool, overwrite: bool) -> None:
    """Refuse an `out` this call may not use, touching nothing: a file, a folder that cannot be written, another
    run (without resume or overwrite), a folder of other files, or a run to resume started with other settings.
    The `out` a resumed run was saved with need not match: the folder given holds the run (it may have moved)."""
    if resume and overwrite:
        raise IntruderError("choose either resume or overwrite, not both")
    check_output_dir(out)
    is_run = holds_run(out)
    if resume:
        if not (out / "state.pt").exists():
            raise IntruderError(f"{out} has no finished epoch to resume from (no state.pt); start it afresh "
                                "with --overwrite")
        saved = TrainConfig.from_dict(saved_config(out))
        changed = [f.name for f in fields(TrainConfig)
                   if f.name != "out" and getattr(saved, f.name) != getattr(config, f.name)]
        if changed:
            raise IntruderError(f"{out} was started with other settings ({', '.join(changed)} differ); resume "
                                "it with the settings in its config.json, or start a new run")
        return
    if is_run and not overwrite:
        raise IntruderError(f"{out} holds another training run; pass --resume to continue it, --overwrite to "
                            "replace it, or choose another --out")
    if out.is_dir() and not is_run and any(out.iterdir()):
        raise IntruderError(f"{out} is not empty and holds no training run; choose an empty or new directory")


def _prepare(model, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Add LoRA layers, or unfreeze the linear (and optionally embedding) weights; the trainable list."""
    if config.method == "lora":
        add_lora(model, config.lora_spec())
    else:
        model.requires_grad_(False)
        head = model.get_output_embeddings()
        for module in model.modules():
            linear = isinstance(module, torch.nn.Linear) and module is not head
            if linear or (config.train_embeddings and isinstance(module, torch.nn.Embedding)):
                module.weight.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:  # pragma: no cover - add_lora raises first
        raise IntruderError("nothing to train: no parameter was selected")
    return trainable


def _check_prompt_length(tokenizer, questions, config: TrainConfig) -> None:
    """Refuse a max_length that would cut the options or the answer cue of a prompt, train or test, and say once
    how many prompts lose their start; the encodings that follow (`_encode`, each evaluation) say it no more."""
    encode_prompts(tokenizer, [q.prompt(context=config.context) for q in questions], config.max_length)


def _encode(tokenizer, questions, config: TrainConfig) -> list[tuple[list[int], list[int] | int]]:
    """(prompt ids, target) per question: the letter's token id, or the answer text's ids."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)  # said for all questions by _check_prompt_length
        prompts = encode_prompts(tokenizer, [q.prompt(context=config.context) for q in questions],
                                 config.max_length)
    if config.loss == "letter":
        letters = letter_token_ids(tokenizer)
        return [(p, letters[q.answer_index]) for p, q in zip(prompts, questions)]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [(p, tokenizer(q.answer_text(full=True), add_special_tokens=False)["input_ids"] + eos)
            for p, q in zip(prompts, questions)]


def _epoch_batches(examples: list, config: TrainConfig, epoch: int):
    """Per optimizer step, its micro-batches; the order depends only on (seed, epoch), so a resumed run
    sees the same batches as an uninterrupted one."""
    generator = torch.Generator().manual_seed(config.seed * 1009 + epoch)
    order = torch.randperm(len(examples), generator=generator).tolist()
    size, window = config.batch_size, config.batch_size * config.bucket
    if config.bucket > 1:  # sort each window of `bucket` micro-batches by prompt length: less padding
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: len(examples[i][0]))]
    micro = [[examples[i] for i in order[s:s + size]] for s in range(0, len(order), size)]
    if config.bucket > 1:  # and shuffle the micro-batches again, so lengths do not follow a pattern
        micro = [micro[i] for i in torch.randperm(len(micro), generator=generator).tolist()]
    for s in range(0, len(micro), config.grad_accum):
        yield micro[s:s + config.grad_accum]


def _optimizer_step(model, batches, trainable, optimizer, schedule, config, pad: int, autocast):
    """One AdamW step over `batches` (gradient accumulation); (mean loss, tokens seen, seconds)."""
    t0 = time.perf_counter()
    n_examples = sum(len(b) for b in batches)
    total_loss, tokens = 0.0, 0
    for batch in batches:
        prompts = [p for p, _ in batch]
        targets = [t for _, t in batch]
        with autocast:
            if config.loss == "letter":
                loss = letter_loss(model, prompts, targets, pad)
            else:
                loss = answer_loss(model, prompts, targets, pad)
        (loss * len(batch) / n_examples).backward()
        total_loss += loss.item() * len(batch) / n_examples
        tokens += sum(len(p) + (len(t) if isinstance(t, list) else 1) for p, t in batch)
    torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return total_loss, tokens, time.perf_counter() - t0


def _lr_lambda(config: TrainConfig, total_steps: int):
    warmup = round(config.warmup * total_steps)

    def factor(step: int) -> float:  # the multiplier of the peak lr for the step about to be taken
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1.0 - progress

    return factor


def evaluate_model(model, tokenizer, config: TrainConfig) -> dict:
    """Learning and forgetting of `model` as the trainer measures them for `config`: held-out accuracy on the
    config's test split and loss on its general-text corpus; {"accuracy", "forget_loss", ...}."""
    questions = mcq_data.load_mcq(config.data)
    _, test_set = mcq_data.train_test_split(questions, test_fraction=config.test_fraction, seed=config.seed)
    general = mcq_data.load_general_text(config.general_text, limit=config.forget_texts)
    device = next(model.parameters()).device
    return _evaluator(model, tokenizer, test_set, general, config, _autocast(config, device))()


def _evaluator(model, tokenizer, test_set, general, config: TrainConfig, autocast):
    def evaluate() -> dict:
        with autocast, warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)  # said once, before training
            mcq = mcq_accuracy(model, tokenizer, test_set, context=config.context, scoring=config.scoring,
                               batch_size=config.eval_batch_size, max_length=config.max_length)
            text = text_loss(model, tokenizer, general)
        return {"accuracy": mcq["accuracy"], "n_questions": mcq["n_questions"], "forget_loss": text["loss"],
                "perplexity": text["perplexity"], "forget_tokens": text["tokens"]}

    return evaluate


def _checkpoint(model, config: TrainConfig, out: Path, epoch: int, model_path: Path) -> None:
    target = out / f"epoch-{epoch:02d}"
    if config.method == "lora":
        save_adapter(model, config.lora_spec(), target, base_model=str(model_path))
        return
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)


def _save_state(out: Path, epoch: int, step: int, optimizer, schedule, metrics: Path) -> None:
    """What `resume` needs beyond the checkpoint: optimizer, schedule, RNG and the log's length."""
    state = {"epoch": epoch, "step": step, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "rng": torch.get_rng_state(), "python_rng": random.getstate(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "metrics_bytes": metrics.stat().st_size}
    tmp = out / f".state.pt.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, out / "state.pt")


def _load_state(out: Path) -> dict:
    try:
        return torch.load(out / "state.pt", weights_only=False, map_location="cpu")
    except Exception as exc:  # a state file we wrote ourselves; anything else is damage
        raise IntruderError(f"{out / 'state.pt'} cannot be read ({exc}); start the run afresh with --overwrite"
                            ) from exc


def _restore(state: dict, model, config: TrainConfig, out: Path, optimizer, schedule, metrics: Path):
    """Put the run back where its last finished epoch left it; (next epoch index, step)."""
    checkpoint = out / f"epoch-{state['epoch']:02d}"
    if config.method == "lora":
        load_adapter_state(model, checkpoint)
    else:
        with open_weights(checkpoint) as saved, torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    param.copy_(saved.get(name))
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    random.setstate(state["python_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    with metrics.open("r+b") as f:  # drop what the interrupted epoch logged
        f.truncate(state["metrics_bytes"])
    return state["epoch"], state["step"]


def _write_summary(out: Path, config, model_path, trainable, n_train: int, n_test: int) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    steps = [r for r in records if r["kind"] == "train"]
    before = next((r for r in evals if r["epoch"] == 0), None)  # absent with eval_before=False
    summary = {
        "config": asdict(config) | {"model_path": str(model_path)}, "evals": evals,
        "accuracy_after": evals[-1]["accuracy"], "forget_loss_after": evals[-1]["forget_loss"],
        "accuracy_before": before["accuracy"] if before else None,
        "forget_loss_before": before["forget_loss"] if before else None,
        "forgetting": evals[-1]["forget_loss"] - before["forget_loss"] if before else None,
        "steps": len(steps), "tokens_per_s": sum(r["tokens_per_s"] for r in steps) / max(1, len(steps)),
        "trainable_parameters": sum(p.numel() for p in trainable), "n_train": n_train, "n_test": n_test,
        "checkpoints": sorted(p.name for p in out.glob("epoch-*") if p.is_dir()),
        "versions": versions(("torch", "transformers", "numpy", "safetensors")),
    }
    _write_json(out / "summary.json", summary)
    return summary


def resolve_device(name: str) -> torch.device:
    """"auto" (CUDA when torch sees one, else the CPU), "cpu", "cuda" or "cuda:N", "mps"; IntruderError for a
    name torch does not know or a device it does not see."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise IntruderError(f"device={name!r} is not a torch device ({exc}); use auto (the default), cpu or "
                            "cuda") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and count == 0:
        raise IntruderError(f"device={name!r} but this torch ({torch.__version__}) sees no CUDA device; use "
                            "device='cpu' (or leave it 'auto'), or install a CUDA build of torch")
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise IntruderError(f"device={name!r} but torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise IntruderError(f"device={name!r} but torch sees no Apple GPU (MPS); use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise IntruderError(f"device={name!r}: train on auto, cpu, cuda or mps")
    return device


def _autocast(config: TrainConfig, device: torch.device):
    if device.type == "cuda" and config.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _progress_bar(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, disable=not enabled, unit="step", dynamic_ncols=True)


def _log(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _write_json(path: Path, value: dict) -> None:
    write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")
