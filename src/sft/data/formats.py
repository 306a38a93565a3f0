"""Rows -> examples: detect a row's format, normalise it, and reject what would be dropped or misread, by location.

Every row becomes an `Example` of one of three kinds:
- "chat": a list of {role, content} messages; the assistant turns are what the model learns. In OpenAI form an
  assistant turn may carry `tool_calls` (its content then may be null: it becomes "") and a tool turn `name` and
  `tool_call_id`; these keys are kept for the chat template;
- "completion": a prompt string and a completion string (no chat template); the completion is learnt;
- "text": raw text (continued pretraining); every token is learnt.

Before the format is detected a source's `columns` renames the file's columns to the format's fields; a source's
`template` instead builds a conversation from arbitrary columns.

Nothing is dropped silently: a column or turn key the format does not use, and a control character in any text
(other than tab, newline and carriage return), are errors naming the row and the field.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from typing import Any

from sft.config import RowTemplate, SourceConfig
from sft.errors import SftError, did_you_mean

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
TOOL_KEYS = {"assistant": ("tool_calls",), "tool": ("name", "tool_call_id")}  # OpenAI-form turn keys beyond content


@dataclass
class Example:
    kind: str  # "chat" | "completion" | "text"
    where: str  # "data/train.jsonl line 12": for error messages
    messages: list[dict[str, Any]] = field(default_factory=list)  # role, content (a str), maybe tool keys
    prompt: str = ""
    completion: str = ""
    text: str = ""
    tools: Any = None
    trained_from: int = 0  # chat: assistant turns before this message index are context, not learnt

    def key(self) -> str:
        """What makes two examples the same (for duplicates and train/eval overlap): all that reaches the tokens."""
        return json.dumps(
            [self.messages, self.prompt, self.completion, self.text, self.tools, self.trained_from],
            sort_keys=True,
            default=str,
        )


FORMAT_FIELDS = {  # every field each format reads; any other (non-null) field would be ignored, so it is an error
    "messages": ("messages", "tools"),
    "sharegpt": ("conversations", "tools"),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0 (bar tab, LF, CR), DEL, C1
SURROGATES = re.compile("[\ud800-\udfff]")  # only from JSON escapes (\\ud83d alone): valid UTF-8 never holds one
FORMAT_KEYS = {
    "messages": "messages",
    "sharegpt": "conversations",
    "alpaca": "instruction + output",
    "prompt_completion": "prompt + completion",
    "text": "text",
}


def detect_format(row: dict, where: str) -> str:
    keys = set(row)
    if {"chosen", "rejected"} & keys:
        raise SftError(
            f"{where}: preference data (chosen/rejected) is for DPO-style training, not SFT; "
            "expected one of: " + "; ".join(FORMAT_KEYS.values())
        )
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise SftError(
        f"{where}: keys {sorted(keys)} match no known format; expected one of: "
        + "; ".join(f"{v} ({k})" for k, v in FORMAT_KEYS.items())
    )


def _string(row: dict, key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if key not in row else f"{type(value).__name__} {value!r:.40}"
        raise SftError(f"{where}: field {key!r} must be a string, got {got}")
    _plain_text(value, where, key)
    return value


def _plain_text(value: str, where: str, key: str) -> None:
    half = SURROGATES.search(value)
    if half:
        raise SftError(
            f"{where}: field {key!r} holds a lone surrogate U+{ord(half.group()):04X} at character {half.start()} "
            "(half of a UTF-16 pair, e.g. an escaped \\udXXX in JSON), which no tokenizer can encode; expected "
            "valid Unicode text"
        )
    found = CONTROL_CHARS.search(value)
    if found:
        raise SftError(
            f"{where}: field {key!r} holds control character U+{ord(found.group()):04X} at character {found.start()}; "
            "expected text (tab, newline and carriage return are the only control characters allowed)"
        )


def _unused(row: dict, known: tuple[str, ...]) -> list[str]:
    """Keys that would be ignored: not read by the format and not null (a null loses nothing, e.g. parquet structs)."""
    return sorted(str(k) for k, v in row.items() if k not in known and v is not None)


def check_column_map(source: SourceConfig) -> None:
    """Every mapped name is a field the source's format reads (any format's, when detected)."""
    assert source.columns is not None
    fields = sorted(set(FORMAT_FIELDS.get(source.format, ())) or {f for fs in FORMAT_FIELDS.values() for f in fs})
    for name in source.columns:
        if name not in fields:
            which = "no format" if source.format == "auto" else f"format {source.format!r}"
            raise SftError(
                f"{source.path}: columns maps {name!r}, a field {which} reads{did_you_mean(name, fields)}; "
                f"expected format field names ({', '.join(fields)}) mapped to the file's column names"
            )


def map_columns(row: dict, columns: dict[str, str], where: str) -> dict:
    """The row with each mapped column renamed to its format field; the other columns as they are."""
    renamed = {key: value for key, value in row.items() if key not in columns.values()}
    for name, column in columns.items():
        if column not in row:
            raise SftError(
                f"{where}: column {column!r} (mapped to field {name!r} by columns) is missing; "
                f"the row has columns {sorted(row)}"
            )
        if name in renamed:
            raise SftError(
                f"{where}: the row has a column {name!r} and a column {column!r} that columns maps to {name!r}; "
                "expected only one of them - drop or rename the other"
            )
        renamed[name] = row[column]
    return renamed


def with_column_map(err: SftError, columns: dict[str, str] | None) -> SftError:
    """An error about a mapped field also names the file's column, which is what the user sees in the file."""
    named = [f"{name!r} is column {column!r}" for name, column in (columns or {}).items() if repr(name) in str(err)]
    return SftError(f"{err} (mapped by columns: {', '.join(named)})") if named else err


def placeholders(text: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]


def template_example(row: dict, template: RowTemplate, where: str, extra_fields: str) -> Example:
    """One conversation from a row's columns. Values are inserted verbatim: `str.format` does not read braces in
    what it inserts, so a value holding `{{name}}` or `{x}` stays that text."""
    turns = [("system", template.system), ("user", template.user), ("assistant", template.assistant)]
    used = sorted({name for _, text in turns if text is not None for name in placeholders(text)})
    for name in used:
        if name not in row:
            raise SftError(
                f"{where}: template placeholder {{{name}}} names no column of this row{did_you_mean(name, set(row))}; "
                f"available columns: {sorted(row)}"
            )
        value = row[name]
        if value is None or isinstance(value, (list, dict)):
            got = "null" if value is None else f"a {type(value).__name__}"
            raise SftError(f"{where}: column {name!r} is {got}; the template expected text or a number")
    unused = _unused(row, tuple(used)) if extra_fields == "error" else []
    if unused:
        raise SftError(
            f"{where}: column(s) {unused} are not used by the template and would be ignored; use them in the "
            "template, or set extra_fields: ignore on this source if they are metadata"
        )
    messages = []
    for role, text in turns:
        if text is None:
            continue
        try:
            content = text.format_map(row)
        except (ValueError, TypeError) as err:  # a format spec that does not fit the value, e.g. {name:.2f}
            raise SftError(f"{where}: template {role} turn {text!r}: {err}") from None
        if role == "system" and not content.strip():
            continue
        messages.append({"role": role, "content": content})
    return _chat(messages, where, "template", "role", "content")


def normalise(row: dict, fmt: str, where: str, extra_fields: str = "error", roles: dict | None = None) -> Example:
    detected = detect_format(row, where)
    if detected != fmt and not (fmt == "text" and "text" in row):
        raise SftError(f"{where}: row looks like {detected!r} but the source is {fmt!r}; mixed formats in one source")
    # format: text picks one column on purpose; extra_fields: ignore is the user saying the rest is metadata
    unused = _unused(row, FORMAT_FIELDS[fmt]) if detected == fmt and extra_fields == "error" else []
    if unused:
        raise SftError(
            f"{where}: field(s) {unused} are not read by format {fmt!r} and would be ignored; "
            f"expected only {list(FORMAT_FIELDS[fmt])} - remove them, or set extra_fields: ignore on this source "
            "if they are metadata (ids, sources)"
        )
    if fmt == "messages":
        return _chat(row["messages"], where, "messages", role_key="role", content_key="content", tools=row.get("tools"))
    if fmt == "sharegpt":
        role_map = {**SHAREGPT_ROLES, **(roles or {})}  # the source's own role names, e.g. {bot: assistant}
        return _chat(row["conversations"], where, "conversations", "from", "value", row.get("tools"), role_map)
    if fmt == "alpaca":
        instruction = _string(row, "instruction", where)
        extra = _string(row, "input", where, required=False)
        messages = []
        if row.get("system"):
            messages.append({"role": "system", "content": _string(row, "system", where)})
        for turn in row.get("history") or []:
            if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise SftError(f"{where}: field 'history' must be a list of [instruction, answer] string pairs")
            messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _string(row, "output", where)}]
        return _chat(messages, where, "instruction/output", "role", "content")
    if fmt == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            example = _chat(prompt + completion, where, "prompt/completion", "role", "content")
            example.trained_from = len(prompt)  # completion-only: assistant turns inside the prompt are context
            return example
        prompt, completion = _string(row, "prompt", where), _string(row, "completion", where)
        if not completion.strip():
            raise SftError(f"{where}: field 'completion' is empty; expected the answer to learn")
        return Example(kind="completion", where=where, prompt=prompt, completion=completion)
    text = _string(row, "text", where)
    if not text.strip():
        raise SftError(f"{where}: field 'text' is empty")
    return Example(kind="text", where=where, text=text)


def _chat(turns: Any, where: str, field_name: str, role_key: str, content_key: str, tools=None, role_map=None):
    if not isinstance(turns, list) or not turns:
        raise SftError(f"{where}: field {field_name!r} must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        at = f"{where}, {field_name}[{i}]"
        if not isinstance(turn, dict):
            raise SftError(f"{at}: expected an object with {role_key!r} and {content_key!r}")
        role = turn.get(role_key)
        if role_map is not None:
            if not isinstance(role, str) or role not in role_map:  # a list or object role is unhashable
                raise SftError(f"{at}: unknown role {role!r}; expected one of {sorted(role_map)}")
            role = role_map[role]
        elif role not in ROLES:
            raise SftError(f"{at}: unknown role {role!r}; expected one of {list(ROLES)}")
        # OpenAI-form turns may call tools; a ShareGPT turn (role map) carries its call in its text.
        extra = TOOL_KEYS.get(role, ()) if role_map is None else ()
        _check_turn_keys(turn, at, (role_key, content_key, *extra), role_map is None)
        content = turn.get(content_key)
        calls = (
            _tool_calls(turn["tool_calls"], at)
            if "tool_calls" in extra and turn.get("tool_calls") is not None
            else None
        )
        if calls and content is None:
            content = ""  # a call with no text: "" for templates and for the checks that read content
        if content is None and role == "assistant":
            raise SftError(
                f"{at}: empty assistant turn ({content_key!r} is null and there are no tool_calls); "
                "expected an answer to learn"
            )
        if not isinstance(content, str):
            raise SftError(f"{at}: {content_key!r} must be a string, got {type(content).__name__}")
        _plain_text(content, at, content_key)
        message: dict[str, Any] = {"role": role, "content": content}
        if calls:
            message["tool_calls"] = calls
        for key in ("name", "tool_call_id"):
            if key in extra and turn.get(key) is not None:
                message[key] = _string(turn, key, at)
        messages.append(message)
    check_turns(messages, where, field_name)
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise SftError(f"{where}: field 'tools' is a string but not JSON") from None
    return Example(kind="chat", where=where, messages=messages, tools=tools)


def _check_turn_keys(turn: dict, at: str, known: tuple[str, ...], tool_keys: bool) -> None:
    unused = _unused(turn, known)
    if not unused:
        return
    listing = ", ".join(repr(k) for k in known[:-1]) + f" and {known[-1]!r}"
    hint = [f"{k} belongs on {role} turns" for k in unused for role, keys in TOOL_KEYS.items() if k in keys]
    hint = f" ({'; '.join(hint)})" if hint and tool_keys else ""
    raise SftError(f"{at}: key(s) {unused} would be ignored; expected only {listing}{hint}")


def _tool_calls(value: Any, at: str) -> list[dict]:
    """OpenAI-form calls, normalised to {type: function, function: {name, arguments}} (and `id` when given).

    `arguments` may come as a JSON string (the OpenAI API's form) or an object; it is kept as the object, because
    chat templates (Qwen2.5, Llama 3.1, Mistral) write it with `tojson`, which would quote and escape a string.
    """
    expected = "expected a non-empty list of {type: function, function: {name, arguments}}"
    if not isinstance(value, list) or not value:
        raise SftError(f"{at}: 'tool_calls' must be a list of calls; {expected}")
    calls = []
    for j, call in enumerate(value):
        here = f"{at}, tool_calls[{j}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise SftError(f"{here}: expected an object with a 'function' object; {expected}")
        function = call["function"]
        unused = _unused(call, ("type", "function", "id")) + [
            f"function.{k}" for k in _unused(function, ("name", "arguments"))
        ]
        if unused:
            raise SftError(f"{here}: key(s) {unused} would be ignored; {expected} and an optional id")
        if call.get("type") not in (None, "function"):
            raise SftError(f"{here}: tool call type {call['type']!r} is not supported; expected 'function'")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise SftError(f"{here}: 'function.name' must be a non-empty string, got {name!r:.40}")
        _plain_text(name, here, "function.name")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as err:
                raise SftError(
                    f"{here}: 'function.arguments' is a string but not JSON ({err.msg}); expected a JSON object"
                ) from None
        if not isinstance(arguments, dict):
            raise SftError(
                f"{here}: 'function.arguments' must be a JSON object (or a JSON string of one), "
                f"got {type(arguments).__name__}"
            )
        normalised: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if call.get("id") is not None:
            normalised["id"] = _string(call, "id", here)
        calls.append(normalised)
    return calls


def check_turns(messages: list[dict[str, Any]], where: str, field_name: str) -> None:
    """System only first; user and assistant alternate (tool results answer an assistant); end on the assistant.

    An assistant turn must say something: text, or tool calls."""
    previous = None
    for i, message in enumerate(messages):
        role, at = message["role"], f"{where}, {field_name}[{i}]"
        if role == "system" and i != 0:
            raise SftError(f"{at}: a system turn must come first")
        if role == "assistant" and previous not in ("user", "tool"):
            raise SftError(f"{at}: assistant turn must follow a user (or tool) turn, not {previous or 'nothing'}")
        if role == "user" and previous == "user":
            raise SftError(f"{at}: two user turns in a row; expected an assistant turn between them")
        if role == "tool" and previous not in ("assistant", "tool"):
            raise SftError(f"{at}: a tool result must follow an assistant turn")
        if role == "assistant" and not message["content"].strip() and not message.get("tool_calls"):
            raise SftError(f"{at}: empty assistant turn; expected an answer to learn")
        previous = role
    if previous != "assistant":
        raise SftError(f"{where}: conversation ends with a {previous} turn; expected it to end with the assistant")
