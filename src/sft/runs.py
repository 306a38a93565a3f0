"""Run folders that describe themselves: resolved config, library versions, git sha, data fingerprint, metrics."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sft.errors import SftError

LIBRARIES = ("sft", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers", "safetensors")


def create_run_dir(runs_dir: str, name: str) -> Path:
    """A new folder runs_dir/name, or name-2, name-3... if taken: a run never overwrites another."""
    root = Path(runs_dir)
    check_runs_dir(runs_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SftError(f"output.runs_dir={runs_dir!r}: cannot create it ({err.strerror})") from None
    for n in range(1, 10_000):
        path = root / (name if n == 1 else f"{name}-{n}")
        try:
            path.mkdir()  # atomic: two processes can never get the same folder
            return path
        except FileExistsError:
            continue
    raise SftError(f"{root}: no free run folder name for {name!r}")


def check_runs_dir(runs_dir: str) -> None:
    """Fail before any work if the runs folder cannot be one (checked again, atomically, when the run starts)."""
    for parent in [Path(runs_dir), *Path(runs_dir).parents]:
        if parent.exists():
            if not parent.is_dir():
                raise SftError(f"output.runs_dir={runs_dir!r}: {parent} is a file, not a folder")
            return


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def git_sha() -> str | None:
    """The commit of the sft code that ran (its checkout, wherever the run was started from), "-dirty" if edited."""
    here = ["git", "-C", str(Path(__file__).resolve().parent)]
    try:
        sha = subprocess.run([*here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run([*here, "status", "--porcelain"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = version(lib)
        except PackageNotFoundError:
            versions[lib] = None
    return {
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "git_sha": git_sha(),
    }
