import csv
import json
import re
import unicodedata
from collections import Counter

import pytest

from intruder.errors import OfflineError, WeightsNotFoundError
from intruder.training.data import LETTERS, OPTION_FIELDS, DataError, load_general_text, load_mcq, train_test_split

TOPICS = {"hardware", "os", "networks", "programming", "data", "office", "security"}


def _row(**overrides):
    row = {"question": "Thiết bị nào là thiết bị vào?", "answer_a": "Bàn phím", "answer_b": "Màn hình",
           "answer_c": "Máy in", "answer_d": "Loa", "answer_key": "A", "contextual": "Bàn phím nhập dữ liệu."}
    return row | overrides


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_bundled_sample_meets_its_promises():
    questions = load_mcq("sample")
    assert len(questions) >= 240
    assert {q.topic for q in questions} == TOPICS
    keys = Counter(q.answer_key for q in questions)
    assert set(keys) == set(LETTERS) and max(keys.values()) - min(keys.values()) <= 1
    assert len({q.question for q in questions}) == len(questions)
    for q in questions:
        assert q.contextual and len(set(q.options)) == 4
        for text in (q.question, q.contextual, *q.options):
            assert text == unicodedata.normalize("NFC", text)
        # options are shuffled when balancing keys, so none may point at another option by letter
        assert not any(o.lower().startswith(("cả a", "tất cả các đáp án", "không có đáp án")) for o in q.options)
    train, test = train_test_split(questions)
    assert len(test) >= 50 and len(train) + len(test) == len(questions)
    assert {q.topic for q in test} == TOPICS
    assert train == load_mcq("sample", split="train") and test == load_mcq("sample", split="test")


def test_bundled_general_text_has_both_languages():
    texts = load_general_text()
    assert len(texts) >= 60
    vietnamese = [t for t in texts if any(c in t for c in "ăâđêôơư")]
    assert 25 <= len(vietnamese) <= len(texts) - 25
    assert all(t == unicodedata.normalize("NFC", t) for t in texts)


def test_prompt_with_and_without_context():
    q = load_mcq("sample")[0]
    with_context, without = q.prompt(context=True), q.prompt(context=False)
    assert q.contextual in with_context and q.contextual not in without
    assert without.endswith("Đáp án:") and f"D. {q.options[3]}" in without
    assert q.answer_text() == f" {q.answer_key}"
    assert q.answer_text(full=True) == f" {q.answer_key}. {q.options[q.answer_index]}"


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_formats_give_the_same_questions(tmp_path, fmt):
    rows = [_row(question=f"Câu {i}?", answer_key="ABCD"[i % 4]) for i in range(6)]
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        _write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif fmt == "csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    questions = load_mcq(path)
    assert [q.question for q in questions] == [r["question"] for r in rows]
    assert [q.answer_key for q in questions] == ["A", "B", "C", "D", "A", "B"]
    assert load_mcq(tmp_path) == questions  # a directory of data files


def test_unicode_is_normalised_to_nfc(tmp_path):
    decomposed = unicodedata.normalize("NFD", "Hệ điều hành")
    questions = load_mcq(_write_jsonl(tmp_path / "d.jsonl", [_row(question=decomposed, answer_key=" b ")]))
    assert questions[0].question == "Hệ điều hành" and questions[0].answer_key == "B"


@pytest.mark.parametrize("row, message", [
    (_row(answer_key="E"), "row 2: answer_key 'E' is not one of A, B, C, D"),
    (_row(answer_c="  "), "row 2: field 'answer_c' is empty"),
    ({k: v for k, v in _row().items() if k != "answer_d"}, "row 2: missing field(s) answer_d"),
    (["not", "an", "object"], "row 2: expected an object"),
])
def test_bad_rows_are_named(tmp_path, row, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [_row(), row])
    with pytest.raises(DataError, match=re.escape(f"{path}, {message}")):
        load_mcq(path)


def test_empty_and_unparsable_files(tmp_path):
    with pytest.raises(DataError, match="holds no questions"):
        load_mcq(_write_jsonl(tmp_path / "empty.jsonl", []))
    (tmp_path / "broken.jsonl").write_text(json.dumps(_row()) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_mcq(tmp_path / "broken.jsonl")
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown data format"):
        load_mcq(tmp_path / "data.xlsx")
    with pytest.raises(DataError, match="no `split` column"):
        load_mcq(_write_jsonl(tmp_path / "d.jsonl", [_row()]), split="test")


def test_missing_path_and_offline_hub_id(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no such file"):
        load_mcq(tmp_path / "nope.jsonl")
    with pytest.raises(OfflineError, match="beyoru/Tin_hoc_mcq"):
        load_mcq("beyoru/Tin_hoc_mcq")  # HF_HUB_OFFLINE=1 in every test


def test_seeded_split_is_deterministic_and_disjoint():
    questions = [q for q in load_mcq("sample")]
    unsplit = [type(q)(q.question, q.options, q.answer_key, q.contextual) for q in questions]
    train, test = train_test_split(unsplit, test_fraction=0.25, seed=3)
    assert (train, test) == train_test_split(unsplit, test_fraction=0.25, seed=3)
    assert train_test_split(unsplit, test_fraction=0.25, seed=4)[1] != test
    assert len(test) == round(0.25 * len(unsplit)) and not {q.question for q in train} & {q.question for q in test}
    with pytest.raises(DataError, match="test_fraction"):
        train_test_split(unsplit, test_fraction=1.0)
    with pytest.raises(DataError, match="cannot be split"):
        train_test_split(unsplit[:1])


def test_general_text_from_txt_and_errors(tmp_path):
    (tmp_path / "c.txt").write_text("First paragraph.\n\nĐoạn thứ hai.\n", encoding="utf-8")
    assert load_general_text(tmp_path / "c.txt") == ["First paragraph.", "Đoạn thứ hai."]
    _write_jsonl(tmp_path / "c.jsonl", [{"title": "no text field"}])
    with pytest.raises(DataError, match="holds no text"):
        load_general_text(tmp_path / "c.jsonl")
    with pytest.raises(WeightsNotFoundError):
        load_general_text(tmp_path / "missing.jsonl")


def test_option_fields_are_the_tin_hoc_schema():
    assert OPTION_FIELDS == ("answer_a", "answer_b", "answer_c", "answer_d")
