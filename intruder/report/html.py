"""`write_report`: one HTML page and one Markdown file about one or more analyses, for a paper or a repository.

Each input is a saved `IntruderReport` JSON (`intruder analyze --out r.json`, `report.to_json(path)`) or a
training run directory (see `intruder.runs`), whose last checkpoint, and by default every epoch's, is analysed
against its base with `find_intruders`. The output directory OUT receives:

    report.html            self-contained: every figure embedded as a PNG data URI
    report.md              the same content, its figures referenced from figures/
    figures/*.png, *.svg   every figure, named <input>-<figure> or compare-<figure>
    analysis/*.json        every analysis shown (`IntruderReport.from_json` reads it back)
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..analysis.intruders import find_intruders
from ..analysis.results import IntruderReport, LayerResult
from ..errors import IntruderError, WeightsNotFoundError
from ..outputs import check_output_dir, versions, write_text
from ..training.runs import TrainingRun, curves, is_run, load_run
from ._pages import Code, Gallery, Heading, Image, Notice, Paragraph, Table, render_html, render_markdown
from .plot import (
    plot_effective_rank,
    plot_intruder_map,
    plot_intruders_by_epoch,
    plot_intruders_per_layer,
    plot_similarity,
    plot_spectrum,
    plot_threshold_sweep,
    plot_training,
    save_figure,
)

SWEEP = (0.3, 0.7)  # thresholds drawn beside the analysis ε in the intruders-against-epoch figure
_PACKAGES = ("numpy", "torch", "transformers", "safetensors", "matplotlib", "peft")
_PAPER = "Shuttleworth et al., arXiv 2410.21228"
_JSON_TYPES = {list: "list", int: "number", float: "number", str: "string", bool: "boolean", type(None): "null"}


@dataclass(eq=False)
class _Input:
    """One input as shown: its analysis (the file's, or the run's last checkpoint) and, for a run, the run."""

    label: str
    source: Path
    report: IntruderReport
    run: TrainingRun | None = None
    by_epoch: list[tuple[int, IntruderReport]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    slug: str = ""
    other_base: bool = False  # analyses a different base than most inputs


@dataclass
class _Canvas:
    """Where the figures go: out/figures/<name>.<format> for each format (PNG always)."""

    out: Path
    formats: tuple[str, ...]

    def draw(self, name: str, plot, *args, caption: str, **kwargs) -> Image | Notice:
        """Draw and save one figure; one that cannot be drawn (ValueError) becomes a notice saying why."""
        try:
            ax = plot(*args, **kwargs)
        except ValueError as exc:
            return Notice(f"figure `{name}` left out: {exc}")
        save_figure(ax, self.out / "figures" / name, formats=self.formats)
        return Image(f"figures/{name}.png", caption, width=96 * ax.figure.get_figwidth())  # inches -> CSS px


def write_report(inputs, out_dir, *, labels=None, base=None, threshold: float = 0.5, top_k: int = 10,
                 side: str = "left", layers=None, every_epoch: bool = True, device=None, cache_dir=None,
                 title: str = "Intruder dimensions", formats=("png", "svg"), progress: bool = False,
                 workers: int | None = None) -> Path:
    """Load or analyse each input, draw its figures and write OUT/report.html and OUT/report.md.

    inputs: paths of saved IntruderReport JSON files and training run directories, in the order to show.
    labels: one name per input for headings and legends (default: the file or directory name).
    base: the base model of the runs, instead of their config's "model_path" (for a run trained elsewhere).
    threshold, top_k, side, layers, device, cache_dir, workers: as in `find_intruders`, for the runs analysed here; a
        saved report keeps the settings it was computed with.
    every_epoch: analyse every epoch checkpoint of a run, for intruders against epoch, not only the last;
        the base factors are cached, so each more checkpoint costs about one LoRA analysis.
    formats: the files of each figure (PNG always; add "pdf" for a paper).
    Warns, and says so in the report, when inputs analyse different bases or settings and when a run has no
    metrics.jsonl. Returns the path of report.html. Every file is written beside its place and renamed in, and
    an `out_dir` that cannot be written is refused before any input is analysed.
    """
    paths = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    if not paths:
        raise IntruderError("no input: pass saved report JSON files or training run directories")
    out = check_output_dir(out_dir)
    options = {"threshold": threshold, "top_k": top_k, "side": side, "layers": layers, "device": device,
               "cache_dir": cache_dir, "progress": progress, "workers": workers}
    items = [_load(p, label, base, every_epoch, options) for p, label in zip(paths, _labels(paths, labels))]
    for item, slug in zip(items, _unique([_slug(i.label) for i in items])):
        item.slug = slug
    notices = _compare(items)
    for text in notices + [note for item in items for note in item.notes]:
        warnings.warn(text, stacklevel=2)
    _write_analyses(items, out / "analysis")
    canvas = _Canvas(out, tuple(dict.fromkeys(("png", *formats))))
    command = _command(paths, out, labels, base, threshold, top_k, side, layers, every_epoch, canvas.formats)
    blocks = _page(items, notices, canvas, command)
    write_text(out / "report.html", render_html(title, blocks, out))
    write_text(out / "report.md", render_markdown(title, blocks))
    return out / "report.html"


# ---- inputs -------------------------------------------------------------------------------------------------


def _load(path: Path, label: str, base, every_epoch: bool, options: dict) -> _Input:
    if is_run(path):
        return _load_run(path, label, base, every_epoch, options)
    if not (path.is_file() and path.suffix.lower() == ".json"):
        raise WeightsNotFoundError(
            f"{path} is neither a saved intruder report (a .json file from `intruder analyze --out r.json`) nor a "
            "training run directory (with config.json and epoch-NN/ checkpoints)")
    write_one = "write one with `intruder analyze BASE TUNED --out report.json` or IntruderReport.to_json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise IntruderError(f"{path} is not valid JSON ({exc}), so not an intruder report; {write_one}") from exc
    if not isinstance(data, dict):
        raise IntruderError(f"{path} holds a JSON {_JSON_TYPES.get(type(data), 'value')}, not an intruder report "
                            f'(a JSON object with "format": "intruder-report/1"); {write_one}')
    try:
        report = IntruderReport.from_json(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise IntruderError(f"{path} cannot be read as an intruder report ({exc}); write it with "
                            "`intruder analyze ... --out report.json` or IntruderReport.to_json") from exc
    if not report.layers:
        raise IntruderError(f"{path} holds no analysed matrix ({report.tuned or 'tuned model'} against "
                            f"{report.base or 'its base'}): nothing to report; analyse a fine-tuned model that "
                            "differs from its base")
    return _Input(label, path, report)


def _load_run(path: Path, label: str, base, every_epoch: bool, options: dict) -> _Input:
    run = load_run(path)
    base_model = str(base) if base is not None else run.base
    if not base_model:
        raise IntruderError(f"{path / 'config.json'} names no model_path: pass the base model (--base)")
    if base is None and "model_path" in run.config and not Path(base_model).exists():
        raise WeightsNotFoundError(f"the base of {path}, {base_model} (config.json model_path), does not exist "
                                   "here: pass the base model it was trained from (--base)")
    chosen = list(zip(run.epochs, run.checkpoints))
    if not every_epoch:
        chosen = chosen[-1:]
    by_epoch = [(epoch, find_intruders(base_model, checkpoint, **options)) for epoch, checkpoint in chosen]
    item = _Input(label, path, by_epoch[-1][1], run, by_epoch)
    if run.metrics is None:
        item.notes.append(f"{path} has no metrics.jsonl: the learning and forgetting figure of {label} is left out")
    planned = run.config.get("epochs")
    if isinstance(planned, int) and not isinstance(planned, bool) and run.epochs[-1] < planned:
        item.notes.append(f"{label}: run stopped after epoch {run.epochs[-1]} of {planned}; resume it with "
                          f"`intruder train --out {shlex.quote(str(path))} --resume`")
    return item


def _labels(paths: list[Path], labels) -> list[str]:
    """Given labels, else file stems or directory names, with the parent folder added where two collide."""
    if labels is not None:
        labels = [str(label) for label in labels]
        if len(labels) != len(paths):
            raise IntruderError(f"{len(labels)} labels for {len(paths)} inputs: give one label per input")
        return labels
    names = [p.resolve().name if p.is_dir() else p.stem for p in paths]
    names = [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]
    return _unique(names, sep=" ")


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40] or "input"


def _unique(names: list[str], sep: str = "-") -> list[str]:
    """`a, a, b` -> `a, a-2, b`."""
    seen: Counter = Counter()
    out = []
    for name in names:
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name}{sep}{seen[name]}")
    return out


def _compare(items: list[_Input]) -> list[str]:
    """Notices for inputs that cannot be compared as they are: different bases, different settings."""
    notices = []
    keys = [_base_key(i.report.base) for i in items]
    if len(set(keys)) > 1:
        reference = Counter(keys).most_common(1)[0][0]
        for item, key in zip(items, keys):
            if key != reference:
                item.other_base = True
                notices.append(f"{item.label} analyses the base {item.report.base}, the other inputs "
                               f"{reference}: its counts are not comparable with theirs; the comparison figures "
                               "label every input with its base")
    settings = {(i.report.threshold, i.report.top_k, i.report.side) for i in items}
    if len(settings) > 1:
        described = "; ".join(f"{i.label}: ε={i.report.threshold:g}, k={i.report.top_k}, side={i.report.side}"
                              for i in items)
        notices.append(f"the inputs were analysed with different settings ({described}): their intruder counts "
                       "differ by definition; the threshold sweep compares them at equal ε")
    return notices


def _base_key(base: str) -> str:
    path = Path(base).expanduser()
    return str(path.resolve()) if base and path.exists() else base


# ---- the page -----------------------------------------------------------------------------------------------


def _write_analyses(items: list[_Input], folder: Path) -> None:
    """folder/<input>.json: the analysis shown; for a run with several checkpoints also <input>-epoch-NN.json
    (each written beside its place and renamed in by `to_json`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in items:
        item.report.to_json(folder / f"{item.slug}.json")
        for epoch, report in item.by_epoch if len(item.by_epoch) > 1 else []:
            report.to_json(folder / f"{item.slug}-epoch-{epoch:02d}.json")


def _page(items: list[_Input], notices: list[str], canvas: _Canvas, command: str) -> list:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    blocks = [Paragraph(
        f"Intruder dimensions ({_PAPER}) are singular vectors among the top k of a fine-tuned matrix "
        "W_t = W_0 + ΔW whose largest |cos| with every singular vector of the base W_0 is below a threshold ε. "
        f"{len(items)} {'input' if len(items) == 1 else 'inputs'}; written {now} by intruder {__version__}.")]
    blocks += [Notice(text) for text in notices]
    blocks += [Heading("Overview"), _overview(items)]
    if len(items) > 1:
        blocks += [Heading("Comparison"), *_comparison_figures(items, canvas)]
    for item in items:
        heading = f"{item.label} (different base)" if item.other_base else item.label
        blocks += [Heading(heading), *_describe(item), *[Notice(n) for n in item.notes]]
        blocks += _input_figures(item, canvas)
        blocks.append(_layer_table(item.report))
        if item.run is not None:
            blocks += [Paragraph("Training configuration (`config.json`):"),
                       Code(json.dumps(item.run.config, indent=2), "json")]
    blocks += [Heading("Software"), _versions(), Heading("Reproduce"),
               Paragraph("Every analysis shown is in `analysis/` (`IntruderReport.from_json` reads it back); "
                         f"the figures, as {' and '.join(f.upper() for f in canvas.formats)}, are in `figures/`. "
                         "This report was written by:"),
               Code(command, "bash")]
    return blocks


def _input_figures(item: _Input, canvas: _Canvas) -> list:
    r, s, layer = item.report, item.slug, _featured(item.report)
    which = "the matrix with the most intruders" if layer.n_intruders else "no intruder anywhere; this comes closest"
    drawn = []
    if item.run is not None and item.run.metrics is not None:
        drawn.append(canvas.draw(f"{s}-training", plot_training, item.run, caption=(
            "Learning (held-out accuracy, left axis) and forgetting (mean token loss on general text, right axis) "
            "against epoch, with the training loss of each logged step; epoch 0 is the model before training.")))
    if len(item.by_epoch) > 1:
        epochs, reports = zip(*item.by_epoch)
        drawn.append(canvas.draw(
            f"{s}-intruders-by-epoch", plot_intruders_by_epoch, list(reports), list(epochs),
            thresholds=sorted({*SWEEP, r.threshold}), caption=(
                "Intruders over all matrices in each epoch's checkpoint, at three thresholds ε; the base model "
                "(epoch 0) has none by definition.")))
    drawn += [
        canvas.draw(f"{s}-intruder-map", plot_intruder_map, r, caption=(
            f"Intruders per matrix (top k = {r.top_k} tuned singular vectors, ε = {r.threshold:g}, {r.side} side), "
            "by layer index and module kind; blank cells were not analysed.")),
        canvas.draw(f"{s}-intruders-per-layer", plot_intruders_per_layer, r,
                    caption="Intruders per layer index, stacked by module kind."),
        canvas.draw(f"{s}-spectrum", plot_spectrum, layer, show_delta=True, caption=(
            f"Singular values of `{layer.name}` ({which}): the base W_0, the tuned top k of W_t with its intruders "
            "marked, and the update ΔW.")),
        canvas.draw(f"{s}-similarity", plot_similarity, layer, caption=(
            f"|cos| between the top-{r.top_k} tuned singular vectors (rows) and the leading base singular vectors "
            f"(columns) of `{layer.name}`, as in Figure 1 of {_PAPER}: an intruder's row has no bright cell.")),
        canvas.draw(f"{s}-effective-rank", plot_effective_rank, r, caption=(
            "Effective rank (Roy & Vetterli) of each update ΔW = W_t − W_0 against layer index, one line per "
            "module kind; a LoRA update of rank r has at most r.")),
        canvas.draw(f"{s}-threshold-sweep", plot_threshold_sweep, r, labels=[item.label], caption=(
            "Intruders over all matrices against the threshold ε, counted from the stored cosines; the dotted "
            "line marks the ε of the analysis.")),
    ]
    return _gallery(drawn)


def _comparison_figures(items: list[_Input], canvas: _Canvas) -> list:
    reports, labels = [i.report for i in items], [i.label for i in items]
    with warnings.catch_warnings():  # _compare has warned once, naming the input
        warnings.filterwarnings("ignore", message="the reports analyse different base")
        drawn = [
            canvas.draw("compare-threshold-sweep", plot_threshold_sweep, reports, labels=labels, caption=(
                "Intruders over all matrices against the threshold ε, one line per input, at equal ε.")),
            canvas.draw("compare-effective-rank", plot_effective_rank, reports, labels=labels, caption=(
                "Effective rank of ΔW against layer index, the mean over each layer's matrices, one line per "
                "input.")),
        ]
    return _gallery(drawn)


def _gallery(drawn: list) -> list:
    return [Gallery([d for d in drawn if isinstance(d, Image)]), *[d for d in drawn if isinstance(d, Notice)]]


def _featured(report: IntruderReport) -> LayerResult:
    """The matrix with the most intruders; among ties, or when none has any, the smallest max |cos|."""
    return max(report.layers, key=lambda lr: (lr.n_intruders, -float(lr.max_cos.min(initial=1.0))))


def _overview(items: list[_Input]) -> Table:
    rows = []
    for item in items:
        r, learned = item.report, _learning(item.run)
        base = _short(r.base) + (" (different)" if item.other_base else "")
        rows.append([item.label, "training run" if item.run else "saved report", base, len(r.layers),
                     r.total, r.threshold, r.top_k, r.side, _mean([lr.delta_effective_rank for lr in r.layers]),
                     *learned])
    return Table(["input", "kind", "base", "matrices", "intruders", "ε", "k", "side", "mean ΔW erank",
                  "accuracy before", "accuracy after", "forgetting (nats)"], rows,
                 "intruders over all analysed matrices; accuracy and forgetting from the training run, if any")


def _describe(item: _Input) -> list:
    r = item.report
    rows = [["source", item.source], ["base", r.base], ["tuned", r.tuned], ["threshold ε", r.threshold],
            ["top k", r.top_k], ["side", r.side], ["matrices analysed", len(r.layers)],
            ["matrices unchanged", len(r.unchanged)],
            *[[f"analysis {key}", value] for key, value in r.meta.items() if key != "cache"]]
    blocks = []
    if item.run is not None:
        epochs = ", ".join(f"{e:02d}" for e, _ in item.by_epoch)
        blocks.append(Paragraph(f"Training run: {item.run.describe()}. Checkpoints analysed: epoch {epochs}; "
                                "the figures and the table show the last."))
        before, after, forgetting = _learning(item.run)
        rows += [["accuracy before / after", f"{_fmt(before)} / {_fmt(after)}"],
                 ["forgetting (nats)", _fmt(forgetting)]]
        if item.run.summary and item.run.summary.get("versions"):
            rows.append(["trained with", ", ".join(f"{k} {v}" for k, v in item.run.summary["versions"].items())])
    rows = [[key, str(value)] for key, value in rows]  # text: one alignment for the column
    return blocks + [Table(["setting", "value"], rows, "analysis settings")]


def _layer_table(report: IntruderReport) -> Table:
    rows = [[r["name"], f"{r['out']}×{r['in']}", r["update"], r["n_intruders"], r["indices"], r["min_max_cos"],
             r["top_sigma"], r["delta_effective_rank"], r["delta_stable_rank"], r["delta_fro_norm"]]
            for r in report.to_rows()]
    return Table(["matrix", "shape", "update", "intruders", "indices", "min max|cos|", "top σ", "ΔW erank",
                  "ΔW stable rank", "‖ΔW‖_F"], rows, f"per-matrix results ({len(rows)} matrices)")


def _versions() -> Table:
    rows = [[name, version] for name, version in versions(_PACKAGES).items()]
    return Table(["package", "version"], rows, "software that wrote this report")


def _learning(run: TrainingRun | None) -> list:
    """[accuracy before, accuracy after, forgetting] from summary.json, else from the eval records."""
    if run is None:
        return [None, None, None]
    summary, found = run.summary or {}, curves(run.metrics or [])
    accuracy, forget = found.accuracy, found.forget_loss
    forgetting = forget[-1][1] - forget[0][1] if forget else None
    return [summary.get("accuracy_before", accuracy[0][1] if accuracy else None),
            summary.get("accuracy_after", accuracy[-1][1] if accuracy else None),
            summary.get("forgetting", forgetting)]


def _command(paths, out, labels, base, threshold, top_k, side, layers, every_epoch, formats) -> str:
    words = ["intruder", "report", *map(str, paths), "--out", str(out), "--threshold", f"{threshold:g}",
             "--top-k", str(top_k), "--side", side]
    if layers is not None:
        words += ["--layers", layers if isinstance(layers, str) else f"^({'|'.join(map(re.escape, layers))})$"]
    if labels is not None:
        words += ["--labels", *map(str, labels)]
    if base is not None:
        words += ["--base", str(base)]
    if not every_epoch:
        words.append("--last-only")
    if formats != ("png", "svg"):
        words += ["--formats", *formats]
    return shlex.join(words)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]
