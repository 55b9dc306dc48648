"""Fine-tune Gemma 3 270M on the bundled Vietnamese informatics questions, then follow its weights epoch by
epoch: held-out accuracy (learning), general-text loss (forgetting), intruder dimensions and ΔW's rank.

    .venv/bin/python examples/train_and_analyze.py                          # LoRA r=8, 3 epochs
    .venv/bin/python examples/train_and_analyze.py --method full --lr 2e-5 --out runs/full
    .venv/bin/python examples/train_and_analyze.py --model path/to/tiny --epochs 1 --out /tmp/run

On 2 CPU cores an epoch of LoRA r=8 on Gemma 3 270M (209 questions with their context paragraphs, batch 8)
takes a few minutes. Prints one line per epoch; the analyses are written beside the run as
`analysis-epoch-NN.json` (read them back with `IntruderReport.from_json`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from intruder import IntruderReport, find_intruders
from intruder.training import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gemma-lora-r8")
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--method", default="lora", choices=("lora", "full"))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    args = parser.parse_args()
    out = Path(args.out)

    if not (out / "summary.json").exists() or args.resume:
        config = TrainConfig(out=str(out), model=args.model, method=args.method, rank=args.rank,
                             alpha=2 * args.rank, epochs=args.epochs, lr=args.lr)
        train(config, resume=args.resume)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    base = summary["config"]["model_path"]

    print(f"{'epoch':>5} {'accuracy':>9} {'forget loss':>11} {'intruders':>9} {'matrices':>8} {'ΔW erank':>8}")
    for record in summary["evals"]:
        epoch = record["epoch"]
        line = f"{epoch:5d} {record['accuracy']:9.3f} {record['forget_loss']:11.4f}"
        if epoch > 0:
            report = _analysis(base, out, epoch)
            erank = sum(layer.delta_effective_rank for layer in report.layers) / len(report.layers)
            line += f" {report.total:9d} {len(report.layers):8d} {erank:8.2f}"
        print(line)
    print(f"forgetting (general-text loss after - before): {summary['forgetting']:+.4f} nats")


def _analysis(base: str, out: Path, epoch: int) -> IntruderReport:
    saved = out / f"analysis-epoch-{epoch:02d}.json"
    if saved.exists():
        return IntruderReport.from_json(saved)
    report = find_intruders(base, out / f"epoch-{epoch:02d}", progress=False)
    report.to_json(saved)
    return report


if __name__ == "__main__":
    main()
