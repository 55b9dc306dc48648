"""The grid of a sweep: which runs it trains, what each is called, and which shard runs which.

A `Grid` is the study's design (methods × ranks × α rules × learning rates, full fine-tuning at its own
learning rates, epochs, the λ of the mitigation) plus the training options every run shares. It is saved as
`DIR/sweep.json`; starting again in the same DIR with another grid is refused, naming the difference, unless
`extend=True`, which keeps every run already there and adds the new ones.

α rules: "2r" (α = 2r, PEFT's common choice: scale 2 at every rank), a number (a fixed α: scale α/r), or
"rslora" / "rslora:A" (rank-stabilised LoRA: scale A/√r, A = 2 unless given, so that r = 1 matches "2r").
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from ..errors import IntruderError

METHODS = ("lora", "full")
GRID_FIELDS = {"method", "rank", "alpha", "rslora", "lr", "epochs", "out"}  # TrainConfig fields a grid sets


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid: LoRA (rank, α rule) at a learning rate, or full fine-tuning."""

    method: str
    lr: float
    rank: int | None = None
    alpha_rule: str | None = None

    @property
    def alpha(self) -> float | None:
        if self.method != "lora":
            return None
        rule = self.alpha_rule
        if rule == "2r":
            return 2.0 * self.rank
        if rule.startswith("rslora"):
            return float(rule.split(":", 1)[1]) if ":" in rule else 2.0
        return float(rule)

    @property
    def rslora(self) -> bool:
        return self.method == "lora" and self.alpha_rule.startswith("rslora")

    @property
    def scale(self) -> float | None:
        """The LoRA scaling s of ΔW = s·B A: α/r, or α/√r for rsLoRA."""
        if self.method != "lora":
            return None
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def name(self) -> str:
        """A readable, filesystem-safe run name: lora-r8-a2r-lr1e-3, lora-r64-rslora-lr1e-3, full-lr2e-5."""
        lr = f"lr{self.lr:.0e}".replace("e-0", "e-").replace("e+0", "e")
        if self.method == "full":
            return f"full-{lr}"
        rule = self.alpha_rule.replace(":", "")
        rule = rule if rule.startswith("rslora") else f"a{rule}"
        return f"lora-r{self.rank}-{rule}-{lr}"

    def train_options(self) -> dict:
        """The TrainConfig fields this run sets."""
        if self.method == "full":
            return {"method": "full", "lr": self.lr}
        return {"method": "lora", "lr": self.lr, "rank": self.rank, "alpha": self.alpha, "rslora": self.rslora}


@dataclass(frozen=True)
class Grid:
    """The design of a sweep; validated on creation. `train` holds the TrainConfig options every run shares."""

    methods: tuple[str, ...] = ("lora", "full")
    ranks: tuple[int, ...] = (1, 8, 64)
    alphas: tuple[str, ...] = ("2r",)
    lrs: tuple[float, ...] = (1e-3,)
    full_lrs: tuple[float, ...] = (2e-5,)
    epochs: int = 3
    lams: tuple[float, ...] = (1.0, 0.5, 0.0)
    threshold: float = 0.5
    top_k: int = 10
    lam_threshold: float | None = None  # ε of the directions λ scales; None: `threshold`
    train: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("methods", "ranks", "alphas", "lrs", "full_lrs", "lams"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "train", json.loads(json.dumps(self.train)))  # as saved: lists, not tuples
        if not 0 < self.threshold <= 1 or not isinstance(self.top_k, int) or self.top_k < 1:
            raise IntruderError(f"threshold={self.threshold}, top_k={self.top_k}: need 0 < ε <= 1 and k >= 1")
        if self.lam_threshold is not None and not 0 < self.lam_threshold <= 1:
            raise IntruderError(f"lam_threshold={self.lam_threshold}: need 0 < ε <= 1")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise IntruderError(f"methods={','.join(self.methods)}: choose from {', '.join(METHODS)}")
        if "lora" in self.methods and (not self.ranks or any(not isinstance(r, int) or r < 1 for r in self.ranks)):
            raise IntruderError(f"ranks={self.ranks}: positive integers, e.g. 1,8,64")
        for rule in self.alphas:
            _check_alpha_rule(rule)
        if any(not lr > 0 for lr in self.lrs + self.full_lrs):
            raise IntruderError(f"learning rates must be positive (lrs={self.lrs}, full_lrs={self.full_lrs})")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise IntruderError(f"epochs={self.epochs!r}: a positive integer")
        if any(not (math.isfinite(lam) and lam >= 0) for lam in self.lams):
            raise IntruderError(f"lams={self.lams}: finite numbers >= 0 (1 keeps the tuned model, 0 removes the "
                                "intruder directions)")
        clash = GRID_FIELDS & set(self.train)
        if clash:
            raise IntruderError(f"training option(s) {', '.join(sorted(clash))} are set by the grid, not per run")

    def runs(self) -> list[RunSpec]:
        """Every run of the grid, LoRA first (by rank, α rule, lr), then full fine-tuning."""
        runs = []
        if "lora" in self.methods:
            runs += [RunSpec("lora", lr, r, rule) for r in self.ranks for rule in self.alphas for lr in self.lrs]
        if "full" in self.methods:
            runs += [RunSpec("full", lr) for lr in self.full_lrs]
        return runs

    def shard(self, index: int, count: int) -> list[RunSpec]:
        """The runs of shard `index` (1-based) of `count`: every count-th run, so shards get similar mixes."""
        if not 1 <= index <= count:
            raise IntruderError(f"--shard {index}/{count}: I must lie between 1 and N")
        return self.runs()[index - 1::count]

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def mitigation_threshold(self) -> float:
        return self.threshold if self.lam_threshold is None else self.lam_threshold

    @classmethod
    def from_dict(cls, values: dict) -> Grid:
        return cls(**values)

    def differences(self, other: Grid) -> list[str]:
        """What differs between two grids, in words ("ranks 1,8 -> 1,8,64")."""
        mine, theirs = self.to_dict(), other.to_dict()
        out = []
        for key in mine:
            if mine[key] != theirs[key]:
                out.append(f"{key} {_show(mine[key])} -> {_show(theirs[key])}")
        return out

    def extended(self, other: Grid) -> Grid:
        """This grid with `other`'s values added to every axis; refused when shared settings differ."""
        fixed = [d for d in self.differences(other) if d.split()[0] in ("epochs", "train", "threshold", "top_k",
                                                                    "lam_threshold")]
        if fixed:
            raise IntruderError(f"--extend adds grid values but cannot change {'; '.join(fixed)}: runs already "
                                "in the sweep were trained with the old value; use a new --out")
        merged = {key: tuple(dict.fromkeys(getattr(self, key) + getattr(other, key)))
                  for key in ("methods", "ranks", "alphas", "lrs", "full_lrs", "lams")}
        return Grid(**merged, epochs=self.epochs, threshold=self.threshold, top_k=self.top_k,
                    lam_threshold=self.lam_threshold, train=self.train)


def parse_alpha_rules(text: str) -> tuple[str, ...]:
    rules = tuple(part.strip() for part in text.split(",") if part.strip())
    for rule in rules:
        _check_alpha_rule(rule)
    return rules


def _check_alpha_rule(rule: str) -> None:
    head, _, value = rule.partition(":")
    ok = rule == "2r" or (head == "rslora" and (not value or _positive(value))) or (not _ and _positive(rule))
    if not ok:
        raise IntruderError(f"α rule {rule!r}: use 2r (α = 2r), a number (fixed α, e.g. 16), or rslora / "
                            "rslora:A (scale A/√r)")


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)
