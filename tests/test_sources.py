"""Sources beyond plain files, and what a source can say about its rows: Hugging Face datasets (saved to disk, and
the hub path offline), weights for mixing, a column mapping, a user template over arbitrary columns, and tool calls
in the messages format (tokenized with the real Qwen2.5 tokenizer, whose template renders them).

Real files come from tests/fixtures through `shared()`; everything else is written into `tmp_path`. Nothing
here touches the network: the hub path is tested offline, and its online branch through a stand-in for
`datasets.load_dataset`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sft.config import DataConfig, SourceConfig
from sft.data import load_dataset, read_source
from sft.errors import SftError
from tests.conftest import shared
from tests.test_data import write_jsonl

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def read(path: Path | str, **options):
    return read_source(SourceConfig(path=str(path), **options))


def fails(path: Path | str, *fragments: str, **options) -> str:
    """Reading the source raises SftError (nothing else) whose message holds every fragment."""
    with pytest.raises(SftError) as info:
        read(path, **options)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def qa(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def answers(examples) -> list[str]:
    return [e.messages[-1]["content"] for e in examples]


def save(rows: list[dict], path: Path) -> Path:
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets saved to disk


def test_a_saved_dataset_reads_like_the_file_it_came_from(tmp_path):
    path = shared("datasets/llamafactory/alpaca_en_demo.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    folder = save(raw, tmp_path / "alpaca")
    source, from_file = read(folder), read(path)
    assert source.format == "alpaca" and source.path == folder
    assert len(source.examples) == 999
    assert [e.messages for e in source.examples] == [e.messages for e in from_file.examples]
    assert [e.where for e in source.examples[:2]] == [f"{folder} row 0", f"{folder} row 1"]


def test_a_saved_dataset_hash_follows_its_content_not_its_folder(tmp_path):
    a = read(save([qa(1), qa(2)], tmp_path / "a")).sha256
    b = read(save([qa(1), qa(2)], tmp_path / "b")).sha256
    c = read(save([qa(1), qa(3)], tmp_path / "c")).sha256
    assert a == b != c
    data = lambda: load_dataset(DataConfig(train=str(tmp_path / "a"), eval=str(tmp_path / "c")))  # noqa: E731
    first = data().fingerprint()
    save([qa(1), qa(4)], tmp_path / "a2")
    (tmp_path / "a").rename(tmp_path / "old")
    (tmp_path / "a2").rename(tmp_path / "a")
    assert data().fingerprint() != first


def test_a_saved_dataset_dict_gives_its_train_split_or_the_one_named(tmp_path):
    folder = tmp_path / "dd"
    splits = {"train": [qa(1), qa(2), qa(3)], "test": [qa(9)]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(folder))
    train = read(folder)
    assert answers(train.examples) == ["answer 1", "answer 2", "answer 3"]
    assert train.examples[0].where == f"{folder} split train row 0"
    test = read(folder, split="test")
    assert answers(test.examples) == ["answer 9"] and test.sha256 != train.sha256
    data = load_dataset(DataConfig(train=str(folder), eval=[{"path": str(folder), "split": "test"}]))
    assert (len(data.train), len(data.eval)) == (3, 1)


def test_saved_dataset_misuse_is_explained(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({"test": datasets.Dataset.from_list([qa(1)])}).save_to_disk(str(folder))
    fails(folder, f"{folder}: the saved DatasetDict has no split 'train'", "expected one of ['test']", "set split")
    single = save([qa(1)], tmp_path / "single")
    fails(single, "split 'validation' given", "one saved Dataset, not a DatasetDict", split="validation")
    fails(single, "subset 'en' selects a hub dataset's configuration", subset="en")
    empty = tmp_path / "empty"
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(empty))  # datasets 5.2 cannot load it back
    fails(empty, f"{empty}: ")
    (single / "state.json").write_text("{not json", encoding="utf-8")
    fails(single, f"{single}: looks like a saved Hugging Face dataset but does not load")


def test_a_saved_dataset_row_error_names_the_folder_split_and_row(tmp_path):
    folder = tmp_path / "dd"
    rows = [{"instruction": "i", "output": "o"}, {"instruction": "i", "output": ""}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))
    fails(folder, f"{folder} split train row 1, instruction/output[1]: empty assistant turn")


def test_a_saved_dataset_with_tool_calls_in_a_struct_column(tmp_path):
    # Arrow gives every turn every struct field: the null tool_calls of plain turns lose nothing.
    call = {"type": "function", "id": "c1", "function": {"name": "add", "arguments": '{"a": 2}'}}
    turns = [
        {"role": "user", "content": "add", "tool_calls": None},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "2", "tool_calls": None},
        {"role": "assistant", "content": "2", "tool_calls": None},
    ]
    [example] = read(save([{"messages": turns}], tmp_path / "calls")).examples
    assert example.messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "id": "c1", "function": {"name": "add", "arguments": {"a": 2}}}],
    }
    assert [set(m) for m in example.messages[2:]] == [{"role", "content"}] * 2


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face hub datasets


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Offline mode, as the environment variables set it, and as datasets and huggingface_hub read them at import."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.chdir(tmp_path)  # the id must not exist as a local path


def test_a_hub_id_offline_is_a_clear_error(offline):
    hub_id = "sft-tests-nobody/no-such-dataset"
    message = fails(
        hub_id,
        f"{hub_id}: no such local file or folder",
        "as a Hugging Face hub dataset (subset None, split 'train') it could not be reached",
        "save it with save_to_disk where you are online",
    )
    assert "ConnectionError" in message
    fails(hub_id, "(subset 'de', split 'test')", subset="de", split="test")


def test_a_hub_id_is_loaded_with_subset_and_split_and_hashed_by_fingerprint(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"prompt": "2+2=", "completion": f" {4 + len(calls)}"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = read("owner/name", subset="main", split="validation")
    assert calls == [("owner/name", "main", "validation")]
    assert source.format == "prompt_completion" and source.path == Path("owner/name")
    assert source.examples[0].where == "owner/name split validation row 0"
    assert source.examples[0].completion == " 5"
    assert read("owner/name", subset="main", split="validation").sha256 != source.sha256  # another fingerprint
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name, split: datasets.Dataset.from_dict({"text": []}))
    fails("owner/name", "owner/name split train: no rows; expected at least one")


def test_a_missing_local_file_is_not_mistaken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fails("data/train.jsonl", "data file not found: data/train.jsonl")
    fails(tmp_path / "owner" / "name", "data file not found")  # an absolute path is never a hub id


def test_split_or_subset_on_data_files_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [qa(1)])
    fails(path, "split and subset select from a Hugging Face dataset", "data files", split="test")
    fails(path, "split and subset select from a Hugging Face dataset", subset="en")
    assert read(path, split="train").format == "messages"  # the default, as a resolved config.yaml spells it


# ---------------------------------------------------------------------------------------------------------------
# Weights


def test_a_fraction_subsamples_without_replacement_deterministically(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [qa(i) for i in range(10)])
    evals = write_jsonl(tmp_path / "eval.jsonl", [qa(100)])

    def taken(seed: int) -> list[str]:
        config = DataConfig(train=[{"path": str(train), "weight": 0.5}], eval=str(evals), seed=seed)
        data = load_dataset(config)
        assert (data.sources[0].used, data.sources[0].held_out, data.sources[1].used) == (5, 0, 1)
        return [e.where for e in data.train]

    first = taken(0)
    assert len(first) == len(set(first)) == 5
    assert first == sorted(first, key=lambda w: int(w.split()[-1]))  # kept in file order
    assert taken(0) == first and taken(1) != first


def test_rounding_is_half_up_and_a_weight_that_rounds_to_nothing_is_refused(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [qa(i) for i in range(5)])
    evals = str(write_jsonl(tmp_path / "eval.jsonl", [qa(100)]))
    data = load_dataset(DataConfig(train=[{"path": str(train), "weight": 0.5}], eval=evals))
    assert len(data.train) == 3  # 2.5 -> 3
    with pytest.raises(SftError, match=r"weight 0.05 of its 5 training row\(s\) rounds to 0 rows; expected a weight"):
        load_dataset(DataConfig(train=[{"path": str(train), "weight": 0.05}], eval=evals))


def test_a_weight_above_one_repeats_whole_copies_plus_a_sampled_remainder(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [qa(i) for i in range(4)])
    other = write_jsonl(tmp_path / "other.jsonl", [qa(i) for i in range(10, 13)])
    evals = write_jsonl(tmp_path / "eval.jsonl", [qa(100)])
    config = DataConfig(train=[{"path": str(train), "weight": 2.5}, str(other)], eval=str(evals))
    data = load_dataset(config)
    counts = Counter(e.where for e in data.train if e.where.startswith(str(train)))
    assert sum(counts.values()) == 10 and len(counts) == 4
    assert sorted(counts.values()) == [2, 2, 3, 3]
    assert [s.used for s in data.sources] == [10, 3, 1]
    assert data.warnings == []  # a weight's copies are on purpose, not duplicates


def test_the_split_comes_first_so_eval_holds_no_copies_and_does_not_move_with_the_weight(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [qa(i) for i in range(20)])

    def data(weight: float):
        return load_dataset(DataConfig(train=[{"path": str(train), "weight": weight}], eval_fraction=0.25, seed=3))

    plain, tripled = data(1.0), data(3.0)
    assert [e.where for e in tripled.eval] == [e.where for e in plain.eval]
    assert len(tripled.eval) == len({e.where for e in tripled.eval}) == 5
    assert not {e.where for e in tripled.eval} & {e.where for e in tripled.train}
    assert Counter(e.where for e in tripled.train) == {e.where: 3 for e in plain.train}
    assert (tripled.sources[0].used, tripled.sources[0].held_out) == (45, 5)


def test_the_fingerprint_follows_weights_mappings_and_the_seed(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"q": f"q{i}", "a": f"a{i}"} for i in range(10)])
    mapped = {"path": str(path), "columns": {"instruction": "q", "output": "a"}}
    templated = {"path": str(path), "template": {"user": "{q}", "assistant": "{a}"}}

    def fingerprint(source: dict, seed: int = 0) -> str:
        return load_dataset(DataConfig(train=[source], seed=seed)).fingerprint()

    prints = [fingerprint(mapped), fingerprint(mapped | {"weight": 2}), fingerprint(templated), fingerprint(mapped, 1)]
    assert len(set(prints)) == 4
    assert fingerprint(mapped) == prints[0]


def test_weights_are_for_training_sources_only_and_positive(tmp_path):
    with pytest.raises(ValidationError, match="eval source 0 has a weight; weights mix training sources only"):
        DataConfig(train="t.jsonl", eval=[{"path": "e.jsonl", "weight": 2}])
    for weight in (0, -1):
        with pytest.raises(ValidationError, match="greater than 0"):
            DataConfig(train=[{"path": "t.jsonl", "weight": weight}])


# ---------------------------------------------------------------------------------------------------------------
# Column mapping


def test_a_column_mapping_turns_a_real_file_into_a_known_format():
    # torchtune's instruct_tiny.json says `response` where Alpaca says `output`: unmapped it matches no format.
    path = shared("datasets/torchtune/instruct_tiny.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    source = read(path, columns={"output": "response"})
    assert source.format == "alpaca"
    assert answers(source.examples) == [r["response"] for r in raw]
    assert source.examples[0].messages[0] == {"role": "user", "content": raw[0]["instruction"]}


def test_a_column_mapping_on_csv_and_on_a_messages_column(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nWhat is 2+2?,4\n", encoding="utf-8")
    [example] = read(path, columns={"instruction": "question", "output": "answer"}).examples
    assert [m["content"] for m in example.messages] == ["What is 2+2?", "4"]
    dialog = write_jsonl(tmp_path / "d.jsonl", [{"dialog": qa(1)["messages"]}])
    source = read(dialog, columns={"messages": "dialog"})
    assert source.format == "messages" and answers(source.examples) == ["answer 1"]


def test_a_mapped_column_missing_from_a_row_names_both_names(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}, {"question": "q"}])
    fails(
        path,
        f"{path} line 2: column 'answer' (mapped to field 'output' by columns) is missing",
        "the row has columns ['question']",
        columns={"instruction": "question", "output": "answer"},
    )


def test_column_mapping_misuse(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a", "output": "o"}])
    fails(path, "columns maps 'ouput', a field no format reads (did you mean 'output'?)", columns={"ouput": "answer"})
    fails(path, "columns maps 'text', a field format 'alpaca' reads", format="alpaca", columns={"text": "answer"})
    fails(
        path,
        "line 1: the row has a column 'output' and a column 'answer' that columns maps to 'output'",
        columns={"instruction": "question", "output": "answer"},
    )
    with pytest.raises(ValidationError, match=r"columns maps several fields to column\(s\) \['q'\]"):
        SourceConfig(path="x", columns={"instruction": "q", "output": "q"})


def test_an_error_about_a_mapped_field_also_names_the_column(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": None}])
    fails(
        path,
        "line 1: field 'output' must be a string, got NoneType",
        "(mapped by columns: 'output' is column 'answer')",
        columns={"instruction": "question", "output": "answer"},
    )


# ---------------------------------------------------------------------------------------------------------------
# A user template over arbitrary columns

TRANSLATE = {"user": "Translate to French: {english}", "assistant": "{french}"}


def test_a_template_builds_a_conversation_from_any_columns(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"english": "cat", "french": "chat", "n": 3}])
    template = TRANSLATE | {"system": "Translate {n} word(s). Braces: {{literal}}"}
    source = read(path, template=template)
    assert source.format == "template"
    [example] = source.examples
    assert example.kind == "chat" and example.where == f"{path} line 1"
    assert example.messages == [
        {"role": "system", "content": "Translate 3 word(s). Braces: {literal}"},
        {"role": "user", "content": "Translate to French: cat"},
        {"role": "assistant", "content": "chat"},
    ]


def test_template_values_are_inserted_verbatim():
    # identity.json's answers hold {{name}} and {{author}}: text to keep, never template syntax.
    path = shared("datasets/llamafactory/identity.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    template = {"user": "{instruction}", "assistant": "{output}"}
    source = read(path, template=template, extra_fields="ignore")
    assert answers(source.examples) == [r["output"] for r in raw]
    assert "Hello! I am {{name}}, an AI assistant developed by {{author}}." in answers(source.examples)[0]


def test_a_value_with_single_braces_or_a_format_spec_stays_literal(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"q": "fill {x} and {0} and {q!r}", "a": "{}"}])
    [example] = read(path, template={"user": "Q: {q}", "assistant": "{a}"}).examples
    assert [m["content"] for m in example.messages] == ["Q: fill {x} and {0} and {q!r}", "{}"]


def test_an_unknown_placeholder_lists_the_available_columns(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"english": "cat", "french": "chat"}])
    fails(
        path,
        f"{path} line 1: template placeholder {{frenchh}} names no column of this row (did you mean 'french'?)",
        "available columns: ['english', 'french']",
        template={"user": "{english}", "assistant": "{frenchh}"},
    )


def test_template_row_problems(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"english": "cat", "french": "chat", "id": 1}])
    fails(path, "line 1: column(s) ['id'] are not used by the template and would be ignored", template=TRANSLATE)
    assert len(read(path, template=TRANSLATE, extra_fields="ignore").examples) == 1
    null = write_jsonl(tmp_path / "n.jsonl", [{"english": "cat", "french": None}])
    fails(null, "line 1: column 'french' is null; the template expected text or a number", template=TRANSLATE)
    listed = write_jsonl(tmp_path / "l.jsonl", [{"english": ["cat"], "french": "chat"}])
    fails(listed, "column 'english' is a list", template=TRANSLATE)
    empty = write_jsonl(tmp_path / "e.jsonl", [{"english": "cat", "french": " "}])
    fails(empty, "line 1, template[1]: empty assistant turn", template=TRANSLATE)
    spec = write_jsonl(tmp_path / "s.jsonl", [{"english": "cat", "french": "chat"}])
    fails(
        spec,
        "line 1: template assistant turn '{french:.2f}':",
        template={"user": "{english}", "assistant": "{french:.2f}"},
    )


def test_an_empty_system_turn_is_dropped(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"sys": "", "english": "cat", "french": "chat"}])
    [example] = read(path, template=TRANSLATE | {"system": "{sys}"}).examples
    assert [m["role"] for m in example.messages] == ["user", "assistant"]


@pytest.mark.parametrize(
    "template, fragment",
    [
        ({"user": "{english", "assistant": "{french}"}, "not a valid str.format template"),
        ({"user": "{}", "assistant": "{french}"}, "placeholder {} must name a column"),
        ({"user": "{0}", "assistant": "{french}"}, "placeholder {0} must name a column"),
        ({"user": "{row.english}", "assistant": "{french}"}, "placeholder {row.english} must name a column"),
        ({"user": "{row[0]}", "assistant": "{french}"}, "must name a column"),
        ({"user": "{english:{width}}", "assistant": "{french}"}, "nested placeholder"),
        ({"user": "{english}"}, "assistant"),
        ({"user": "{english}", "assistant": "{french}", "assistent": "x"}, "assistent"),
    ],
)
def test_a_bad_template_is_a_config_error(template, fragment):
    with pytest.raises(ValidationError, match="template") as info:
        SourceConfig(path="x.jsonl", template=template)
    assert fragment in str(info.value)


def test_template_format_and_columns_are_exclusive_and_round_trip():
    with pytest.raises(ValidationError, match="template builds the conversation itself; drop format 'alpaca'"):
        SourceConfig(path="x", format="alpaca", template=TRANSLATE)
    with pytest.raises(ValidationError, match="format 'template' needs a template"):
        SourceConfig(path="x", format="template")
    with pytest.raises(ValidationError, match="template names the file's columns directly; drop columns"):
        SourceConfig(path="x", template=TRANSLATE, columns={"output": "y"})
    config = SourceConfig(path="x", template=TRANSLATE, weight=2)
    assert config.format == "template"
    assert SourceConfig.model_validate(config.model_dump(mode="json")) == config  # a resolved config.yaml reloads


# ---------------------------------------------------------------------------------------------------------------
# Tool calls in the messages format

CALL = {"type": "function", "id": "call_1", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def tool_row(call: dict = CALL, content=None) -> dict:
    return {
        "messages": [
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": content, "tool_calls": [call]},
            {"role": "tool", "content": "5", "name": "add", "tool_call_id": "call_1"},
            {"role": "assistant", "content": "2 + 3 = 5."},
        ],
        "tools": TOOLS,
    }


def test_tool_calls_and_tool_turn_keys_are_kept_with_arguments_as_an_object(tmp_path):
    as_object = CALL | {"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    path = write_jsonl(tmp_path / "t.jsonl", [tool_row(), tool_row(as_object, content=""), tool_row(content="Let me.")])
    first, second, third = read(path).examples
    expected_call = {"type": "function", "id": "call_1", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    assert first.messages[1] == {"role": "assistant", "content": "", "tool_calls": [expected_call]}
    assert first.messages[2] == {"role": "tool", "content": "5", "name": "add", "tool_call_id": "call_1"}
    assert second.messages == first.messages
    assert third.messages[1]["content"] == "Let me."
    assert first.tools == TOOLS


def test_a_call_without_type_or_id_is_normalised(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [tool_row({"function": {"name": "add", "arguments": "{}"}})])
    calls = read(path).examples[0].messages[1]["tool_calls"]
    assert calls == [{"type": "function", "function": {"name": "add", "arguments": {}}}]


@pytest.mark.parametrize(
    "call, fragment",
    [
        ({"type": "function"}, "tool_calls[0]: expected an object with a 'function' object"),
        ("add(2, 3)", "tool_calls[0]: expected an object with a 'function' object"),
        (CALL | {"type": "retrieval"}, "tool call type 'retrieval' is not supported; expected 'function'"),
        (CALL | {"index": 0}, "key(s) ['index'] would be ignored"),
        (CALL | {"function": {"name": "add", "arguments": "{}", "strict": True}}, "['function.strict']"),
        (CALL | {"function": {"name": "", "arguments": "{}"}}, "'function.name' must be a non-empty string"),
        (CALL | {"function": {"name": "add", "arguments": "{a: 2}"}}, "'function.arguments' is a string but not JSON"),
        (
            CALL | {"function": {"name": "add", "arguments": "[2, 3]"}},
            "must be a JSON object (or a JSON string of one)",
        ),
        (CALL | {"function": {"name": "add"}}, "'function.arguments' must be a JSON object"),
        (CALL | {"id": 7}, "field 'id' must be a string"),
    ],
)
def test_a_malformed_tool_call_is_refused(tmp_path, call, fragment):
    path = write_jsonl(tmp_path / "t.jsonl", [tool_row(call)])
    fails(path, f"{path} line 1, messages[1]", fragment)


def test_tool_call_lists_and_turn_keys_in_the_wrong_place(tmp_path):
    for calls in ([], "add", {"function": {}}):
        row = tool_row()
        row["messages"][1]["tool_calls"] = calls
        fails(write_jsonl(tmp_path / "t.jsonl", [row]), "messages[1]: 'tool_calls' must be a list of calls")
    row = tool_row()
    row["messages"][0]["tool_call_id"] = "x"
    fails(
        write_jsonl(tmp_path / "u.jsonl", [row]), "messages[0]: key(s) ['tool_call_id'] would be ignored", "tool turns"
    )
    row = tool_row()
    row["messages"][2]["name"] = 3
    fails(write_jsonl(tmp_path / "v.jsonl", [row]), "messages[2]: field 'name' must be a string, got int 3")


def test_an_assistant_turn_with_neither_content_nor_tool_calls_is_empty(tmp_path):
    for turn in ({"role": "assistant", "content": ""}, {"role": "assistant", "content": None, "tool_calls": None}):
        row = {"messages": [{"role": "user", "content": "hi"}, turn]}
        fails(write_jsonl(tmp_path / "t.jsonl", [row]), "line 1, messages[1]: empty assistant turn")


def test_sharegpt_turns_still_refuse_tool_keys(tmp_path):
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "", "tool_calls": [CALL]}]
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"conversations": turns}]), encoding="utf-8")
    fails(path, "conversations[1]: key(s) ['tool_calls'] would be ignored; expected only 'from' and 'value'")


def test_a_tool_call_tokenizes_with_qwen2_5_and_the_call_is_trained_up_to_im_end(tmp_path):
    from transformers import AutoTokenizer

    from sft.tokenize import IGNORE, tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(shared("tokenizers/qwen2_5"))
    path = write_jsonl(tmp_path / "t.jsonl", [tool_row()])
    tokenized = tokenize_examples(read(path).examples, tokenizer, max_length=4096)
    [row] = tokenized.rows
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            spans, current = [*spans, current], []
    spans += [current] if current else []
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>'
    assert [tokenizer.decode(s) for s in spans] == [call, "2 + 3 = 5.<|im_end|>"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [s[-1] for s in spans] == [im_end, im_end]
    assert tokenized.stats.trained_tokens == sum(map(len, spans))
    text = tokenizer.decode(row["input_ids"])
    assert "<tools>\n" + json.dumps(TOOLS[0]) in text  # the tools column reached the template
    assert "<tool_response>\n5\n</tool_response>" in text


# ---------------------------------------------------------------------------------------------------------------
# Whatever a tool call or a templated row holds, the loader either reads it or raises SftError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
function = st.fixed_dictionaries(
    {"name": st.just("add") | json_values, "arguments": st.sampled_from(['{"a": 1}', {"a": 1}]) | json_values}
)
call = st.fixed_dictionaries(
    {"function": function | json_values},
    optional={"type": st.just("function") | json_values, "id": st.just("c1") | json_values},
)
fuzz = settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@fuzz
@given(
    calls=st.lists(call, max_size=2) | json_values,
    content=st.sampled_from([None, "", "Let me."]) | json_values,
    tool_turn=st.sampled_from([None, "c1"]) | json_values,
)
def test_any_tool_calls_are_read_or_refused_with_sft_error(tmp_path, calls, content, tool_turn):
    row = tool_row()
    row["messages"][1] |= {"tool_calls": calls, "content": content}
    row["messages"][2] |= {"tool_call_id": tool_turn}
    path = write_jsonl(tmp_path / "fuzz.jsonl", [row])
    try:
        [example] = read(path).examples
    except SftError as err:
        assert str(path) in str(err)
        return
    assistant = example.messages[1]
    assert isinstance(assistant["content"], str)
    assert assistant["content"].strip() or assistant["tool_calls"]
    for normalised in assistant.get("tool_calls", []):
        assert normalised["type"] == "function" and isinstance(normalised["function"]["arguments"], dict)


@fuzz
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {"a": st.text(max_size=8) | json_values, "b": st.text(max_size=8) | json_values},
            optional={"c": st.text(max_size=8) | json_values, "{a}": json_values},
        ),
        min_size=1,
        max_size=3,
    )
)
def test_any_templated_rows_are_read_or_refused_with_sft_error(tmp_path, rows):
    path = write_jsonl(tmp_path / "fuzz.jsonl", rows)
    try:
        source = read(path, template={"system": "{{c}}", "user": "{a}", "assistant": "{b}!"}, extra_fields="ignore")
    except SftError as err:
        assert str(path) in str(err)
        return
    for row, example in zip(rows, source.examples):
        assert example.messages[0] == {"role": "system", "content": "{c}"}
        assert example.messages[-1]["content"] == f"{row['b']}!"


def test_sharegpt_role_map_extends_the_usual_roles(tmp_path):
    path = tmp_path / "chat.json"
    turns = [{"from": "customer", "value": "hi"}, {"from": "bot", "value": "hello"}]
    path.write_text(json.dumps([{"conversations": turns}]))
    with pytest.raises(SftError, match="unknown role 'customer'"):
        read_source(SourceConfig(path=str(path)))
    source = read_source(SourceConfig(path=str(path), roles={"customer": "user", "bot": "assistant"}))
    assert [m["role"] for m in source.examples[0].messages] == ["user", "assistant"]
    with pytest.raises(ValueError):
        SourceConfig(path=str(path), roles={"bot": "robot"})
