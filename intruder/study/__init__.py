"""The study wing: the seed's questions answered with one command.

`grid` (the design: methods × ranks × α rules × learning rates, epochs, λ), `sweep` (train every run, analyse
every epoch, evaluate the λ intervention; resumable and shardable), `demo` (a small sweep on Gemma 3 270M that
fits a 2-core CPU in minutes). It sits on top: it uses training, analysis and report, and nothing imports it
but the command line.
"""

from .grid import Grid, RunSpec
from .runner import collect, sweep

__all__ = ["Grid", "RunSpec", "sweep", "collect"]
