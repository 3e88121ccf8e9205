"""Readers and records: every file format, record type and bad-row kind; rejects, reject share, validation split."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import write_jsonl
from tunesmith.data import (
    Record, check_reject_share, load_records, prepare_data, validation_split, write_rejects,
)
from tunesmith.data import readers
from tunesmith.data.readers import read_rows
from tunesmith.errors import DataError
from tunesmith.recipe import DataSection


def write_bytes(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def lines_and_reasons(result) -> list[tuple[int, str]]:
    return [(r["line"], r["reason"]) for r in result.rejects]


def records_of(result) -> list[tuple[int, dict]]:
    return [(r.line, r.data) for r in result.records]


# ----------------------------------------------------------------------------------------------- file formats


def test_jsonl_rows_keep_their_line_numbers_and_skip_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, "", "   ", {"text": "two"}])
    result = load_records(path)
    assert result.kind == "text" and result.path == str(path)
    assert records_of(result) == [(1, {"text": "one"}), (4, {"text": "two"})]
    assert result.rows_read == 2 and result.rejects == []
    assert all(r.source == str(path) and r.kind == "text" for r in result.records)


def test_jsonl_byte_order_mark_on_the_first_line_is_ignored(tmp_path):
    path = write_bytes(tmp_path / "bom.jsonl", b'\xef\xbb\xbf{"text": "a"}', b'{"text": "b"}')
    assert records_of(load_records(path)) == [(1, {"text": "a"}), (2, {"text": "b"})]


def test_csv_rows_are_numbered_by_their_line_in_the_file(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('text,label\nhello,pos\n\n"two\nlines, quoted",neg\nbye,neg\n', encoding="utf-8")
    result = load_records(path)
    assert result.kind == "classification"
    assert records_of(result) == [(2, {"text": "hello", "label": "pos"}),
                                  (4, {"text": "two\nlines, quoted", "label": "neg"}),
                                  (6, {"text": "bye", "label": "neg"})]


def test_tsv_is_read_with_tabs(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("instruction\tinput\toutput\nq1\t\ta1\nq2, with comma\tctx\ta2\n", encoding="utf-8")
    result = load_records(path)
    assert result.kind == "instruction"
    assert records_of(result) == [(2, {"instruction": "q1", "input": "", "output": "a1"}),
                                  (3, {"instruction": "q2, with comma", "input": "ctx", "output": "a2"})]


def test_parquet_rows_numbered_from_one_and_nulls_are_missing_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "a", "label": 0}, {"text": "b", "label": 1},
                                         {"text": None, "label": 1}, {"text": "c", "label": None}]), path)
    result = load_records(path)
    assert result.kind == "classification"
    assert records_of(result) == [(1, {"text": "a", "label": "0"}), (2, {"text": "b", "label": "1"})]
    assert lines_and_reasons(result) == [(3, "missing field: 'text'"), (4, "missing field: 'label'")]


def test_broken_parquet_file_is_a_data_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_records(path)


def test_saved_datasets_folder(tmp_path):
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_list([{"prompt": "p1", "chosen": "good", "rejected": "bad"},
                                {"prompt": "p2", "chosen": "", "rejected": "bad"},
                                {"prompt": "p3", "chosen": "fine", "rejected": "worse"}]).save_to_disk(str(folder))
    result = load_records(folder)
    assert result.kind == "preference"
    assert records_of(result) == [(1, {"prompt": "p1", "chosen": "good", "rejected": "bad"}),
                                  (3, {"prompt": "p3", "chosen": "fine", "rejected": "worse"})]
    assert lines_and_reasons(result) == [(2, "empty field: 'chosen'")]


def test_saved_dataset_dict_reads_its_train_split_and_needs_one(tmp_path):
    import datasets

    split = datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}])
    datasets.DatasetDict({"train": split}).save_to_disk(str(tmp_path / "with_train"))
    assert records_of(load_records(tmp_path / "with_train")) == [(1, {"text": "a"}), (2, {"text": "b"})]
    datasets.DatasetDict({"test": split}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(DataError, match=r"a DatasetDict with splits \['test'\] and no 'train'") as info:
        load_records(tmp_path / "no_train")
    assert info.value.hint == f"point at one split's folder, e.g. {tmp_path / 'no_train'}/test"


def test_files_that_cannot_be_read_at_all(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "absent.jsonl")
    (tmp_path / "plain_folder").mkdir()
    with pytest.raises(DataError, match="a folder, but not one saved by `datasets`"):
        load_records(tmp_path / "plain_folder")
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"unknown file type '\.txt'"):
        load_records(tmp_path / "data.txt")


@pytest.mark.parametrize("name, lines, where", [
    ("h.csv", (b"t\xffxt,label", b"a,b"), "line 1, column 2 is not UTF-8 (byte 0xff at byte offset 1 of the file)"),
    ("r.csv", (b"text,label", b"ok,pos", b"caf\xe9,neg"),
     "line 3, column 4 is not UTF-8 (byte 0xe9 at byte offset 21 of the file)"),
    ("r.jsonl", (b'{"text": "ok"}', b'{"text": "caf\xc3\xa9 \xff"}'),
     "line 2, column 16 is not UTF-8 (byte 0xff at byte offset 31 of the file)"),
    ("a.json", (b'[{"text": "ok"},', b'{"text": "\xe9"}]'), "line 2, column 11 is not UTF-8"),
])
def test_a_file_that_is_not_utf8_is_a_data_error_naming_line_column_and_byte(tmp_path, name, lines, where):
    """Latin-1 / cp1252 text would otherwise lose exactly the rows with accents; the whole file is refused."""
    path = write_bytes(tmp_path / name, *lines)
    with pytest.raises(DataError) as info:
        load_records(path)
    assert info.value.message.startswith(f"{path}: {where}")
    assert info.value.hint.startswith(f"re-encode the file as UTF-8, e.g. `iconv -f cp1252 -t utf-8 {path} > ")


def test_a_utf16_file_is_named_as_such(tmp_path):
    path = tmp_path / "u.csv"
    path.write_bytes("text,label\nhello,pos\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"is UTF-16 text \(it starts with a UTF-16 byte order mark\)") as info:
        load_records(path)
    assert "iconv -f utf-16 -t utf-8" in info.value.hint


def test_csv_cells_over_128_kib_are_read_whole_and_counted(tmp_path):
    big = "word " * 60_000  # 300,000 characters: over Python's default csv field limit of 131,072
    path = tmp_path / "big.csv"
    path.write_text(f'text,label\n"{big}",pos\nshort one,neg\n', encoding="utf-8")
    result = load_records(path)
    assert records_of(result) == [(2, {"text": big, "label": "pos"}), (3, {"text": "short one", "label": "neg"})]
    assert result.rows_read == 2 and result.rejects == []


@pytest.mark.parametrize("text, opened, last", [
    ('text,label\nfine,pos\n"never closed,neg\nthird,pos\nfourth,neg\n', 3, 5),
    ('text,label,n\nok,pos,1\n"two\nlines",neg,"open\nrest\n', 4, 5),  # after a two-line cell of the same row
    ('"text,label\nfine,pos\n', 1, 2),  # in the header
])
def test_csv_quote_never_closed_names_the_line_it_opened_on(tmp_path, text, opened, last):
    path = tmp_path / "q.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_records(path)
    assert info.value.message == (f"{path}: line {opened}: a quote opens here and is never closed, so lines "
                                  f"{opened}–{last} (the rest of the file) would be read as one cell")
    assert '""' in info.value.hint


def test_jsonl_nested_100000_deep_is_a_reject_not_a_crash(tmp_path):
    deep = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = write_jsonl(tmp_path / "deep.jsonl", [{"text": "first"}, deep, {"text": "third"}])
    result = load_records(path)
    assert records_of(result) == [(1, {"text": "first"}), (3, {"text": "third"})]
    assert lines_and_reasons(result) == [(2, "nested too deeply: 100001 levels of arrays/objects, more than 100")]
    assert result.rows_read == 3
    assert readers.nesting_depth('{"a": "[[[[", "b": [[1], {"c": [2]}]}') == 4  # brackets in strings don't count


def test_json_array_file_rows_are_numbered_by_their_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"text": "one"},\n  {"text": "two"}, 3,\n  {"text": ' + "[" * 150 + "]" * 150 + "}\n]\n",
                    encoding="utf-8")
    result = load_records(path, fmt="text")
    assert records_of(result) == [(2, {"text": "one"}), (3, {"text": "two"})]
    assert lines_and_reasons(result) == [(3, "not a JSON object: got int"),
                                         (4, "nested too deeply: 151 levels of arrays/objects, more than 100")]


@pytest.mark.parametrize("name, text, message", [
    ("empty.jsonl", "", "no rows (the file is empty)"),
    ("blank.jsonl", "\n  \n\n", "no rows (the file is empty)"),
    ("empty.csv", "", "no rows (the file is empty)"),
    ("header.csv", "text,label\n", "only a header (line 1), no rows"),
    ("twice.csv", "text,text\na,b\n", "line 1 (the header) names column 'text' twice"),
    ("object.json", '{\n  "rows": [{"text": "a"}]\n}\n', "one JSON object over several lines, not one row per line"),
    ("array.json", '[{"text": "a"}\n{"text": "b"}]', "line 2: expected ',' or the closing ']' of the array"),
    ("broken.json", '[{"text": "a"},\n {"text": }]',
     "line 2, column 11: malformed JSON in the array (Expecting value)"),
])
def test_files_with_no_rows_or_a_broken_shape_are_data_errors(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_records(path)
    assert info.value.message.startswith(f"{path}: {message}")
    assert info.value.hint


def test_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path):
    path = write_bytes(tmp_path / "bom.csv", b"\xef\xbb\xbftext,label", b"hello,pos")
    assert records_of(load_records(path)) == [(2, {"text": "hello", "label": "pos"})]


def test_empty_parquet_and_damaged_datasets_folder_are_data_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "none.parquet")
    with pytest.raises(DataError, match="no rows"):
        load_records(tmp_path / "none.parquet")
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "state.json").write_text("{not json")
    with pytest.raises(DataError, match=r"ds: not a readable saved `datasets` folder"):
        load_records(folder)


# ----------------------------------------------------------------------------------------------- exact types


def typed_table():
    import datetime
    import decimal

    import pyarrow as pa

    return pa.table({
        "text": ["first row here", "second row here", "third row here", "fourth row here"],
        "at": pa.array([datetime.datetime(2024, 1, d, 12, 30, 5, 123456) for d in range(1, 5)], pa.timestamp("us")),
        "at_ns": pa.array([1_700_000_000_123_456_789 + d for d in range(4)], pa.timestamp("ns", tz="UTC")),
        "day": pa.array([datetime.date(2024, 2, d) for d in range(1, 5)], pa.date32()),
        "price": pa.array([decimal.Decimal("1.10"), decimal.Decimal("2.25"), None, decimal.Decimal("-0.01")],
                          pa.decimal128(9, 2)),
        "blob": pa.array([b"\x00\xff", b"", None, b"abc"], pa.binary()),
    })


def test_parquet_types_round_trip_exactly_and_become_iso_text_in_jsonl_and_csv(tmp_path):
    import pyarrow.parquet as pq

    from tunesmith.data.readers import source_schema, write_rows

    table = typed_table()
    pq.write_table(table, tmp_path / "in.parquet")
    rows = [r.value for r in read_rows(tmp_path / "in.parquet")]
    write_rows(rows, tmp_path / "out.parquet", schema=source_schema(tmp_path / "in.parquet"))
    assert pq.read_table(tmp_path / "out.parquet").equals(table)
    write_rows(rows, tmp_path / "out.jsonl")
    first = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert first == {"text": "first row here", "at": "2024-01-01T12:30:05.123456",
                     "at_ns": "2023-11-14T22:13:20.123456789+00:00", "day": "2024-02-01", "price": "1.10",
                     "blob": "AP8="}
    write_rows(rows, tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_text().splitlines()[1] == \
        "first row here,2024-01-01T12:30:05.123456,2023-11-14T22:13:20.123456789+00:00,2024-02-01,1.10,AP8="
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "out.csv", "out.jsonl", "out.parquet"]


def test_a_new_column_beside_typed_ones_is_inferred(tmp_path):
    import pyarrow.parquet as pq

    from tunesmith.data.readers import write_rows

    table = typed_table()
    rows = [{**row, "upsampled": {"from": "in.parquet:1"}} for row in table.to_pylist()]
    write_rows(rows, tmp_path / "out.parquet", schema=table.schema)
    back = pq.read_table(tmp_path / "out.parquet")
    assert back.select(table.column_names).equals(table)
    assert back.column("upsampled").to_pylist()[0] == {"from": "in.parquet:1"}


def test_rejects_of_a_typed_row_keep_its_values_as_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = typed_table().set_column(0, "text", pa.array(["", "ok row", "ok row two", "ok row three"]))
    pq.write_table(table, tmp_path / "in.parquet")
    result = load_records(tmp_path / "in.parquet", fmt="text")
    write_rejects(result.rejects, tmp_path / "rejects.jsonl")
    reject = json.loads((tmp_path / "rejects.jsonl").read_text())
    assert reject["line"] == 1 and reject["reason"] == "empty field: 'text'"
    assert reject["row"]["at"] == "2024-01-01T12:30:05.123456" and reject["row"]["price"] == "1.10"


# ----------------------------------------------------------------------------------------------- record types


def test_text_records(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "alpha", "extra": 1}, {"text": "beta"}])
    result = load_records(path)
    assert result.kind == "text"
    assert records_of(result) == [(1, {"text": "alpha"}), (2, {"text": "beta"})]


def test_instruction_records_with_and_without_input(tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Greet", "output": "Hello"},
        {"instruction": "Greet", "input": None, "output": "Hi"},
    ])
    result = load_records(path)
    assert result.kind == "instruction"
    assert records_of(result) == [(1, {"instruction": "Add", "input": "2 and 3", "output": "5"}),
                                  (2, {"instruction": "Greet", "input": "", "output": "Hello"}),
                                  (3, {"instruction": "Greet", "input": "", "output": "Hi"})]


def test_chat_records_in_openai_messages(tmp_path, chat_rows):
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows[:3])
    result = load_records(path)
    assert result.kind == "chat" and len(result.records) == 3
    assert result.records[2].data == {"messages": [{"role": "user", "content": "What is 2 plus 2?"},
                                                   {"role": "assistant", "content": "2 plus 2 is 4."}]}


def test_chat_records_in_sharegpt_conversations_map_roles(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": "Be terse."}, {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hi."},
        {"from": "Human", "value": "Bye?"}, {"from": "gpt", "value": "Bye."}]}])
    result = load_records(path)
    assert result.kind == "chat"
    assert result.records[0].data["messages"] == [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Bye."}]


def test_classification_records_turn_integer_labels_into_strings(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "great", "label": 1}, {"text": "awful", "label": 0},
                                              {"text": "meh", "label": "neutral"}])
    result = load_records(path)
    assert result.kind == "classification"
    assert [r.data for r in result.records] == [{"text": "great", "label": "1"}, {"text": "awful", "label": "0"},
                                                {"text": "meh", "label": "neutral"}]


def test_preference_records(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "id": 7}])
    result = load_records(path)
    assert result.kind == "preference"
    assert records_of(result) == [(1, {"prompt": "2+2?", "chosen": "4", "rejected": "5"})]


@pytest.mark.parametrize("row, kind", [
    ({"text": "a"}, "text"),
    ({"instruction": "a", "output": "b"}, "instruction"),
    ({"instruction": "a", "input": "", "output": "b"}, "instruction"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "chat"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "chat"),
    ({"text": "a", "label": "x"}, "classification"),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
])
def test_auto_detection_of_each_kind(tmp_path, row, kind):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    result = load_records(path)
    assert result.kind == kind and len(result.records) == 1


def test_detection_looks_past_unreadable_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{broken", {"prompt": "a", "chosen": "b", "rejected": "c"}])
    result = load_records(path)
    assert result.kind == "preference" and len(result.records) == 1 and len(result.rejects) == 1


def test_undetectable_columns_are_a_data_error_with_a_hint(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"can't tell the record type from its columns \['answer', 'question'\]") \
            as info:
        load_records(path)
    assert "data.columns" in info.value.hint


def test_explicit_format_wins_over_detection(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}])
    result = load_records(path, fmt="text")
    assert result.kind == "text" and records_of(result) == [(1, {"text": "a"})]


def test_column_mapping_detects_and_converts(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "Capital of France?", "answer": "Paris"},
                                              {"question": "2+2?"}])
    result = load_records(path, columns={"instruction": "question", "output": "answer"})
    assert result.kind == "instruction"
    assert records_of(result) == [(1, {"instruction": "Capital of France?", "input": "", "output": "Paris"})]
    assert lines_and_reasons(result) == [(2, "missing field: 'answer' (mapped from 'output')")]


def test_column_mapping_for_chat_messages(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"dialog": [{"role": "user", "content": "a"},
                                                          {"role": "assistant", "content": "b"}]}])
    result = load_records(path, columns={"messages": "dialog"})
    assert result.kind == "chat" and len(result.records[0].data["messages"]) == 2


# ----------------------------------------------------------------------------------------------- bad rows


def test_every_bad_jsonl_row_kind_is_rejected_with_its_line_and_reason(tmp_path):
    path = write_bytes(
        tmp_path / "bad.jsonl",
        b'{"text": "fine"}',                 # 1
        b'{"text": "a" "b"}',                # 2 malformed JSON
        b'[1, 2]',                           # 3 not an object
        b'"just a string"',                  # 4 not an object
        b'{"text": [' + b"[" * 150 + b"]" * 150 + b']}',  # 5 nested too deeply
        b'{"body": "no text field"}',        # 6 missing field
        b'{"text": null}',                   # 7 missing field (null)
        b'{"text": "   "}',                  # 8 empty field
        b'{"text": 42}',                     # 9 wrong type
        b'{"text": ["a"]}',                  # 10 wrong type
        b'',                                 # 11 blank: not a row
        b'{"text": "also fine"}',            # 12
    )
    result = load_records(path, fmt="text")
    assert records_of(result) == [(1, {"text": "fine"}), (12, {"text": "also fine"})]
    got = lines_and_reasons(result)
    assert [line for line, _ in got] == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert got == [
        (2, "malformed JSON: Expecting ',' delimiter at column 14"),
        (3, "not a JSON object: got list"),
        (4, "not a JSON object: got str"),
        (5, "nested too deeply: 152 levels of arrays/objects, more than 100"),
        (6, "missing field: 'text'"),
        (7, "missing field: 'text'"),
        (8, "empty field: 'text'"),
        (9, "wrong type: field 'text' must be text, got int"),
        (10, "wrong type: field 'text' must be text, got list"),
    ]
    assert result.rows_read == 11
    reasons = result.reasons()
    assert (reasons["malformed JSON"], reasons["missing field"], reasons["empty field"], reasons["wrong type"]) \
        == (1, 2, 1, 2)
    assert sum(reasons.values()) == 9
    assert all(r["file"] == str(path) for r in result.rejects)
    assert result.rejects[0]["row"] == '{"text": "a" "b"}'
    assert result.rejects[3]["row"].startswith('{"text": [[[[')
    assert result.rejects[4]["row"] == {"body": "no text field"}


def test_reasons_group_unreadable_rows_by_kind(tmp_path):
    path = write_bytes(tmp_path / "u.jsonl", b'{"text": "a",}', b'{"text": ', b"[1]", b'"s"')
    assert load_records(path, fmt="text").reasons() == Counter({"malformed JSON": 2, "not a JSON object": 2})


def test_malformed_json_reports_the_column(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", ['{"text": "a",}'])
    assert lines_and_reasons(load_records(path, fmt="text")) == [
        (1, "malformed JSON: Expecting property name enclosed in double quotes at column 14")]


@pytest.mark.parametrize("line, reason", [
    ('{"text": "unterminated}', "malformed JSON: Unterminated string starting at column 10"),
    ('{"text": ', "malformed JSON: Expecting value at column 10"),
])
def test_malformed_json_at_the_end_of_a_line_names_the_right_column(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "m.jsonl", [line])
    assert lines_and_reasons(load_records(path, fmt="text")) == [(1, reason)]


def test_bad_csv_rows_wrong_cell_count(tmp_path):
    path = write_bytes(tmp_path / "bad.csv",
                       b"text,label",
                       b"good,pos",           # 2
                       b'"two\nlines",a,b',   # 3-4 too many cells, over two lines
                       b"a,b,c",              # 5 too many cells
                       b"lonely",             # 6 too few cells
                       b",neg",               # 7 empty text
                       b"fine,neg")           # 8
    result = load_records(path)
    assert result.kind == "classification"
    assert records_of(result) == [(2, {"text": "good", "label": "pos"}), (8, {"text": "fine", "label": "neg"})]
    assert lines_and_reasons(result) == [
        (3, "wrong cell count: 3 cells, but the header has 2; the row runs over lines 3–4: is a quote on line 3 "
            "left open?"),
        (5, "wrong cell count: 3 cells, but the header has 2"),
        (6, "wrong cell count: 1 cells, but the header has 2"), (7, "empty field: 'text'")]
    assert result.rejects[0]["row"] == '"two\nlines",a,b'
    assert result.rejects[1]["row"] == "a,b,c"
    assert result.rows_read == len(result.records) + len(result.rejects) == 6


def test_bad_chat_rows(tmp_path):
    user, bot = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [user, bot]},                                                       # 1
        {"messages": [{"role": "wizard", "content": "hi"}, bot]},                        # 2 unknown role
        {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},  # 3 unknown role
        {"messages": [user]},                                                            # 4 no assistant
        {"messages": [{"role": "system", "content": "s"}, user]},                        # 5 no assistant
        {"messages": "hi"},                                                              # 6 wrong type
        {"messages": []},                                                                # 7 empty
        {"messages": [user, {"role": "assistant", "content": ""}]},                      # 8 empty content
        {"messages": [user, {"role": "assistant", "content": 3}]},                       # 9 wrong type
        {"messages": [user, {"content": "x"}]},                                          # 10 no role
        {"messages": [user, "text"]},                                                    # 11 not an object
        {"prompt": "no messages"},                                                       # 12 missing field
    ])
    result = load_records(path)
    assert result.kind == "chat"
    assert [r.line for r in result.records] == [1]
    assert lines_and_reasons(result) == [
        (2, "unknown role: messages[0] has role 'wizard'; allowed: system, user, assistant"),
        (3, "unknown role: conversations[0] has role 'robot'; allowed: system, human, user, gpt, assistant, "
            "chatgpt, bing, bard"),
        (4, "missing field: messages has no assistant message to learn from"),
        (5, "missing field: messages has no assistant message to learn from"),
        (6, "wrong type: field 'messages' must be a list of messages, got str"),
        (7, "empty field: 'messages'"),
        (8, "empty field: messages[1] content is empty"),
        (9, "wrong type: messages[1] content must be text, got int"),
        (10, "missing field: messages[1] has no 'role' (or ShareGPT 'from')"),
        (11, "wrong type: messages[1] must be an object, got str"),
        (12, "missing field: 'messages' (or ShareGPT 'conversations')"),
    ]
    assert result.reasons() == Counter({"unknown role": 2, "missing field": 4, "wrong type": 3, "empty field": 2})


def test_label_not_in_the_label_set(tmp_path):
    path = write_jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"},
                                              {"text": "c", "label": 0}, {"text": "d", "label": True}])
    result = load_records(path, labels=["pos", "neg"])
    assert records_of(result) == [(1, {"text": "a", "label": "pos"})]
    assert lines_and_reasons(result) == [
        (2, "label not in the label set: 'meh' (allowed: neg, pos)"),
        (3, "label not in the label set: '0' (allowed: neg, pos)"),
        (4, "wrong type: field 'label' must be text, got bool"),
    ]


# ----------------------------------------------------------------------------------------------- prepare & share


def classification_file(path: Path, rows_per_label: dict[str, int], bad: int = 0) -> Path:
    rows = [{"text": f"{label} example {hashlib.sha1(f'{label}{i}'.encode()).hexdigest()[:16]}", "label": label}
            for label, n in rows_per_label.items() for i in range(n)]  # distinct, not near-duplicates
    rows += ["{not json"] * bad
    return write_jsonl(path, rows)


def test_prepare_data_splits_and_counts(tmp_path):
    path = classification_file(tmp_path / "train.jsonl", {"pos": 10, "neg": 10}, bad=1)
    prepared = prepare_data(DataSection(train=str(path), validation_fraction=0.2), seed=1)
    assert prepared.kind == "classification" and prepared.labels == ["neg", "pos"]
    assert prepared.validation_source == "split"
    assert (len(prepared.train), len(prepared.validation)) == (16, 4)
    assert len(prepared.rejects) == 1
    assert prepared.counts() == {
        "files": {str(path): {"read": 21, "used": 20, "rejected": 1, "reasons": {"malformed JSON": 1}}},
        "train_rows": 16, "validation_rows": 4, "validation_source": "split", "kind": "classification"}


def test_reject_share_above_the_limit_stops_and_at_the_limit_passes(tmp_path):
    at_limit = classification_file(tmp_path / "ok.jsonl", {"pos": 10, "neg": 9}, bad=1)       # 1 of 20 = 5%
    prepared = prepare_data(DataSection(train=str(at_limit)), seed=0)
    check_reject_share(prepared, 0.05)
    above = classification_file(tmp_path / "bad.jsonl", {"pos": 9, "neg": 9}, bad=2)         # 2 of 20 = 10%
    prepared = prepare_data(DataSection(train=str(above)), seed=0)
    check_reject_share(prepared, 0.10)
    with pytest.raises(DataError) as info:
        check_reject_share(prepared, 0.05)
    assert info.value.message == (f"{above}: 2 of 20 rows rejected (10.0%), above `data.max_reject_fraction` = "
                                  "5.0% (malformed JSON ×2)")
    assert "rejects.jsonl" in info.value.hint


def test_reject_share_counts_the_validation_file_on_its_own(tmp_path):
    train = classification_file(tmp_path / "train.jsonl", {"pos": 10, "neg": 10})
    val = classification_file(tmp_path / "val.jsonl", {"pos": 2, "neg": 2}, bad=1)           # 1 of 5 = 20%
    prepared = prepare_data(DataSection(train=str(train), validation=str(val)), seed=0)
    assert prepared.validation_source == "file" and len(prepared.validation) == 4
    with pytest.raises(DataError, match=r"val\.jsonl: 1 of 5 rows rejected \(20\.0%\)"):
        check_reject_share(prepared, 0.1)


def test_no_usable_training_rows_stops_even_with_no_limit(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": ""}, {"text": " "}])
    prepared = prepare_data(DataSection(train=str(path)), seed=0)
    with pytest.raises(DataError, match="no usable training rows"):
        check_reject_share(prepared, 1.0)


def test_validation_labels_default_to_the_training_labels(tmp_path):
    train = classification_file(tmp_path / "train.jsonl", {"pos": 3, "neg": 3})
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "x", "label": "neg"}, {"text": "y", "label": "neutral"},
                                               {"text": "z", "label": "pos"}])
    prepared = prepare_data(DataSection(train=str(train), validation=str(val)), seed=0)
    assert prepared.labels == ["neg", "pos"]
    assert [r.data["label"] for r in prepared.validation] == ["neg", "pos"]
    assert [(r["file"], r["line"], r["reason"]) for r in prepared.rejects] == [
        (str(val), 2, "label not in the label set: 'neutral' (allowed: neg, pos)")]


def test_validation_file_is_read_as_the_training_kind(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "c"}])
    prepared = prepare_data(DataSection(train=str(train), validation=str(val)), seed=0)
    assert prepared.validation == []
    assert [(r["line"], r["reason"]) for r in prepared.rejects] == [(1, "missing field: 'label'")]


def test_recipe_labels_restrict_the_training_file(tmp_path):
    train = classification_file(tmp_path / "train.jsonl", {"pos": 3, "neg": 3, "other": 2})
    prepared = prepare_data(DataSection(train=str(train), labels=["pos", "neg"], validation_fraction=0), seed=0)
    assert prepared.labels == ["pos", "neg"] and len(prepared.train) == 6
    assert Counter(r["reason"].split(":")[0] for r in prepared.rejects) == {"label not in the label set": 2}


def test_kind_the_method_cannot_train_is_a_data_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(DataError, match="holds preference records, which this method can't train on"):
        prepare_data(DataSection(train=str(path)), seed=0, allowed_kinds=("chat", "text"))


# ----------------------------------------------------------------------------------------------- validation split


def text_records(n: int) -> list[Record]:
    return [Record("text", {"text": f"row {i}"}, "f.jsonl", i + 1) for i in range(n)]


def label_records(counts: dict[str, int]) -> list[Record]:
    return [Record("classification", {"text": f"{label} {i}", "label": label}, "f.jsonl", 0)
            for label, n in counts.items() for i in range(n)]


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    records = text_records(100)
    train_a, val_a = validation_split(records, 0.2, seed=3)
    train_b, val_b = validation_split(records, 0.2, seed=3)
    _, val_c = validation_split(records, 0.2, seed=4)
    assert len(val_a) == 20 and len(train_a) == 80
    assert [r.line for r in val_a] == [r.line for r in val_b]
    assert [r.line for r in train_a] == [r.line for r in train_b]
    assert {r.line for r in val_a} != {r.line for r in val_c}
    assert sorted(r.line for r in train_a + val_a) == list(range(1, 101))


def test_split_keeps_input_order_within_each_side():
    train, val = validation_split(text_records(30), 0.3, seed=0)
    assert [r.line for r in train] == sorted(r.line for r in train)
    assert [r.line for r in val] == sorted(r.line for r in val)


def test_split_is_stratified_by_label():
    counts = {"a": 47, "b": 23, "c": 9, "d": 3}
    fraction = 0.2
    train, val = validation_split(label_records(counts), fraction, seed=11)
    held = Counter(r.data["label"] for r in val)
    kept = Counter(r.data["label"] for r in train)
    for label, n in counts.items():
        assert abs(held[label] - n * fraction) <= 1, label
        assert held[label] + kept[label] == n
    assert held == {"a": 9, "b": 5, "c": 2, "d": 1}


def test_identical_rows_never_straddle_the_split():
    base = text_records(40)
    records = base + [Record("text", dict(r.data), "f.jsonl", 100 + r.line) for r in base[:20]] \
        + [Record("text", {"text": "row 0"}, "f.jsonl", 999)]
    train, val = validation_split(records, 0.25, seed=5)
    train_texts = {r.data["text"] for r in train}
    val_texts = {r.data["text"] for r in val}
    assert train_texts.isdisjoint(val_texts)
    assert len(train) + len(val) == 61
    # about a quarter of the 61 rows, filled with whole groups (a row and its copies) without passing the target
    assert 13 <= len(val) <= round(61 * 0.25) and len(val_texts) >= 7


@pytest.mark.parametrize("fraction", [0.0, -0.5])
def test_fraction_zero_holds_out_nothing(fraction):
    records = text_records(10)
    train, val = validation_split(records, fraction, seed=0)
    assert val == [] and train == records


def test_fraction_zero_through_prepare_data(tmp_path):
    path = classification_file(tmp_path / "t.jsonl", {"pos": 5, "neg": 5})
    prepared = prepare_data(DataSection(train=str(path), validation_fraction=0.0), seed=0)
    assert (len(prepared.train), len(prepared.validation)) == (10, 0)


def test_a_single_row_is_never_held_out():
    records = text_records(1)
    assert validation_split(records, 0.5, seed=0) == (records, [])


def test_small_fraction_still_holds_out_one_row():
    train, val = validation_split(text_records(4), 0.1, seed=0)
    assert (len(train), len(val)) == (3, 1)


# ----------------------------------------------------------------------------------------------- rejects file


def test_write_rejects_writes_file_line_reason_and_row(tmp_path):
    path = write_bytes(tmp_path / "bad.jsonl", b'{"text": "ok"}', b'{oops', b'{"text": ["caf\xc3\xa9"' + b"]" * 2,
                       b'{"text": ""}')
    result = load_records(path, fmt="text")
    out = tmp_path / "run" / "nested" / "rejects.jsonl"
    write_rejects(result.rejects, out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    items = [json.loads(line) for line in lines]
    assert [list(item) for item in items] == [["file", "line", "reason", "row"]] * 3
    assert [(i["file"], i["line"]) for i in items] == [(str(path), 2), (str(path), 3), (str(path), 4)]
    assert items[0]["reason"].startswith("malformed JSON:") and items[0]["row"] == "{oops"
    assert items[1]["reason"] == "malformed JSON: Expecting ',' delimiter at column 18"
    assert items[1]["row"] == '{"text": ["café"]]'
    assert items[2] == {"file": str(path), "line": 4, "reason": "empty field: 'text'", "row": {"text": ""}}
    assert "café" in lines[1]  # written as UTF-8, not \u escapes


def test_write_rejects_with_nothing_writes_an_empty_file(tmp_path):
    out = tmp_path / "rejects.jsonl"
    out.write_text("stale\n")
    write_rejects([], out)
    assert out.read_text() == ""


def test_read_rows_yields_raw_rows_with_errors_instead_of_raising(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"a": 1}, "nope"])
    rows = list(read_rows(path))
    assert [(r.line, r.value, r.error is None) for r in rows] == [(1, {"a": 1}, True), (2, None, False)]
    assert rows[1].text == "nope"
