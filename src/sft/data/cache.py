"""Tokenized data cached on disk, keyed by everything that changes the tokens.

The key hashes the normalised examples themselves (so every source's content, format, mapping, weighting and the
train/eval split are in it without listing config fields), the tokenizer's full state and chat template,
`max_length` and the too-long policy, the library versions, and the source of the code that turns examples into
tokens. Change any of them and the data is tokenized again; a stale cache (PITFALLS #13) cannot be hit.

Stored as safetensors (two flat int32 arrays and row offsets) plus a JSON file: no pickle, loads in milliseconds.
"""

from __future__ import annotations

import gc
import hashlib
import json
import marshal
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tokenizers
import transformers
from safetensors.numpy import load_file, save_file
from transformers import PreTrainedTokenizerBase

import sft
from sft.data import formats, load, sources, tokenize
from sft.data.formats import Example
from sft.data.tokenize import Tokenized, TokenStats, tokenize_examples

FORMAT = 1  # bump when the layout below changes


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "vocab.txt")


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's vocabulary and rules (its files, or its full serialisation when it has no local folder) and
    the in-memory state that can differ from them: template, added and special tokens."""
    digest = hashlib.sha256()
    folder = Path(str(tokenizer.name_or_path))
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()] if folder.is_dir() else []
    if files:  # hashing the files: ~3 ms for Qwen2.5, where serialising the tokenizer takes ~90 ms
        for file in files:
            digest.update(file.name.encode())  # the same stream as name + bytes, without copying megabytes to join them
            digest.update(file.read_bytes())
    else:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        digest.update(backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab()).encode())
    digest.update(str(tokenizer.chat_template).encode())
    added = {i: str(t) for i, t in tokenizer.added_tokens_decoder.items()}
    digest.update(
        json.dumps([len(tokenizer), added, tokenizer.special_tokens_map], sort_keys=True, default=str).encode()
    )
    digest.update(str([getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)]).encode())
    return digest.hexdigest()


def _serialise(value: object) -> bytes:
    """The same bytes for equal values, different bytes for different ones. marshal format 2 tags each value with
    its type and length and, unlike later formats, writes no back-references and no interning flags, which would
    depend on object identity: ~1.3 ms for 1k Alpaca rows where json.dumps takes ~4.5 ms. Values marshal cannot
    write (objects in `tools`) go through json."""
    try:
        return b"marshal2:" + marshal.dumps(value, 2)
    except ValueError:
        return b"json:" + json.dumps(value, sort_keys=True, default=str).encode()


def cache_key(examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int, on_too_long: str) -> str:
    digest = hashlib.sha256()
    digest.update(_serialise([vars(example) for example in examples]))  # every field, so a field added later too
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    digest.update(f"{max_length}:{on_too_long}:{FORMAT}".encode())
    # The versions of the libraries loaded in this process (importlib.metadata reads each from disk: ~1 ms for three)
    for lib in (transformers, tokenizers, sft):
        digest.update(f"{lib.__name__}={lib.__version__}".encode())
    for module in (tokenize, formats, sources, load):  # the code that decides the tokens and the labels
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:24]


def tokenize_cached(
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    on_too_long: str,
    cache_dir: str | None,
) -> tuple[Tokenized, bool]:
    """`tokenize_examples`, through the cache when `cache_dir` is set; returns (tokens, whether it was a hit)."""
    if cache_dir is None:
        return tokenize_examples(examples, tokenizer, max_length, on_too_long), False
    folder = Path(cache_dir) / cache_key(examples, tokenizer, max_length, on_too_long)
    if (folder / "meta.json").is_file():
        return _load(folder), True
    tokenized = tokenize_examples(examples, tokenizer, max_length, on_too_long)
    _save(tokenized, folder)
    return tokenized, False


def _save(tokenized: Tokenized, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    tmp.chmod(0o755)
    try:
        lengths = [len(row["input_ids"]) for row in tokenized.rows]
        save_file(
            {
                "input_ids": np.fromiter((t for r in tokenized.rows for t in r["input_ids"]), dtype=np.int32),
                "labels": np.fromiter((t for r in tokenized.rows for t in r["labels"]), dtype=np.int32),
                "offsets": np.cumsum([0, *lengths], dtype=np.int64),
            },
            str(tmp / "tokens.safetensors"),
        )
        meta = {"stats": asdict(tokenized.stats), "end_tokens": sorted(tokenized.end_tokens)}
        (tmp / "meta.json").write_text(json.dumps(meta))  # written last: its presence marks a complete entry
        try:
            tmp.rename(folder)
        except OSError:  # another process cached the same key first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def _no_gc():
    """Building a dict and two lists per row would start the cyclic collector several times over the young lists,
    walking every element, when none of them can be garbage: off while the rows are built (~1/3 of a load)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _rows(ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> list[dict[str, list[int]]]:
    """The rows as lists of Python ints, each distinct value created once and shared (~15k distinct of ~390k ids and
    labels in 1k Alpaca rows): most of the time of `tolist()` went into creating an int object per element."""
    if ids.size == 0:
        return [{"input_ids": [], "labels": []} for _ in range(len(offsets) - 1)]
    bounds = offsets.tolist()
    with _no_gc():
        low = min(int(ids.min()), int(labels.min()))
        present = np.zeros(max(int(ids.max()), int(labels.max())) - low + 1, dtype=bool)
        present[ids - low] = True
        present[labels - low] = True
        values = np.flatnonzero(present)
        table = np.empty(len(present), dtype=object)  # value - low -> its one Python int
        table[values] = (values + low).tolist()
        shared_ids, shared_labels = table[ids - low], table[labels - low]
        return [
            {"input_ids": shared_ids[a:b].tolist(), "labels": shared_labels[a:b].tolist()}
            for a, b in zip(bounds[:-1], bounds[1:])
        ]


def _load(folder: Path) -> Tokenized:
    arrays = load_file(str(folder / "tokens.safetensors"))
    meta = json.loads((folder / "meta.json").read_text())
    rows = _rows(arrays["input_ids"], arrays["labels"], arrays["offsets"])
    return Tokenized(rows=rows, stats=TokenStats(**meta["stats"]), end_tokens=set(meta["end_tokens"]))
