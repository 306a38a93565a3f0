"""`tokenize_examples` trains exactly the assistant answers and the template's end-of-turn token, nothing else.

Every check counts tokens against an independent expectation: for each assistant turn the trained span must be the
answer's own tokens followed by the end-of-turn id (`<|im_end|>` 151645 for Qwen2.5), and the spans must be the only
trained positions. Real tokenizers come from tests/fixtures through `shared()`.
Templates from other model families are in test_templates.py.
"""

from __future__ import annotations

import json
import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, GPT2Tokenizer, LlavaConfig, Qwen2Config

from sft.data import Example
from sft.errors import SftError
from sft.model import check_vocab, ensure_pad_token
from sft.tokenize import (
    IGNORE,
    prompt_ids,
    reference_answer,
    render,
    special_tokens,
    tokenize_examples,
)
from tests.conftest import shared

QWEN_EOT = 151645  # <|im_end|>
QWEN_IM_START = 151644
QWEN_ASSISTANT = 77091  # "assistant"
NEWLINE = 198  # "\n" (the same id in GPT-2 and Qwen2.5)
GPT2_EOS = 50256  # <|endoftext|>: GPT-2's bos, eos and unk at once
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def load_qwen():
    return AutoTokenizer.from_pretrained(shared("tokenizers/qwen2_5"))


def load_gpt2():
    # No config.json in the fixture, so AutoTokenizer cannot tell the class: name it.
    return GPT2Tokenizer.from_pretrained(shared("tokenizers/gpt2"))


@pytest.fixture
def qwen():
    return load_qwen()


@pytest.fixture(scope="module")
def qwen_ro():
    """One Qwen2.5 tokenizer for tests (and the hypothesis property) that never modify it."""
    return load_qwen()


@pytest.fixture
def gpt2():
    return load_gpt2()


def chat(*texts: str, system: str | None = None, where: str = "test row 1") -> Example:
    """A conversation from alternating user/assistant texts (ending on the assistant)."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    for i, text in enumerate(texts):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return Example(kind="chat", where=where, messages=messages)


def answers(example: Example) -> list[str]:
    return [m["content"] for m in example.messages if m["role"] == "assistant"]


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def spans(labels: list[int]) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of trained positions."""
    out, start = [], None
    for i, label in enumerate([*labels, IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            out.append((start, i))
            start = None
    return out


def check_row(tokenizer, row: dict, texts: list[str], ends: list[list[int]]) -> list[tuple[int, int]]:
    """The row trains exactly `texts[i]` then `ends[i]` (token ids) per span, in order, and nothing else."""
    ids, labels = row["input_ids"], row["labels"]
    assert len(labels) == len(ids)
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels)), "a label differs from its input id"
    found = spans(labels)
    assert len(found) == len(texts), [decode(tokenizer, ids[s:e]) for s, e in found]
    for (start, end), text, tail in zip(found, texts, ends):
        expected = ids_of(tokenizer, text) + tail
        assert ids[start:end] == expected, (decode(tokenizer, ids[start:end]), text)
        assert decode(tokenizer, ids[start:end]) == unicodedata.normalize("NFC", text) + decode(tokenizer, tail)
    assert sum(label != IGNORE for label in labels) == sum(
        len(ids_of(tokenizer, t)) + len(e) for t, e in zip(texts, ends)
    )
    return found


def tokenize_one(example: Example, tokenizer, max_length: int = 4096) -> dict:
    result = tokenize_examples([example], tokenizer, max_length)
    assert len(result.rows) == 1
    return result.rows[0]


# ---------------------------------------------------------------------------------------------------------------
# Qwen2.5 with its own template (default system prompt)


def test_qwen_fixture_is_what_the_tests_assume(qwen_ro):
    assert len(qwen_ro) == 151665
    assert (qwen_ro.eos_token, qwen_ro.eos_token_id) == ("<|im_end|>", QWEN_EOT)
    assert qwen_ro.bos_token_id is None
    assert qwen_ro.convert_tokens_to_ids(["<|im_start|>", "assistant", "Ċ"]) == [QWEN_IM_START, QWEN_ASSISTANT, NEWLINE]


def test_qwen_single_turn_trains_answer_and_im_end_only(qwen_ro):
    example = chat("What is the capital of France?", "The capital of France is Paris.")
    result = tokenize_examples([example], qwen_ro, max_length=4096)
    row = result.rows[0]
    ids, labels = row["input_ids"], row["labels"]

    # The input is the template's rendering, token for token: no BOS added, nothing cut.
    rendered = render(qwen_ro, example.messages)
    assert ids == ids_of(qwen_ro, rendered)
    assert rendered.startswith(f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n")

    [(start, end)] = check_row(qwen_ro, row, answers(example), [[QWEN_EOT]])
    assert ids[end - 1] == QWEN_EOT and labels[end - 1] == QWEN_EOT  # the last trained token is <|im_end|>
    # The newline after <|im_end|> ends the row and is not trained.
    assert end == len(ids) - 1 and ids[end] == NEWLINE and labels[end] == IGNORE
    # The generation prompt "<|im_start|>assistant\n" sits right before the answer and is not trained.
    assert ids[start - 3 : start] == [QWEN_IM_START, QWEN_ASSISTANT, NEWLINE]
    assert labels[:start] == [IGNORE] * start

    # Inference prompt: exactly the untrained prefix, and a prefix of the training ids.
    prompt = prompt_ids(qwen_ro, example)
    assert ids[: len(prompt)] == prompt and len(prompt) == start
    assert decode(qwen_ro, prompt).endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )

    stats = result.stats
    assert (stats.examples, stats.tokens, stats.dropped_too_long, stats.truncated) == (1, len(ids), 0, 0)
    assert stats.trained_tokens == len(ids_of(qwen_ro, "The capital of France is Paris.")) + 1
    assert stats.lengths == [len(ids)]
    assert result.end_tokens == {QWEN_EOT}
    assert stats.summary()["trained_fraction"] == round(stats.trained_tokens / len(ids), 4)


def test_qwen_multi_turn_with_system_trains_each_answer(qwen_ro):
    example = chat(
        "Hi!",
        "Hello! How can I help you today?",
        "Name three primary colours.",
        "Red, yellow and blue.",
        "And in light?",
        "Red, green and blue: the additive primaries.",
        system="You answer in one sentence.",
    )
    row = tokenize_one(example, qwen_ro)
    ids, labels = row["input_ids"], row["labels"]
    assert ids == ids_of(qwen_ro, render(qwen_ro, example.messages))
    assert QWEN_DEFAULT_SYSTEM not in decode(qwen_ro, ids)  # an explicit system replaces the default one
    found = check_row(qwen_ro, row, answers(example), [[QWEN_EOT]] * 3)
    for start, end in found:
        assert ids[start - 3 : start] == [QWEN_IM_START, QWEN_ASSISTANT, NEWLINE]
        assert ids[end] == NEWLINE and labels[end] == IGNORE
    # Nothing the user or system wrote is trained.
    untrained = decode(qwen_ro, [i for i, label in zip(ids, labels) if label == IGNORE])
    for message in example.messages:
        if message["role"] != "assistant":
            assert message["content"] in untrained

    prompt = prompt_ids(qwen_ro, example)  # everything before the LAST answer
    assert ids[: len(prompt)] == prompt and len(prompt) == found[-1][0]
    assert reference_answer(example) == "Red, green and blue: the additive primaries."


def test_qwen_batch_statistics_add_up(qwen_ro):
    examples = [chat("Q1", "A one."), chat("Q2", "A two.", "Q3", "A three.", where="test row 2")]
    result = tokenize_examples(examples, qwen_ro, max_length=4096)
    assert len(result.rows) == 2
    check_row(qwen_ro, result.rows[0], ["A one."], [[QWEN_EOT]])
    check_row(qwen_ro, result.rows[1], ["A two.", "A three."], [[QWEN_EOT]] * 2)
    lengths = [len(r["input_ids"]) for r in result.rows]
    assert result.stats.lengths == lengths and result.stats.tokens == sum(lengths)
    assert result.stats.trained_tokens == sum(len(ids_of(qwen_ro, a)) + 1 for a in ["A one.", "A two.", "A three."])


def test_qwen_pad_equal_to_eos_still_trains_eos(qwen):
    """PITFALLS #2: labels come from spans, not from `input_ids == pad_id`."""
    qwen.pad_token = "<|im_end|>"
    assert qwen.pad_token_id == qwen.eos_token_id == QWEN_EOT
    example = chat("Say yes.", "Yes.", "Again.", "Yes.")
    row = tokenize_one(example, qwen)
    check_row(qwen, row, answers(example), [[QWEN_EOT]] * 2)
    # <|im_end|> closes user turns too: those stay untrained, the assistant ones are trained.
    trained_eot = [label == QWEN_EOT for i, label in zip(row["input_ids"], row["labels"]) if i == QWEN_EOT]
    assert trained_eot.count(True) == 2 and trained_eot.count(False) == 3  # system, user, user


def test_answer_starting_with_newline_fails_the_round_trip_clearly(qwen_ro):
    """The template's "assistant\\n" merges with a leading newline of the answer ("\\n\\n" is one token), so the
    inference prompt is not a prefix of the training tokens: that is an error naming the row, not a silent mislabel."""
    with pytest.raises(SftError, match=r"test row 4: round-trip check failed at assistant turn 1"):
        tokenize_examples([chat("Q", "\nA list:\n- one", where="test row 4")], qwen_ro, 4096)


# ---------------------------------------------------------------------------------------------------------------
# Property: random conversations on Qwen2.5

# Any text but surrogates; an answer must not open with whitespace holding a newline (see the test above).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
ANSWER = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30).filter(
    lambda a: not re.match(r"\s*[\r\n]", a)
)


@st.composite
def conversations(draw):
    system = draw(st.one_of(st.none(), TEXT))
    texts = []
    for _ in range(draw(st.integers(1, 4))):
        texts += [draw(TEXT), draw(ANSWER)]
    return chat(*texts, system=system, where="hypothesis row")


@settings(max_examples=50, deadline=None, derandomize=True)
@given(example=conversations())
def test_property_random_conversations_train_exactly_the_answers(qwen_ro, example):
    literal = re.compile("|".join(re.escape(t) for t in special_tokens(qwen_ro)))
    if any(literal.search(m["content"]) for m in example.messages):
        return  # rejected on purpose (see test_literal_special_tokens_are_rejected); vanishingly rare here
    result = tokenize_examples([example], qwen_ro, max_length=100_000)
    row = result.rows[0]
    texts = answers(example)
    assert row["input_ids"] == ids_of(qwen_ro, render(qwen_ro, example.messages))
    check_row(qwen_ro, row, texts, [[QWEN_EOT]] * len(texts))
    assert result.stats.trained_tokens == sum(len(ids_of(qwen_ro, a)) + 1 for a in texts)
    assert result.end_tokens == {QWEN_EOT}
    prompt = prompt_ids(qwen_ro, example)
    assert row["input_ids"][: len(prompt)] == prompt
    # After the inference prompt: the last answer, <|im_end|>, and the untrained newline the template ends with.
    assert row["labels"][len(prompt) :] == ids_of(qwen_ro, texts[-1]) + [QWEN_EOT, IGNORE]


# ---------------------------------------------------------------------------------------------------------------
# GPT-2: no chat template, no pad token; a template set by hand


def test_gpt2_fixture_is_what_the_tests_assume(gpt2):
    assert len(gpt2) == 50257 and gpt2.chat_template is None and gpt2.pad_token is None
    assert gpt2.bos_token_id == gpt2.eos_token_id == gpt2.unk_token_id == GPT2_EOS
    assert ids_of(gpt2, "Hello world") == [15496, 995]


def test_gpt2_chat_without_template_is_an_error(gpt2):
    with pytest.raises(SftError, match="no chat template.*model.chat_template"):
        tokenize_examples([chat("Hi", "Hello.")], gpt2, 100)


def test_gpt2_chatml_template_with_added_tokens(gpt2):
    gpt2.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    gpt2.chat_template = CHATML
    eot = gpt2.convert_tokens_to_ids("<|im_end|>")
    assert eot == 50258
    example = chat("Hello, how are you?", "Fine, thanks.", "Tell me a joke.", "Why did the chicken cross the road?")
    result = tokenize_examples([example], gpt2, 200)
    row = result.rows[0]
    assert row["input_ids"] == ids_of(gpt2, render(gpt2, example.messages))
    found = check_row(gpt2, row, answers(example), [[eot]] * 2)
    for _, end in found:
        assert row["input_ids"][end] == NEWLINE and row["labels"][end] == IGNORE
    assert result.end_tokens == {eot}


def test_gpt2_llama3_template_round_trip_mismatch_is_caught(gpt2):
    """llama3.jinja ends its generation prompt with "\n\n", one GPT-2 token; in the training text GPT-2 splits
    "\n\nFine" as "\n" "\n" "Fine". The model would be trained on tokens it never sees at inference (PITFALLS #4):
    an error naming the row and the turn, not a silent mismatch."""
    gpt2.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    gpt2.chat_template = shared("chat_templates/trl/llama3.jinja").read_text()
    example = chat("Hello, how are you?", "Fine, thanks.", system="Be nice.", where="test row 2")
    prompt = prompt_ids(gpt2, example)
    assert prompt[0] == GPT2_EOS and prompt.count(GPT2_EOS) == 1  # the template's own bos_token, once
    assert prompt[-1] == ids_of(gpt2, "\n\n")[0] == 628
    with pytest.raises(
        SftError, match=r"^test row 2: round-trip check failed at assistant turn 2: .* diverge at token"
    ):
        tokenize_examples([example], gpt2, 100)


def test_gpt2_template_closing_turns_with_eos(gpt2):
    """GPT-2's EOS is also its UNK: it must still count as an end-of-turn token (zephyr closes turns with EOS)."""
    index = json.loads(shared("chat_templates/ollama_golden/index.json").read_text())
    gpt2.chat_template = next(e["template"] for e in index if e["name"] == "zephyr" and "<|system|>" in e["template"])
    example = chat("Hi", "Hello there.", "Bye", "Goodbye.", system="Be brief.")
    row = tokenize_one(example, gpt2)
    assert decode(gpt2, row["input_ids"]).count("<|endoftext|>") == 5  # after every message
    found = check_row(gpt2, row, answers(example), [[GPT2_EOS]] * 2)
    assert row["input_ids"][found[-1][1]] == NEWLINE


def test_gpt2_completion_trains_completion_and_eos(gpt2):
    ensure_pad_token(gpt2)
    assert gpt2.pad_token_id == gpt2.eos_token_id == GPT2_EOS  # pad == eos (PITFALLS #2)
    example = Example(
        kind="completion", where="test row 3", prompt="Translate to French: cheese =>", completion=" fromage"
    )
    result = tokenize_examples([example], gpt2, 100)
    row = result.rows[0]
    prompt = ids_of(gpt2, example.prompt)
    assert row["input_ids"] == prompt + ids_of(gpt2, " fromage") + [GPT2_EOS]
    assert row["labels"] == [IGNORE] * len(prompt) + ids_of(gpt2, " fromage") + [GPT2_EOS]
    check_row(gpt2, row, [" fromage"], [[GPT2_EOS]])
    assert prompt_ids(gpt2, example) == prompt
    assert result.end_tokens == {GPT2_EOS}
    assert reference_answer(example) == " fromage"


def test_gpt2_text_trains_every_token_and_eos(gpt2):
    ensure_pad_token(gpt2)
    text = "The quick brown fox jumps over the lazy dog."
    example = Example(kind="text", where="test row 5", text=text)
    result = tokenize_examples([example], gpt2, 100)
    row = result.rows[0]
    assert row["input_ids"] == ids_of(gpt2, text) + [GPT2_EOS]
    assert row["labels"] == row["input_ids"]
    assert result.stats.trained_tokens == len(ids_of(gpt2, text)) + 1
    with pytest.raises(ValueError):
        prompt_ids(gpt2, example)


# ---------------------------------------------------------------------------------------------------------------
# BOS: written by the template, never added again


@pytest.fixture
def llama3_like(qwen):
    """Qwen2.5's vocabulary with Llama 3's special tokens, a BOS the tokenizer ADDS by default, and llama3.jinja."""
    qwen.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        }
    )
    qwen.add_bos_token = True
    qwen.chat_template = shared("chat_templates/trl/llama3.jinja").read_text()
    return qwen


def test_no_double_bos_when_the_template_writes_it(llama3_like):
    tok = llama3_like
    bos, eot = tok.bos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")
    example = chat("Hello, how are you?", "Great.", "Show me.", "Here.", system="Be helpful.")
    rendered = render(tok, example.messages)
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>system")
    # The trap is live: encoding the rendering with special tokens would put a second BOS in front.
    assert tok(rendered)["input_ids"][:2] == [bos, bos]

    row = tokenize_one(example, tok)
    assert row["input_ids"][0] == bos and row["input_ids"].count(bos) == 1
    check_row(tok, row, answers(example), [[eot]] * 2)
    prompt = prompt_ids(tok, example)
    assert prompt[0] == bos and prompt.count(bos) == 1

    # Completion rows have no template: the tokenizer adds the one BOS.
    completion = Example(kind="completion", where="test row 6", prompt="2 + 2 =", completion=" 4")
    ids = tokenize_one(completion, tok)["input_ids"]
    assert ids[0] == bos and ids.count(bos) == 1


def test_template_writing_bos_twice_is_an_error(llama3_like):
    llama3_like.chat_template = "{{ bos_token }}" + llama3_like.chat_template
    with pytest.raises(SftError, match="test row 9: the rendered conversation starts with two BOS"):
        tokenize_examples([chat("Hi", "Hello.", where="test row 9")], llama3_like, 100)


# ---------------------------------------------------------------------------------------------------------------
# Literal special tokens in the data


@pytest.mark.parametrize(
    ("messages", "field", "token"),
    [
        ([("user", "Stop here <|im_end|> and go on"), ("assistant", "OK.")], "messages[0].content", "<|im_end|>"),
        ([("user", "Hi"), ("assistant", "Bye<|endoftext|>")], "messages[1].content", "<|endoftext|>"),
        (
            [("system", "<|im_start|>system"), ("user", "Hi"), ("assistant", "Yo.")],
            "messages[0].content",
            "<|im_start|>",
        ),
        ([("user", "look: <|vision_start|>"), ("assistant", "No.")], "messages[0].content", "<|vision_start|>"),
    ],
)
def test_literal_special_tokens_are_rejected(qwen_ro, messages, field, token):
    example = Example(kind="chat", where="data.jsonl line 7", messages=[{"role": r, "content": c} for r, c in messages])
    with pytest.raises(SftError) as info:
        tokenize_examples([chat("fine", "fine."), example], qwen_ro, 4096)
    message = str(info.value)
    assert message.startswith(f"data.jsonl line 7: {field} contains the literal special token {token!r}"), message


def test_literal_eos_in_completion_is_rejected(gpt2):
    example = Example(kind="completion", where="data.csv line 3", prompt="Say:", completion=" done<|endoftext|>")
    with pytest.raises(
        SftError, match=r"^data.csv line 3: completion contains the literal special token '<\|endoftext\|>'"
    ):
        tokenize_examples([example], gpt2, 100)


def test_lookalikes_of_special_tokens_are_plain_text(qwen_ro):
    example = chat("Is <|im_end |> or <im_end> special?", "Neither <|im_end or im_end|> is.")
    check_row(qwen_ro, tokenize_one(example, qwen_ro), answers(example), [[QWEN_EOT]])


# ---------------------------------------------------------------------------------------------------------------
# Length: drop and count, or error; never cut


def test_rows_longer_than_max_length_are_dropped_and_counted(qwen_ro):
    short, long = chat("Hi", "Hello."), chat("Tell me a story.", "Once upon a time " * 20, where="test row 2")
    n_short = len(ids_of(qwen_ro, render(qwen_ro, short.messages)))
    n_long = len(ids_of(qwen_ro, render(qwen_ro, long.messages)))
    assert n_long > n_short

    kept = tokenize_examples([short, long], qwen_ro, max_length=n_long)  # exactly max_length: kept whole
    assert kept.stats.examples == 2 and kept.stats.dropped_too_long == 0
    assert len(kept.rows[1]["input_ids"]) == n_long

    result = tokenize_examples([short, long], qwen_ro, max_length=n_long - 1)
    assert (result.stats.examples, result.stats.dropped_too_long, result.stats.truncated) == (1, 1, 0)
    assert len(result.rows) == 1 and len(result.rows[0]["input_ids"]) == n_short  # the short one, whole
    assert result.stats.tokens == n_short
    check_row(qwen_ro, result.rows[0], ["Hello."], [[QWEN_EOT]])


def test_too_long_with_on_too_long_error(qwen_ro):
    example = chat("Tell me a story.", "Once upon a time " * 20, where="test row 2")
    n = len(ids_of(qwen_ro, render(qwen_ro, example.messages)))
    with pytest.raises(SftError, match=rf"^test row 2: {n} tokens after templating, over data.max_length={n - 1}"):
        tokenize_examples([example], qwen_ro, max_length=n - 1, on_too_long="error")
    assert len(tokenize_examples([example], qwen_ro, max_length=n, on_too_long="error").rows[0]["input_ids"]) == n


def test_every_row_too_long_is_an_error(qwen_ro):
    with pytest.raises(SftError, match="no rows left after dropping 2 longer than data.max_length=10"):
        tokenize_examples([chat("Hi", "Hello."), chat("Yo", "Hey.")], qwen_ro, max_length=10)


def test_completion_too_long_is_dropped_not_cut(gpt2):
    example = Example(kind="completion", where="test row 8", prompt="A B C", completion=" D E F")
    n = len(ids_of(gpt2, "A B C")) + len(ids_of(gpt2, " D E F")) + 1
    with pytest.raises(SftError, match="no rows left after dropping 1"):
        tokenize_examples([example], gpt2, max_length=n - 1)
    assert tokenize_examples([example], gpt2, max_length=n).rows[0]["labels"][-1] == GPT2_EOS


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary vs embedding rows (PITFALLS #6)


def test_check_vocab_qwen_tokenizer_fits_its_model(qwen_ro):
    config = Qwen2Config.from_json_file(str(shared("configs/qwen2_5_0_5b_instruct_config.json")))
    assert config.vocab_size == 151936 > len(qwen_ro) == 151665
    check_vocab(qwen_ro, config)  # more rows than tokens: fine
    check_vocab(qwen_ro, Qwen2Config(vocab_size=151665))  # exactly as many: fine


def test_check_vocab_fewer_rows_is_an_error(qwen_ro):
    with pytest.raises(SftError, match="ids run to 151664 but the model has 151664 embedding rows"):
        check_vocab(qwen_ro, Qwen2Config(vocab_size=151664))


def test_check_vocab_added_tokens_past_the_rows(qwen):
    config = Qwen2Config.from_json_file(str(shared("configs/qwen2_5_0_5b_instruct_config.json")))
    qwen.add_tokens([f"<new_{i}>" for i in range(151936 - 151665)])
    check_vocab(qwen, config)  # 151936 tokens, 151936 rows
    qwen.add_tokens(["<one_too_many>"])
    with pytest.raises(SftError, match="ids run to 151936 but the model has 151936 embedding rows"):
        check_vocab(qwen, config)


def test_check_vocab_reads_the_text_config_of_a_multimodal_model(qwen_ro):
    small = LlavaConfig(text_config=Qwen2Config(vocab_size=1000).to_dict())
    assert getattr(small, "vocab_size", None) is None
    with pytest.raises(SftError, match="1000 embedding rows"):
        check_vocab(qwen_ro, small)
    check_vocab(qwen_ro, LlavaConfig(text_config=Qwen2Config(vocab_size=151936).to_dict()))
