"""Shared test fixtures. Real third-party files live in ../shared/fixtures (beside the repo); tests that need them
skip with a clear reason in a clone that lacks it. Everything else builds its own fixtures here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SFT_SHARED_FIXTURES", ROOT.parent / "shared" / "fixtures"))


def shared(relative: str) -> Path:
    """Path of a file in ../shared/fixtures, or skip the test when this clone has no such folder."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"needs the shared fixture {relative} (../shared/fixtures is absent in this clone)")
    return path
