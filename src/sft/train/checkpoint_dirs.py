"""Checkpoints complete or absent: only folders with a valid completion marker count, the rest is removed on resume."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from sft.runs import is_complete, write_text

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in `folder`, oldest step first. A folder without a valid completion marker (a save
    that was cut short, or one not written by sft) is never resumed from."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if is_complete(p)]


def discard_incomplete(folder: Path) -> list[Path]:
    """Remove half-written checkpoints (staging leftovers of a killed save, folders without a marker)."""
    removed = []
    if folder.is_dir():
        complete = set(checkpoints(folder))
        for path in folder.iterdir():
            if path.is_dir() and path not in complete and (CHECKPOINT.match(path.name) or path.name == STAGING):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


STAGING = ".staging"


def rotate(folder: Path, keep: int | None, best: str | None) -> None:
    """Keep the newest `keep` complete checkpoints (and the best one); only complete ones count."""
    if not keep:
        return
    complete = checkpoints(folder)
    for path in complete[:-keep]:
        if best is None or Path(best).name != path.name:
            shutil.rmtree(path, ignore_errors=True)


def truncate_log(path: Path, step: int) -> None:
    """Drop the lines a killed run wrote after `step` (the checkpoint resumed from): they are trained again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if json.loads(line).get("step", 0) <= step]
    write_text(path, "".join(line + "\n" for line in kept))
