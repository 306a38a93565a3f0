"""The loader reads every supported format, and turns every bad input into an `SftError` that names the file, the
line or row, the field, and what was expected (docs/PITFALLS.md, "Bad inputs a loader must turn into a clear error").

Real third-party files come from tests/fixtures through `shared()`; everything else is
written into `tmp_path`. `pytest.raises(SftError)` lets any other exception type through, so each bad-input test
also proves the loader raised nothing else.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft.config import DataConfig, SourceConfig
from sft.data import SHAREGPT_ROLES, Example, load_dataset, read_source
from sft.errors import SftError
from tests.conftest import shared

# ---------------------------------------------------------------------------------------------------------------
# Helpers


def read(path: Path, fmt: str = "auto"):
    return read_source(SourceConfig(path=str(path), format=fmt))


def fails(path: Path, *fragments: str, fmt: str = "auto") -> str:
    """Reading `path` raises SftError (nothing else) whose message names the file and holds every fragment."""
    with pytest.raises(SftError) as info:
        read(path, fmt)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def chat(*pairs: str) -> list[dict]:
    """chat("user", "hi", "assistant", "hello") -> [{"role": "user", "content": "hi"}, ...]"""
    return [{"role": r, "content": c} for r, c in zip(pairs[::2], pairs[1::2])]


QA = chat("user", "What is 2+2?", "assistant", "4")


def qa(i: int) -> dict:
    return {"messages": chat("user", f"question {i}", "assistant", f"answer {i}")}


# ---------------------------------------------------------------------------------------------------------------
# Good inputs: real files


def test_alpaca_en_demo_reads_999_rows_and_an_empty_input_gives_the_instruction_alone():
    path = shared("datasets/llamafactory/alpaca_en_demo.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    source = read(path)
    assert source.format == "alpaca"
    assert len(source.examples) == len(raw) == 999
    assert sum(not r["input"].strip() for r in raw) == 587
    for i, (row, example) in enumerate(zip(raw, source.examples)):
        assert example.kind == "chat"
        assert example.where == f"{path} row {i}"
        user = row["instruction"] if not row["input"].strip() else f"{row['instruction']}\n\n{row['input']}"
        assert example.messages == [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def test_glaive_toolcall_maps_function_call_and_observation_and_parses_the_tools_column():
    path = shared("datasets/llamafactory/glaive_toolcall_en_demo.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    source = read(path)
    assert source.format == "sharegpt"
    assert len(source.examples) == len(raw) == 300
    for row, example in zip(raw, source.examples):
        expected = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]
        assert example.messages == expected
        assert example.tools == json.loads(row["tools"])
    roles = Counter(m["role"] for e in source.examples for m in e.messages)
    # human -> user, gpt and function_call -> assistant, observation -> tool
    assert roles == {"user": 746, "assistant": 746 + 211, "tool": 211}
    called = next(
        e for e, r in zip(source.examples, raw) if any(t["from"] == "function_call" for t in r["conversations"])
    )
    i = [m["role"] for m in called.messages].index("tool")
    assert called.messages[i - 1]["role"] == "assistant" and called.messages[i + 1]["role"] == "assistant"
    assert isinstance(called.tools, list) and called.tools[0]["name"]


def test_a_single_top_level_object_is_one_row():
    path = shared("datasets/axolotl/conversation.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(raw, dict)
    source = read(path)
    assert source.format == "sharegpt"
    [example] = source.examples
    assert example.where == f"{path} row 0"
    assert [m["role"] for m in example.messages] == ["user", "assistant"] * 6
    assert [m["content"] for m in example.messages] == [t["value"] for t in raw["conversations"]]


def test_identity_placeholders_stay_literal_text():
    path = shared("datasets/llamafactory/identity.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    source = read(path)
    answers = [e.messages[-1]["content"] for e in source.examples]
    assert answers == [r["output"] for r in raw]
    assert "Hello! I am {{name}}, an AI assistant developed by {{author}}." in answers[0]
    assert sum("{{name}}" in a for a in answers) > 50


def test_format_text_picks_the_text_column_of_a_richer_row():
    # torchtune's alpaca rows carry a pre-rendered `text` column: auto reads them as alpaca and refuses to drop
    # `text` silently; asking for format text trains on that column alone, by choice.
    path = shared("datasets/torchtune/alpaca_tiny.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    fails(path, "row 0", "['text']", "not read by format 'alpaca'", "would be ignored", "expected only")
    source = read(path, fmt="text")
    assert source.format == "text"
    assert [e.text for e in source.examples] == [r["text"] for r in raw]
    assert {e.kind for e in source.examples} == {"text"}


# ---------------------------------------------------------------------------------------------------------------
# Good inputs: every file type and format


def test_jsonl_messages_with_system_tools_and_blank_lines(tmp_path):
    tools = [{"name": "add", "parameters": {"type": "object"}}]
    path = tmp_path / "train.jsonl"
    first = {"messages": chat("system", "Be brief.", "user", "hi", "assistant", "hello"), "tools": tools}
    path.write_text(json.dumps(first) + "\n\n   \n" + json.dumps({"messages": QA}) + "\n", encoding="utf-8")
    source = read(path)
    assert source.format == "messages"
    assert [e.where for e in source.examples] == [f"{path} line 1", f"{path} line 4"]  # physical line numbers
    assert source.examples[0].messages == first["messages"]
    assert source.examples[0].tools == tools
    assert source.examples[1].messages == QA and source.examples[1].tools is None


def test_tools_given_as_a_json_string_are_parsed(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": QA, "tools": '[{"name": "add"}]'}])
    assert read(path).examples[0].tools == [{"name": "add"}]


def test_csv_alpaca_with_quoted_multiline_values_keeps_true_line_numbers(tmp_path):
    path = tmp_path / "train.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "input", "output", "system"])
        writer.writerow(["List two colours.", "", "red,\nblue", ""])  # two physical lines
        writer.writerow(["Add", "2 and 3", "5", "You are a calculator."])
    source = read(path)
    assert source.format == "alpaca"
    first, second = source.examples
    assert first.where == f"{path} line 2" and second.where == f"{path} line 4"
    assert first.messages == chat("user", "List two colours.", "assistant", "red,\nblue")
    assert second.messages == chat("system", "You are a calculator.", "user", "Add\n\n2 and 3", "assistant", "5")


def test_parquet_rows_are_read_by_index(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    rows = [{"instruction": f"say {i}", "input": "", "output": str(i)} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    source = read(path)
    assert source.format == "alpaca"
    assert [e.where for e in source.examples] == [f"{path} row {i}" for i in range(3)]
    assert source.examples[2].messages == chat("user", "say 2", "assistant", "2")


def test_parquet_messages_whose_struct_has_a_null_field_everywhere(tmp_path):
    # A parquet struct gives every turn every field; a field that is null in every turn loses nothing.
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    turns = [{"role": "user", "content": "hi", "name": None}, {"role": "assistant", "content": "hello"}]
    pq.write_table(pa.Table.from_pylist([{"messages": turns}, {"messages": QA}]), path)
    source = read(path)
    assert source.examples[0].messages == chat("user", "hi", "assistant", "hello")
    assert source.examples[1].messages == QA


def test_prompt_completion_strings_give_a_completion_example(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": " 4"}])
    source = read(path)
    assert source.format == "prompt_completion"
    [example] = source.examples
    assert (example.kind, example.prompt, example.completion, example.messages) == ("completion", "2+2=", " 4", [])


def test_prompt_completion_message_lists_give_one_conversation(tmp_path):
    prompt = chat("system", "Be brief.", "user", "2+2?")
    completion = chat("assistant", "4")
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": completion}])
    [example] = read(path).examples
    assert example.kind == "chat"
    assert example.messages == prompt + completion


def test_raw_text(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time.\tThe end.\r\n"}, {"text": "Two"}])
    source = read(path)
    assert source.format == "text"
    assert [(e.kind, e.text) for e in source.examples] == [("text", "Once upon a time.\tThe end.\r\n"), ("text", "Two")]


def test_alpaca_system_and_history_become_earlier_turns(tmp_path):
    row = {"instruction": "and 3+3?", "input": "", "output": "6", "system": "Math.", "history": [["2+2?", "4"]]}
    [example] = read(write_json(tmp_path / "a.json", [row])).examples
    assert example.messages == chat(
        "system", "Math.", "user", "2+2?", "assistant", "4", "user", "and 3+3?", "assistant", "6"
    )


def test_a_folder_reads_its_data_files_in_name_order_and_skips_others(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    alpaca = {"instruction": "i", "input": "", "output": "o"}
    write_json(folder / "b.json", [alpaca, alpaca | {"output": "p"}])
    write_jsonl(folder / "a.jsonl", [alpaca | {"instruction": "first"}])
    (folder / "c.csv").write_text("instruction,input,output\nlast,,z\n", encoding="utf-8")
    (folder / "README.md").write_text("not data", encoding="utf-8")
    (folder / "nested.jsonl").mkdir()  # a folder with a data suffix is not a file
    source = read(folder)
    assert source.format == "alpaca"
    assert source.path == folder
    assert [e.where for e in source.examples] == [
        f"{folder / 'a.jsonl'} line 1",
        f"{folder / 'b.json'} row 0",
        f"{folder / 'b.json'} row 1",
        f"{folder / 'c.csv'} line 2",
    ]
    assert [e.messages[0]["content"] for e in source.examples] == ["first", "i", "i", "last"]


def test_a_utf8_byte_order_mark_is_dropped(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"messages": QA}])
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert read(bom).examples[0].messages == read(plain).examples[0].messages
    csv_bom = tmp_path / "bom.csv"
    csv_bom.write_bytes("instruction,input,output\nhi,,hello\n".encode("utf-8-sig"))
    assert read(csv_bom).examples[0].messages == chat(
        "user", "hi", "assistant", "hello"
    )  # header not '\ufeffinstruction'


def test_a_utf8_sig_fixture_decodes_then_fails_only_as_json(tmp_path):
    # The chardet utf-8-sig sample is prose, not JSON: the BOM must not be what the loader complains about.
    path = tmp_path / "x.jsonl"
    path.write_bytes(shared("encodings/utf-8-sig_ude_4.txt").read_bytes())
    message = fails(path, "line 1: malformed JSON", "expected one JSON object per line")
    assert "UTF" not in message


def test_non_ascii_and_naughty_strings_are_kept_exactly(tmp_path):
    naughty = json.loads(shared("encodings/blns.json").read_text(encoding="utf-8"))
    clean = [s for s in naughty if s.strip() and not any(0 <= ord(c) < 32 and c not in "\t\n\r" for c in s)]
    clean = [s for s in clean if not any(0x7F <= ord(c) <= 0x9F for c in s)]
    path = write_jsonl(tmp_path / "n.jsonl", [{"messages": chat("user", s, "assistant", s)} for s in clean])
    assert [e.messages[1]["content"] for e in read(path).examples] == clean


def test_source_digest_is_of_the_bytes(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [qa(1)])
    b = write_jsonl(tmp_path / "b.jsonl", [qa(1)])
    c = write_jsonl(tmp_path / "c.jsonl", [qa(2)])
    assert read(a).sha256 == read(b).sha256 != read(c).sha256


# ---------------------------------------------------------------------------------------------------------------
# load_dataset: split, explicit eval, hygiene warnings


def test_split_is_deterministic_disjoint_and_complete(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [qa(i) for i in range(50)])

    def split(seed: int):
        data = load_dataset(DataConfig(train=str(path), eval_fraction=0.2, seed=seed))
        return [e.where for e in data.train], [e.where for e in data.eval], data

    train, evals, data = split(0)
    assert len(evals) == 10 and len(train) == 40
    assert not set(train) & set(evals)
    assert sorted(train + evals, key=lambda w: int(w.split()[-1])) == [f"{path} line {i}" for i in range(1, 51)]
    assert split(0)[:2] == (train, evals)
    assert split(1)[1] != evals
    assert data.warnings == []
    assert [s.path for s in data.sources] == [path]


def test_split_keeps_at_least_one_eval_row_and_refuses_too_few_rows(tmp_path):
    two = write_jsonl(tmp_path / "two.jsonl", [qa(1), qa(2)])
    data = load_dataset(DataConfig(train=str(two), eval_fraction=0.01))
    assert (len(data.train), len(data.eval)) == (1, 1)
    one = write_jsonl(tmp_path / "one.jsonl", [qa(1)])
    with pytest.raises(SftError, match=r"1 row\(s\) are too few to split off an eval set; give data.eval"):
        load_dataset(DataConfig(train=str(one)))


def test_explicit_eval_sources_are_used_as_given(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [qa(i) for i in range(5)])
    evals = write_jsonl(tmp_path / "eval.jsonl", [qa(i) for i in range(100, 102)])
    data = load_dataset(DataConfig(train=[str(train)], eval=[{"path": str(evals), "format": "messages"}]))
    assert len(data.train) == 5 and len(data.eval) == 2
    assert all(e.where.startswith(str(evals)) for e in data.eval)
    assert [s.path for s in data.sources] == [train, evals]
    assert data.warnings == []


def test_duplicates_and_train_eval_overlap_are_warned_about(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [qa(1), qa(1), qa(1), qa(2), qa(3)])
    evals = write_jsonl(tmp_path / "eval.jsonl", [qa(3), qa(2), qa(9)])
    data = load_dataset(DataConfig(train=str(train), eval=str(evals)))
    assert data.warnings == [
        f"2 training row(s) are exact duplicates of another (first: {train} line 2 repeats {train} line 1)",
        "2 eval row(s) also appear in the training data: eval scores are inflated "
        f"(e.g. eval {evals} line 1 is train {train} line 5)",
    ]


def test_duplicates_error_names_the_count_and_locations(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [qa(1), qa(2), qa(1), qa(3), qa(1)])
    evals = write_jsonl(tmp_path / "eval.jsonl", [qa(9), qa(3)])
    config = DataConfig(train=str(train), eval=str(evals), duplicates="error")
    with pytest.raises(SftError) as info:
        load_dataset(config)
    message = str(info.value)
    assert (
        f"2 training row(s) are exact duplicates of another (first: {train} line 3 repeats {train} line 1)" in message
    )
    assert "1 eval row(s) also appear in the training data" in message
    assert f"e.g. eval {evals} line 2 is train {train} line 4" in message
    assert "data.duplicates=warn" in message


def test_duplicates_error_with_overlap_alone_and_a_clean_dataset(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [qa(1), qa(2)])
    evals = write_jsonl(tmp_path / "eval.jsonl", [qa(2)])
    with pytest.raises(SftError, match=r"^data: 1 eval row\(s\) also appear .*eval .*eval.jsonl line 1 is train "):
        load_dataset(DataConfig(train=str(train), eval=str(evals), duplicates="error"))
    clean = write_jsonl(tmp_path / "clean.jsonl", [qa(3)])
    data = load_dataset(DataConfig(train=str(train), eval=str(clean), duplicates="error"))
    assert data.warnings == [] and len(data.train) == 2


def test_the_same_conversation_in_two_formats_is_a_duplicate(tmp_path):
    alpaca = write_json(tmp_path / "a.json", [{"instruction": "What is 2+2?", "input": "", "output": "4"}])
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": QA}])
    data = load_dataset(DataConfig(train=[str(alpaca), str(messages)], eval=str(messages)))
    assert (
        data.warnings[0]
        == f"1 training row(s) are exact duplicates of another (first: {messages} line 1 repeats {alpaca} row 0)"
    )
    assert "1 eval row(s) also appear" in data.warnings[1]


def test_fingerprint_follows_the_content(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [qa(i) for i in range(10)])
    config = DataConfig(train=str(path))
    first = load_dataset(config).fingerprint()
    assert load_dataset(config).fingerprint() == first
    write_jsonl(path, [qa(i) for i in range(1, 11)])
    assert load_dataset(config).fingerprint() != first


def test_load_dataset_passes_source_errors_through(tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text("{nope\n", encoding="utf-8")
    good = write_jsonl(tmp_path / "train.jsonl", [qa(1)])
    with pytest.raises(SftError, match="eval.jsonl line 1: malformed JSON"):
        load_dataset(DataConfig(train=str(good), eval=str(bad)))


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: files and encodings


@pytest.mark.parametrize(
    "fixture, fragments",
    [
        ("windows-1252_github_bug_9.txt", ["not UTF-8: byte 0x93 at offset 14 (line 1)", "expected UTF-8"]),
        ("gb2312_mozilla_bug171813_text.html", ["not UTF-8: byte 0xcb at offset 320 (line 7)", "expected UTF-8"]),
        ("nobom-utf16le.txt", ["looks like UTF-16", "NUL bytes", "expected UTF-8 - re-encode it"]),
        ("bom-utf-16-le.srt", ["looks like UTF-16", "byte-order mark", "expected UTF-8 - re-encode it"]),
    ],
)
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_file_that_is_not_utf8_is_refused_with_the_offending_byte(tmp_path, fixture, fragments, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(shared(f"encodings/{fixture}").read_bytes())
    fails(path, *fragments)


def test_a_utf16_file_with_a_big_endian_bom_is_refused(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(json.dumps({"messages": QA}).encode("utf-16"))  # BOM + native order
    fails(path, "looks like UTF-16")
    path.write_bytes(b"\xfe\xff" + json.dumps({"messages": QA}).encode("utf-16-be"))
    fails(path, "looks like UTF-16")


def test_a_malformed_jsonl_line_is_reported_by_number(tmp_path):
    path = tmp_path / "x.jsonl"
    lines = [json.dumps(qa(1)), "", json.dumps(qa(2)), '{"messages": [}', json.dumps(qa(3))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    fails(path, "line 4: malformed JSON", "column 15", "expected one JSON object per line")


def test_a_json_array_in_a_jsonl_file_says_rename_it(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps([qa(1), qa(2)], indent=2), encoding="utf-8")
    fails(path, "holds one JSON array, not JSON Lines", "rename it to x.json")


def test_a_one_line_array_in_a_jsonl_file_is_not_an_object(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps([qa(1)]), encoding="utf-8")
    fails(path, "line 1: expected an object with named fields, got list")


def test_json_lines_in_a_json_file_says_rename_it(tmp_path):
    path = write_jsonl(tmp_path / "x.json", [qa(1), qa(2)])
    fails(path, "several JSON values, one per line: this is JSON Lines", "rename it to x.jsonl")


def test_malformed_json_reports_its_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n', encoding="utf-8")
    fails(path, "line 3: malformed JSON")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
@pytest.mark.parametrize("content", [b"", b"  \n\n\t\n", b"\xef\xbb\xbf\n"])
def test_an_empty_file_is_refused(tmp_path, suffix, content):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(content)
    fails(path, "file is empty; expected at least one row")


@pytest.mark.parametrize(
    "name, content", [("x.json", "[]"), ("x.csv", "instruction,input,output\n"), ("y.json", "[\n]\n")]
)
def test_a_file_with_no_rows_is_refused(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    fails(path, "no rows; expected at least one")


def test_an_empty_parquet_file_is_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    fails(path, "no rows; expected at least one")


def test_a_corrupt_parquet_file_is_refused(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    fails(path, "not a readable parquet file")


def test_a_missing_file_is_named(tmp_path):
    path = tmp_path / "nope" / "train.jsonl"
    message = fails(path, "data file not found")
    assert str(path.resolve()) in message


def test_an_unsupported_suffix_lists_the_supported_ones(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text('{"text": "hi"}\n', encoding="utf-8")
    fails(path, "unsupported file type '.txt'", "expected .jsonl, .json, .csv, .parquet")


def test_a_folder_without_data_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    fails(tmp_path, "folder holds no data files", "expected .jsonl")


@pytest.mark.parametrize("value, kind", [('"hello"', "str"), ("42", "int"), ("null", "NoneType"), ("true", "bool")])
def test_a_top_level_json_value_that_is_not_an_object_or_array(tmp_path, value, kind):
    path = tmp_path / "x.json"
    path.write_text(value, encoding="utf-8")
    fails(path, f"expected a JSON array of objects (or one object), got {kind}")


def test_rows_that_are_not_objects(tmp_path):
    fails(write_json(tmp_path / "x.json", [qa(1), "hi"]), "row 1: expected an object with named fields, got str")
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(qa(1)) + "\n[1, 2]\n", encoding="utf-8")
    fails(path, "line 2: expected an object with named fields, got list")
    path.write_text("3\n", encoding="utf-8")
    fails(path, "line 1: expected an object with named fields, got int")


@pytest.mark.parametrize(
    "lines, fragments",
    [
        (["instruction,input,output", "a,b,c,d"], ["line 2: 4 value(s) but the header has 3 column(s)"]),
        (["instruction,input,output", "a,b,c", "a,b"], ["line 3: 2 value(s) but the header has 3 column(s)"]),
        (["instruction,input,output", 'a,,"x', 'y"', "a,b"], ["line 4: 2 value(s)", "one value per column"]),
    ],
)
def test_a_csv_row_of_the_wrong_width(tmp_path, lines, fragments):
    path = tmp_path / "x.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    fails(path, *fragments, "['instruction', 'input', 'output']")


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: schema


def test_preference_data_is_refused():
    path = shared("datasets/llamafactory/dpo_en_demo.json")
    fails(path, "row 0", "preference data (chosen/rejected)", "not SFT", "expected one of: messages; conversations")


def test_keys_that_match_no_format_are_listed_with_the_formats_expected():
    path = shared("datasets/torchtune/instruct_tiny.json")
    fails(
        path,
        "row 0: keys ['instruction', 'response'] match no known format",
        "expected one of: messages (messages); conversations (sharegpt); instruction + output (alpaca)",
        "prompt + completion (prompt_completion); text (text)",
    )


def test_rows_of_mixed_formats_in_one_file(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [qa(1), qa(2), {"instruction": "i", "output": "o"}])
    fails(path, "line 3: row looks like 'alpaca' but the source is 'messages'", "mixed formats in one source")


def test_rows_of_mixed_formats_across_the_files_of_a_folder(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [qa(1)])
    bad = write_jsonl(tmp_path / "b.jsonl", [{"text": "raw"}])
    message = fails(tmp_path, "row looks like 'text' but the source is 'messages'")
    assert f"{bad} line 1" in message


def test_an_explicit_format_that_does_not_match_the_rows(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [qa(1)])
    fails(path, "line 1: row looks like 'messages' but the source is 'sharegpt'", fmt="sharegpt")


@pytest.mark.parametrize(
    "row, fragments",
    [
        (
            {"messages": QA, "id": 7},
            ["line 1: field(s) ['id'] are not read by format 'messages'", "['messages', 'tools']"],
        ),
        ({"conversations": [], "system": "s"}, ["field(s) ['system'] are not read by format 'sharegpt'"]),
        (
            {"instruction": "i", "output": "o", "response": "r"},
            ["field(s) ['response'] are not read by format 'alpaca'"],
        ),
        (
            {"prompt": "p", "completion": "c", "meta": {}},
            ["field(s) ['meta'] are not read by format 'prompt_completion'"],
        ),
        (
            {"text": "t", "source": "web"},
            ["field(s) ['source'] are not read by format 'text'", "expected only ['text']"],
        ),
    ],
)
def test_a_row_field_that_would_be_ignored_is_refused(tmp_path, row, fragments):
    fails(write_jsonl(tmp_path / "x.jsonl", [row]), *fragments, "would be ignored")


def test_a_null_extra_field_loses_nothing_and_is_accepted(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"messages": QA, "id": None}])
    assert read(path).examples[0].messages == QA


@pytest.mark.parametrize(
    "turn, fragments",
    [
        ({"role": "assistant", "content": "4", "weight": 0}, ["messages[1]: key(s) ['weight'] would be ignored"]),
        ({"role": "assistant", "content": "4", "name": "bot"}, ["expected only 'role', 'content' and 'tool_calls'"]),
        (
            {"role": "user", "content": "4", "tool_calls": []},
            ["['tool_calls']", "tool_calls belongs on assistant turns"],
        ),
    ],
)
def test_a_turn_key_that_would_be_ignored_is_refused(tmp_path, turn, fragments):
    path = write_jsonl(tmp_path / "x.jsonl", [{"messages": [QA[0], turn]}])
    fails(path, "line 1, ", *fragments)


def test_a_sharegpt_turn_key_that_would_be_ignored_is_refused(tmp_path):
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello", "weight": 0}]
    fails(write_json(tmp_path / "x.json", [{"conversations": turns}]), "row 0, conversations[1]: key(s) ['weight']")


@pytest.mark.parametrize(
    "content, kind",
    [(4, "int"), (4.5, "float"), ([{"type": "text", "text": "4"}], "list"), ({"t": 1}, "dict")],
)
def test_message_content_that_is_not_a_string(tmp_path, content, kind):
    path = write_jsonl(tmp_path / "x.jsonl", [qa(1), {"messages": [QA[0], {"role": "assistant", "content": content}]}])
    fails(path, f"line 2, messages[1]: 'content' must be a string, got {kind}")


def test_null_content_is_an_empty_assistant_turn_and_a_type_error_elsewhere(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"messages": [QA[0], {"role": "assistant", "content": None}]}])
    fails(path, "line 1, messages[1]: empty assistant turn ('content' is null and there are no tool_calls)")
    path = write_jsonl(tmp_path / "y.jsonl", [{"messages": [{"role": "user", "content": None}, QA[1]]}])
    fails(path, "line 1, messages[0]: 'content' must be a string, got NoneType")


def test_sharegpt_value_that_is_not_a_string(tmp_path):
    turns = [{"from": "human", "value": ["hi"]}, {"from": "gpt", "value": "hello"}]
    fails(
        write_json(tmp_path / "x.json", {"conversations": turns}), "row 0, conversations[0]: 'value' must be a string"
    )


@pytest.mark.parametrize(
    "row, fragments",
    [
        ({"instruction": "i", "output": None}, ["field 'output' must be a string, got NoneType None"]),
        ({"instruction": 3, "output": "o"}, ["field 'instruction' must be a string, got int 3"]),
        ({"instruction": "i", "input": ["x"], "output": "o"}, ["field 'input' must be a string, got list"]),
        ({"instruction": "i", "output": "o", "system": 1}, ["field 'system' must be a string, got int"]),
        ({"instruction": "i", "output": "o", "history": [["q"]]}, ["field 'history' must be a list of [instruction"]),
        ({"instruction": "i", "output": "o", "history": "q a"}, ["field 'history' must be a list of [instruction"]),
        ({"prompt": 1, "completion": "c"}, ["field 'prompt' must be a string, got int 1"]),
        ({"prompt": "p", "completion": None}, ["field 'completion' must be a string, got NoneType"]),
        ({"prompt": "p", "completion": "  "}, ["field 'completion' is empty; expected the answer to learn"]),
        ({"prompt": QA[:1], "completion": "4"}, ["field 'prompt' must be a string, got list"]),
        ({"text": 5}, ["field 'text' must be a string, got int 5"]),
        ({"text": ["a", "b"]}, ["field 'text' must be a string, got list"]),
        ({"text": " \n "}, ["field 'text' is empty"]),
        ({"messages": []}, ["field 'messages' must be a non-empty list of turns"]),
        ({"messages": "hi"}, ["field 'messages' must be a non-empty list of turns"]),
        ({"messages": ["hi", "there"]}, ["messages[0]: expected an object with 'role' and 'content'"]),
        ({"conversations": {"from": "human"}}, ["field 'conversations' must be a non-empty list of turns"]),
        ({"messages": QA, "tools": "not json"}, ["field 'tools' is a string but not JSON"]),
    ],
)
def test_a_field_of_the_wrong_type_or_shape(tmp_path, row, fragments):
    fails(write_jsonl(tmp_path / "x.jsonl", [row]), "line 1", *fragments)


def test_a_wrong_type_in_a_csv_or_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "x.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"instruction": "i", "output": "o"}, {"instruction": "i", "output": None}]), path
    )
    fails(path, "row 1: field 'output' must be a string, got NoneType")
    pq.write_table(pa.table({"prompt": ["p"], "completion": [3]}), path)
    fails(path, "row 0: field 'completion' must be a string, got int 3")


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: roles and turn order


def test_an_empty_assistant_turn_is_reported_with_its_index():
    path = shared("datasets/axolotl/conversation.missingturns.json")
    fails(path, "row 0, conversations[1]: empty assistant turn; expected an answer to learn")


@pytest.mark.parametrize(
    "messages, fragments",
    [
        (
            chat("user", "hi", "bot", "hello"),
            ["messages[1]: unknown role 'bot'", "['system', 'user', 'assistant', 'tool']"],
        ),
        ([{"content": "hi"}] + QA[1:], ["messages[0]: unknown role None"]),
        (chat("human", "hi", "gpt", "hello"), ["messages[0]: unknown role 'human'"]),  # ShareGPT names need a role map
        (chat("user", "a", "system", "s", "assistant", "b"), ["messages[1]: a system turn must come first"]),
        (chat("user", "a", "user", "b", "assistant", "c"), ["messages[1]: two user turns in a row"]),
        (
            chat("assistant", "a", "user", "b", "assistant", "c"),
            ["messages[0]: assistant turn must follow a user", "nothing"],
        ),
        (
            chat("system", "s", "assistant", "a"),
            ["messages[1]: assistant turn must follow a user (or tool) turn, not system"],
        ),
        (
            chat("user", "a", "tool", "{}", "assistant", "b"),
            ["messages[1]: a tool result must follow an assistant turn"],
        ),
        (
            chat("user", "a", "assistant", "b", "user", "c"),
            ["conversation ends with a user turn", "end with the assistant"],
        ),
        (chat("user", "a", "assistant", "call", "tool", "{}"), ["conversation ends with a tool turn"]),
        (chat("system", "s"), ["conversation ends with a system turn"]),
        (chat("user", "a", "assistant", " \n"), ["messages[1]: empty assistant turn"]),
    ],
)
def test_bad_roles_and_turn_order(tmp_path, messages, fragments):
    path = write_jsonl(tmp_path / "x.jsonl", [qa(0), {"messages": messages}])
    fails(path, "line 2", *fragments)


def test_a_tool_exchange_is_a_valid_order(tmp_path):
    messages = chat("user", "add 2 3", "assistant", '{"name": "add"}', "tool", "5", "tool", "ok", "assistant", "5")
    [example] = read(write_jsonl(tmp_path / "x.jsonl", [{"messages": messages}])).examples
    assert [m["role"] for m in example.messages] == ["user", "assistant", "tool", "tool", "assistant"]


@pytest.mark.parametrize("role", ["bot", "model", "User", None, ["human"], {"x": 1}, 3])
def test_a_sharegpt_role_outside_the_role_map(tmp_path, role):
    turns = [{"from": "human", "value": "hi"}, {"from": role, "value": "hello"}]
    fails(
        write_json(tmp_path / "x.json", [{"conversations": turns}]),
        "row 0, conversations[1]: unknown role",
        "expected one of",
    )


def test_sharegpt_order_errors_name_the_conversations_field(tmp_path):
    turns = [{"from": "gpt", "value": "hello"}]
    fails(
        write_json(tmp_path / "x.json", [{"conversations": turns}]),
        "row 0, conversations[0]: assistant turn must follow",
    )


def test_alpaca_with_an_empty_output_is_an_empty_assistant_turn(tmp_path):
    path = write_json(tmp_path / "x.json", [{"instruction": "i", "input": "", "output": ""}])
    fails(path, "row 0, instruction/output[1]: empty assistant turn")


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: control characters


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\x93"])
def test_a_control_character_in_message_content(tmp_path, char):
    messages = chat("user", "hi", "assistant", f"hel{char}lo")
    path = write_jsonl(tmp_path / "x.jsonl", [{"messages": messages}])
    fails(path, f"line 1, messages[1]: field 'content' holds control character U+{ord(char):04X} at character 3")


@pytest.mark.parametrize(
    "row, fragment",
    [
        ({"instruction": "a\x01b", "output": "o"}, "field 'instruction' holds control character U+0001 at character 1"),
        ({"instruction": "i", "input": "\x02", "output": "o"}, "field 'input' holds control character U+0002"),
        ({"instruction": "i", "output": "o", "system": "\x1f"}, "field 'system' holds control character U+001F"),
        ({"prompt": "p\x00", "completion": "c"}, "field 'prompt' holds control character U+0000 at character 1"),
        ({"text": "\x1b[31mred"}, "field 'text' holds control character U+001B at character 0"),
    ],
)
def test_a_control_character_in_a_string_field(tmp_path, row, fragment):
    fails(write_jsonl(tmp_path / "x.jsonl", [row]), "line 1: ", fragment, "tab, newline and carriage return")


def test_a_control_character_in_a_sharegpt_value_or_history(tmp_path):
    turns = [{"from": "human", "value": "hi\x08"}, {"from": "gpt", "value": "hello"}]
    fails(write_json(tmp_path / "a.json", [{"conversations": turns}]), "conversations[0]: field 'value' holds control")
    row = {"instruction": "i", "output": "o", "history": [["q", "a\x00"]]}
    fails(write_json(tmp_path / "b.json", [row]), "row 0, instruction/output[1]: field 'content' holds control")


def test_a_raw_control_character_in_a_csv_cell(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("instruction,input,output\nhi,,bell\x07\n", encoding="utf-8")
    fails(path, "line 2: field 'output' holds control character U+0007")


def test_a_raw_control_character_in_a_json_string_is_malformed_json(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a\x01b"}\n', encoding="utf-8")
    fails(path, "line 1: malformed JSON (Invalid control character")


# ---------------------------------------------------------------------------------------------------------------
# Whatever the row holds, the loader either reads it or raises SftError


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
role = st.sampled_from([*SHAREGPT_ROLES, "bot", None, 1, [], {}])
turn = st.fixed_dictionaries({"role": role, "content": json_values | st.text(max_size=5)}) | json_values
sharegpt_turn = st.fixed_dictionaries({"from": role, "value": json_values | st.text(max_size=5)}) | json_values
fields = st.sampled_from(
    ["messages", "conversations", "instruction", "input", "output", "system", "history", "prompt", "completion"]
    + ["text", "tools", "chosen", "id"]
)
row = st.dictionaries(
    fields, json_values | st.lists(turn, max_size=4) | st.lists(sharegpt_turn, max_size=4), max_size=4
)


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=st.lists(row | json_values, min_size=1, max_size=3), fmt=st.sampled_from(["auto", "messages", "sharegpt"]))
def test_any_json_rows_are_read_or_refused_with_sft_error(tmp_path, rows, fmt):
    path = write_jsonl(tmp_path / "fuzz.jsonl", rows)
    try:
        source = read(path, fmt)
    except SftError as err:
        assert str(path) in str(err)
        return
    assert len(source.examples) == len(rows)
    assert all(isinstance(e, Example) and e.kind in {"chat", "completion", "text"} for e in source.examples)


def test_extra_fields_can_be_declared_metadata(tmp_path):
    path = tmp_path / "with_ids.jsonl"
    row = {
        "id": 7,
        "source": "web",
        "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    }
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(SftError, match=r"\['id', 'source'\].*extra_fields: ignore"):
        read_source(SourceConfig(path=str(path)))
    examples = read_source(SourceConfig(path=str(path), extra_fields="ignore")).examples
    assert [m["content"] for m in examples[0].messages] == ["a", "b"]
