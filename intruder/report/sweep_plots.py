"""Figures of a sweep, drawn from its rows (`DIR/sweep.jsonl`, as `intruder.study.runner.collect` builds them).

Each `plot_*(rows, ..., ax=None)` returns its Axes (or the first of a pair); none trains, evaluates or
decomposes anything. Counts at ε = 0.5 can stay at zero at CPU scale while the tuned top vectors drift away
from the pretrained ones, so the intruder figures also draw each run's smallest max |cos| (lower = further
from every pretrained direction) beside the counts.
"""

from __future__ import annotations

from collections import defaultdict

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

_COLORS = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
_FULL = "#555555"


def plot_intruders_vs_rank(rows: list[dict], *, ax: Axes | None = None) -> Axes:
    """Intruders (left) and smallest max |cos| (right) at each run's last epoch against LoRA rank: a line per
    α rule and lr; full fine-tuning as a horizontal reference."""
    axes = _pair(ax)
    last = last_epoch(rows)
    lora = [r for r in last if r["method"] == "lora" and r["intruders"] is not None]
    full = [r for r in last if r["method"] == "full" and r["intruders"] is not None]
    if not lora and not full:
        raise ValueError("no analysed run yet")
    for color, (label, group) in zip(_COLORS, _groups(lora, lambda r: f"α {r['alpha_rule']}, lr {r['lr']:g}")):
        group = sorted(group, key=lambda r: r["rank"])
        for a, key in zip(axes, ("intruders", "min_max_cos")):
            a.plot([r["rank"] for r in group], [r[key] for r in group], "o-", color=color, label=label)
    for a, key in zip(axes, ("intruders", "min_max_cos")):
        for i, r in enumerate(full):
            a.axhline(r[key], color=_FULL, ls="--" if i == 0 else ":", label=f"full FT, lr {r['lr']:g}")
        _rank_axis(a, lora)
    threshold = (lora or full)[0]["threshold"]
    _count_axis(axes[0], [r["intruders"] for r in lora + full])
    axes[0].set_ylabel(f"intruders at ε = {threshold:g} (all matrices)")
    axes[1].set_ylabel("smallest max |cos| over all matrices")
    axes[1].axhline(threshold, color="#bbbbbb", lw=0.8)
    axes[0].legend(fontsize=7)
    axes[0].set_title("Intruders against rank (last epoch)", fontsize=10)
    return axes[0]


def plot_intruders_vs_epoch(rows: list[dict], *, ax: Axes | None = None) -> Axes:
    """Intruder count (left) and smallest max |cos| (right) against epoch, a line per run."""
    axes = _pair(ax)
    runs = _by_run([r for r in rows if r["kind"] == "epoch" and r["epoch"] > 0 and r["intruders"] is not None])
    if not runs:
        raise ValueError("no analysed epoch yet")
    for color, (name, group) in zip(_cycle(), runs.items()):
        for a, key in zip(axes, ("intruders", "min_max_cos")):
            a.plot([r["epoch"] for r in group], [r[key] for r in group], "o-", color=color, label=name)
    axes[0].set_ylabel("intruders")
    axes[1].set_ylabel("smallest max |cos|")
    for a in axes:
        a.set_xlabel("epoch")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    _count_axis(axes[0], [r["intruders"] for group in runs.values() for r in group])
    axes[0].legend(fontsize=7)
    axes[0].set_title("Intruders against epoch (overlapping lines share a count)", fontsize=10)
    return axes[0]


def plot_erank_vs_rank(rows: list[dict], *, ax: Axes | None = None) -> Axes:
    """Mean effective rank of ΔW against LoRA rank (a line per α rule and lr), full fine-tuning as reference."""
    ax = ax or _axes()
    last = [r for r in last_epoch(rows) if r["mean_erank"] is not None]
    if not last:
        raise ValueError("no analysed run yet")
    lora = [r for r in last if r["method"] == "lora"]
    for color, (label, group) in zip(_COLORS, _groups(lora, lambda r: f"α {r['alpha_rule']}, lr {r['lr']:g}")):
        group = sorted(group, key=lambda r: r["rank"])
        ax.plot([r["rank"] for r in group], [r["mean_erank"] for r in group], "o-", color=color, label=label)
    if lora:
        ranks = sorted({r["rank"] for r in lora})
        ax.plot(ranks, ranks, color="#bbbbbb", lw=0.8, label="erank = r (its ceiling)")
    _rank_axis(ax, lora)
    for i, r in enumerate(r for r in last if r["method"] == "full"):
        ax.axhline(r["mean_erank"], color=_FULL, ls="--" if i == 0 else ":", label=f"full FT, lr {r['lr']:g}")
    ax.set_yscale("log")
    ax.set_ylabel("mean effective rank of ΔW")
    ax.legend(fontsize=7)
    ax.set_title("Effective rank of the update", fontsize=10)
    return ax


def plot_learning_curves(rows: list[dict], *, ax: Axes | None = None) -> Axes:
    """Held-out accuracy (left) and general-text loss (right) against epoch, a line per run."""
    axes = _pair(ax)
    runs = _by_run([r for r in rows if r["kind"] == "epoch"])
    if not runs:
        raise ValueError("no evaluated epoch yet")
    for color, (name, group) in zip(_cycle(), runs.items()):
        axes[0].plot([r["epoch"] for r in group], [100 * r["accuracy"] for r in group], "o-", color=color, label=name)
        axes[1].plot([r["epoch"] for r in group], [r["forget_loss"] for r in group], "o-", color=color)
    axes[0].set_ylabel("held-out accuracy (%)")
    axes[1].set_ylabel("general-text loss (nats)")
    for a in axes:
        a.set_xlabel("epoch")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].axhline(25, color="#bbbbbb", lw=0.8)
    axes[0].legend(fontsize=7)
    axes[0].set_title("Learning and forgetting against epoch", fontsize=10)
    return axes[0]


def plot_learning_vs_forgetting(rows: list[dict], *, ax: Axes | None = None) -> Axes:
    """One point per run and epoch: accuracy gained against forgetting (rise of the general-text loss), as in
    "LoRA Learns Less and Forgets Less"; each run's points joined in epoch order."""
    ax = ax or _axes()
    runs = _by_run([r for r in rows if r["kind"] == "epoch" and r["forgetting"] is not None])
    base = {r["run"]: r["accuracy"] for r in rows if r["kind"] == "epoch" and r["epoch"] == 0}
    if not runs:
        raise ValueError("no evaluated epoch yet")
    for color, (name, group) in zip(_cycle(), runs.items()):
        start = base.get(name, group[0]["accuracy"])
        x = [r["forgetting"] for r in group]
        y = [100 * (r["accuracy"] - start) for r in group]
        ax.plot(x, y, "-", color=color, alpha=0.5)
        ax.scatter(x, y, color=color, s=[14 + 10 * r["epoch"] for r in group], label=name, zorder=3)
    ax.axhline(0, color="#bbbbbb", lw=0.8)
    ax.axvline(0, color="#bbbbbb", lw=0.8)
    ax.set_xlabel("forgetting: rise of the general-text loss (nats)")
    ax.set_ylabel("learning: accuracy gained (points)")
    ax.legend(fontsize=7)
    ax.set_title("Learning against forgetting (bigger dot = later epoch)", fontsize=10)
    return ax


def plot_lambda(rows: list[dict], *, ax: Axes | None = None) -> Axes:
    """Accuracy (left) and general-text loss (right) of each LoRA run's last epoch against λ."""
    axes = _pair(ax)
    runs = _by_run([r for r in rows if r["kind"] == "lambda"], key="lam")
    if not runs:
        raise ValueError("no λ evaluated yet")
    for color, (name, group) in zip(_cycle(), runs.items()):
        lams = [r["lam"] for r in group]
        axes[0].plot(lams, [100 * r["accuracy"] for r in group], "o-", color=color, label=name)
        axes[1].plot(lams, [r["forget_loss"] for r in group], "o-", color=color)
    base = [r for r in rows if r["kind"] == "epoch" and r["epoch"] == 0]
    if base:
        axes[1].axhline(base[0]["forget_loss"], color=_FULL, ls="--", lw=0.8, label="base model")
        axes[1].legend(fontsize=7)
    axes[0].set_ylabel("held-out accuracy (%)")
    axes[1].set_ylabel("general-text loss (nats)")
    for a in axes:
        a.set_xlabel("λ (scale of the intruder directions)")
        a.invert_xaxis()
    axes[0].legend(fontsize=7)
    axes[0].set_title("Scaling intruders down", fontsize=10)
    return axes[0]


def plot_epsilon_curves(rows: list[dict], *, ax: Axes | None = None) -> Axes:
    """Intruders at each ε for every run's last epoch: the trend where ε = 0.5 counts are zero."""
    ax = ax or _axes()
    last = [r for r in last_epoch(rows) if r["counts"]]
    if not last:
        raise ValueError("no analysed run yet")
    for color, r in zip(_cycle(), last):
        eps = sorted(r["counts"], key=float)
        ax.plot([float(e) for e in eps], [max(r["counts"][e], 0.5) for e in eps], "o-", color=color, label=r["run"])
    ax.set_yscale("log")
    ax.set_xlabel("threshold ε")
    ax.set_ylabel("intruders (0 drawn at 0.5)")
    ax.legend(fontsize=7)
    ax.set_title("Intruders against ε (last epoch)", fontsize=10)
    return ax


# ---- helpers ------------------------------------------------------------------------------------------------


def _count_axis(ax: Axes, counts: list[int]) -> None:
    """Whole-number ticks from zero: all-zero counts show as a line at 0, not at ±0.04 ticks."""
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(-0.5, max(counts, default=0) * 1.08 + 1)


def _rank_axis(ax: Axes, lora: list[dict]) -> None:
    """A log2 rank axis labelled with the ranks themselves (1, 8, 64), not powers of two."""
    ranks = sorted({r["rank"] for r in lora})
    if ranks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
    ax.set_xlabel("LoRA rank r")


def _axes(size=(5.5, 3.8)) -> Axes:
    return Figure(figsize=size, layout="constrained").add_subplot()


def _pair(ax: Axes | None) -> list[Axes]:
    """Two side-by-side Axes; `ax` (if given) becomes the left one and its figure gets a right neighbour."""
    if ax is not None:
        return [ax, ax.figure.add_subplot(1, 2, 2)]
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    return list(fig.subplots(1, 2))


def last_epoch(rows: list[dict]) -> list[dict]:
    last: dict[str, dict] = {}
    for r in rows:
        if r["kind"] == "epoch" and r["epoch"] > 0 and r["epoch"] >= last.get(r["run"], {"epoch": -1})["epoch"]:
            last[r["run"]] = r
    return list(last.values())


def _by_run(rows: list[dict], key: str = "epoch") -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        runs[r["run"]].append(r)
    return {name: sorted(group, key=lambda r: r[key]) for name, group in runs.items()}


def _groups(rows: list[dict], label) -> list[tuple[str, list[dict]]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[label(r)].append(r)
    return list(groups.items())


def _cycle():
    i = 0
    while True:
        yield _COLORS[i % len(_COLORS)]
        i += 1

