"""Where rows come from: files, folders, saved datasets and the hub, each read into one `Source` of examples.

Sources: `.jsonl`, `.json`, `.csv` and `.parquet` files and folders of them; a folder written by `datasets`'
`save_to_disk` (a DatasetDict gives the source's `split`); and, when no such local path exists, a Hugging Face hub
dataset id (`owner/name`, with `subset` and `split`), which needs the network.

Encodings: UTF-8, with or without a byte-order mark (the BOM is dropped). Anything else (UTF-16, cp1252, GB2312...)
is an error naming the file and the first offending byte: re-encode the file as UTF-8.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.config import SourceConfig
from sft.data.formats import (
    Example,
    check_column_map,
    detect_format,
    map_columns,
    normalise,
    template_example,
    with_column_map,
)
from sft.errors import SftError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name


@dataclass
class Source:
    path: Path
    format: str
    examples: list[Example]  # every row as read, before the split and the weight
    sha256: str
    used: int = 0  # rows it gives: to training after the split and its weight (repeats counted), or to eval
    held_out: int = 0  # rows of a training source split off into eval


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
            raise with_column_map(err, source.columns) from None
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
