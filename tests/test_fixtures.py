"""The vendored third-party files are the ones tests/fixtures/SOURCES.md lists, byte for byte: a fixture edited by
accident (or a licence dropped) fails here, not as a puzzling tokenizer difference elsewhere."""

from __future__ import annotations

import hashlib
import re

import pytest

from tests.conftest import FIXTURES, shared

ROW = re.compile(r"^\| `([^`]+)` \| (xz)? *\| .* \| (\d+) \| ([0-9a-f]{64}) \| [^|]* \|$")


def listed() -> dict[str, tuple[bool, int, str]]:
    rows = {}
    for line in (FIXTURES / "SOURCES.md").read_text(encoding="utf-8").splitlines():
        if match := ROW.match(line):
            name, packed, size, sha = match.groups()
            rows[name] = (packed == "xz", int(size), sha)
    return rows


LISTED = listed()


def test_every_file_is_listed_and_every_listed_file_is_there():
    stored = {p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*") if p.is_file()} - {"SOURCES.md"}
    expected = {f"{name}.xz" if packed else name for name, (packed, _, _) in LISTED.items()}
    assert len(LISTED) > 80
    assert stored == expected


def test_every_file_has_the_listed_bytes():
    actual = {}
    for name in LISTED:
        data = shared(name).read_bytes()
        actual[name] = (len(data), hashlib.sha256(data).hexdigest())
    assert {name: got for name, got in actual.items() if got != LISTED[name][1:]} == {}


def test_a_folder_with_packed_files_is_unpacked_whole():
    folder = shared("tokenizers/t5_spm")
    assert sorted(p.name for p in folder.iterdir()) == ["spiece.model", "tokenizer.json", "tokenizer_config.json"]
    assert (folder / "tokenizer_config.json").read_bytes() == (
        FIXTURES / "tokenizers/t5_spm/tokenizer_config.json"
    ).read_bytes()
    assert shared("tokenizers/qwen2_5") == FIXTURES / "tokenizers/qwen2_5"  # nothing packed: the folder itself


def test_a_missing_fixture_is_an_error_not_a_skip():
    with pytest.raises(FileNotFoundError, match="tests/fixtures/tokenizers/nope is missing"):
        shared("tokenizers/nope")
