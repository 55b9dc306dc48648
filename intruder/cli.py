"""Command line: `intruder analyze BASE TUNED [...]`."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from .errors import IntruderError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="intruder", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_analyze(commands)
    _add_mitigate(commands)
    _add_train(commands)
    _add_report(commands)
    _add_sweep(commands)
    _add_demo(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except IntruderError as exc:
        print(f"intruder: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = getattr(args, "kept", "nothing half-written: every file is written beside its place and renamed in")
        again = getattr(args, "again", None)  # a command that continues the work, where it is not the same one
        how = f"run:\n  {again}" if again else f"run the same command again:\n  {_command_line(argv)}"
        print(f"\nintruder: interrupted. Kept: {kept}. To continue, {how}", file=sys.stderr)
        return 130


def _add_analyze(commands) -> None:
    p = commands.add_parser("analyze", help="find intruder dimensions of a fine-tuned model or LoRA adapter",
                            description="Print one line per analysed matrix and the total number of intruders.")
    p.add_argument("base", nargs="?", help="pretrained model: directory, .safetensors/.bin/.gguf file, or hub id "
                                          "(left out for an adapter: its adapter_config.json's "
                                          "base_model_name_or_path)")
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
    p.add_argument("--workers", type=int, help="matrices analysed side by side on a CPU (default: one per torch "
                                                "thread); 1 holds one at a time, the least memory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _analyze(args) -> int:
    """Under torchrun every rank analyses its share of the matrices; rank 0 prints and writes --out."""
    from . import distributed
    from .analysis import find_intruders
    from .analysis.parallel import TIMEOUT, together_if
    from .outputs import check_output_file

    group = distributed.init_from_env(device=args.device, timeout=TIMEOUT)  # a no-op without torchrun
    main_rank = distributed.rank() == 0
    try:
        with together_if(group, f"checking --out {args.out}"):
            if args.out is not None and main_rank:
                if args.out.suffix.lower() not in (".json", ".csv"):
                    raise IntruderError(f"--out {args.out}: name a .json or .csv file")
                check_output_file(args.out)
        base = args.base if args.base is not None else _adapter_base(Path(args.tuned))
        args.kept = "nothing was written" + (f" ({args.out} is as it was)" if args.out is not None else "")
        report = find_intruders(base, args.tuned, threshold=args.threshold, top_k=args.top_k,
                                side=args.side, layers=args.layers, device=args.device,
                                cache_dir=False if args.no_cache else args.cache_dir,
                                progress=main_rank and not args.quiet, workers=args.workers)
    finally:
        distributed.close()
    if not main_rank:
        return 0
    print(report.summary())
    if args.out is not None:
        if args.out.suffix.lower() == ".json":
            report.to_json(args.out)
        else:
            report.to_csv(args.out)
        print(f"wrote {args.out}")
    return 0


def _adapter_base(adapter: Path) -> str:
    """The base model a PEFT adapter directory names (adapter_config.json's base_model_name_or_path), said on
    stderr; for `intruder analyze ADAPTER` with the base left out."""
    import json

    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise IntruderError(f"{adapter} is not a LoRA adapter directory (it has no adapter_config.json), so it "
                            f"names no base model: pass the base first, `intruder analyze BASE {adapter}`")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise IntruderError(f"{config_file} is not valid JSON ({exc}); fix it, or pass the base first, "
                            f"`intruder analyze BASE {adapter}`") from exc
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise IntruderError(f"{config_file} names no base_model_name_or_path: pass the base model first, "
                            f"`intruder analyze BASE {adapter}`")
    print(f"intruder: base model {base} (base_model_name_or_path in {config_file})", file=sys.stderr)
    return base


def _add_mitigate(commands) -> None:
    p = commands.add_parser("mitigate", help="scale the intruder dimensions of a fine-tuned model or adapter by λ",
                            description="Write W' = W_t + (λ−1) Σ σ_j u_j v_jᵀ over the intruders find_intruders "
                            "flags: an exact PEFT adapter of rank r + |I| per changed module for a LoRA adapter, "
                            "else a safetensors model directory (with the tuned model's config and tokenizer).")
    p.add_argument("base", help="pretrained model: directory, .safetensors/.bin/.gguf file, or hub id")
    p.add_argument("tuned", help="fine-tuned model (same forms) or a PEFT LoRA adapter directory")
    p.add_argument("--lam", type=float, default=0.5, help="λ >= 0, the factor on each intruder's σ (1 keeps, "
                                                          "0 removes; default 0.5)")
    p.add_argument("--out", type=Path, required=True, help="directory to write (replaced atomically if it holds "
                                                           "an earlier `intruder mitigate` output)")
    _add_analysis_options(p)
    p.set_defaults(run=_mitigate)


def _mitigate(args) -> int:
    from .analysis import scale_intruders

    result = scale_intruders(args.base, args.tuned, args.out, lam=args.lam, threshold=args.threshold,
                             top_k=args.top_k, side=args.side, layers=args.layers, device=args.device,
                             cache_dir=False if args.no_cache else args.cache_dir, progress=not args.quiet,
                             workers=args.workers)
    print(result.summary())
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
                            title=args.title, formats=args.formats, progress=not args.quiet,
                            workers=args.workers)
    for warning in caught:
        print(f"intruder: warning: {warning.message}", file=sys.stderr)
    print(f"wrote {page}, {page.with_name('report.md')}, {page.parent / 'figures'} and {page.parent / 'analysis'}")
    return 0


def _add_train(commands) -> None:
    p = commands.add_parser(
        "train", help="fine-tune a causal LM with LoRA or fully on multiple-choice questions",
        description="Train, evaluate learning (held-out accuracy) and forgetting (general-text loss) after "
                    "every epoch, and save one checkpoint per epoch. Options left out keep their defaults, or "
                    "with --resume the values in the run's config.json.",
        argument_default=argparse.SUPPRESS)
    p.add_argument("--out", required=True, help="run directory (created; refused if it holds another run)")
    _add_training_options(p, grid=True)
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    resume.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_train)


def _add_training_options(p, *, grid: bool) -> None:
    """The options of `TrainConfig`; with grid=False, those a sweep varies (method, rank, α, lr) are left out."""
    from .training.config import LOSSES, METHODS, SCHEDULES, TrainConfig
    from .training.lora import PRESETS

    default = TrainConfig(out="")
    p.add_argument("--model", help=f"HF model directory, hub id or .gguf file (default {default.model})")
    p.add_argument("--data", help="'sample' (bundled), a .parquet/.jsonl/.json/.csv file or a hub data set id")
    if grid:
        p.add_argument("--method", choices=METHODS, help=f"default {default.method}")
        p.add_argument("--rank", type=int, help=f"LoRA rank r (default {default.rank})")
        p.add_argument("--alpha", type=float, help=f"LoRA α; scale α/r (default {default.alpha:g})")
        p.add_argument("--rslora", action="store_true", help="scale α/√r (rank-stabilised LoRA)")
        p.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 for lora, 2e-5 for full)")
        p.add_argument("--epochs", type=int, help=f"default {default.epochs}")
    p.add_argument("--dropout", type=float, help="dropout on the LoRA input (default 0)")
    p.add_argument("--targets", nargs="+", help=f"presets {', '.join(PRESETS)} and/or module names such as "
                                                "q_proj, embed_tokens, lm_head (default all-linear)")
    p.add_argument("--train-embeddings", action="store_true", help="full fine-tuning: train embeddings too")
    p.add_argument("--batch-size", type=int, help=f"questions per micro-batch (default {default.batch_size})")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
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
    p.add_argument("--forget-texts", type=int, help="measure forgetting on N paragraphs of it (default: all)")
    p.add_argument("--eval-every", type=int, help="evaluate after every N-th epoch; the last always (default 1)")
    p.add_argument("--bucket", type=int, help="sort windows of N micro-batches by length: less padding (1: off)")
    p.add_argument("--eval-batch-size", type=int, help=f"questions per evaluation batch ({default.eval_batch_size})")
    p.add_argument("--device", help="auto (default), cpu or cuda")


def _train(args) -> int:
    from . import distributed
    from .training import TrainConfig, train
    from .training.parallel import TIMEOUT
    from .training.resume import saved_settings

    options = {k: v for k, v in vars(args).items() if k not in ("run", "command", "resume", "overwrite", "quiet")}
    resume = getattr(args, "resume", False)
    distributed.init_from_env(device=options.get("device", "auto"), timeout=TIMEOUT)  # under torchrun
    if resume:
        options = saved_settings(Path(args.out)) | options
    if "targets" in options:
        options["targets"] = tuple(options["targets"])
    config = TrainConfig.from_dict(options)
    before = _state_stamp(Path(args.out))
    main_rank = distributed.rank() == 0  # the others train in silence
    try:
        with _warnings_to_stderr(main_rank):
            summary = train(config, resume=resume, overwrite=getattr(args, "overwrite", False),
                            progress=main_rank and not getattr(args, "quiet", False))
    except KeyboardInterrupt:
        args.kept, args.again = _kept_epochs(Path(args.out), config.epochs, before)
        raise
    distributed.close()
    if not main_rank:
        return 0
    print(f"accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f} "
          f"on {summary['n_test']} held-out questions; general-text loss {summary['forget_loss_before']:.3f} -> "
          f"{summary['forget_loss_after']:.3f} nats (forgetting {summary['forgetting']:+.3f})")
    print(f"wrote {args.out}: {', '.join(summary['checkpoints'])}, metrics.jsonl, summary.json")
    return 0


def _kept_epochs(out: Path, epochs: int, before) -> tuple[str, str | None]:
    """What an interrupted `train` kept in `out`, and the command that continues it (None: the same one).
    before: `_state_stamp(out)` when the command started; unchanged, no epoch of this command was saved."""
    import shlex

    if _state_stamp(out) in (None, before):
        return f"nothing new: no epoch had finished, so {out} is as it was before this command", None
    done = sorted(p.name for p in out.glob("epoch-*") if p.is_dir())
    return (f"{', '.join(done)} of {epochs} epochs in {out} (checkpoints, metrics.jsonl and state.pt)",
            f"intruder train --out {shlex.quote(str(out))} --resume")


def _state_stamp(out: Path):
    """Identity of out/state.pt (inode, modification time), None when absent: the trainer replaces it after
    every epoch it saves."""
    try:
        stat = (out / "state.pt").stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


@contextlib.contextmanager
def _warnings_to_stderr(show: bool = True):
    """Print each warning as `intruder: warning: ...` when it is raised (a long run should not hold them); with
    show=False (ranks but 0 under torchrun, which would repeat them) print none."""
    import warnings

    with warnings.catch_warnings():
        if show:
            warnings.showwarning = lambda message, *_, **__: print(f"intruder: warning: {message}", file=sys.stderr)
        else:
            warnings.simplefilter("ignore")
        yield


def _add_sweep(commands) -> None:
    from .study.grid import Grid

    default = Grid()
    p = commands.add_parser(
        "sweep", help="train a grid of LoRA and full fine-tuning runs, analyse every epoch, compare them",
        description="Train every configuration of the grid (one ordinary run directory each under DIR/runs/), "
                    "analyse every epoch's checkpoint, evaluate learning, forgetting and the λ intervention, "
                    "and write DIR/sweep.jsonl, DIR/report.html and DIR/report.md. Run the same command again "
                    "to continue a sweep that was stopped; nothing finished is redone.")
    p.add_argument("--out", required=True, type=Path, help="sweep directory")
    p.add_argument("--methods", default=",".join(default.methods), help="lora,full (default both)")
    p.add_argument("--ranks", default="1,8,64", help="LoRA ranks (default 1,8,64)")
    p.add_argument("--alphas", default="2r", help="α rules: 2r, a number (fixed α), rslora or rslora:A")
    p.add_argument("--lrs", default="1e-3", help="LoRA learning rates (default 1e-3)")
    p.add_argument("--full-lrs", default="2e-5", help="full fine-tuning learning rates (default 2e-5)")
    p.add_argument("--epochs", type=int, default=default.epochs, help=f"per run (default {default.epochs})")
    p.add_argument("--lams", default="1,0.5,0", help="λ scales of the intruder directions (default 1,0.5,0)")
    p.add_argument("--threshold", type=float, default=0.5, help="ε of the intruder counts and of the mitigation")
    p.add_argument("--top-k", type=int, default=10, help="tuned singular vectors examined per matrix")
    p.add_argument("--lam-threshold", type=float, help="ε of the directions λ scales (default: --threshold)")
    p.add_argument("--shard", help="I/N: run only every N-th configuration, from the I-th (under torchrun each "
                                   "process takes its own shard)")
    p.add_argument("--extend", action="store_true", help="add this grid's runs to the sweep already in --out")
    p.add_argument("--report-only", action="store_true", help="merge what every shard finished into the report")
    p.add_argument("--cache-dir", help="base-factor cache shared by every run (default ~/.cache/intruder)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    train = p.add_argument_group("training options applied to every run (see `intruder train --help`)")
    _add_training_options(train, grid=False)
    p.set_defaults(run=_sweep)


def _sweep(args) -> int:
    from . import distributed
    from .report.sweep_page import findings, write_sweep_report
    from .study.grid import Grid, parse_alpha_rules
    from .study.runner import collect, load_grid, sweep

    args.kept = f"every finished run, analysis and evaluation in {args.out}"
    if args.report_only and distributed.launched():
        raise IntruderError("--report-only only merges files: run it in one process, without torchrun")
    if args.report_only:
        rows = collect(args.out)
    else:
        shared = {k: v for k, v in vars(args).items() if k in _shared_training_fields() and v is not None}
        if "targets" in shared:
            shared["targets"] = list(shared["targets"])
        grid = Grid(methods=_split(args.methods, str), ranks=_split(args.ranks, int),
                    alphas=parse_alpha_rules(args.alphas), lrs=_split(args.lrs, float),
                    full_lrs=_split(args.full_lrs, float), epochs=args.epochs, lams=_split(args.lams, float),
                    threshold=args.threshold, top_k=args.top_k, lam_threshold=args.lam_threshold, train=shared)
        rows = sweep(args.out, grid, shard=_shard(args.shard) if args.shard else None, extend=args.extend,
                     cache_dir=args.cache_dir, progress=not args.quiet)
        rank = distributed.rank()
        distributed.close()
        if rank > 0:  # rank 0 writes the report
            return 0
    page = write_sweep_report(rows, load_grid(args.out).to_dict(), args.out, command=_command_line())
    for text in findings(rows):
        print(f"- {text}")
    print(f"wrote {args.out / 'sweep.jsonl'}, {page} and {page.with_name('report.md')}")
    return 0


def _add_demo(commands) -> None:
    p = commands.add_parser(
        "demo", help="README's first command: a small sweep on Gemma 3 270M with findings, in minutes on a CPU",
        description="LoRA at r = 1 and 16 and full fine-tuning of Gemma 3 270M on the bundled Vietnamese "
                    "informatics questions, two epochs each, every epoch analysed, the intruders of the LoRA "
                    "runs scaled by λ = 0.5 and 0; then a report and a few plain findings.")
    p.add_argument("--out", type=Path, default=Path("intruder-demo"), help="where (default ./intruder-demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_demo)


def _demo(args) -> int:
    from .study.demo import demo

    args.kept = f"every finished run, analysis and evaluation in {args.out}"
    result = demo(args.out, progress=not args.quiet)
    if result is None:  # not rank 0 under torchrun: rank 0 prints and writes the report
        return 0
    print("\nFindings of this run:")
    for text in result["findings"]:
        print(f"- {text}")
    print(f"\nReport: {result['page']} (and {result['page'].with_name('report.md')}); "
          f"took {result['seconds'] / 60:.1f} minutes")
    return 0


def _shared_training_fields() -> set[str]:
    """The TrainConfig options a sweep applies to every run: all but those its grid sets."""
    from dataclasses import fields

    from .study.grid import GRID_FIELDS
    from .training.config import TrainConfig

    return {f.name for f in fields(TrainConfig)} - GRID_FIELDS


def _split(text: str, kind) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise IntruderError(f"{text!r}: give comma-separated {kind.__name__} values, e.g. 1,8,64") from None


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        return int(index), int(count)
    except ValueError:
        raise IntruderError(f"--shard {text!r}: give I/N, e.g. 2/4 for the second of four shards") from None


def _command_line(argv: list[str] | None = None) -> str:
    import shlex

    return "intruder " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
