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
    p.add_argument("--threshold", type=float, default=0.5, help="ε: max |cos| below this is an intruder")
    p.add_argument("--top-k", type=int, default=10, help="how many top tuned singular vectors to examine")
    p.add_argument("--side", choices=("left", "right", "both"), default="left")
    p.add_argument("--layers", help="regex selecting tensor names (default: every changed 2-D weight)")
    p.add_argument("--out", type=Path, help="write the full result to FILE.json or the table to FILE.csv")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--cache-dir", help="where base factors are cached (default ~/.cache/intruder)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the factor cache")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_analyze)


def _analyze(args) -> int:
    from .intruders import find_intruders

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
