"""Result types of `find_intruders`: plain dataclasses that store everything a table, a plot or a threshold
sweep needs, so nothing downstream ever recomputes an SVD."""

from __future__ import annotations

import csv
import html
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..outputs import atomic_write, write_text
from .spectra import effective_rank, stable_rank

SIDES = ("left", "right", "both")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block)\.(\d+)\.")


@dataclass(eq=False)
class LayerResult:
    """Intruder analysis of one matrix W_t = W_0 + ΔW, shape (out, in), k = `top_k` tuned vectors.

    `max_cos_left[j]` is max_i |cos(y_j, x_i)| between the j-th left singular vector of W_t and every left
    singular vector of W_0; `max_cos_right` the same for right vectors. Tuned vector j is an intruder when
    the cosine of the analysed `side` is below `threshold` ("both": when either side's is).
    """

    name: str
    shape: tuple[int, int]
    threshold: float
    side: str
    update: str  # "low-rank" (structured) or "dense"
    singular_values: np.ndarray  # (k,) tuned, descending
    max_cos_left: np.ndarray  # (k,)
    max_cos_right: np.ndarray  # (k,)
    best_match_left: np.ndarray  # (k,) index of the base left vector with the largest |cos|
    best_match_right: np.ndarray  # (k,)
    similarity: np.ndarray  # (k, K) |cos| of tuned and top-K base vectors, left side unless side == "right"
    base_singular_values: np.ndarray  # (min(m, n),)
    delta_singular_values: np.ndarray  # nonzero singular values of ΔW, descending

    @property
    def max_cos(self) -> np.ndarray:
        """(k,) the cosine that decides: the analysed side's, or the smaller of the two for "both"."""
        return _side_cos(self.max_cos_left, self.max_cos_right, self.side)

    @property
    def indices(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.max_cos < self.threshold)]

    @property
    def n_intruders(self) -> int:
        return int((self.max_cos < self.threshold).sum())

    def count_at(self, threshold: float, side: str | None = None) -> int:
        cos = _side_cos(self.max_cos_left, self.max_cos_right, side or self.side)
        return int((cos < threshold).sum())

    @property
    def delta_effective_rank(self) -> float:
        return effective_rank(self.delta_singular_values)

    @property
    def delta_stable_rank(self) -> float:
        return stable_rank(self.delta_singular_values)

    @property
    def delta_fro_norm(self) -> float:
        return float(np.sqrt((self.delta_singular_values**2).sum()))

    @property
    def layer_index(self) -> int | None:
        """The transformer block number parsed from the name (`model.layers.3.mlp...` -> 3), if any."""
        match = _LAYER_INDEX.search(self.name)
        return int(match.group(1)) if match else None

    @property
    def module(self) -> str:
        """The module kind: `model.layers.3.self_attn.q_proj.weight` -> "q_proj"."""
        parts = self.name.split(".")
        return parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "bias") else parts[-1]

    def to_row(self) -> dict:
        return {
            "name": self.name,
            "layer": self.layer_index,
            "module": self.module,
            "out": self.shape[0],
            "in": self.shape[1],
            "update": self.update,
            "n_intruders": self.n_intruders,
            "indices": " ".join(map(str, self.indices)),
            "min_max_cos": float(self.max_cos.min()) if self.max_cos.size else float("nan"),
            "top_sigma": float(self.singular_values[0]) if self.singular_values.size else 0.0,
            "delta_effective_rank": self.delta_effective_rank,
            "delta_stable_rank": self.delta_stable_rank,
            "delta_fro_norm": self.delta_fro_norm,
        }

    def to_dict(self) -> dict:
        out = {"name": self.name, "shape": list(self.shape), "threshold": self.threshold,
               "side": self.side, "update": self.update}
        for key in _ARRAYS:
            out[key] = getattr(self, key).tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LayerResult:
        arrays = {key: np.asarray(data[key]) for key in _ARRAYS}
        for key in ("best_match_left", "best_match_right"):
            arrays[key] = arrays[key].astype(np.int64)
        return cls(name=data["name"], shape=tuple(data["shape"]), threshold=float(data["threshold"]),
                   side=data["side"], update=data["update"], **arrays)

    def __repr__(self) -> str:
        return (f"LayerResult({self.name!r}, shape={self.shape}, n_intruders={self.n_intruders}, "
                f"indices={self.indices}, delta_effective_rank={self.delta_effective_rank:.2f})")


_ARRAYS = ("singular_values", "max_cos_left", "max_cos_right", "best_match_left", "best_match_right",
           "similarity", "base_singular_values", "delta_singular_values")


def _side_cos(left: np.ndarray, right: np.ndarray, side: str) -> np.ndarray:
    if side == "left":
        return left
    if side == "right":
        return right
    return np.minimum(left, right)


@dataclass(eq=False)
class IntruderReport:
    """All analysed matrices of one (base, tuned) pair, in checkpoint order."""

    layers: list[LayerResult]
    threshold: float
    top_k: int
    side: str
    base: str = ""
    tuned: str = ""
    unchanged: list[str] = field(default_factory=list)  # common 2-D tensors equal in both models
    meta: dict = field(default_factory=dict)  # versions, device, timing

    @property
    def total(self) -> int:
        return sum(layer.n_intruders for layer in self.layers)

    def counts_at(self, thresholds: Iterable[float], *, side: str | None = None) -> dict[float, int]:
        """{ε: intruders over all matrices at threshold ε}, from the stored cosines (no recomputation)."""
        return {float(t): sum(layer.count_at(t, side) for layer in self.layers) for t in thresholds}

    def __getitem__(self, name: str) -> LayerResult:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"{name!r} was not analysed; analysed: {', '.join(lr.name for lr in self.layers[:4])}...")

    def __len__(self) -> int:
        return len(self.layers)

    def to_rows(self) -> list[dict]:
        return [layer.to_row() for layer in self.layers]

    def to_pandas(self):
        import pandas as pd  # optional dependency: `pip install intruder[pandas]`

        return pd.DataFrame(self.to_rows())

    def to_csv(self, path) -> Path:
        """One row per matrix (`to_rows`), written beside `path` and renamed in; returns `path`."""
        path = Path(path)
        rows = self.to_rows()

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["name"])
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(path, write)
        return path

    def to_json(self, path=None) -> str:
        """Everything, arrays included; `IntruderReport.from_json` reads it back. Returns the text; with `path`,
        also writes it there (beside it first, then renamed in)."""
        data = {"format": "intruder-report/1", "threshold": self.threshold, "top_k": self.top_k,
                "side": self.side, "base": self.base, "tuned": self.tuned, "total": self.total,
                "unchanged": self.unchanged, "meta": self.meta,
                "layers": [layer.to_dict() for layer in self.layers]}
        text = json.dumps(data)
        if path is not None:
            write_text(path, text)
        return text

    @classmethod
    def from_json(cls, path_or_text) -> IntruderReport:
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        data = json.loads(text)
        if data.get("format") != "intruder-report/1":
            raise ValueError(f"{str(path_or_text)[:80]} is not an intruder report (format {data.get('format')!r})")
        return cls(layers=[LayerResult.from_dict(d) for d in data["layers"]], threshold=data["threshold"],
                   top_k=data["top_k"], side=data["side"], base=data["base"], tuned=data["tuned"],
                   unchanged=data["unchanged"], meta=data["meta"])

    def summary(self, max_rows: int | None = None) -> str:
        """A plain-text table: one line per matrix, then the total."""
        rows = self.to_rows()[:max_rows]
        width = max([len(r["name"]) for r in rows] + [4])
        lines = [f"{'name':<{width}}  {'shape':>11}  {'intr':>4}  {'min cos':>7}  {'ΔW erank':>8}  indices"]
        for r in rows:
            shape = f"{r['out']}x{r['in']}"
            lines.append(f"{r['name']:<{width}}  {shape:>11}  {r['n_intruders']:>4}  {r['min_max_cos']:>7.3f}  "
                         f"{r['delta_effective_rank']:>8.2f}  {r['indices']}")
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"... {len(self.layers) - max_rows} more")
        lines.append(f"total: {self.total} intruders in {len(self.layers)} matrices "
                     f"(k={self.top_k}, ε={self.threshold}, side={self.side})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"IntruderReport(total={self.total}, matrices={len(self.layers)}, k={self.top_k}, "
                f"threshold={self.threshold}, side={self.side!r})")

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in
                       ("name", "shape", "intruders", "min max-cos", "ΔW erank", "indices"))
        body = "".join(
            f"<tr><td>{html.escape(r['name'])}</td><td>{r['out']}×{r['in']}</td><td>{r['n_intruders']}</td>"
            f"<td>{r['min_max_cos']:.3f}</td><td>{r['delta_effective_rank']:.2f}</td>"
            f"<td>{html.escape(r['indices'])}</td></tr>" for r in self.to_rows())
        caption = (f"{self.total} intruders in {len(self.layers)} matrices "
                   f"(k={self.top_k}, ε={self.threshold}, side={self.side})")
        return f"<table><caption>{html.escape(caption)}</caption><tr>{head}</tr>{body}</table>"
