"""Shared test fixtures. Real third-party files (tokenizers, chat templates, data sets, bad inputs) are vendored in
tests/fixtures/, each with its origin, licence and sha256 in tests/fixtures/SOURCES.md; `shared()` gives their
path. Everything else is built by the tests themselves."""

from __future__ import annotations

import atexit
import lzma
import os
import shutil
import tempfile
import threading
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
# The largest files are stored xz-compressed as NAME.xz (8 MiB of fixtures instead of 16: the tree travels to the GPU
# machine together with the wheels, 64 MiB per call). Each process unpacks what it uses into its own scratch folder.
SCRATCH = Path(tempfile.mkdtemp(prefix="sft-fixtures-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
_unpacking = threading.Lock()  # test_bad_inputs builds its cases in threads

if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # `make test` runs one pytest-xdist worker per core: each gets its share of the cores as torch threads (read by
    # torch at import, and inherited by the `sft` subprocesses the tests start), not all of them each.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))


def pytest_collection_modifyitems(items: list) -> None:
    """Modules with the most end-to-end (`slow`) tests first, the rest in file order: pytest-xdist hands out whole
    files in this order (`--dist loadfile --no-loadscope-reorder`), so the longest start early instead of last."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


def shared(relative: str) -> Path:
    """Path of the vendored file or folder tests/fixtures/RELATIVE, with its real bytes (unpacked where it is stored
    as RELATIVE.xz). A missing fixture is an error, never a skip: the files ship with the repository."""
    source, packed = FIXTURES / relative, FIXTURES / f"{relative}.xz"
    if source.is_file():
        return source
    if packed.is_file():
        return _unpacked(packed, relative)
    if source.is_dir():
        files = list(source.iterdir())
        if not any(path.suffix == ".xz" for path in files):
            return source
        for path in files:  # a folder that holds packed files loads as a whole: an unpacked copy of all of it
            _unpacked(path, f"{relative}/{path.name.removesuffix('.xz')}")
        return SCRATCH / relative
    raise FileNotFoundError(f"tests/fixtures/{relative} is missing: every fixture ships with the repository")


def _unpacked(path: Path, relative: str) -> Path:
    """The vendored file PATH (xz-compressed or not) as SCRATCH/RELATIVE."""
    target = SCRATCH / relative
    with _unpacking:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            data = path.read_bytes()
            target.write_bytes(lzma.decompress(data) if path.suffix == ".xz" else data)
    return target
