"""Examples -> token ids in the model's own vocabulary, with labels exactly on what the model should learn.

For a conversation the trained tokens are, for every assistant turn, the answer and the template's end-of-turn
token (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, `</s>`...), and nothing else: not the generation prompt before it, not
the newline (or Phi-3's closing EOS) a template writes after the end-of-turn token. They are found without
`{% generation %}` markers, by rendering the conversation up to each assistant turn with `add_generation_prompt=True`
(what the model sees at inference) and checking that its tokens are a prefix of the training tokens: that check is
the round trip between training and inference, and a mismatch stops the run showing where the two diverge.

Labels are built from these spans, never from `input_ids == pad_id`, so a pad token equal to EOS cannot mask EOS.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from transformers import PreTrainedTokenizerBase

from sft.data.formats import Example
from sft.errors import SftError

IGNORE = -100


@dataclass
class TokenStats:
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    dropped_too_long: int = 0
    truncated: int = 0  # always 0: a row is never cut, it is dropped and counted instead
    lengths: list[int] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "lengths"}
        out["trained_fraction"] = round(self.trained_tokens / max(self.tokens, 1), 4)
        if self.lengths:
            ordered = sorted(self.lengths)
            for p in (50, 90, 95, 99, 100):
                out[f"length_p{p}"] = ordered[min(len(ordered) - 1, len(ordered) * p // 100)]
        return out


@dataclass
class Tokenized:
    rows: list[dict[str, list[int]]]  # input_ids, labels
    stats: TokenStats
    end_tokens: set[int]  # the last trained token of each row: where generation must stop


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    return sorted(set(tokenizer.all_special_tokens) | set(added), key=len, reverse=True)


def render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools=None, generation_prompt: bool = False
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja raises TemplateError and anything the template itself raises
        raise SftError(f"the chat template failed to render a conversation: {err}") from None


def prompt_ids(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[int]:
    """Token ids the model is given at inference for an example: everything before its last answer.

    Built exactly as the training tokens are, so the round trip holds (see the module docstring).
    """
    if example.kind == "chat":
        text = render(tokenizer, example.messages[:-1], example.tools, generation_prompt=True)
        return _ids(tokenizer, text, special=False)
    if example.kind == "completion":
        return _bos(tokenizer) + _ids(tokenizer, example.prompt, special=False)
    raise ValueError("raw text examples have no prompt")


def reference_answer(example: Example) -> str:
    if example.kind == "chat":
        return example.messages[-1]["content"]
    return example.completion if example.kind == "completion" else example.text


def tokenize_examples(
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    on_too_long: str = "drop",
) -> Tokenized:
    """Tokenize and label every example; raise `SftError` on the first example that cannot be labelled exactly."""
    if tokenizer.chat_template is None and any(e.kind == "chat" for e in examples):
        raise SftError(
            "the tokenizer has no chat template but the data is conversational; set model.chat_template to a "
            ".jinja file (or use a model whose tokenizer has one)"
        )
    special = special_tokens(tokenizer)
    literal = re.compile("|".join(re.escape(t) for t in special)) if special else None
    stats = TokenStats()
    rows = []
    end_tokens: set[int] = set()
    for example in examples:
        if literal is not None:
            _reject_literal_special_tokens(example, literal)
        if example.kind == "chat":
            ids, labels = _chat(example, tokenizer, end_of_turn_candidates(tokenizer))
        else:
            ids, labels = _plain(example, tokenizer)
        trained = sum(label != IGNORE for label in labels)
        if trained == 0:
            raise SftError(f"{example.where}: no token would be trained; expected a non-empty answer")
        if example.kind == "chat" and trained == len(ids):
            raise SftError(f"{example.where}: every token would be trained, prompt included; the mask is wrong")
        if len(ids) > max_length:
            if on_too_long == "error":
                raise SftError(
                    f"{example.where}: {len(ids)} tokens after templating, over data.max_length={max_length}; "
                    "raise max_length, shorten the row, or set data.on_too_long=drop"
                )
            stats.dropped_too_long += 1
            continue
        rows.append({"input_ids": ids, "labels": labels})
        end_tokens.add(next(label for label in reversed(labels) if label != IGNORE))
        stats.examples += 1
        stats.tokens += len(ids)
        stats.trained_tokens += trained
        stats.lengths.append(len(ids))
    if not rows:
        raise SftError(f"no rows left after dropping {stats.dropped_too_long} longer than data.max_length={max_length}")
    return Tokenized(rows=rows, stats=stats, end_tokens=end_tokens)


def end_of_turn_candidates(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Special tokens that can close a turn: all of them but UNK (which a template never writes on purpose).

    Unless UNK is also EOS (GPT-2: `<|endoftext|>` is bos, eos and unk): then it is the end-of-turn token."""
    ids = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids - ({tokenizer.unk_token_id} - {tokenizer.eos_token_id})


def _reject_literal_special_tokens(example: Example, literal: re.Pattern) -> None:
    texts = [(f"messages[{i}].content", m["content"]) for i, m in enumerate(example.messages)]
    # tool calls, tool names and tool schemas reach the template too
    texts += [(f"messages[{i}]", json.dumps(m, ensure_ascii=False)) for i, m in enumerate(example.messages)]
    texts += [("tools", json.dumps(example.tools, ensure_ascii=False)), ("prompt", example.prompt)]
    texts += [("completion", example.completion), ("text", example.text)]
    for name, text in texts:
        found = literal.search(text)
        if found:
            raise SftError(
                f"{example.where}: {name} contains the literal special token {found.group()!r}, which the "
                "tokenizer would read as a control token; expected plain text - remove or escape it"
            )


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _plain(example: Example, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """No chat template: BOS as the tokenizer adds it, then the text; the completion (or all text) and EOS learnt."""
    if tokenizer.eos_token_id is None:
        raise SftError("the tokenizer has no EOS token; the model could never learn to stop")
    eos = [tokenizer.eos_token_id]
    if example.kind == "completion":
        prompt = _bos(tokenizer) + _ids(tokenizer, example.prompt, special=False)
        answer = _ids(tokenizer, example.completion, special=False) + eos
        return prompt + answer, [IGNORE] * len(prompt) + answer
    ids = _bos(tokenizer) + _ids(tokenizer, example.text, special=False) + eos
    return ids, list(ids)


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """BOS if this tokenizer starts sequences with it - but not the EOS some post-processors append (T5): that one
    is placed by us, once, after the answer."""
    first = _ids(tokenizer, "", special=True)[:1]
    return first if tokenizer.bos_token_id is not None and first == [tokenizer.bos_token_id] else []


def _chat(example: Example, tokenizer: PreTrainedTokenizerBase, special_ids: set[int]) -> tuple[list, list]:
    messages, tools = example.messages, example.tools
    # The template writes BOS itself where the model wants one: adding special tokens again would double it.
    ids = _ids(tokenizer, render(tokenizer, messages, tools), special=False)
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        raise SftError(f"{example.where}: the rendered conversation starts with two BOS tokens; fix the template")
    labels = [IGNORE] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant" or turn < example.trained_from:
            continue
        prompt = _ids(tokenizer, render(tokenizer, messages[:turn], tools, generation_prompt=True), special=False)
        _check_prefix(prompt, ids, tokenizer, example.where, turn)
        upto = _ids(tokenizer, render(tokenizer, messages[: turn + 1], tools), special=False)
        # The turn ends where the conversation cut after it stops agreeing with the whole one: a template may close
        # a conversation with more than it writes between turns (Phi-3 appends EOS), and that is not in `ids` here.
        end = next((i for i, (a, b) in enumerate(zip(upto, ids)) if a != b), min(len(upto), len(ids)))
        # The answer ends at the first special token after it: the end-of-turn token (an answer holds none, see
        # _reject_literal_special_tokens). What follows (a newline, Phi-3's closing EOS) is template decoration.
        eot = next((i for i in range(len(prompt), end) if ids[i] in special_ids), None)
        if eot is None and any(t not in special_ids for t in upto[end:]):
            raise SftError(
                f"{example.where}: the chat template renders assistant turn {turn} differently once later turns "
                f"follow it (they diverge at token {end}: {tokenizer.decode(upto[end : end + 8])!r} vs "
                f"{tokenizer.decode(ids[end : end + 8])!r}; Qwen3 drops the <think> block of earlier turns), so the "
                "turn cannot be labelled as the model generates it; use a template that renders earlier turns as they "
                "were generated (e.g. TRL's qwen3_training.jinja), or single-turn rows"
            )
        if eot is None:
            raise SftError(
                f"{example.where}: the chat template closes assistant turns with no special end-of-turn token, so "
                "the model would never learn to stop; use a template that does (e.g. ChatML's <|im_end|>)"
            )
        labels[len(prompt) : eot + 1] = ids[len(prompt) : eot + 1]
    return ids, labels


def _check_prefix(prompt: list[int], ids: list[int], tokenizer, where: str, turn: int) -> None:
    if ids[: len(prompt)] == prompt:
        return
    at = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
    raise SftError(
        f"{where}: round-trip check failed at assistant turn {turn}: the inference prompt "
        "(add_generation_prompt=True) is not a prefix of the training tokens; they diverge at token "
        f"{at}: inference {tokenizer.decode(prompt[at : at + 8])!r} vs "
        f"training {tokenizer.decode(ids[at : at + 8])!r}. "
        "The model would be trained on a rendering it never sees at inference; fix the chat template "
        "(model.chat_template)"
    )
