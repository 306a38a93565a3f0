"""The tokenized-data cache: a hit gives the same tokens; anything that changes the tokens misses."""

from __future__ import annotations

import pytest

from sft.config import ModelConfig, TinyModelSpec
from sft.data import Example
from sft.data.cache import tokenize_cached
from sft.data.demo import make_reverse_rows
from sft.model import load_tokenizer
from sft.model.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import random

    path = tmp_path_factory.mktemp("tok") / "tiny"
    rows = make_reverse_rows(200, random.Random(0))
    build_tiny_model(
        TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        path,
        [m["content"] for r in rows for m in r["messages"]],
    )
    return load_tokenizer(ModelConfig(name_or_path=str(path)))


def examples(n: int = 20, answer: str = "b a") -> list[Example]:
    return [
        Example(
            kind="chat",
            where=f"t line {i}",
            messages=[
                {"role": "user", "content": f"reverse: a b {i}"},
                {"role": "assistant", "content": answer},
            ],
        )
        for i in range(n)
    ]


def test_second_run_hits_and_gives_identical_tokens(tokenizer, tmp_path):
    cold, hit = tokenize_cached(examples(), tokenizer, 64, "drop", str(tmp_path))
    warm, hit2 = tokenize_cached(examples(), tokenizer, 64, "drop", str(tmp_path))
    assert (hit, hit2) == (False, True)
    assert warm.rows == cold.rows and warm.end_tokens == cold.end_tokens
    assert warm.stats.summary() == cold.stats.summary()
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize(
    "change",
    ["content", "max_length", "on_too_long", "chat_template", "special_tokens"],
)
def test_anything_that_changes_the_tokens_misses(tokenizer, tmp_path, change):
    tokenize_cached(examples(), tokenizer, 64, "drop", str(tmp_path))
    rows, max_length, policy, tok = examples(), 64, "drop", tokenizer
    if change == "content":
        rows = examples(answer="a b")
    elif change == "max_length":
        max_length = 63
    elif change == "on_too_long":
        policy = "error"
    else:
        tok = load_tokenizer(ModelConfig(name_or_path=tokenizer.name_or_path))
        if change == "chat_template":
            tok.chat_template = tokenizer.chat_template.replace("\n", "\n\n", 1)
        else:
            tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    _, hit = tokenize_cached(rows, tok, max_length, policy, str(tmp_path))
    assert not hit
    assert len(list(tmp_path.iterdir())) == 2


def test_no_cache_dir_writes_nothing_and_partial_entries_are_ignored(tokenizer, tmp_path):
    _, hit = tokenize_cached(examples(), tokenizer, 64, "drop", None)
    assert not hit
    tokenize_cached(examples(), tokenizer, 64, "drop", str(tmp_path))
    (entry,) = tmp_path.iterdir()
    (entry / "meta.json").unlink()  # as if the process died while writing
    _, hit = tokenize_cached(examples(), tokenizer, 64, "drop", str(tmp_path))
    assert not hit
