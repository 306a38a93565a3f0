"""Config sweeps (work in progress)."""

from __future__ import annotations

from pathlib import Path

from sft.errors import SftError


def run_sweep(path: Path, overrides: list[str]) -> Path:
    raise SftError("sft sweep is not implemented yet")
