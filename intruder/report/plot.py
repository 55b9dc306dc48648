"""Figures of an `IntruderReport`, drawn only from its stored fields (compute once, plot later), and of a
training run's metrics (learning and forgetting against epoch).

Every `plot_*(..., ax=None)` draws into `ax`, or into a new headless `matplotlib.figure.Figure` when `ax` is
None, and returns the Axes; `save_figure` writes it as `<stem>.png` / `<stem>.svg`. Nothing here recomputes an
SVD. Singular-vector indices are 0-based (0 = largest σ), as in `LayerResult.indices`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..analysis.results import IntruderReport, LayerResult
from ..outputs import atomic_write
from ..training.runs import Curves, TrainingRun, curves, read_metrics

# Okabe & Ito (2008), safe for the common colour-vision deficiencies; a perceptually uniform map for heat maps
OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky_blue": "#56B4E9", "green": "#009E73",
             "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7"}
COLORS = [OKABE_ITO[c] for c in ("blue", "orange", "green", "vermillion", "sky_blue", "purple", "black", "yellow")]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]  # a second cue besides colour, for grey-scale print
HEATMAP_CMAP = "cividis"
_INTRUDER = OKABE_ITO["vermillion"]
_OTHER = "other"  # row / tick label of matrices whose name has no layer index


def plot_spectrum(layer: LayerResult, *, ax: Axes | None = None, show_delta: bool = False) -> Axes:
    """Base spectrum S_0 (min(m, n),) and the tuned top-k S_t (k,) against index, log σ; intruders marked.

    show_delta: also draw the spectrum of ΔW = W_t - W_0 (its nonzero singular values).
    """
    _check_layer(layer, "base_singular_values", "singular_values")
    ax = _axes(ax)
    base, tuned = layer.base_singular_values, layer.singular_values
    _log_line(ax, base, color=OKABE_ITO["black"], lw=1.2, label="base $W_0$")
    _log_line(ax, tuned, color=OKABE_ITO["blue"], marker="o", ms=4, lw=1.2, label=f"tuned $W_t$ (top {tuned.size})")
    if layer.indices:
        ax.plot(layer.indices, tuned[layer.indices], ls="none", marker="X", ms=9, color=_INTRUDER,
                markeredgecolor="white", zorder=3, label=f"intruder (max |cos| < {layer.threshold:g})")
    if show_delta and layer.delta_singular_values.size:
        _log_line(ax, layer.delta_singular_values, color=OKABE_ITO["orange"], ls="--", lw=1.2,
                  label=r"update $\Delta W$")
    ax.set_yscale("log")
    if base.size > 5 * tuned.size:  # a long base spectrum would squeeze the top k into its first few pixels
        ax.set_xscale("symlog", linthresh=max(10, tuned.size), linscale=1.5)
        ax.set_xlim(left=-0.5)
    ax.set_xlabel("singular-value index (0 = largest)")
    ax.set_ylabel("singular value σ (weight units)")
    ax.set_title(f"{_short(layer.name)}: {_plural(layer.n_intruders, 'intruder')}", fontsize="medium")
    ax.legend(fontsize="small", loc="upper right")
    return ax


def plot_similarity(layer: LayerResult, *, ax: Axes | None = None) -> Axes:
    """Heat map of `layer.similarity` (k, K): |cos| of tuned vector j (row) and base vector i (column).

    Like Figure 1 of Shuttleworth et al. (arXiv 2410.21228); intruder rows are marked at the left. The map
    shows only the top-K base vectors, while `max_cos` was taken over all of them.
    """
    _check_layer(layer, "similarity")
    sim = layer.similarity
    k, n_base = sim.shape
    ax = _axes(ax, size=(min(2.5 + 0.12 * n_base, 9.0), min(1.8 + 0.25 * k, 7.0)))
    image = ax.imshow(sim, vmin=0.0, vmax=1.0, cmap=HEATMAP_CMAP, aspect="auto", interpolation="nearest")
    which = "right" if layer.side == "right" else "left"
    ax.figure.colorbar(image, ax=ax, label=f"|cos| of {which} singular vectors")
    if layer.indices:
        ax.plot(np.full(len(layer.indices), -0.5), layer.indices, ls="none", marker=">", ms=8, color=_INTRUDER,
                markeredgecolor="white", clip_on=False, zorder=3, label="intruder")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    rows = list(range(0, k, max(1, -(-k // 16))))  # at most 16 row ticks
    ax.set_yticks(rows)
    for row, label in zip(rows, ax.get_yticklabels()):
        if row in layer.indices:
            label.set_color(_INTRUDER)
            label.set_fontweight("bold")
    ax.set_xlabel("base singular-vector index i (0 = largest)")
    ax.set_ylabel("tuned singular-vector index j")
    marked = " (rows marked ▶)" if layer.indices else ""
    ax.set_title(f"{_short(layer.name)}: {_plural(layer.n_intruders, 'intruder')}{marked}", fontsize="medium")
    return ax


def plot_intruder_map(report: IntruderReport, *, ax: Axes | None = None) -> Axes:
    """Heat map of intruder counts, layer index (rows) × module kind (columns), each cell annotated.

    Matrices whose name has no layer index (e.g. `lm_head.weight`) form a last row, "other"; cells with no
    analysed matrix stay blank.
    """
    rows, modules, counts = _count_grid(report)
    ax = _axes(ax, size=(min(2.5 + 0.9 * len(modules), 10.0), min(1.5 + 0.28 * len(rows), 12.0)))
    image = ax.imshow(np.ma.masked_invalid(counts), cmap=HEATMAP_CMAP, aspect="auto", interpolation="nearest",
                      vmin=0, vmax=max(1.0, float(np.nanmax(counts))))
    colorbar = ax.figure.colorbar(image, ax=ax, label="intruders (count)")
    colorbar.locator = MaxNLocator(integer=True)
    colorbar.update_ticks()
    middle = 0.5 * image.norm.vmax
    fontsize = "small" if len(rows) <= 24 else "xx-small"
    for (r, c), value in np.ndenumerate(counts):
        if not np.isnan(value):
            ax.text(c, r, f"{int(value)}", ha="center", va="center", fontsize=fontsize,
                    color="black" if value > middle else "white")
    tilt = len(modules) > 4  # long module names side by side would overlap
    ax.set_xticks(range(len(modules)), modules, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_yticks(*_category_ticks(rows))
    ax.set_xlabel("module kind")
    ax.set_ylabel("layer index")
    ax.set_title(_report_title(report), fontsize="medium")
    return ax


def plot_intruders_per_layer(report: IntruderReport, *, ax: Axes | None = None) -> Axes:
    """Bar chart of the intruders per layer index, stacked by module kind (a last bar "other" if needed)."""
    rows, modules, counts = _count_grid(report)
    counts = np.nan_to_num(counts)
    ax = _axes(ax, size=(min(3.5 + 0.2 * len(rows), 12.0), 3.5))
    x, bottom = np.arange(len(rows)), np.zeros(len(rows))
    for c, module in enumerate(modules):
        ax.bar(x, counts[:, c], bottom=bottom, width=0.8, color=COLORS[c % len(COLORS)], label=module,
               edgecolor="white", linewidth=0.5)
        bottom += counts[:, c]
    ax.set_xticks(*_category_ticks(rows))
    ax.set_ylim(0, 1.08 * max(1.0, bottom.max()))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer index")
    ax.set_ylabel("intruders (count)")
    ax.set_title(_report_title(report), fontsize="medium")
    ax.legend(title="module", fontsize="small", title_fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return ax


def plot_threshold_sweep(report_or_reports, *, thresholds=None, ax: Axes | None = None,
                         labels: Sequence[str] | None = None) -> Axes:
    """Intruders over all matrices against the threshold ε, from the stored cosines (`counts_at`).

    thresholds: the ε grid (default 0.05, 0.10, ..., 0.95); one line per report.
    """
    reports = _as_reports(report_or_reports)
    grid = np.linspace(0.05, 0.95, 19) if thresholds is None else np.asarray(thresholds, dtype=float).ravel()
    if grid.size == 0:
        raise ValueError("thresholds is empty: give at least one ε in (0, 1]")
    ax = _axes(ax)
    for i, (report, label) in enumerate(zip(reports, _labels(reports, labels))):
        counts = report.counts_at(grid)
        ax.plot(grid, [counts[float(t)] for t in grid], marker=MARKERS[i % len(MARKERS)], ms=4, lw=1.5,
                color=COLORS[i % len(COLORS)], label=label)
    used = {r.threshold for r in reports}
    if len(used) == 1:
        ax.axvline(used.pop(), color="0.5", ls=":", lw=1, label="ε of the analysis")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("threshold ε (max |cos| below which a vector intrudes)")
    ax.set_ylabel("intruders, all matrices (count)")
    ax.set_title(f"threshold sweep (k={', '.join(sorted({str(r.top_k) for r in reports}))})", fontsize="medium")
    ax.legend(fontsize="small", loc="upper left")
    return ax


def plot_effective_rank(reports, *, labels: Sequence[str] | None = None, ax: Axes | None = None) -> Axes:
    """Effective rank of ΔW per layer index: one line per module kind for one report, or the mean over a
    layer's matrices, one line per report, for several (e.g. LoRA r=1, 8, 64 and full fine-tuning)."""
    reports = _as_reports(reports)
    ax = _axes(ax)
    if len(reports) == 1:
        series = _rank_by_module(reports[0])
        legend_title = "module"
    else:
        series = [(label, *_mean_rank_per_layer(r)) for r, label in zip(reports, _labels(reports, labels))]
        legend_title = "mean over a layer's matrices"
    if not any(len(x) for _, x, _ in series):
        raise ValueError("no analysed matrix name has a layer index (like `model.layers.3.mlp.up_proj.weight`); "
                         "the effective rank per layer cannot be drawn")
    for i, (label, x, y) in enumerate(series):
        ax.plot(x, y, marker=MARKERS[i % len(MARKERS)], ms=4.5 if len(x) <= 24 else 3, lw=1.5,
                color=COLORS[i % len(COLORS)], label=label)
    skipped = sum(layer.layer_index is None for r in reports for layer in r.layers)
    ax.set_ylim(0, 1.2 * max(max(y, default=0.0) for _, _, y in series) or 1.0)  # room for the legend above
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer index")
    ax.set_ylabel(r"effective rank of $\Delta W$ (dimensions)")
    note = f"\n({_plural(skipped, 'matrix', 'matrices')} without a layer index not shown)" if skipped else ""
    ax.set_title(f"effective rank of the update{note}", fontsize="medium")
    ax.legend(title=legend_title, fontsize="small", title_fontsize="small")
    return ax


def plot_training(metrics, *, ax: Axes | None = None) -> Axes:
    """Learning and forgetting against epoch, from the records of a training run's `metrics.jsonl`.

    Left axis, learning: held-out accuracy (%) at each eval (epoch 0 = before training). Right axis, a twin
    Axes (the figure's last one after this call), in nats per token: the training loss of each logged step
    and, for forgetting, the mean loss on general text at each eval.
    metrics: the records (dicts, as `intruder.runs.read_metrics` returns them), a `TrainingRun`, or the path
    of a run directory or of its metrics.jsonl.
    """
    found = _curves(metrics)
    train, forget = found.loss, found.forget_loss
    accuracy = [(epoch, 100 * value) for epoch, value in found.accuracy]
    ax = _axes(ax)
    right = ax.twinx()
    lines = []
    if train:
        lines += right.plot(*zip(*train), color=OKABE_ITO["orange"], lw=1, alpha=0.8, label="training loss (steps)")
    if forget:
        lines += right.plot(*zip(*forget), color=OKABE_ITO["vermillion"], marker="s", ms=5, ls="--", lw=1.5,
                            label="general-text loss (forgetting)")
    if accuracy:
        lines += ax.plot(*zip(*accuracy), color=OKABE_ITO["blue"], marker="o", ms=5, lw=1.8,
                         label="held-out accuracy (learning)")
    ax.set_zorder(right.get_zorder() + 1)  # accuracy above the losses, and the legend above both
    ax.patch.set_visible(False)
    epochs = [x for x, _ in train + accuracy + forget]
    lo, hi = min(0.0, *epochs), max(epochs)
    pad = 0.03 * max(hi - lo, 1)  # markers at the ends stay whole
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(0, 100)
    right.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("held-out accuracy (%)")
    right.set_ylabel("loss (nats per token)")
    ax.set_title(_training_title(accuracy, forget), fontsize="medium")
    ax.legend(handles=lines[::-1], fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
              frameon=False)
    return ax


def plot_intruders_by_epoch(reports, epochs: Sequence[float] | None = None, *, thresholds=None,
                            ax: Axes | None = None) -> Axes:
    """Intruders over all matrices against training epoch: one report per checkpoint, one line per ε.

    epochs: the epoch of each report (default 1, 2, ...). thresholds: the ε of each line (default: the
    analysis ε of the reports), counted from the stored cosines.
    """
    reports = _as_reports(reports)
    x = np.arange(1, len(reports) + 1) if epochs is None else np.asarray(epochs, dtype=float)
    if x.shape != (len(reports),):
        raise ValueError(f"{x.size} epochs for {len(reports)} reports: give one epoch per report")
    grid = sorted({r.threshold for r in reports}) if thresholds is None else [float(t) for t in thresholds]
    ax = _axes(ax)
    for i, eps in enumerate(grid):
        ax.plot(x, [r.counts_at([eps])[eps] for r in reports], marker=MARKERS[i % len(MARKERS)], ms=5, lw=1.5,
                color=COLORS[i % len(COLORS)], label=f"ε = {eps:g}")
    ax.set_xlim(min(0.0, x.min()) - 0.2, x.max() + 0.2)
    top = max(ax.get_ylim()[1], 1.0)  # all-zero counts still get a 0..1 axis with whole ticks
    ax.set_ylim(-0.04 * top, top)  # zero counts just above the frame
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (checkpoint)")
    ax.set_ylabel("intruders, all matrices (count)")
    matrices = sorted({len(r.layers) for r in reports})
    ax.set_title(f"intruders during training (k={reports[0].top_k}, "
                 f"{'/'.join(map(str, matrices))} matrices)", fontsize="medium")
    ax.legend(title="threshold", fontsize="small", title_fontsize="small", loc="upper left")
    return ax


def save_figure(ax_or_fig, path_stem, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Write the figure of `ax_or_fig` to `<path_stem>.<fmt>` for each format (PNG at 150 dpi), creating the
    parent directory; each file is written beside its place and renamed in, so an interrupted save leaves the
    figure that was there. SVG and PDF carry no timestamp and SVG ids are salted with a fixed string, so files
    differ only where the drawing does. Returns the paths."""
    fig = ax_or_fig.figure if isinstance(ax_or_fig, Axes) else ax_or_fig
    if not isinstance(fig, Figure):
        raise TypeError(f"save_figure takes a matplotlib Axes or Figure, got {type(ax_or_fig).__name__}")
    formats = [f.lower().lstrip(".") for f in ([formats] if isinstance(formats, str) else formats)]
    supported = fig.canvas.get_supported_filetypes()
    unknown = [f for f in formats if f not in supported]
    if not formats or unknown:
        raise ValueError(f"formats={formats}: give one or more of {', '.join(sorted(supported))}")
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    with matplotlib.rc_context({"svg.hashsalt": "intruder"}):
        for fmt in formats:
            path = stem.with_name(f"{stem.name}.{fmt}")  # not with_suffix: stems like "layer.3" keep their dots
            metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt)
            atomic_write(path, lambda tmp, fmt=fmt, metadata=metadata: fig.savefig(tmp, format=fmt, dpi=150,
                                                                                  metadata=metadata))
            paths.append(path)
    return paths


# ---- helpers ------------------------------------------------------------------------------------------------


def _axes(ax: Axes | None, size: tuple[float, float] = (5.5, 3.8)) -> Axes:
    """`ax`, or the Axes of a new headless Figure (no pyplot state) with constrained layout."""
    if ax is not None:
        return ax
    return Figure(figsize=size, layout="constrained").add_subplot()


def _check_layer(layer: LayerResult, *fields: str) -> None:
    if not isinstance(layer, LayerResult):
        raise TypeError(f"expected a LayerResult (e.g. report.layers[0]), got {type(layer).__name__}")
    empty = [f for f in fields if np.asarray(getattr(layer, f)).size == 0]
    if empty:
        raise ValueError(f"{layer.name}: {', '.join(empty)} is empty, nothing to draw; "
                         "pass a LayerResult produced by find_intruders")


def _as_reports(report_or_reports) -> list[IntruderReport]:
    """One report or a sequence of them, each checked to hold at least one matrix."""
    reports = [report_or_reports] if isinstance(report_or_reports, IntruderReport) else list(report_or_reports)
    if not reports:
        raise ValueError("no report given: pass an IntruderReport or a list of them")
    for report in reports:
        _check_report(report)
    return reports


def _check_report(report) -> None:
    if not isinstance(report, IntruderReport):
        raise TypeError(f"expected an IntruderReport (from find_intruders), got {type(report).__name__}")
    if not report.layers:
        raise ValueError(f"the report of {report.tuned or 'an unnamed model'} has no analysed matrix; "
                         "nothing to draw")


def _labels(reports: list[IntruderReport], labels: Sequence[str] | None) -> list[str]:
    """Legend labels: given ones, else the tuned sources (or "report i"); the base is added when bases differ."""
    if labels is not None:
        labels = [str(label) for label in labels]
        if len(labels) != len(reports):
            raise ValueError(f"{len(labels)} labels for {len(reports)} reports: give one label per report")
    else:
        tuned = [r.tuned for r in reports]
        distinct = all(tuned) and len(set(tuned)) == len(tuned) and not any(t.startswith("<") for t in tuned)
        labels = [_short(t) for t in tuned] if distinct else [f"report {i + 1}" for i in range(len(reports))]
    if len({r.base for r in reports}) > 1:
        warnings.warn("the reports analyse different base models; their curves may not be comparable",
                      stacklevel=3)
        labels = [f"{label} (base: {_short(r.base)})" for label, r in zip(labels, reports)]
    return labels


def _count_grid(report: IntruderReport) -> tuple[list, list[str], np.ndarray]:
    """Rows (sorted layer indices, then "other"), module kinds in checkpoint order, and counts (rows, modules)
    with NaN where no matrix was analysed; matrices sharing a cell (e.g. experts) add up."""
    _check_report(report)
    layers = report.layers
    indices = sorted({lr.layer_index for lr in layers if lr.layer_index is not None})
    rows = indices + ([_OTHER] if any(lr.layer_index is None for lr in layers) else [])
    modules = list(dict.fromkeys(lr.module for lr in layers))
    counts = np.full((len(rows), len(modules)), np.nan)
    for lr in layers:
        r = rows.index(_OTHER if lr.layer_index is None else lr.layer_index)
        c = modules.index(lr.module)
        counts[r, c] = np.nan_to_num(counts[r, c]) + lr.n_intruders
    return rows, modules, counts


def _category_ticks(rows: list, max_ticks: int = 32) -> tuple[list[int], list[str]]:
    """Positions and labels for categorical rows, thinned to at most about `max_ticks`."""
    step = max(1, -(-len(rows) // max_ticks))
    positions = list(range(0, len(rows), step))
    if rows and rows[-1] == _OTHER and positions[-1] != len(rows) - 1:
        positions.append(len(rows) - 1)
    return positions, [str(rows[p]) for p in positions]


def _rank_by_module(report: IntruderReport) -> list[tuple[str, list[int], list[float]]]:
    """[(module kind, layer indices, ΔW effective ranks)] for the matrices that have a layer index."""
    modules = list(dict.fromkeys(lr.module for lr in report.layers if lr.layer_index is not None))
    series = []
    for module in modules:
        points = sorted((lr.layer_index, lr.delta_effective_rank) for lr in report.layers
                        if lr.module == module and lr.layer_index is not None)
        series.append((module, [p[0] for p in points], [p[1] for p in points]))
    return series


def _mean_rank_per_layer(report: IntruderReport) -> tuple[list[int], list[float]]:
    """Layer indices and the mean ΔW effective rank of each layer's matrices."""
    by_layer: dict[int, list[float]] = {}
    for lr in report.layers:
        if lr.layer_index is not None:
            by_layer.setdefault(lr.layer_index, []).append(lr.delta_effective_rank)
    x = sorted(by_layer)
    return x, [float(np.mean(by_layer[i])) for i in x]


def _curves(metrics) -> Curves:
    """The curves of records, a `TrainingRun` or a metrics path; an error when there is nothing to draw."""
    if isinstance(metrics, TrainingRun):
        if metrics.metrics is None:
            raise ValueError(f"{metrics.path} has no metrics.jsonl: no learning or forgetting curve to draw")
        metrics = metrics.metrics
    found = curves(read_metrics(metrics) if isinstance(metrics, (str, Path)) else metrics)
    if not found:
        raise ValueError('the metrics hold no training loss, accuracy or general-text loss (records with "kind" '
                         '"train" or "eval", an "epoch", and "loss", "accuracy" or "forget_loss"); nothing to draw')
    return found


def _training_title(accuracy: list, forget: list) -> str:
    """`accuracy 25% → 62%, forgetting +0.31 nats`: first and last eval, or a plain title."""
    parts = []
    if len(accuracy) > 1:
        parts.append(f"accuracy {accuracy[0][1]:.0f}% → {accuracy[-1][1]:.0f}%")
    if len(forget) > 1:
        parts.append(f"forgetting {forget[-1][1] - forget[0][1]:+.2f} nats")
    return ", ".join(parts) or "learning and forgetting"


def _log_line(ax: Axes, values: np.ndarray, **style) -> None:
    """Plot values against index 0..n-1, dropping values <= 0 that a log axis cannot show."""
    values = np.asarray(values, dtype=float)
    keep = values > 0
    ax.plot(np.flatnonzero(keep), values[keep], **style)


def _report_title(report: IntruderReport) -> str:
    return (f"{_plural(report.total, 'intruder')} in {_plural(len(report.layers), 'matrix', 'matrices')} "
            f"(k={report.top_k}, ε={report.threshold:g})")


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _short(text: str, width: int = 48) -> str:
    """Long names shortened from the left, keeping the informative tail: `…layers.3.self_attn.q_proj.weight`."""
    return text if len(text) <= width else "…" + text[-(width - 1):]
