"""Real chat templates: masks across model families, and renderings against ollama's golden files.

The templates come from TRL (`chat_templates/trl/*.jinja`, plain and `*_training` with `{% generation %}` markers)
and ollama's template index; they run on the Qwen2.5 vocabulary with each family's special tokens added. For every
assistant turn the trained span must be the answer's tokens followed by the family's end-of-turn token; the plain
and `_training` variants must give identical rows; and where the `_training` variant has generation markers,
transformers' own assistant mask (an independent oracle) must agree, up to the whitespace a template writes around
the answer that the model never generates.
"""

from __future__ import annotations

import functools
import json

import pytest
from transformers import AutoTokenizer

from sft.data import Example
from sft.errors import SftError
from sft.tokenize import IGNORE, prompt_ids, render, tokenize_examples
from tests.conftest import shared
from tests.test_tokenize import CHATML, QWEN_DEFAULT_SYSTEM, check_row, decode, ids_of, spans

# name: special tokens the template writes, BOS it writes (None: none), end-of-turn token, system role allowed
FAMILIES = {
    "llama3": (["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", True),
    "llama3_1": (["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", True),
    "phi3": (["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|end|>", True),
    "gemma": (["<start_of_turn>", "<end_of_turn>"], "<bos>", "<end_of_turn>", False),
    "qwen2_5": ([], None, "<|im_end|>", True),
    "qwen3": ([], None, "<|im_end|>", True),
}
TRAINING_VARIANT = {"llama3", "phi3", "gemma", "qwen2_5", "qwen3"}  # those with a *_training.jinja
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"  # Qwen3 writes it in front of the answers after the last user turn


@functools.cache  # read-only below: nothing in this file changes a tokenizer it gets
def family_tokenizer(name: str, template: str):
    extra, bos, _, _ = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(shared("tokenizers/qwen2_5"))
    tokens: dict = {"additional_special_tokens": extra}
    if bos is not None:
        tokens["bos_token"] = bos
    tokenizer.add_special_tokens(tokens)
    tokenizer.chat_template = shared(f"chat_templates/trl/{template}.jinja").read_text()
    return tokenizer


def conversation(name: str, turns: int = 3) -> Example:
    messages = [{"role": "system", "content": "You are terse."}] if FAMILIES[name][3] else []
    for i in range(turns):
        messages += [
            {"role": "user", "content": f"Question {i + 1}: what is {i} + {i}?"},
            {"role": "assistant", "content": f"{i} + {i} = {2 * i}, so the answer is {2 * i}."},
        ]
    return Example(kind="chat", where="test row 1", messages=messages)


def expected_spans(name: str, tokenizer, example: Example, template: str) -> tuple[list[str], list[list[int]]]:
    """Per assistant turn: the text generated before the end-of-turn token, and the token ids that close it."""
    eot = tokenizer.convert_tokens_to_ids(FAMILIES[name][2])
    assert eot != tokenizer.unk_token_id and eot in tokenizer.all_special_ids
    answers = [m["content"] for m in example.messages if m["role"] == "assistant"]
    ends = [[eot] for _ in answers]
    if name == "qwen3":  # the training variant keeps the think block on every turn, the original on the last only
        first = 0 if template.endswith("_training") else len(answers) - 1
        answers = [QWEN3_EMPTY_THINK + a if i >= first else a for i, a in enumerate(answers)]
    return answers, ends


CASES = [(n, n) for n in FAMILIES if n != "qwen3"] + [(n, f"{n}_training") for n in sorted(TRAINING_VARIANT)]


@pytest.mark.parametrize(("name", "template"), CASES, ids=[t for _, t in CASES])
def test_family_masks_train_answers_and_end_of_turn(name, template):
    tokenizer = family_tokenizer(name, template)
    example = conversation(name)
    result = tokenize_examples([example], tokenizer, max_length=4096)
    row = result.rows[0]
    ids = row["input_ids"]
    assert ids == ids_of(tokenizer, render(tokenizer, example.messages))
    bos = FAMILIES[name][1]
    if bos is not None:
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    texts, ends = expected_spans(name, tokenizer, example, template)
    found = check_row(tokenizer, row, texts, ends)
    for (_, end), tail in zip(found, ends):
        assert ids[end - 1] == tail[-1]  # each turn's last trained token is what closes it
    assert result.end_tokens == {ends[-1][-1]}
    prompt = prompt_ids(tokenizer, example)
    assert ids[: len(prompt)] == prompt and len(prompt) == found[-1][0]


@pytest.mark.parametrize("name", sorted(TRAINING_VARIANT - {"qwen3"}))
def test_generation_markers_do_not_change_the_rows(name):
    example = conversation(name)
    plain = tokenize_examples([example], family_tokenizer(name, name), 4096).rows[0]
    training = tokenize_examples([example], family_tokenizer(name, f"{name}_training"), 4096).rows[0]
    assert plain["input_ids"] == training["input_ids"]
    assert plain["labels"] == training["labels"]


def _strip_decoration(tokenizer, ids: list[int], start: int, end: int) -> tuple[int, int]:
    """Drop whitespace-only, non-special tokens from both ends of a span (template newlines around the answer), and
    anything after the span's first special token (Phi-3 marks "<|end|>\n<eos>" at the very end of a conversation:
    the model stops at <|end|>; the closing newline and EOS are never generated)."""
    special = set(tokenizer.all_special_ids)
    end = next((i + 1 for i in range(start, end) if ids[i] in special), end)
    while start < end and ids[start] not in special and not decode(tokenizer, [ids[start]]).strip():
        start += 1
    while end > start and ids[end - 1] not in special and not decode(tokenizer, [ids[end - 1]]).strip():
        end -= 1
    return start, end


@pytest.mark.parametrize("name", sorted(TRAINING_VARIANT))
def test_masks_agree_with_generation_markers(name):
    """transformers' assistant mask from {% generation %} markers, less the newlines the markers enclose around the
    answer (Qwen: the "\\n" after "assistant"; Gemma, Phi-3: the "\\n" after the end-of-turn token; Phi-3's closing
    EOS), is our mask."""
    tokenizer = family_tokenizer(name, f"{name}_training")
    example = conversation(name)
    row = tokenize_examples([example], tokenizer, 4096).rows[0]
    marked = tokenizer.apply_chat_template(
        example.messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert marked["input_ids"] == row["input_ids"]
    oracle = spans([1 if m else IGNORE for m in marked["assistant_masks"]])
    assert len(oracle) == len(spans(row["labels"])) == 3
    assert [_strip_decoration(tokenizer, row["input_ids"], s, e) for s, e in oracle] == spans(row["labels"])


def test_qwen3_original_template_with_several_turns_is_an_error():
    """Qwen3's template writes an empty think block only for answers after the last user turn: an earlier answer
    renders differently once later turns follow, so it cannot be labelled as generated. Use qwen3_training.jinja."""
    tokenizer = family_tokenizer("qwen3", "qwen3")
    with pytest.raises(
        SftError,
        match=r"^test row 1: the chat template renders assistant turn 2 differently .*"
        r"qwen3_training\.jinja",
    ):
        tokenize_examples([conversation("qwen3")], tokenizer, 4096)
    single = conversation("qwen3", turns=1)
    check_row(
        tokenizer,
        tokenize_examples([single], tokenizer, 4096).rows[0],
        [QWEN3_EMPTY_THINK + single.messages[-1]["content"]],
        [[tokenizer.eos_token_id]],
    )


def test_gemma_rejects_a_system_turn_clearly():
    tokenizer = family_tokenizer("gemma", "gemma")
    example = Example(
        kind="chat",
        where="test row 1",
        messages=[
            {"role": "system", "content": "S"},
            {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"},
        ],
    )
    with pytest.raises(SftError, match="the chat template failed to render a conversation: System role not supported"):
        tokenize_examples([example], tokenizer, 4096)


# ---------------------------------------------------------------------------------------------------------------
# ollama golden renderings (template/testdata/<name>.gotmpl/<case>): the same three fixed conversations


SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER1 = {"role": "user", "content": "Hello, how are you?"}
ANSWER1 = {"role": "assistant", "content": "I'm doing great. How can I help you today?"}
USER2 = {"role": "user", "content": "I'd like to show off how chat templating works!"}
GOLDEN_CASES = {
    "user": [USER1],
    "user-assistant-user": [USER1, ANSWER1, USER2],
    "system-user-assistant-user": [SYSTEM, USER1, ANSWER1, USER2],
}
GOLDEN_NAMES = [
    "alpaca",
    "chatml",
    "gemma-instruct",
    "llama2-chat",
    "llama3-instruct",
    "mistral-instruct",
    "phi-3",
    "zephyr",
]
UNMATCHED = {
    "alpaca": "no HF template in the fixtures writes ollama's alpaca layout (index.json's 'alpaca' entry is "
    "Deepseek Coder's, with its own system prompt and <|EOT|>)",
    "llama2-chat": "the HF llama2 templates in index.json differ in whitespace: ' </s>' after answers, and no empty "
    "'<<SYS>><</SYS>>' block when there is no system",
    "mistral-instruct": "the HF mistral templates (index.json, mistral_common/v1*.jinja) write a space before "
    "'[/INST]' ('you? [/INST]') where ollama writes 'you?[/INST] ' (and index.json's reject a system turn)",
}


def golden(name: str, case: str) -> str:
    return shared(f"chat_templates/ollama_golden/{name}/{case}").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_conversations_are_the_ones_inferred(name):
    """Every golden file holds every message of its conversation, in order: the fixed conversations are right."""
    for case, messages in GOLDEN_CASES.items():
        text, at = golden(name, case), 0
        for message in messages:
            at = text.index(message["content"], at) + len(message["content"])
        assert ANSWER1["content"] not in text or ANSWER1 in messages


def index_templates(name: str) -> list[str]:
    index = json.loads(shared("chat_templates/ollama_golden/index.json").read_text())
    return [e["template"] for e in index if e["name"] == name]


@functools.cache
def golden_tokenizer(name: str):
    """A tokenizer and template for a golden name, and the BOS text the template writes but ollama leaves out."""
    if name == "chatml":
        tokenizer = AutoTokenizer.from_pretrained(shared("tokenizers/qwen2_5"))
        assert CHATML in index_templates("chatml")  # plain ChatML, as HF repos ship it
        tokenizer.chat_template = CHATML
        return tokenizer, ""
    if name == "zephyr":
        tokenizer = AutoTokenizer.from_pretrained(shared("tokenizers/qwen2_5"))
        tokenizer.add_special_tokens({"eos_token": "</s>"})
        [tokenizer.chat_template] = [t for t in index_templates("zephyr") if "<|system|>" in t]
        return tokenizer, ""
    trl = {"llama3-instruct": "llama3", "phi-3": "phi3", "gemma-instruct": "gemma"}[name]
    tokenizer = family_tokenizer(trl, trl)
    return tokenizer, tokenizer.bos_token or ""


@pytest.mark.parametrize("case", list(GOLDEN_CASES))
@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_rendering(name, case):
    if name in UNMATCHED:
        pytest.skip(f"{name}: {UNMATCHED[name]}")
    tokenizer, bos = golden_tokenizer(name)
    messages = GOLDEN_CASES[case]
    if name == "gemma-instruct" and messages[0]["role"] == "system":
        # ollama folds the system into the first user turn; Gemma's HF template refuses a system turn.
        with pytest.raises(SftError, match="System role not supported"):
            render(tokenizer, messages, generation_prompt=True)
        return
    expected = bos + golden(name, case)
    assert render(tokenizer, messages, generation_prompt=True) == expected
    # The inference prompt `prompt_ids` builds for a row ending with an answer decodes to that same golden text,
    # and the row trains the answer after it.
    row_messages = [*messages, {"role": "assistant", "content": "It works."}]
    example = Example(kind="chat", where="golden", messages=row_messages)
    prompt = prompt_ids(tokenizer, example)
    assert decode(tokenizer, prompt) == expected
    row = tokenize_examples([example], tokenizer, 4096).rows[0]
    assert row["input_ids"][: len(prompt)] == prompt
    start, end = spans(row["labels"])[-1]
    answer = ids_of(tokenizer, "It works.")
    assert start == len(prompt) and row["input_ids"][start : start + len(answer)] == answer
    assert row["input_ids"][start + len(answer)] in tokenizer.all_special_ids  # then the end-of-turn token


@pytest.mark.parametrize("case", list(GOLDEN_CASES))
def test_qwen2_5_own_template_is_chatml_plus_its_default_system(case):
    tokenizer = AutoTokenizer.from_pretrained(shared("tokenizers/qwen2_5"))
    assert tokenizer.chat_template == shared("chat_templates/trl/qwen2_5.jinja").read_text()
    messages = GOLDEN_CASES[case]
    default = "" if messages[0]["role"] == "system" else f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n"
    assert render(tokenizer, messages, generation_prompt=True) == default + golden("chatml", case)
