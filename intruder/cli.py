"""Command line: `intruder analyze BASE TUNED [...]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import IntruderError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="intruder", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_analyze(commands)
    _add_train(commands)
    _add_report(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except IntruderError as exc:
        print(f"intruder: error: {exc}", file=sys.stderr)
        return 2


def _add_analyze(commands) -> None:
    p = commands.add_parser("analyze", help="find intruder dimensions of a fine-tuned model or LoRA adapter",
                            description="Print one line per analysed matrix and the total number of intruders.")
    p.add_argument("base", help="pretrained model: directory, .safetensors/.bin/.gguf file, or hub id")
    p.add_argument("tuned", help="fine-tuned model (same forms) or a PEFT LoRA adapter directory")
    p.add_argument("--out", type=Path, help="write the full result to FILE.json or the table to FILE.csv")
    _add_analysis_options(p)
    p.set_defaults(run=_analyze)


def _add_analysis_options(p) -> None:
    """The options of `find_intruders`, shared by `analyze` and `report`."""
    p.add_argument("--threshold", type=float, default=0.5, help="ε: max |cos| below this is an intruder")
    p.add_argument("--top-k", type=int, default=10, help="how many top tuned singular vectors to examine")
    p.add_argument("--side", choices=("left", "right", "both"), default="left")
    p.add_argument("--layers", help="regex selecting tensor names (default: every changed 2-D weight)")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--cache-dir", help="where base factors are cached (default ~/.cache/intruder)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the factor cache")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _analyze(args) -> int:
    from .analysis import find_intruders

    if args.out is not None and args.out.suffix.lower() not in (".json", ".csv"):
        raise IntruderError(f"--out {args.out}: name a .json or .csv file")
    report = find_intruders(args.base, args.tuned, threshold=args.threshold, top_k=args.top_k,
                            side=args.side, layers=args.layers, device=args.device,
                            cache_dir=False if args.no_cache else args.cache_dir, progress=not args.quiet)
    print(report.summary())
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix.lower() == ".json":
            report.to_json(args.out)
        else:
            report.to_csv(args.out)
        print(f"wrote {args.out}")
    return 0


def _add_report(commands) -> None:
    p = commands.add_parser("report", help="write an HTML and a Markdown report of analyses and training runs",
                            description="Write OUT/report.html (self-contained), OUT/report.md, OUT/figures/ and "
                            "OUT/analysis/ from saved report JSON files (intruder analyze --out r.json) and "
                            "training run directories (config.json, metrics.jsonl, epoch-NN/ checkpoints).")
    p.add_argument("inputs", nargs="+", metavar="RUN_OR_REPORT", help="a run directory or a saved report .json")
    p.add_argument("--out", type=Path, required=True, help="the directory to write the report into")
    p.add_argument("--labels", nargs="+", help="one name per input, for headings and legends")
    p.add_argument("--base", help="base model of the runs, instead of model_path in their config.json")
    p.add_argument("--last-only", action="store_true", help="analyse only a run's last checkpoint, not every epoch")
    p.add_argument("--title", default="Intruder dimensions", help="the report's title")
    p.add_argument("--formats", nargs="+", default=["png", "svg"], help="figure files to write (png always; pdf)")
    _add_analysis_options(p)  # for the runs analysed here; saved reports keep their own settings
    p.set_defaults(run=_report)


def _report(args) -> int:
    import warnings

    from .report import write_report

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        page = write_report(args.inputs, args.out, labels=args.labels, base=args.base, threshold=args.threshold,
                            top_k=args.top_k, side=args.side, layers=args.layers, every_epoch=not args.last_only,
                            device=args.device, cache_dir=False if args.no_cache else args.cache_dir,
                            title=args.title, formats=args.formats, progress=not args.quiet)
    for warning in caught:
        print(f"intruder: warning: {warning.message}", file=sys.stderr)
    print(f"wrote {page}, {page.with_name('report.md')}, {page.parent / 'figures'} and {page.parent / 'analysis'}")
    return 0


def _add_train(commands) -> None:
    from .training.lora import PRESETS
    from .training.trainer import LOSSES, METHODS, SCHEDULES, TrainConfig

    default = TrainConfig(out="")
    p = commands.add_parser(
        "train", help="fine-tune a causal LM with LoRA or fully on multiple-choice questions",
        description="Train, evaluate learning (held-out accuracy) and forgetting (general-text loss) after "
                    "every epoch, and save one checkpoint per epoch. Options left out keep their defaults, or "
                    "with --resume the values in the run's config.json.",
        argument_default=argparse.SUPPRESS)
    p.add_argument("--out", required=True, help="run directory (created; refused if it holds another run)")
    p.add_argument("--model", help=f"HF model directory, hub id or .gguf file (default {default.model})")
    p.add_argument("--data", help="'sample' (bundled), a .parquet/.jsonl/.json/.csv file or a hub data set id")
    p.add_argument("--method", choices=METHODS, help=f"default {default.method}")
    p.add_argument("--rank", type=int, help=f"LoRA rank r (default {default.rank})")
    p.add_argument("--alpha", type=float, help=f"LoRA α; scale α/r (default {default.alpha:g})")
    p.add_argument("--rslora", action="store_true", help="scale α/√r (rank-stabilised LoRA)")
    p.add_argument("--dropout", type=float, help="dropout on the LoRA input (default 0)")
    p.add_argument("--targets", nargs="+", help=f"presets {', '.join(PRESETS)} and/or module names such as "
                                                "q_proj, embed_tokens, lm_head (default all-linear)")
    p.add_argument("--train-embeddings", action="store_true", help="full fine-tuning: train embeddings too")
    p.add_argument("--epochs", type=int, help=f"default {default.epochs}")
    p.add_argument("--batch-size", type=int, help=f"questions per micro-batch (default {default.batch_size})")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 for lora, 2e-5 for full)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    p.add_argument("--warmup", type=float, help=f"fraction of steps warming up (default {default.warmup})")
    p.add_argument("--schedule", choices=SCHEDULES, help=f"decay after warm-up (default {default.schedule})")
    p.add_argument("--max-grad-norm", type=float, help=f"gradient clipping (default {default.max_grad_norm})")
    p.add_argument("--loss", choices=LOSSES, help="'letter': the answer letter only (default); 'answer': its text")
    p.add_argument("--context", action=argparse.BooleanOptionalAction,
                   help="include the `contextual` paragraph in prompts (default on)")
    p.add_argument("--max-length", type=int, help=f"prompt tokens kept (default {default.max_length})")
    p.add_argument("--test-fraction", type=float, help="held-out share for data without a split column")
    p.add_argument("--seed", type=int, help="seed of initialisation, data order and splits (default 0)")
    p.add_argument("--scoring", choices=("letter", "mean-loglik"), help="how accuracy picks an option")
    p.add_argument("--general-text", help="forgetting corpus: .jsonl (`text`) or .txt (default: bundled)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    resume.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_train)


def _train(args) -> int:
    import json

    from .training import TrainConfig, train

    options = {k: v for k, v in vars(args).items() if k not in ("run", "command", "resume", "overwrite", "quiet")}
    resume = getattr(args, "resume", False)
    saved = Path(args.out) / "config.json"
    if resume and saved.is_file():
        options = json.loads(saved.read_text(encoding="utf-8")) | options
    if "targets" in options:
        options["targets"] = tuple(options["targets"])
    config = TrainConfig.from_dict(options)
    summary = train(config, resume=resume, overwrite=getattr(args, "overwrite", False),
                    progress=not getattr(args, "quiet", False))
    print(f"accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f} "
          f"on {summary['n_test']} held-out questions; general-text loss {summary['forget_loss_before']:.3f} -> "
          f"{summary['forget_loss_after']:.3f} nats (forgetting {summary['forgetting']:+.3f})")
    print(f"wrote {args.out}: {', '.join(summary['checkpoints'])}, metrics.jsonl, summary.json")
    return 0

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
