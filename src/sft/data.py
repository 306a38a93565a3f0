"""Read labeled data, detect its format, normalise every row, and reject bad input with its location.

Sources: `.jsonl`, `.json`, `.csv` and `.parquet` files and folders of them; a folder written by `datasets`'
`save_to_disk` (a DatasetDict gives the source's `split`); and, when no such local path exists, a Hugging Face hub
dataset id (`owner/name`, with `subset` and `split`), which needs the network.

Every row becomes an `Example` of one of three kinds:
- "chat": a list of {role, content} messages; the assistant turns are what the model learns. In OpenAI form an
  assistant turn may carry `tool_calls` (its content then may be null: it becomes "") and a tool turn `name` and
  `tool_call_id`; these keys are kept for the chat template;
- "completion": a prompt string and a completion string (no chat template); the completion is learnt;
- "text": raw text (continued pretraining); every token is learnt.

Before the format is detected a source's `columns` renames the file's columns to the format's fields; a source's
`template` instead builds a conversation from arbitrary columns.

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
import math
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft.config import DataConfig, RowTemplate, SourceConfig
from sft.errors import SftError, did_you_mean

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
TOOL_KEYS = {"assistant": ("tool_calls",), "tool": ("name", "tool_call_id")}  # OpenAI-form turn keys beyond content
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name


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


@dataclass
class Source:
    path: Path
    format: str
    examples: list[Example]  # every row as read, before the split and the weight
    sha256: str
    used: int = 0  # rows it gives: to training after the split and its weight (repeats counted), or to eval
    held_out: int = 0  # rows of a training source split off into eval


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    sources: list[Source]
    warnings: list[str]

    def fingerprint(self) -> str:
        """The sources' content, and the rows made of it for training and eval: a mapping, template, weight or seed
        turns the same bytes into other rows."""
        digest = hashlib.sha256()
        for source in self.sources:
            digest.update(f"{source.path.name}:{source.format}:{source.sha256}\n".encode())
        for split in (self.train, self.eval):
            digest.update(b"split\n")
            for example in split:
                digest.update(example.key().encode() + b"\n")
        return digest.hexdigest()[:16]


def load_dataset(config: DataConfig) -> Dataset:
    """Read every source, split train/eval, weight the training sources; raise `SftError` on bad input.

    The split comes first so eval rows are drawn from the data as given and never hold a weight's repeated copies;
    duplicates are checked on the rows before weighting too, since a weight's repeats are on purpose.
    """
    train_sources = [read_source(s) for s in config.train]
    eval_sources = [read_source(s) for s in config.eval] if config.eval else []
    if eval_sources:
        parts = [s.examples for s in train_sources]
        evals = [e for s in eval_sources for e in s.examples]
        for source in eval_sources:
            source.used = len(source.examples)
    else:
        parts, evals = split_off_eval(train_sources, config.eval_fraction, config.seed)
    warnings = check_duplicates([e for part in parts for e in part], evals, config.duplicates)
    train = []
    for i, (spec, source, part) in enumerate(zip(config.train, train_sources, parts)):
        taken = apply_weight(part, spec.weight, random.Random(f"{config.seed}:{i}"), spec.path)
        source.used, source.held_out = len(taken), len(source.examples) - len(part)
        train += taken
    return Dataset(train=train, eval=evals, sources=train_sources + eval_sources, warnings=warnings)


def split_off_eval(sources: list[Source], fraction: float, seed: int) -> tuple[list[list[Example]], list[Example]]:
    """Hold out `fraction` of all training rows, drawn with `seed` over the sources pooled in order.

    Returns each source's training part (in file order) and the eval rows. The draw does not depend on weights, so
    changing a weight never moves a row between train and eval.
    """
    pooled = [(i, e) for i, source in enumerate(sources) for e in source.examples]
    order = list(range(len(pooled)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(pooled) * fraction))
    if len(pooled) - n_eval < 1:
        raise SftError(f"data: {len(pooled)} row(s) are too few to split off an eval set; give data.eval")
    held = set(order[:n_eval])
    parts: list[list[Example]] = [[] for _ in sources]
    for j, (i, example) in enumerate(pooled):
        if j not in held:
            parts[i].append(example)
    return parts, [pooled[j][1] for j in sorted(held)]


def apply_weight(rows: list[Example], weight: float, rng: random.Random, name: str) -> list[Example]:
    """round(weight * len(rows)) rows, half up: whole copies of every row, then a seeded sample of the remainder
    without replacement (kept in file order), so a weight of 0.5 is half the rows and 2.5 is every row 2 or 3 times.
    """
    if weight == 1 or not rows:
        return list(rows)
    n = math.floor(weight * len(rows) + 0.5)
    if n == 0:
        raise SftError(
            f"data source {name}: weight {weight} of its {len(rows)} training row(s) rounds to 0 rows; expected a "
            f"weight of at least {0.5 / len(rows):.3g}, or remove the source"
        )
    copies, rest = divmod(n, len(rows))
    picked = sorted(rng.sample(range(len(rows)), rest))
    return rows * copies + [rows[i] for i in picked]


def check_duplicates(train: list[Example], evals: list[Example], mode: str) -> list[str]:
    """Exact duplicate training rows, and eval rows that are also training rows: warnings, each with one location,
    or (mode "error") one `SftError` naming the counts and those locations."""
    first_seen: dict[str, str] = {}
    repeats: list[tuple[str, str]] = []
    for example in train:
        key = example.key()
        if key in first_seen:
            repeats.append((example.where, first_seen[key]))
        else:
            first_seen[key] = example.where
    leaked: dict[str, str] = {}
    for example in evals:
        key = example.key()
        if key in first_seen and key not in leaked:
            leaked[key] = example.where
    problems = []
    if repeats:
        where, first = repeats[0]
        problems.append(
            f"{len(repeats)} training row(s) are exact duplicates of another (first: {where} repeats {first})"
        )
    if leaked:
        key, where = next(iter(leaked.items()))
        problems.append(
            f"{len(leaked)} eval row(s) also appear in the training data: eval scores are inflated "
            f"(e.g. eval {where} is train {first_seen[key]})"
        )
    if problems and mode == "error":
        raise SftError(
            "data: " + "; ".join(problems) + ". Expected no duplicates (data.duplicates=error): remove them, or set "
            "data.duplicates=warn"
        )
    return problems


def read_source(source: SourceConfig) -> Source:
    """Read one source: its rows, renamed by `columns`, the format detected once, then every row normalised."""
    rows, sha256 = source_rows(source)
    if source.columns:
        check_column_map(source)
    fmt = source.format
    examples = []
    for where, row in rows:
        if source.columns:
            row = map_columns(row, source.columns, where)
        try:
            if fmt == "auto":
                fmt = detect_format(row, where)
            if fmt == "template":
                assert source.template is not None  # the config guarantees it
                examples.append(template_example(row, source.template, where, source.extra_fields))
            else:
                examples.append(normalise(row, fmt, where, source.extra_fields, source.roles))
        except SftError as err:
            raise _with_column_map(err, source.columns) from None
    return Source(path=Path(source.path), format=fmt, examples=examples, sha256=sha256)


def source_rows(source: SourceConfig) -> tuple[list[tuple[str, dict]], str]:
    """(where, row) pairs of a source and the sha256 of its content; `where` names the file and line or row."""
    path = Path(source.path)
    if path.is_dir() and is_saved_dataset(path):
        return saved_dataset_rows(path, source)
    if not path.exists() and HUB_ID.fullmatch(source.path) and path.suffix not in SUFFIXES:
        return hub_rows(source)
    if source.split != "train" or source.subset is not None:
        raise SftError(
            f"{path}: split and subset select from a Hugging Face dataset, but this source is data files; "
            "remove them from the source"
        )
    digest = hashlib.sha256()
    rows = []
    for file in source_files(path):
        data = file.read_bytes()
        digest.update(data)
        rows += [(f"{file} {where}", row) for where, row in read_rows(file, data)]
    return rows, digest.hexdigest()


def source_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise SftError(
                f"{path}: folder holds no data files (expected {', '.join(SUFFIXES)}, or a folder written by "
                "datasets' save_to_disk)"
            )
        return files
    if not path.exists():
        raise SftError(f"data file not found: {path} (resolved to {path.resolve()})")
    if path.suffix not in SUFFIXES:
        raise SftError(f"{path}: unsupported file type {path.suffix!r} (expected {', '.join(SUFFIXES)})")
    return [path]


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (state.json + dataset_info.json) or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def saved_dataset_rows(path: Path, source: SourceConfig) -> tuple[list[tuple[str, dict]], str]:
    """Rows of a saved dataset, hashed by its arrow files (so the hash follows the content, not the folder's name)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises several types for a damaged folder
        raise SftError(
            f"{path}: looks like a saved Hugging Face dataset but does not load ({type(err).__name__}: {err})"
        ) from None
    if source.subset is not None:
        raise SftError(
            f"{path}: subset {source.subset!r} selects a hub dataset's configuration; remove it for a saved folder"
        )
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            raise SftError(
                f"{path}: the saved DatasetDict has no split {source.split!r}; expected one of {sorted(loaded)} "
                "(set split on this source)"
            )
        table, prefix = loaded[source.split], f"{path} split {source.split}"
    elif source.split != "train":
        raise SftError(
            f"{path}: split {source.split!r} given, but the folder holds one saved Dataset, not a DatasetDict with "
            "splits; remove split from this source"
        )
    else:
        table, prefix = loaded, str(path)
    digest = hashlib.sha256()
    for name in sorted(f["filename"] for f in table.cache_files):
        digest.update(Path(name).name.encode() + b"\0")
        with open(name, "rb") as arrow:
            while chunk := arrow.read(1 << 20):
                digest.update(chunk)
    return dataset_rows(table, prefix), digest.hexdigest()


def hub_rows(source: SourceConfig) -> tuple[list[tuple[str, dict]], str]:
    """Rows of a hub dataset (needs the network, or the datasets cache), hashed by the dataset's `_fingerprint`."""
    import datasets

    try:
        table = datasets.load_dataset(source.path, name=source.subset, split=source.split)
    except Exception as err:  # connection, not found, gated, unknown subset or split: all end the run here
        what = "could not be reached" if isinstance(err, ConnectionError) else "could not be loaded"
        raise SftError(
            f"{source.path}: no such local file or folder (resolved to {Path(source.path).resolve()}), and as a "
            f"Hugging Face hub dataset (subset {source.subset!r}, split {source.split!r}) it {what}: "
            f"{type(err).__name__}: {err}. Expected a local path, or a hub dataset id with network access (offline: "
            "save it with save_to_disk where you are online and give that folder)"
        ) from None
    if not isinstance(table, datasets.Dataset):
        raise SftError(f"{source.path}: expected one split as a datasets.Dataset, got {type(table).__name__}")
    digest = hashlib.sha256(f"hub:{source.path}:{source.subset}:{source.split}:{table._fingerprint}".encode())
    return dataset_rows(table, f"{source.path} split {source.split}"), digest.hexdigest()


def dataset_rows(table: Any, prefix: str) -> list[tuple[str, dict]]:
    if len(table) == 0:
        raise SftError(f"{prefix}: no rows; expected at least one")
    return [(f"{prefix} row {i}", row) for i, row in enumerate(table.to_list())]


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


# ---------------------------------------------------------------------------------------------------------------
# Column mapping and templates


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


def _with_column_map(err: SftError, columns: dict[str, str] | None) -> SftError:
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


# ---------------------------------------------------------------------------------------------------------------
# Formats


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
