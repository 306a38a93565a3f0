"""`sft.inspect_data`: per-source counts agree with `tokenize_examples`, and the marked text is exactly what is trained.

Expectations are independent of the code under test: answers are read from the data files themselves, counts from
`tokenize_examples` run directly on each file's examples.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from sft.config import load_config, validate_config
from sft.data import Example, load_dataset
from sft.model import load_tokenizer
from sft.pipeline.inspect import format_report, inspect, render_trained
from sft.tokenize import tokenize_examples
from tests.conftest import ROOT, shared

ANSI = re.compile(r"\x1b\[[0-9;]*m")
BRACKETED = re.compile(r"\[\[(.*?)\]\]", re.S)
TRAIN, EVAL = ROOT / "data/reverse/train.jsonl", ROOT / "data/reverse/eval.jsonl"


def demo_config(model_dir, *overrides: str):
    """configs/tiny.yaml with the stand-in model built in a temporary folder and absolute data paths."""
    base = [f"model.name_or_path={model_dir}", f"data.train={TRAIN}", f"data.eval={EVAL}"]
    return load_config(ROOT / "configs/tiny.yaml", [*base, *overrides])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("inspect") / "tiny-llama"  # built by the first inspect() that needs it


def blocks(text: str) -> list[tuple[str, str]]:
    """(header, body) of each rendered example in a format_report text."""
    return [tuple(b.split("\n", 1)) for b in text.split("\n--- ")[1:]]


@pytest.mark.parametrize("max_length", [64, 31])  # 64: every row kept; 31: rows are 25-35 tokens, some dropped
def test_demo_counts_match_tokenize_examples_and_brackets_hold_the_answers(model_dir, max_length):
    config = demo_config(model_dir, f"data.max_length={max_length}")
    report = inspect(config, examples=5)
    assert (model_dir / "config.json").is_file()
    json.dumps(report)  # JSON-able as it is

    tokenizer = load_tokenizer(config.model)
    dataset = load_dataset(config.data)
    assert [s["path"] for s in report["sources"]] == [str(TRAIN), str(EVAL)]
    assert [s["split"] for s in report["sources"]] == ["train", "eval"]
    totals = dict.fromkeys(["rows", "examples", "tokens", "trained_tokens", "dropped_too_long"], 0)
    for got, source in zip(report["sources"], dataset.sources, strict=True):
        direct = tokenize_examples(source.examples, tokenizer, max_length).stats
        assert got["format"] == "messages"
        assert got["rows"] == len(source.examples) == len(source.path.read_text().splitlines())
        assert got["examples"] + got["dropped_too_long"] == got["rows"]
        for key in ("examples", "tokens", "trained_tokens", "dropped_too_long"):
            assert got[key] == getattr(direct, key), key
            totals[key] += got[key]
        totals["rows"] += got["rows"]
        ordered = sorted(direct.lengths)
        assert got["length_p100"] == ordered[-1] <= max_length
        assert got["length_p50"] == ordered[len(ordered) // 2]
        assert got["length_p50"] <= got["length_p90"] <= got["length_p95"] <= got["length_p99"] <= got["length_p100"]
        assert got["trained_fraction"] == round(direct.trained_tokens / direct.tokens, 4)
    for key, value in totals.items():
        assert report["total"][key] == value, key
    if max_length == 31:
        assert report["total"]["dropped_too_long"] > 0
    else:
        assert report["total"]["dropped_too_long"] == 0

    # The first five rows of the train file, each marked with exactly its answer and the end-of-turn token.
    answers = [json.loads(line)["messages"][-1]["content"] for line in TRAIN.read_text().splitlines()[:5]]
    text = format_report(report, color=False)
    assert ANSI.search(text) is None
    shown = blocks(text)
    assert [header.split(" (")[0] for header, _ in shown] == [f"{TRAIN} line {i}" for i in range(1, 6)]
    for (header, body), answer, example in zip(shown, answers, report["examples"], strict=True):
        assert BRACKETED.findall(body) == [answer + "<|im_end|>"]
        assert "<|im_start|>" in body  # special tokens are shown
        assert ("over max_length" in header) == example["too_long"] == (example["tokens"] > max_length)


def test_colour_marks_trained_text_green_and_plain_text_has_no_escape_codes(model_dir):
    report = inspect(demo_config(model_dir), examples=2)
    plain, colour = format_report(report, color=False), format_report(report, color=True)
    assert ANSI.search(plain) is None and "\x1b" not in plain
    assert ANSI.search(colour) is not None
    assert "[[" not in ANSI.sub("", colour.split("\n--- ", 1)[1])  # colour replaces the brackets, not adds to them
    answer = json.loads(TRAIN.read_text().splitlines()[0])["messages"][-1]["content"]
    assert f"\x1b[32m{answer}<|im_end|>\x1b[0m" in colour
    # Stripped of its codes, the colour text is the plain text without brackets.
    for example in report["examples"]:
        assert ANSI.sub("", example["color"]) == example["text"].replace("[[", "").replace("]]", "")


def test_examples_zero_renders_nothing(model_dir):
    report = inspect(demo_config(model_dir), examples=0)
    assert report["examples"] == []
    assert "\n--- " not in format_report(report, color=False)


# ---------------------------------------------------------------------------------------------------------------
# The real Qwen2.5 tokenizer


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """The Qwen2.5 tokenizer files with the model's config.json beside them: what check_vocab needs."""
    folder = tmp_path_factory.mktemp("qwen2_5")
    for file in shared("tokenizers/qwen2_5").iterdir():
        shutil.copy(file, folder / file.name)
    shutil.copy(shared("configs/qwen2_5_0_5b_instruct_config.json"), folder / "config.json")
    return folder


def test_qwen_alpaca_brackets_are_exactly_the_output_and_im_end(qwen_dir):
    data = shared("datasets/llamafactory/alpaca_en_demo.json")
    config = validate_config({"model": {"name_or_path": str(qwen_dir)}, "data": {"train": str(data)}})
    report = inspect(config, examples=10)
    rows = json.loads(data.read_text(encoding="utf-8"))
    (source,) = report["sources"]
    assert (source["format"], source["rows"], source["split"]) == ("alpaca", len(rows), "train")
    assert source["examples"] + source["dropped_too_long"] == len(rows)
    assert source["trained_tokens"] < source["tokens"]

    text = format_report(report, color=False)
    shown = blocks(text)
    assert len(shown) == 10
    for i, ((header, body), row) in enumerate(zip(shown, rows)):
        assert header.startswith(f"{data} row {i} (")
        assert BRACKETED.findall(body) == [row["output"] + "<|im_end|>"]
        assert body.rstrip("\n").endswith(f"[[{row['output']}<|im_end|>]]")
        assert body.startswith("<|im_start|>system\nYou are Qwen")  # the template's default system turn, untrained
        assert row["instruction"] in body.split("[[")[0]


def test_qwen_multibyte_answer_is_decoded_whole(qwen_dir):
    config = validate_config({"model": {"name_or_path": str(qwen_dir)}, "data": {"train": "unused.jsonl"}})
    tokenizer = load_tokenizer(config.model)
    answer = "Café – 日本語の答え 😀👍🏽 ok"
    messages = [{"role": "user", "content": "naïve question ¿qué?"}, {"role": "assistant", "content": answer}]
    (row,) = tokenize_examples([Example(kind="chat", where="t", messages=messages)], tokenizer, 1024).rows
    plain = render_trained(tokenizer, row["input_ids"], row["labels"], color=False)
    assert "\ufffd" not in plain
    assert BRACKETED.findall(plain) == [answer + "<|im_end|>"]
    assert plain.replace("[[", "").replace("]]", "") == tokenizer.decode(row["input_ids"], skip_special_tokens=False)
    colour = render_trained(tokenizer, row["input_ids"], row["labels"], color=True)
    assert f"\x1b[32m{answer}<|im_end|>\x1b[0m" in colour
