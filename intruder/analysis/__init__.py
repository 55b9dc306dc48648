"""The analysis wing: base factors and their cache, `find_intruders` and its results, ranks, mitigation.

It reads weights through `intruder.weights` and knows nothing of training or reports. `spectra` holds the
base decomposition and the rank measures, `intruders` the exact structured method, `results` the result
types, `mitigation` the paper's intervention (scale the intruders by λ, written as an exact adapter or a
model); `_runtime` (threads, buffers) and `_reference` (the float64 brute force tests compare against) are
its private helpers.
"""

from .intruders import find_intruders
from .mitigation import MitigationResult, scale_intruders, scaled_matrices
from .results import IntruderReport, LayerResult
from .spectra import effective_rank

__all__ = ["find_intruders", "IntruderReport", "LayerResult", "effective_rank", "scale_intruders",
           "scaled_matrices", "MitigationResult"]
