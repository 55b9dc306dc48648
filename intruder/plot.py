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

__all__ = ["plot_spectrum", "plot_similarity", "plot_intruder_map", "plot_intruders_per_layer",
           "plot_threshold_sweep", "plot_effective_rank", "plot_training", "plot_intruders_by_epoch", "save_figure"]
