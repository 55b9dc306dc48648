"""The one error family of `intruder`: every message names the thing at fault and says what to do."""

from __future__ import annotations


class IntruderError(Exception):
    """Base class of every error `intruder` raises on bad input."""


class WeightsNotFoundError(IntruderError, FileNotFoundError):
    """A path, hub id or tensor that does not exist."""


class OfflineError(IntruderError, ConnectionError):
    """A hub id was given but the hub cannot be reached."""


class CorruptWeightsError(IntruderError, ValueError):
    """A weights file that cannot be read: truncated, garbled or of an unknown layout."""


class ShapeMismatchError(IntruderError, ValueError):
    """The base and the fine-tuned model disagree on a tensor's shape."""


class NonFiniteError(IntruderError, ValueError):
    """A weight holds NaN or Inf."""


class NoCommonTensorsError(IntruderError, ValueError):
    """The two models share no analysable tensor, or the selection matched none."""


class AdapterError(IntruderError, ValueError):
    """A PEFT adapter that cannot be merged exactly: unsupported field, or keys matching no base tensor."""
