"""The report of a sweep: its findings in plain sentences, tables of every run and λ, and the sweep figures,
as `DIR/report.html` (self-contained) and `DIR/report.md`, from the rows of `DIR/sweep.jsonl`."""

from __future__ import annotations

import datetime
import json
import statistics
from pathlib import Path

from .. import __version__
from ..outputs import versions, write_text
from ._pages import Code, Gallery, Heading, Image, Notice, Paragraph, Table, render_html, render_markdown
from .plot import save_figure
from .sweep_plots import (
    last_epoch,
    plot_epsilon_curves,
    plot_erank_vs_rank,
    plot_intruders_vs_epoch,
    plot_intruders_vs_rank,
    plot_lambda,
    plot_learning_curves,
    plot_learning_vs_forgetting,
)

_FIGURES = (
    ("intruders-vs-rank", plot_intruders_vs_rank, "Intruders and the smallest max |cos| at the last epoch against "
     "LoRA rank; full fine-tuning dashed."),
    ("intruders-vs-epoch", plot_intruders_vs_epoch, "Intruders and the smallest max |cos| against epoch, per run."),
    ("epsilon-curves", plot_epsilon_curves, "Intruders at every threshold ε, last epoch of each run."),
    ("erank-vs-rank", plot_erank_vs_rank, "Mean effective rank of ΔW against LoRA rank; full fine-tuning dashed."),
    ("learning-curves", plot_learning_curves, "Held-out accuracy and general-text loss against epoch."),
    ("learning-vs-forgetting", plot_learning_vs_forgetting, "Accuracy gained against forgetting, a point per "
     "run and epoch."),
    ("lambda", plot_lambda, "Accuracy and general-text loss of each LoRA run's last epoch with its intruder "
     "directions scaled by λ."),
)


def write_sweep_report(rows: list[dict], grid: dict, out_dir, *, command: str, notes=(), formats=("png",),
                       title: str = "Intruder dimensions: the sweep") -> Path:
    """Draw the sweep figures into OUT/figures and write OUT/report.html and OUT/report.md; returns the page."""
    out = Path(out_dir)
    blocks = [Paragraph(_intro(rows, grid)), *[Notice(n) for n in notes]]
    blocks += [Heading("Findings"), *[Paragraph(f"- {text}") for text in findings(rows)]]
    blocks += [Heading("Runs"), _runs_table(rows)]
    if any(r["kind"] == "lambda" for r in rows):
        blocks += [_lambda_table(rows)]
    images, left_out = _figures(rows, out, formats)
    blocks += [Heading("Figures"), Gallery(images), *left_out]
    blocks += [Heading("Settings"), Paragraph("The grid and the training options every run shared "
                                              "(`sweep.json`):"), Code(json.dumps(grid, indent=1), "json"),
               Heading("Software"), Table(["package", "version"], [[k, v] for k, v in versions().items()]),
               Heading("Reproduce"), Paragraph("Every row is in `sweep.jsonl`, every analysis in `analysis/`. "
                                               "Running the same command again redoes nothing finished:"),
               Code(command, "bash")]
    write_text(out / "report.html", render_html(title, blocks, out))
    write_text(out / "report.md", render_markdown(title, blocks))
    return out / "report.html"


def findings(rows: list[dict]) -> list[str]:
    """Plain sentences, each with its number from these rows, on the questions the study asks."""
    last = last_epoch(rows)
    lora = [r for r in last if r["method"] == "lora" and r["intruders"] is not None]
    full = [r for r in last if r["method"] == "full" and r["intruders"] is not None]
    base = next((r for r in rows if r["kind"] == "epoch" and r["epoch"] == 0), None)
    out = []
    if lora or full:
        eps = (lora or full)[0]["threshold"]
        parts = [f"{r['run']} {r['intruders']} (smallest max |cos| {r['min_max_cos']:.3f})" for r in lora + full]
        verdict = ""
        if lora and full:
            most_lora, most_full = max(r["intruders"] for r in lora), max(r["intruders"] for r in full)
            drift_lora, drift_full = min(r["min_max_cos"] for r in lora), min(r["min_max_cos"] for r in full)
            verdict = (f" LoRA {'has more' if most_lora > most_full else 'has no more'} intruders than full "
                       f"fine-tuning ({most_lora} against {most_full}); its top vectors drift "
                       f"{'further' if drift_lora < drift_full else 'less far'} from the pretrained ones "
                       f"(smallest max |cos| {drift_lora:.3f} against {drift_full:.3f}).")
        out.append(f"Intruders at ε = {eps:g}, last epoch: {'; '.join(parts)}.{verdict}")
    if lora and full:
        lo, fu = statistics.fmean(r["mean_erank"] for r in lora), statistics.fmean(r["mean_erank"] for r in full)
        out.append(f"Effective rank of ΔW (mean over matrices): LoRA {_list(lora, 'mean_erank')}; full fine-tuning "
                   f"{_list(full, 'mean_erank')}: full fine-tuning's update is {fu / lo:.0f}× higher in rank."
                   if fu > lo else f"Effective rank of ΔW: LoRA {_list(lora, 'mean_erank')}, full "
                   f"{_list(full, 'mean_erank')}: full fine-tuning's is not higher here.")
    if base:
        learned = [f"{r['run']} {100 * base['accuracy']:.1f} → {100 * r['accuracy']:.1f} % "
                   f"(forgetting {r['forgetting']:+.3f} nats)" for r in last if r["forgetting"] is not None]
        if learned:
            n = base.get("n_questions")
            p = base["accuracy"]
            noise = (f" With {n} held-out questions one standard error of an accuracy near {100 * p:.0f} % is "
                     f"{100 * (p * (1 - p) / n) ** 0.5:.1f} points: smaller changes are noise." if n else "")
            out.append(f"Learning and forgetting (held-out accuracy, rise of the general-text loss from "
                       f"{base['forget_loss']:.3f}): {'; '.join(learned)}.{noise}")
    out += _lambda_findings(rows)
    return out or ["No run has finished an epoch yet."]


def _lambda_findings(rows: list[dict]) -> list[str]:
    out = []
    by_run: dict[str, list[dict]] = {}
    for r in rows:
        if r["kind"] == "lambda":
            by_run.setdefault(r["run"], []).append(r)
    for name, group in by_run.items():
        group.sort(key=lambda r: -r["lam"])
        tuned, low = group[0], group[-1]
        if tuned["lam"] == low["lam"]:
            continue
        eps = low.get("lam_threshold")
        if low.get("directions", 0) == 0:
            out.append(f"{name}: no direction was flagged at ε = {eps:g}, so scaling by λ = {low['lam']:g} "
                       "changed nothing.")
            continue
        out.append(f"{name}: scaling its {low['directions']} directions below ε = {eps:g} from λ = {tuned['lam']:g} to "
                   f"{low['lam']:g} moved the general-text loss {low['forget_loss'] - tuned['forget_loss']:+.3f} "
                   f"nats and accuracy {100 * (low['accuracy'] - tuned['accuracy']):+.1f} points "
                   f"({'recovers' if low['forget_loss'] < tuned['forget_loss'] else 'does not recover'} forgetting).")
    return out


def _intro(rows: list[dict], grid: dict) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    runs = sorted({r["run"] for r in rows})
    train = grid.get("train", {})
    settings = ", ".join(f"{k} {v}" for k, v in train.items()) or "the trainer's defaults"
    return (f"{len(runs)} runs of {grid['epochs']} epochs each ({settings}); every epoch's checkpoint analysed "
            f"against the base with k = {grid['top_k']}, ε = {grid['threshold']:g}. Learning is held-out accuracy, "
            "forgetting the rise of the loss on a general-text corpus. Written "
            f"{now} by intruder {__version__}.")


def _runs_table(rows: list[dict]) -> Table:
    columns = ["run", "epoch", "r", "α", "scale", "lr", "accuracy", "forgetting (nats)", "intruders",
               "ε-curve 0.1…0.9", "smallest max |cos|", "ΔW erank mean / median", "trainable", "seconds"]
    body = []
    for r in rows:
        if r["kind"] != "epoch":
            continue
        curve = " ".join(str(r["counts"][k]) for k in sorted(r["counts"], key=float)) if r["counts"] else ""
        body.append([r["run"], r["epoch"], r["rank"] or "", _fmt(r["alpha"]), _fmt(r["scale"]), f"{r['lr']:g}",
                     f"{100 * r['accuracy']:.1f} %", _fmt(r["forgetting"], "+.3f"), _fmt(r["intruders"]), curve,
                     _fmt(r["min_max_cos"], ".3f"),
                     "" if r["mean_erank"] is None else f"{r['mean_erank']:.1f} / {r['median_erank']:.1f}",
                     _fmt(r["trainable_parameters"], ","), _fmt(r.get("seconds"), ".0f")])
    return Table(columns, body, "Every run and epoch (epoch 0: the base model)")


def _lambda_table(rows: list[dict]) -> Table:
    body = [[r["run"], f"{r['lam']:g}", r.get("directions", ""), r.get("matrices", ""),
             f"{100 * r['accuracy']:.1f} %", f"{r['forget_loss']:.3f}", _fmt(r["forgetting"], "+.3f")]
            for r in rows if r["kind"] == "lambda"]
    return Table(["run", "λ", "directions scaled", "matrices", "accuracy", "general-text loss", "forgetting"], body,
                 "The last epoch of each LoRA run with its intruders scaled by λ (λ = 1: the tuned model)")


def _figures(rows: list[dict], out: Path, formats) -> tuple[list[Image], list[Notice]]:
    """Every sweep figure that can be drawn, saved under OUT/figures; a notice for each that cannot."""
    drawn, left_out = [], []
    for name, plot, caption in _FIGURES:
        try:
            ax = plot(rows)
        except ValueError as exc:
            left_out.append(Notice(f"figure `{name}` left out: {exc}"))
            continue
        save_figure(ax, out / "figures" / name, formats=tuple(dict.fromkeys(("png", *formats))))
        drawn.append(Image(f"figures/{name}.png", caption, width=96 * ax.figure.get_figwidth()))
    return drawn, left_out


def _list(rows: list[dict], key: str) -> str:
    return ", ".join(f"{r['run']} {r[key]:.1f}" for r in rows)


def _fmt(value, spec: str = "g") -> str:
    return "" if value is None else format(value, spec)
