"""Multiple-choice data in the `beyoru/Tin_hoc_mcq` schema, prompts in Vietnamese, and a general-text corpus.

A row has `question`, `answer_a`..`answer_d`, `answer_key` (A-D) and an optional `contextual` paragraph.
`load_mcq("sample")` returns the bundled set the project wrote itself (Vietnamese informatics questions with
a fixed train/test split); a local .parquet/.jsonl/.json/.csv file or a hub data set id works the same way.
`load_general_text()` returns the bundled Vietnamese and English paragraphs used to measure forgetting.
"""

from __future__ import annotations

import csv
import json
import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ..errors import IntruderError, WeightsNotFoundError
from ..weights.hub import download, looks_like_hub_id

LETTERS = ("A", "B", "C", "D")
OPTION_FIELDS = ("answer_a", "answer_b", "answer_c", "answer_d")
REQUIRED_FIELDS = ("question", *OPTION_FIELDS, "answer_key")
SAMPLE = "sample"
_DATA_DIR = Path(__file__).parent / "_data"
_SAMPLE_FILE = _DATA_DIR / "tin_hoc_sample.jsonl"
_GENERAL_FILE = _DATA_DIR / "general_text.jsonl"
_FORMATS = (".parquet", ".jsonl", ".json", ".csv")

INSTRUCTION = "Chọn đáp án đúng (A, B, C hoặc D) cho câu hỏi trắc nghiệm tin học sau."
ANSWER_CUE = "Đáp án:"


class DataError(IntruderError, ValueError):
    """A data file or row that does not fit the Tin_hoc_mcq schema."""


@dataclass(frozen=True)
class MCQ:
    """One multiple-choice question; every string NFC-normalised, `answer_key` one of A-D."""

    question: str
    options: tuple[str, str, str, str]
    answer_key: str
    contextual: str = ""
    topic: str = ""
    split: str = ""

    @property
    def answer_index(self) -> int:
        return LETTERS.index(self.answer_key)

    def prompt(self, *, context: bool = True) -> str:
        """The question in Vietnamese, ending with the cue after which the model names a letter."""
        lines = [INSTRUCTION]
        if context and self.contextual:
            lines.append(f"Ngữ cảnh: {self.contextual}")
        lines.append(f"Câu hỏi: {self.question}")
        lines += [f"{letter}. {option}" for letter, option in zip(LETTERS, self.options)]
        lines.append(ANSWER_CUE)
        return "\n".join(lines)

    def answer_text(self, *, full: bool = False) -> str:
        """What follows the prompt: " B", or " B. <option text>" with `full`."""
        letter = f" {self.answer_key}"
        return f"{letter}. {self.options[self.answer_index]}" if full else letter

    def to_row(self) -> dict:
        row = {"question": self.question, **dict(zip(OPTION_FIELDS, self.options)),
               "answer_key": self.answer_key, "contextual": self.contextual}
        return row | {k: v for k, v in (("topic", self.topic), ("split", self.split)) if v}


def load_mcq(source: str | Path = SAMPLE, *, split: str | None = None) -> list[MCQ]:
    """Rows of `source` ("sample", a local file or directory, or a hub data set id), validated.

    split: keep only rows whose `split` column equals it ("train"/"test"); the bundled sample has one.
    """
    rows, origin = _read_source(source)
    questions = [_validate(row, i, origin) for i, row in enumerate(rows, 1)]
    if split is not None:
        if not any(q.split for q in questions):
            raise DataError(f"{origin} has no `split` column; use intruder.data.train_test_split instead")
        questions = [q for q in questions if q.split == split]
    if not questions:
        raise DataError(f"{origin} holds no questions" + (f" in split {split!r}" if split else "")
                        + "; point --data at a file with rows in the Tin_hoc_mcq schema")
    return questions


def train_test_split(questions: list[MCQ], *, test_fraction: float = 0.2, seed: int = 0
                     ) -> tuple[list[MCQ], list[MCQ]]:
    """A deterministic split: the same rows and seed give the same split on every machine.

    Rows that carry a `split` column ("train"/"test") keep it; others are shuffled with `seed`.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction}: must lie strictly between 0 and 1")
    if all(q.split in ("train", "test") for q in questions):
        return [q for q in questions if q.split == "train"], [q for q in questions if q.split == "test"]
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(test_fraction * len(questions)))
    if n_test >= len(questions):
        raise DataError(f"{len(questions)} question(s) cannot be split into train and test; add more rows")
    test = sorted(order[:n_test])
    train = sorted(order[n_test:])
    return [questions[i] for i in train], [questions[i] for i in test]


def load_general_text(source: str | Path | None = None) -> list[str]:
    """Paragraphs for the forgetting measure: the bundled corpus, or a .jsonl (`text` field) / .txt file
    (paragraphs separated by blank lines)."""
    path = _GENERAL_FILE if source is None else Path(source)
    if not path.is_file():
        raise WeightsNotFoundError(f"general-text corpus {path} does not exist; pass a .jsonl or .txt file")
    if path.suffix == ".txt":
        texts = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    else:
        texts = [str(row.get("text", "")).strip() for row in _read_jsonl(path)]
    texts = [unicodedata.normalize("NFC", t) for t in texts if t]
    if not texts:
        raise DataError(f"{path} holds no text; a .jsonl needs a `text` field per line")
    return texts


def _read_source(source: str | Path) -> tuple[list[dict], str]:
    if str(source) == SAMPLE:
        return _read_jsonl(_SAMPLE_FILE), "the bundled sample"
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_dir(path), str(path)
    if path.exists():
        return _read_file(path), str(path)
    if looks_like_hub_id(str(source)):
        return _read_dir(_download_dataset(str(source))), str(source)
    raise WeightsNotFoundError(f"data {source}: no such file, directory or hub data set id; "
                               f"pass a {'/'.join(_FORMATS)} file, a directory of them, or \"sample\"")


def _download_dataset(repo_id: str) -> Path:
    return download(repo_id, repo_type="dataset", patterns=tuple(f"*{ext}" for ext in _FORMATS))


def _read_dir(path: Path) -> list[dict]:
    files = sorted(f for f in path.rglob("*") if f.suffix in _FORMATS and not f.name.startswith("."))
    files = [f for f in files if "test" not in f.stem.lower()] or files  # a hub repo's train files first
    if not files:
        raise DataError(f"{path} holds no {'/'.join(_FORMATS)} data file")
    return [row for f in files for row in _read_file(f)]


def _read_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, list) else data.get("data", data.get("rows", []))
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
        if suffix == ".parquet":
            return _read_parquet(path)
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} cannot be parsed as {suffix[1:]}: {exc}") from exc
    raise DataError(f"{path}: unknown data format {suffix!r}; use one of {', '.join(_FORMATS)}")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {line_no} is not valid JSON: {exc}") from exc
    return rows


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"{path}: reading parquet needs pyarrow; `pip install 'intruder[data]'`") from exc
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError family
        raise DataError(f"{path} cannot be read as parquet: {exc}") from exc


def _validate(row, number: int, origin: str) -> MCQ:
    where = f"{origin}, row {number}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields {', '.join(REQUIRED_FIELDS)}, got {row!r:.80}")
    missing = [f for f in REQUIRED_FIELDS if f not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}; rows need {', '.join(REQUIRED_FIELDS)}")
    text = {f: _text(row[f]) for f in ("question", *OPTION_FIELDS)}
    for field, value in text.items():
        if not value:
            raise DataError(f"{where}: field {field!r} is empty; every question needs a question and four options")
    key = _text(row["answer_key"]).upper().rstrip(".")
    if key not in LETTERS:
        raise DataError(f"{where}: answer_key {row['answer_key']!r} is not one of A, B, C, D")
    return MCQ(question=text["question"], options=tuple(text[f] for f in OPTION_FIELDS), answer_key=key,
               contextual=_text(row.get("contextual")), topic=_text(row.get("topic")), split=_text(row.get("split")))


def _text(value) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN from CSV/parquet
        return ""
    return unicodedata.normalize("NFC", str(value)).strip()
