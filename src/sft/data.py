"""Read labeled data files, detect their format, normalise every row, and reject bad input with its location.

Every row becomes an `Example` of one of three kinds:
- "chat": a list of {role, content} messages; the assistant turns are what the model learns;
- "completion": a prompt string and a completion string (no chat template); the completion is learnt;
- "text": raw text (continued pretraining); every token is learnt.

Encodings: UTF-8, with or without a byte-order mark (the BOM is dropped). Anything else (UTF-16, cp1252, GB2312...)
is an error naming the file and the first offending byte: re-encode the file as UTF-8.

Nothing is dropped silently: a column or turn key the format does not use, and a control character in any text
(other than tab, newline and carriage return), are errors naming the row and the field.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft.config import DataConfig, SourceConfig
from sft.errors import SftError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
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


@dataclass
class Example:
    kind: str  # "chat" | "completion" | "text"
    where: str  # "data/train.jsonl line 12": for error messages
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt: str = ""
    completion: str = ""
    text: str = ""
    tools: Any = None

    def key(self) -> str:
        """What makes two examples the same (for duplicates and train/eval overlap)."""
        return json.dumps([self.messages, self.prompt, self.completion, self.text], sort_keys=True)


@dataclass
class Source:
    path: Path
    format: str
    examples: list[Example]
    sha256: str


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    sources: list[Source]
    warnings: list[str]

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for source in self.sources:
            digest.update(f"{source.path.name}:{source.format}:{source.sha256}\n".encode())
        return digest.hexdigest()[:16]


def load_dataset(config: DataConfig) -> Dataset:
    """Read every source, split train/eval, and return normalised examples; raise `SftError` on bad input."""
    train_sources = [read_source(s) for s in config.train]
    eval_sources = [read_source(s) for s in config.eval] if config.eval else []
    train = [e for s in train_sources for e in s.examples]
    if eval_sources:
        evals = [e for s in eval_sources for e in s.examples]
    else:
        order = list(range(len(train)))
        random.Random(config.seed).shuffle(order)
        n_eval = max(1, round(len(train) * config.eval_fraction))
        if len(train) - n_eval < 1:
            raise SftError(f"data: {len(train)} row(s) are too few to split off an eval set; give data.eval")
        evals = [train[i] for i in sorted(order[:n_eval])]
        train = [train[i] for i in sorted(order[n_eval:])]

    warnings = []
    dup = len(train) - len({e.key() for e in train})
    if dup:
        warnings.append(f"{dup} training row(s) are exact duplicates of another")
    overlap = {e.key() for e in train} & {e.key() for e in evals}
    if overlap:
        warnings.append(f"{len(overlap)} eval row(s) also appear in the training data: eval scores are inflated")
    return Dataset(train=train, eval=evals, sources=train_sources + eval_sources, warnings=warnings)


def source_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise SftError(f"{path}: folder holds no data files (expected {', '.join(SUFFIXES)})")
        return files
    if not path.exists():
        raise SftError(f"data file not found: {path} (resolved to {path.resolve()})")
    if path.suffix not in SUFFIXES:
        raise SftError(f"{path}: unsupported file type {path.suffix!r} (expected {', '.join(SUFFIXES)})")
    return [path]


def read_source(source: SourceConfig) -> Source:
    path = Path(source.path)
    files = source_files(path)
    digest = hashlib.sha256()
    examples: list[Example] = []
    fmt = source.format
    for file in files:
        data = file.read_bytes()
        digest.update(data)
        rows = read_rows(file, data)
        if fmt == "auto":
            fmt = detect_format(rows[0][1], f"{file} {rows[0][0]}")
        examples += [normalise(row, fmt, f"{file} {where}", source.extra_fields) for where, row in rows]
    return Source(path=path, format=fmt, examples=examples, sha256=digest.hexdigest())


def decode(file: Path, data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(data) > 1 and b"\x00" in data[:1000]):
        raise SftError(f"{file}: looks like UTF-16 (byte-order mark or NUL bytes); expected UTF-8 - re-encode it")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SftError(
            f"{file}: not UTF-8: byte 0x{data[err.start]:02x} at offset {err.start} (line {line}); "
            "expected UTF-8 text - re-encode the file (e.g. from cp1252 or GB2312)"
        ) from None


def read_rows(file: Path, data: bytes) -> list[tuple[str, dict]]:
    """Rows of one file as (where, row) pairs, `where` being "line N" or "row N" for messages."""
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(io.BytesIO(data)).to_pylist()
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise SftError(f"{file}: not a readable parquet file ({err})") from None
        pairs = [(f"row {i}", r) for i, r in enumerate(rows)]
    else:
        text = decode(file, data)
        if not text.strip():
            raise SftError(f"{file}: file is empty; expected at least one row")
        if file.suffix == ".csv":
            pairs = _csv_rows(file, text)
        elif file.suffix == ".jsonl":
            pairs = list(_jsonl_rows(file, text))
        else:
            pairs = _json_rows(file, text)
    if not pairs:
        raise SftError(f"{file}: no rows; expected at least one")
    for where, row in pairs:
        if not isinstance(row, dict):
            raise SftError(f"{file} {where}: expected an object with named fields, got {type(row).__name__}")
    return pairs


def _csv_rows(file: Path, text: str) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(text))
    pairs, end = [], 1  # `end`: the last line of the header or previous record (a quoted value may span lines)
    for row in reader:
        where, end = f"line {end + 1}", reader.line_num
        columns = reader.fieldnames or []
        if None in row or None in row.values():
            count = len(columns) + len(row.get(None) or []) - sum(v is None for v in row.values())
            raise SftError(
                f"{file} {where}: {count} value(s) but the header has {len(columns)} column(s) {columns}; "
                "expected one value per column (quote values that hold commas)"
            )
        pairs.append((where, row))
    return pairs


def _jsonl_rows(file: Path, text: str):
    stripped = text.lstrip()
    if stripped.startswith("[") and "\n" in stripped and stripped.rstrip().endswith("]"):
        try:
            json.loads(text)
            raise SftError(f"{file}: holds one JSON array, not JSON Lines; rename it to {file.stem}.json")
        except json.JSONDecodeError:
            pass
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as err:
            raise SftError(
                f"{file} line {number}: malformed JSON ({err.msg} at column {err.colno}); "
                "expected one JSON object per line"
            ) from None


def _json_rows(file: Path, text: str) -> list[tuple[str, Any]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":
            raise SftError(
                f"{file}: several JSON values, one per line: this is JSON Lines; rename it to {file.stem}.jsonl"
            ) from None
        raise SftError(f"{file} line {err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    if isinstance(value, dict):
        value = [value]  # a single top-level object is one row
    if not isinstance(value, list):
        raise SftError(f"{file}: expected a JSON array of objects (or one object), got {type(value).__name__}")
    return [(f"row {i}", row) for i, row in enumerate(value)]


FORMAT_FIELDS = {  # every field each format reads; any other (non-null) field would be ignored, so it is an error
    "messages": ("messages", "tools"),
    "sharegpt": ("conversations", "tools"),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0 (bar tab, LF, CR), DEL, C1

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
    found = CONTROL_CHARS.search(value)
    if found:
        raise SftError(
            f"{where}: field {key!r} holds control character U+{ord(found.group()):04X} at character {found.start()}; "
            "expected text (tab, newline and carriage return are the only control characters allowed)"
        )


def _unused(row: dict, known: tuple[str, ...]) -> list[str]:
    """Keys that would be ignored: not read by the format and not null (a null loses nothing, e.g. parquet structs)."""
    return sorted(str(k) for k, v in row.items() if k not in known and v is not None)


def normalise(row: dict, fmt: str, where: str, extra_fields: str = "error") -> Example:
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
        return _chat(row["conversations"], where, "conversations", "from", "value", row.get("tools"), SHAREGPT_ROLES)
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
            return _chat(prompt + completion, where, "prompt/completion", "role", "content")
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
        unused = _unused(turn, (role_key, content_key))
        if unused:
            raise SftError(f"{at}: key(s) {unused} would be ignored; expected only {role_key!r} and {content_key!r}")
        role = turn.get(role_key)
        if role_map is not None:
            if not isinstance(role, str) or role not in role_map:  # a list or object role is unhashable
                raise SftError(f"{at}: unknown role {role!r}; expected one of {sorted(role_map)}")
            role = role_map[role]
        elif role not in ROLES:
            raise SftError(f"{at}: unknown role {role!r}; expected one of {list(ROLES)}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise SftError(f"{at}: {content_key!r} must be a string, got {type(content).__name__}")
        _plain_text(content, at, content_key)
        messages.append({"role": role, "content": content})
    check_turns(messages, where, field_name)
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise SftError(f"{where}: field 'tools' is a string but not JSON") from None
    return Example(kind="chat", where=where, messages=messages, tools=tools)


def check_turns(messages: list[dict[str, str]], where: str, field_name: str) -> None:
    """System only first; user and assistant alternate (tool results answer an assistant); end on the assistant."""
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
        if role == "assistant" and not message["content"].strip():
            raise SftError(f"{at}: empty assistant turn; expected an answer to learn")
        previous = role
    if previous != "assistant":
        raise SftError(f"{where}: conversation ends with a {previous} turn; expected it to end with the assistant")
