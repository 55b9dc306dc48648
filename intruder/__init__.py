"""intruder: what did fine-tuning do to a model? Intruder dimensions and effective rank, exactly and fast.

    from intruder import find_intruders
    report = find_intruders("path/to/base", "path/to/lora-adapter")
    print(report.summary())
"""

from .analysis import IntruderReport, LayerResult, effective_rank, find_intruders
from .errors import IntruderError
from .weights import Weights, open_weights

__all__ = ["find_intruders", "open_weights", "effective_rank", "IntruderReport", "LayerResult", "Weights",
           "IntruderError"]
__version__ = "0.1.0"
