"""Training runs as the bundled trainer writes them, read back for figures and reports.

A run directory RUN holds:

    RUN/config.json     the training config; "model_path" is the local directory of the base weights
    RUN/metrics.jsonl   one JSON record per line: {"kind": "train", "step", "epoch" (fractional), "loss", ...}
                        for logged steps, {"kind": "eval", "step", "epoch" (0 = before training), "accuracy",
                        "forget_loss", "perplexity", ...} once per epoch
    RUN/summary.json    {"config", "evals", "accuracy_before", "accuracy_after", "forgetting", "versions", ...}
    RUN/epoch-01/, ...  one checkpoint per epoch: a PEFT adapter (LoRA) or a model directory (full)

`find_intruders(run.base, run.checkpoints[-1])` analyses the last checkpoint.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import IntruderError, WeightsNotFoundError

_CHECKPOINT = re.compile(r"^epoch-(\d+)$")
_TRAINER_FIELDS = ("model_path", "method", "epochs", "data")  # in every config.json the trainer writes


@dataclass(eq=False)
class TrainingRun:
    """A run directory, read: its config, metrics records (None when metrics.jsonl is missing), summary
    (None when summary.json is missing) and epoch checkpoints, in epoch order."""

    path: Path
    config: dict
    metrics: list[dict] | None
    summary: dict | None
    checkpoints: list[Path]

    @property
    def base(self) -> str:
        """The base weights the run was trained from: config "model_path", else "model"."""
        return str(self.config.get("model_path") or self.config.get("model") or "")

    @property
    def epochs(self) -> list[int]:
        """The epoch of each checkpoint (`epoch-03` -> 3)."""
        return [int(_CHECKPOINT.match(p.name).group(1)) for p in self.checkpoints]

    def describe(self) -> str:
        """One line of settings: `LoRA r=8 α=16, 3 epochs, lr 0.0002, seed 0`."""
        c = self.config
        method, alpha = str(c.get("method", "?")), c.get("alpha")
        alpha = f"{alpha:g}" if isinstance(alpha, (int, float)) else alpha
        parts = [f"LoRA r={c.get('rank')} α={alpha}" if method == "lora" else f"{method} fine-tuning"]
        if "epochs" in c:
            parts.append(f"{c['epochs']} epochs")
        parts += [f"{key} {c[key]}" for key in ("lr", "seed") if key in c]
        return ", ".join(parts)


@dataclass
class Curves:
    """A run's learning and forgetting: (epoch, value) pairs in epoch order, read from its metrics records."""

    loss: list[tuple[float, float]]  # training loss of each logged step (fractional epoch)
    accuracy: list[tuple[float, float]]  # held-out accuracy, 0..1, of each eval (epoch 0 = before training)
    forget_loss: list[tuple[float, float]]  # mean token loss on general text (nats) of each eval

    def __bool__(self) -> bool:
        return bool(self.loss or self.accuracy or self.forget_loss)


def curves(records: list[dict]) -> Curves:
    """The curves of metrics records; records without an epoch or the value are skipped."""
    records = [r for r in records if isinstance(r, dict) and r.get("epoch") is not None]

    def series(kind: str, key: str) -> list[tuple[float, float]]:
        return sorted((r["epoch"], r[key]) for r in records if r.get("kind") == kind and r.get(key) is not None)

    return Curves(series("train", "loss"), series("eval", "accuracy"), series("eval", "forget_loss"))


def is_run(path) -> bool:
    """Whether `path` is a training run directory (it holds a config.json)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def load_run(path) -> TrainingRun:
    """Read the run directory `path`. A missing metrics.jsonl or summary.json is allowed (None); a missing
    config.json or no `epoch-NN` checkpoint is an error."""
    path = Path(path)
    if not is_run(path):
        raise WeightsNotFoundError(f"{path} is not a training run directory: it has no config.json "
                                   "(pass the directory the trainer wrote, with config.json and epoch-NN/)")
    config = _read_json(path / "config.json")
    checkpoints = sorted((p for p in path.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)),
                         key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))
    if not checkpoints and not any(f in config for f in _TRAINER_FIELDS) and not (path / "metrics.jsonl").is_file():
        kind = f" (a {config['model_type']} model directory?)" if isinstance(config.get("model_type"), str) else ""
        raise IntruderError(
            f"{path} is not a training run{kind}: its config.json has none of the trainer's fields "
            f"({', '.join(_TRAINER_FIELDS)}), and it has no metrics.jsonl and no epoch-NN checkpoint. `intruder "
            "report` takes run directories that `intruder train --out RUN` writes, and saved analyses: for a "
            "model, run `intruder analyze BASE MODEL --out analysis.json` and report analysis.json")
    if not checkpoints:
        raise WeightsNotFoundError(f"{path} holds no epoch-NN checkpoint directory: the run may have stopped "
                                   "before its first epoch ended")
    metrics = read_metrics(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else None
    summary = _read_json(path / "summary.json") if (path / "summary.json").is_file() else None
    return TrainingRun(path, config, metrics, summary, checkpoints)


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file (or of RUN/metrics.jsonl when `path` is a run directory).

    A malformed line is an error naming it, except a truncated last line (a run stopped mid-write), which is
    skipped with a warning.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise WeightsNotFoundError(f"{path} does not exist: the run wrote no metrics")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                warnings.warn(f"{path}:{number}: skipped a truncated last line", stacklevel=2)
                break
            raise IntruderError(f"{path}:{number} is not a JSON record ({exc.msg}): fix or delete that line") from exc
        if not isinstance(record, dict):
            raise IntruderError(f"{path}:{number} holds a {type(record).__name__}, not a JSON object record")
        records.append(record)
    return records


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IntruderError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise IntruderError(f"{path} holds a {type(data).__name__}; expected a JSON object")
    return data
