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
        import pyarrow as pa  # in the `test` extra: a missing pyarrow fails here rather than skipping
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


def _write_csv(path, rows, encoding="utf-8"):
    with path.open("w", encoding=encoding, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json"])
def test_a_byte_order_mark_is_read_past(tmp_path, fmt):
    rows = [_row(question=f"Câu {i}?") for i in range(3)]
    path = tmp_path / f"excel.{fmt}"
    if fmt == "csv":
        _write_csv(path, rows, encoding="utf-8-sig")  # Excel's "CSV UTF-8"
    elif fmt == "jsonl":
        _write_jsonl(path, rows)
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    else:
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8-sig")
    assert [q.question for q in load_mcq(path)] == ["Câu 0?", "Câu 1?", "Câu 2?"]


def test_general_text_with_a_byte_order_mark_and_bad_lines(tmp_path):
    (tmp_path / "c.txt").write_text("Đoạn một.\n\nĐoạn hai.\n", encoding="utf-8-sig")
    assert load_general_text(tmp_path / "c.txt") == ["Đoạn một.", "Đoạn hai."]
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n"just a string"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c.jsonl line 2.*object with a `text` field"):
        load_general_text(tmp_path / "c.jsonl")
    (tmp_path / "c.csv").write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"c.csv.*\.jsonl.*\.txt"):
        load_general_text(tmp_path / "c.csv")


@pytest.mark.parametrize("top, shape", [("42", r"a number \(42\)"), ('"rows.jsonl"', "a string"),
                                        ('{"data": 5}', "a number .* in its `data` field"),
                                        ('{"questions": []}', "an object with fields questions")])
def test_a_json_file_of_the_wrong_shape_is_named(tmp_path, top, shape):
    path = tmp_path / "d.json"
    path.write_text(top, encoding="utf-8")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}.*{shape}.*list of row objects") as info:
        load_mcq(path)
    assert "`data`" in str(info.value)


def test_missing_field_lists_the_fields_the_row_has(tmp_path):
    path = _write_csv(tmp_path / "d.csv", [{"Question": "Q?", **{k: v for k, v in _row().items() if k != "question"}}])
    with pytest.raises(DataError, match=r"missing field\(s\) question.*has fields Question, answer_a"):
        load_mcq(path)


@pytest.mark.parametrize("layout", [("train.jsonl", "test.jsonl"),
                                    ("data/train-00000-of-00001.jsonl", "data/test-00000-of-00001.jsonl"),
                                    ("questions.jsonl", "test.jsonl")])
def test_a_directorys_test_file_is_the_held_out_set(tmp_path, layout):
    train_file, test_file = (tmp_path / name for name in layout)
    train_file.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(train_file, [_row(question=f"Học {i}?") for i in range(8)])
    _write_jsonl(test_file, [_row(question=f"Thi {i}?") for i in range(3)] + [_row(question="Học 8?", split="train")])
    questions = load_mcq(tmp_path)
    assert len(questions) == 12  # the test file is read, not dropped
    train, test = train_test_split(questions, test_fraction=0.5)
    assert [q.question for q in test] == ["Thi 0?", "Thi 1?", "Thi 2?"]
    assert sorted(q.question for q in train) == [f"Học {i}?" for i in range(9)]  # a `split` column wins
    assert [q.question for q in load_mcq(tmp_path, split="test")] == ["Thi 0?", "Thi 1?", "Thi 2?"]


def test_a_directory_with_only_train_files_is_split_at_random(tmp_path):
    _write_jsonl(tmp_path / "train-00000-of-00001.jsonl", [_row(question=f"Câu {i}?") for i in range(10)])
    questions = load_mcq(tmp_path)
    assert {q.split for q in questions} == {"train"}
    train, test = train_test_split(questions, test_fraction=0.2)
    assert (len(train), len(test)) == (8, 2)
    _write_jsonl(tmp_path / "train-00000-of-00001.jsonl", [_row(split="test")])
    with pytest.raises(DataError, match="none is left for training"):
        train_test_split(load_mcq(tmp_path))


def test_a_mistyped_data_path_says_no_such_local_path(tmp_path):
    with pytest.raises(OfflineError, match=r"no local path fx/data\b.*, and 'fx/data' cannot be downloaded"):
        load_mcq("fx/data")
