"""Figures from stored results, one public name each: `from intruder.plot import plot_spectrum, ...`.

Every `plot_*(..., ax=None)` draws from a result that already holds what it needs and returns its Axes; none
computes a decomposition. The figures themselves live in the report wing (`intruder/report/`).
"""

from .report.plot import (
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
from .report.sweep_plots import (
    plot_epsilon_curves,
    plot_erank_vs_rank,
    plot_intruders_vs_epoch,
    plot_intruders_vs_rank,
    plot_lambda,
    plot_learning_curves,
    plot_learning_vs_forgetting,
)

__all__ = ["plot_spectrum", "plot_similarity", "plot_intruder_map", "plot_intruders_per_layer",
           "plot_threshold_sweep", "plot_effective_rank", "plot_training", "plot_intruders_by_epoch", "save_figure",
           # a sweep's rows (DIR/sweep.jsonl)
           "plot_intruders_vs_rank", "plot_intruders_vs_epoch", "plot_epsilon_curves", "plot_erank_vs_rank",
           "plot_learning_curves", "plot_learning_vs_forgetting", "plot_lambda"]
