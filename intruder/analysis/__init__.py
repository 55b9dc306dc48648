"""The analysis wing: base factors and their cache, `find_intruders` and its results, ranks.

It reads weights through `intruder.weights` and knows nothing of training or reports. `spectra` holds the
base decomposition and the rank measures, `intruders` the exact structured method, `results` the result
types; `_runtime` (threads, buffers) and `_reference` (the float64 brute force tests compare against) are
its private helpers.
"""

from .intruders import find_intruders
from .results import IntruderReport, LayerResult
from .spectra import effective_rank

__all__ = ["find_intruders", "IntruderReport", "LayerResult", "effective_rank"]
