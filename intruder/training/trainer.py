"""The bundled trainer: LoRA or full fine-tuning of a causal LM on multiple-choice questions, in one loop.

    from intruder.train import TrainConfig, train
    summary = train(TrainConfig(out="runs/lora-r8", method="lora", rank=8, alpha=16, epochs=3))

A run directory holds `config.json`, `metrics.jsonl` (one JSON object per training step and per evaluation),
`summary.json`, one checkpoint per epoch (`epoch-01/`, ...: a PEFT adapter for LoRA, a safetensors model for
full fine-tuning, both readable by `find_intruders(config["model_path"], run / "epoch-01")`) and `state.pt`,
from which `resume=True` continues an interrupted run exactly. Every checkpoint and state file is written
beside its place and renamed into it, so an interruption never leaves a broken one; a run that stops before
its first epoch ends leaves `out` as it was (an overwritten run is put back).

Started by torchrun (`torchrun --nproc_per_node N -m intruder train ...`), the run is spread over the N
processes with DistributedDataParallel: the global batch is batch_size × N × grad_accum, each rank trains on its
share of every micro-batch and evaluates its share of the questions, and rank 0 alone writes (parallel.py).
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import torch

from .. import distributed
from ..errors import IntruderError
from ..outputs import atomic_dir, check_output_dir, versions, write_text
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
from .lora import add_lora, save_adapter
from .modeling import load_model
from .parallel import Ranks
from .resume import load_state, random_state, restore, save_state, saved_config
from .rundir import holds_run


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          data_parallel: bool | None = None) -> dict:
    """Run `config` to the end and return its summary (also written to `<out>/summary.json`).

    Everything is checked before `out` is touched: the options, the device, the data, the model and the prompt
    length. A run that stops before its first epoch ends leaves `out` as it was: what this call created is
    removed, and the run `overwrite` replaces is put back (it is deleted only once the new run has an epoch).
    data_parallel: spread the run over the processes torchrun started (None: whenever torchrun started several;
    False: train in this process alone, as each run of a sweep does). Every rank returns the summary.
    """
    out = Path(config.out)
    ranks = Ranks.join(data_parallel, config.device)
    with ranks.together("preparing the run"):  # an error on one rank is raised on all
        if ranks.main:
            _check_out(out, config, resume=resume, overwrite=overwrite, world_size=ranks.size)
        device = resolve_device(ranks.device(config.device))
        state = load_state(out) if resume and ranks.main else None
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        questions = mcq_data.load_mcq(config.data)
        train_set, test_set = mcq_data.train_test_split(questions, test_fraction=config.test_fraction,
                                                        seed=config.seed)
        general = mcq_data.load_general_text(config.general_text, limit=config.forget_texts)
        model, tokenizer, model_path = load_model(config.model, device=device)
        trainable = _prepare(model, config)
        _check_prompt_length(tokenizer, questions, config)
        examples = _encode(tokenizer, train_set, config)
    ranks.seed(config.seed)
    state = ranks.broadcast(state)

    with ranks.run_directory(out, new=not resume) as run_dir:
        metrics = out / "metrics.jsonl" if ranks.main else None  # None: this rank logs nothing
        pad = pad_id(tokenizer)
        steps_per_epoch = math.ceil(math.ceil(len(examples) / (config.batch_size * ranks.size)) / config.grad_accum)
        total_steps = steps_per_epoch * config.epochs
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total_steps))
        autocast = _autocast(config, device)
        evaluate = _evaluator(model, tokenizer, test_set, general, config, autocast, ranks)

        start_epoch, step = 0, 0
        with ranks.together("starting the run"):
            if ranks.main:
                _write_json(out / "config.json", _recorded(config, model_path, ranks))
            if state is not None:
                start_epoch, step = restore(state, model, config, out, optimizer, schedule, rank=ranks.rank,
                                            device=device)
            elif metrics:
                metrics.write_text("", encoding="utf-8")
        if state is None and config.eval_before:
            _log(metrics, {"kind": "eval", "step": 0, "epoch": 0, **evaluate()})
        net = ranks.wrap(model, device)  # the model in DDP (rank 0's weights on every rank) or itself

        bar = _progress_bar(total_steps, step, progress and ranks.main)
        started = time.perf_counter()
        for epoch in range(start_epoch, config.epochs):
            model.train()
            for batches in _epoch_batches(examples, config, epoch, config.batch_size * ranks.size):
                lr = schedule.get_last_lr()[0]  # the lr this step uses (the step advances the schedule)
                loss, tokens, seconds = _optimizer_step(net, batches, trainable, optimizer, schedule, config, pad,
                                                        autocast, ranks)
                step += 1
                record = {"kind": "train", "step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss,
                          "lr": lr, "tokens_per_s": tokens / seconds,
                          "elapsed_s": round(time.perf_counter() - started, 3)}
                _log(metrics, record)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                _log(metrics, {"kind": "eval", "step": step, "epoch": epoch + 1, **evaluate()})
            streams = ranks.gather(random_state(device))
            with ranks.together(f"saving epoch {epoch + 1}"):
                if ranks.main:
                    _checkpoint(model, config, out, epoch + 1, model_path)
                    save_state(out, epoch + 1, step, optimizer, schedule, metrics, streams)
            run_dir.keep()  # an epoch is saved: the new run stays, the run it replaces goes
        bar.close()
        with ranks.together("writing the summary"):
            summary = _write_summary(out, config, model_path, trainable, len(train_set), len(test_set), ranks
                                     ) if ranks.main else None
        return ranks.broadcast(summary)


def _check_out(out: Path, config: TrainConfig, *, resume: bool, overwrite: bool, world_size: int) -> None:
    """Refuse an `out` this call may not use, touching nothing: a file, a folder that cannot be written, another
    run (without resume or overwrite), a folder of other files, or a run to resume started with other settings
    or another number of processes. The `out` a resumed run was saved with need not match: the folder given
    holds the run (it may have moved)."""
    if resume and overwrite:
        raise IntruderError("choose either resume or overwrite, not both")
    check_output_dir(out)
    is_run = holds_run(out)
    if resume:
        if not (out / "state.pt").exists():
            raise IntruderError(f"{out} has no finished epoch to resume from (no state.pt); start it afresh "
                                "with --overwrite")
        values = saved_config(out)
        saved = TrainConfig.from_dict(values)
        changed = [f.name for f in fields(TrainConfig)
                   if f.name != "out" and getattr(saved, f.name) != getattr(config, f.name)]
        if changed:
            raise IntruderError(f"{out} was started with other settings ({', '.join(changed)} differ); resume "
                                "it with the settings in its config.json, or start a new run")
        if values.get("world_size", 1) != world_size:
            raise IntruderError(f"{out} was trained by {values.get('world_size', 1)} process(es), this is "
                                f"{world_size}; the global batch (batch_size × processes × grad_accum) would "
                                f"change: resume it with torchrun --nproc_per_node {values.get('world_size', 1)} "
                                "(processes in all), or start a new run")
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


def _epoch_batches(examples: list, config: TrainConfig, epoch: int, size: int):
    """Per optimizer step, its micro-batches of `size` examples (of all ranks together); the order depends only on
    (seed, epoch), so a resumed run sees the same batches as an uninterrupted one, and N ranks with batch_size
    B the same as one process with batch_size N·B."""
    generator = torch.Generator().manual_seed(config.seed * 1009 + epoch)
    order = torch.randperm(len(examples), generator=generator).tolist()
    window = size * config.bucket
    if config.bucket > 1:  # sort each window of `bucket` micro-batches by prompt length: less padding
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: len(examples[i][0]))]
    micro = [[examples[i] for i in order[s:s + size]] for s in range(0, len(order), size)]
    if config.bucket > 1:  # and shuffle the micro-batches again, so lengths do not follow a pattern
        micro = [micro[i] for i in torch.randperm(len(micro), generator=generator).tolist()]
    for s in range(0, len(micro), config.grad_accum):
        yield micro[s:s + config.grad_accum]


def _optimizer_step(net, batches, trainable, optimizer, schedule, config, pad: int, autocast, ranks: Ranks):
    """One AdamW step over `batches` (gradient accumulation), each rank running its share of every micro-batch;
    (mean loss, tokens seen by all ranks, seconds)."""
    t0 = time.perf_counter()
    n_examples = sum(len(b) for b in batches)
    total_loss, tokens = 0.0, 0
    for i, batch in enumerate(batches):
        part = ranks.share(batch)
        weight = _units(part, config) / _units(batch, config) * len(batch) / n_examples  # of the step's mean loss
        rows = part or batch[:1]  # a rank without a part runs a 0-weighted one: DDP needs every rank's backward
        loss_of = letter_loss if config.loss == "letter" else answer_loss
        with ranks.accumulating(net, last=i == len(batches) - 1):
            with autocast:
                loss = loss_of(net, [p for p, _ in rows], [t for _, t in rows], pad)
            (loss * (weight * ranks.size)).backward()  # × size: DDP averages the ranks' gradients; we add them
        total_loss += loss.item() * weight
        tokens += sum(len(p) + (len(t) if isinstance(t, list) else 1) for p, t in part)
    total_loss, tokens = ranks.sum([total_loss, tokens])
    torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return total_loss, int(tokens), time.perf_counter() - t0


def _units(batch: list, config: TrainConfig) -> int:
    """What a micro-batch's loss is the mean over: its questions (letter loss) or its answers' tokens."""
    return len(batch) if config.loss == "letter" else sum(len(t) for _, t in batch)


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
    return _evaluator(model, tokenizer, test_set, general, config, _autocast(config, device), Ranks())()


def _evaluator(model, tokenizer, test_set, general, config: TrainConfig, autocast, ranks: Ranks):
    """evaluate() -> the evaluation record. Each rank measures every size-th question and paragraph; the counts
    (right answers, questions, summed loss, tokens) are added up, so the numbers are those of one process."""
    questions, texts = ranks.stride(test_set), ranks.stride(general)

    def evaluate() -> dict:
        with ranks.together("evaluating"), autocast, warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)  # said once, before training
            mcq = mcq_accuracy(model, tokenizer, questions, context=config.context, scoring=config.scoring,
                               batch_size=config.eval_batch_size, max_length=config.max_length
                               ) if questions or not test_set else {"predictions": []}  # none: its error
            text = text_loss(model, tokenizer, texts) if texts or not general else {"nll": 0.0, "tokens": 0}
        right = sum(p == q.answer_key for p, q in zip(mcq["predictions"], questions))
        right, n, nll, tokens = ranks.sum([right, len(questions), text["nll"], text["tokens"]])
        return {"accuracy": right / n, "n_questions": int(n), "forget_loss": nll / tokens,
                "perplexity": math.exp(nll / tokens), "forget_tokens": int(tokens)}

    return evaluate


def _checkpoint(model, config: TrainConfig, out: Path, epoch: int, model_path: Path) -> None:
    target = out / f"epoch-{epoch:02d}"
    if config.method == "lora":
        save_adapter(model, config.lora_spec(), target, base_model=str(model_path))
        return
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)


def _recorded(config: TrainConfig, model_path: Path, ranks: Ranks) -> dict:
    """config.json: the settings, the base weights' local directory and the number of processes."""
    return asdict(config) | {"model_path": str(model_path), "world_size": ranks.size}


def _write_summary(out: Path, config, model_path, trainable, n_train: int, n_test: int, ranks: Ranks) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    steps = [r for r in records if r["kind"] == "train"]
    before = next((r for r in evals if r["epoch"] == 0), None)  # absent with eval_before=False
    summary = {
        "config": _recorded(config, model_path, ranks), "evals": evals,
        "accuracy_after": evals[-1]["accuracy"], "forget_loss_after": evals[-1]["forget_loss"],
        "accuracy_before": before["accuracy"] if before else None,
        "forget_loss_before": before["forget_loss"] if before else None,
        "forgetting": evals[-1]["forget_loss"] - before["forget_loss"] if before else None,
        "steps": len(steps), "tokens_per_s": sum(r["tokens_per_s"] for r in steps) / max(1, len(steps)),
        "trainable_parameters": sum(p.numel() for p in trainable), "n_train": n_train, "n_test": n_test,
        "world_size": ranks.size, "global_batch": config.batch_size * ranks.size * config.grad_accum,
        "checkpoints": sorted(p.name for p in out.glob("epoch-*") if p.is_dir()),
        "versions": versions(("torch", "transformers", "numpy", "safetensors")),
    }
    _write_json(out / "summary.json", summary)
    return summary


def resolve_device(name: str) -> torch.device:
    """"auto" (CUDA when torch sees one, else the CPU), "cpu", "cuda" or "cuda:N", "mps"; IntruderError for a
    name torch does not know or a device it does not see. Among several processes started by torchrun, "auto"
    and "cuda" mean this process's GPU, cuda:LOCAL_RANK."""
    name = distributed.device_for_rank(name)
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


def _log(path: Path | None, record: dict) -> None:
    if path is None:  # a rank that does not write
        return
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _write_json(path: Path, value: dict) -> None:
    write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")
