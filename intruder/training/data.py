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
import re
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
_SPLIT_NAME = re.compile(r"^(train|test)(?![a-z])")  # `test`, `test-0000-of-0001`, `train_v2`; not `testing`

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

    A directory's files are all read; rows of a file named like Hugging Face's split shards (`test.jsonl`,
    `test-00000-of-00001.parquet`, `data/train-*.csv`, or any file in a `test/` folder) get that split
    unless they carry a `split` column of their own.
    split: keep only rows whose split equals it ("train"/"test"); the bundled sample has one.
    """
    rows, origin = _read_source(source)
    questions = [_validate(row, i, origin) for i, row in enumerate(rows, 1)]
    if split is not None:
        if not any(q.split for q in questions):
            raise DataError(f"{origin} has no `split` column and no train/test file names: leave out the split "
                            "to use every row, or split them with intruder.training.data.train_test_split")
        questions = [q for q in questions if q.split == split]
    if not questions:
        raise DataError(f"{origin} holds no questions" + (f" in split {split!r}" if split else "")
                        + "; point --data at a file with rows in the Tin_hoc_mcq schema")
    return questions


def train_test_split(questions: list[MCQ], *, test_fraction: float = 0.2, seed: int = 0
                     ) -> tuple[list[MCQ], list[MCQ]]:
    """A deterministic split: the same rows and seed give the same split on every machine.

    When some rows are in the split "test" (a `split` column, or a directory's test file), they are the test
    set and every other row is for training; otherwise `test_fraction` of the rows, drawn with `seed`, are.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction}: must lie strictly between 0 and 1")
    test = [q for q in questions if q.split == "test"]
    if test:
        train = [q for q in questions if q.split != "test"]
        if not train:
            raise DataError(f"all {len(test)} question(s) are in the split \"test\", so none is left for "
                            "training: add training rows (a train file, or rows whose split is \"train\")")
        return train, test
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(test_fraction * len(questions)))
    if n_test >= len(questions):
        raise DataError(f"{len(questions)} question(s) cannot be split into train and test; add more rows")
    return [questions[i] for i in sorted(order[n_test:])], [questions[i] for i in sorted(order[:n_test])]


def load_general_text(source: str | Path | None = None, *, limit: int | None = None) -> list[str]:
    """Paragraphs for the forgetting measure: the bundled corpus, or a .jsonl (`text` field) / .txt file
    (paragraphs separated by blank lines). limit: keep N paragraphs spread evenly through the corpus (the
    bundled one is Vietnamese, then English: both languages keep their share)."""
    path = _GENERAL_FILE if source is None else Path(source)
    if not path.is_file():
        raise WeightsNotFoundError(f"general-text corpus {path} does not exist; pass a .jsonl or .txt file")
    if path.suffix.lower() == ".txt":
        try:
            texts = [p.strip() for p in path.read_text(encoding="utf-8-sig").split("\n\n")]
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text ({exc}); save it as UTF-8") from exc
    elif path.suffix.lower() == ".jsonl":
        texts = [str(_text_field(path, line_no, row)).strip() for line_no, row in _jsonl_lines(path)]
    else:
        raise DataError(f"general-text corpus {path}: unknown format {path.suffix!r}; pass a .jsonl file (a "
                        "`text` field per line) or a .txt file (paragraphs separated by blank lines)")
    texts = [unicodedata.normalize("NFC", t) for t in texts if t]
    if not texts:
        raise DataError(f"{path} holds no text; a .jsonl needs a `text` field per line")
    if limit is not None and limit < len(texts):
        texts = [texts[i * len(texts) // limit] for i in range(limit)]
    return texts


def _text_field(path: Path, line_no: int, row):
    if not isinstance(row, dict):
        raise DataError(f"{path} line {line_no} holds {_json_kind(row)}; each line of a general-text .jsonl must "
                        'be an object with a `text` field, e.g. {"text": "..."}')
    return row.get("text") or ""


def _read_source(source: str | Path) -> tuple[list[dict], str]:
    if str(source) == SAMPLE:
        return _read_jsonl(_SAMPLE_FILE), "the bundled sample"
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_dir(path), str(path)
    if path.exists():
        return _read_file(path), str(path)
    if looks_like_hub_id(str(source)):
        return _read_dir(_download_dataset(str(source), path)), str(source)
    raise WeightsNotFoundError(f"data {source}: no such file, directory or hub data set id; "
                               f"pass a {'/'.join(_FORMATS)} file, a directory of them, or \"sample\"")


def _download_dataset(repo_id: str, local_path: Path) -> Path:
    return download(repo_id, repo_type="dataset", patterns=tuple(f"*{ext}" for ext in _FORMATS),
                    local_path=local_path)


def _read_dir(path: Path) -> list[dict]:
    """Every data file under `path`; a row without a `split` gets its file's (see `_split_of`)."""
    files = sorted(f for f in path.rglob("*") if f.suffix.lower() in _FORMATS and f.is_file()
                   and not any(part.startswith(".") for part in f.relative_to(path).parts))
    if not files:
        raise DataError(f"{path} holds no {'/'.join(_FORMATS)} data file")
    rows = []
    for file in files:
        split = _split_of(file.relative_to(path))
        for row in _read_file(file):
            if split and isinstance(row, dict) and not _text(row.get("split")):
                row = {**row, "split": split}
            rows.append(row)
    return rows


def _split_of(file: Path) -> str:
    """"train" or "test" for a file named as Hugging Face names split shards (`test.jsonl`,
    `train-00000-of-00001.parquet`, `test_2024.csv`) or inside a `train/` or `test/` folder, else ""."""
    for name in (file.stem, *reversed(file.parent.parts)):
        match = _SPLIT_NAME.match(name.lower())
        if match:
            return match.group(1)
    return ""


def _read_file(path: Path) -> list[dict]:
    """The rows of one data file; text formats may start with a UTF-8 byte-order mark (Excel writes one)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _json_rows(path, json.loads(path.read_text(encoding="utf-8-sig")))
        if suffix == ".csv":
            with path.open(encoding="utf-8-sig", newline="") as f:
                return list(csv.DictReader(f))
        if suffix == ".parquet":
            return _read_parquet(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}); save it as UTF-8 (in Excel: CSV UTF-8)") from exc
    except json.JSONDecodeError as exc:
        hint = "; a file of one JSON object per line should be named .jsonl" if exc.msg == "Extra data" else ""
        raise DataError(f"{path} cannot be parsed as json: {exc}{hint}") from exc
    except csv.Error as exc:
        raise DataError(f"{path} cannot be parsed as csv: {exc}") from exc
    raise DataError(f"{path}: unknown data format {suffix!r}; use one of {', '.join(_FORMATS)}")


def _json_rows(path: Path, data) -> list:
    """The rows of a .json file: a list of row objects, or an object whose `data` or `rows` is such a list."""
    where = ""
    if isinstance(data, dict) and ("data" in data or "rows" in data):
        field = "data" if "data" in data else "rows"
        data, where = data[field], f" in its `{field}` field"
    if isinstance(data, list):
        return data
    raise DataError(f"{path} holds {_json_kind(data)}{where}; expected a list of row objects "
                    '([{"question": ..., "answer_a": ..., ...}, ...]), or an object whose `data` or `rows` '
                    "field is such a list")


def _json_kind(value) -> str:
    """What a JSON value is, for an error message: `a number (42)`, `an object with fields a, b`."""
    if isinstance(value, dict):
        return f"an object with fields {', '.join(map(str, list(value)[:6]))}" if value else "an empty object"
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list"}.get(
        type(value), "null")
    return f"{kind} ({value!r:.40})" if value is not None else kind


def _read_jsonl(path: Path) -> list:
    return [row for _, row in _jsonl_lines(path)]


def _jsonl_lines(path: Path):
    """(line number, value) of each non-blank line of a JSON Lines file."""
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {line_no} is not valid JSON: {exc}") from exc


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
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}; rows need {', '.join(REQUIRED_FIELDS)}"
                        f" (this row has fields {', '.join(map(str, row)) or 'none'})")
    text = {f: _text(row[f]) for f in ("question", *OPTION_FIELDS)}
    for field, value in text.items():
        if not value:
            raise DataError(f"{where}: field {field!r} is empty; every question needs a question and four options")
    key = _text(row["answer_key"]).upper().rstrip(".")
    if key not in LETTERS:
        raise DataError(f"{where}: answer_key {row['answer_key']!r} is not one of A, B, C, D")
    return MCQ(question=text["question"], options=tuple(text[f] for f in OPTION_FIELDS), answer_key=key,
               contextual=_text(row.get("contextual")), topic=_text(row.get("topic")),
               split=_text(row.get("split")).lower())


def _text(value) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN from CSV/parquet
        return ""
    return unicodedata.normalize("NFC", str(value)).strip()
