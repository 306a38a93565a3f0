"""Run folders that describe themselves: resolved config, library versions, git sha, data fingerprint, metrics."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
    """Atomically (a reader sees the old file or the new one), with secrets redacted."""
    write_text(path, json.dumps(redact(data), indent=2, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Atomically, with secrets redacted: a crash mid-write leaves the previous version, never half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(redact_text(text), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    """A run-folder JSON file, or {} when it is missing or unreadable (a run killed before writing it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


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


# ---------------------------------------------------------------------------------------------------------------
# Complete or absent: folders are written under a temporary name, marked complete, then renamed.

COMPLETE = "sft_complete.json"


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it gets a completion marker and replaces `final`, on failure it
    is removed and `final` (if any) is left as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published folder should read like any other
    try:
        yield tmp
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(staged: Path, final: Path, **meta: Any) -> None:
    """Mark `staged` complete (every file with its size, flushed to disk) and rename it to `final`."""
    files = {str(p.relative_to(staged)): p.stat().st_size for p in sorted(staged.rglob("*")) if p.is_file()}
    marker = staged / COMPLETE
    marker.write_text(json.dumps({**meta, "files": files}, indent=2) + "\n", encoding="utf-8")
    _fsync_tree(staged)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        staged.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staged.rename(final)
    _fsync(final.parent)


def is_complete(folder: Path) -> bool:
    """The folder was published by `publish` and every file it listed is still there with its size."""
    try:
        files = json.loads((folder / COMPLETE).read_text(encoding="utf-8"))["files"]
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync(folder)


def _fsync(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# Disk space and concurrency.


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    for folder in [path, *path.parents]:
        if folder.exists():
            return shutil.disk_usage(folder).free
    return shutil.disk_usage(".").free


def check_free_space(path: Path, needed: int, what: str) -> None:
    """Refuse to start a write that cannot finish: a full disk mid-save is how checkpoints get corrupted."""
    needed = int(needed * 1.2) + (64 << 20)  # 20% and 64 MiB of headroom for metadata and the file system
    free = free_bytes(path)
    if free < needed:
        raise SftError(
            f"not enough disk space for {what} in {path}: about {_mib(needed)} needed, {_mib(free)} free. "
            "Free some space (old runs, checkpoints, caches) or point output.runs_dir at a larger disk"
        )


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold RUN/.lock while this process writes into the run: a second `sft train --resume`, `sft export` or
    `sft eval` on the same run folder stops with a message instead of interleaving its writes."""
    try:
        import fcntl
    except ImportError:  # Windows: run folders are still unique per run; there is no shared-writer protection
        yield
        return
    path = run_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise SftError(
                f"{run_dir}: in use by another sft process (pid {holder}); wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock, also when the process is killed


# ---------------------------------------------------------------------------------------------------------------
# Secrets never reach a file or a log line.

SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|api_key|apikey|access_key|auth|credentials?)$", re.I)
NOT_SECRET = {"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token"}
SECRET_VALUE = re.compile(
    r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|ghp_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|xox[bp]-[\w-]{10,})"
)
REDACTED = "<redacted>"


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key)) and key.lower() not in NOT_SECRET


def redact(data: Any) -> Any:
    """`data` with the value of every secret-named key replaced, and token-shaped strings masked anywhere."""
    if isinstance(data, dict):
        return {
            k: (REDACTED if is_secret_key(str(k)) and v not in (None, "", False) else redact(v))
            for k, v in data.items()
        }
    if isinstance(data, (list, tuple)):
        return [redact(v) for v in data]
    if isinstance(data, str):
        return redact_text(data)
    return data


def redact_text(text: str) -> str:
    """Mask token-shaped strings and the values of secret environment variables (HF_TOKEN, WANDB_API_KEY...)."""
    text = SECRET_VALUE.sub(REDACTED, text)
    for value in _environment_secrets():
        text = text.replace(value, REDACTED)
    return text


def _environment_secrets() -> list[str]:
    return [
        v
        for k, v in os.environ.items()
        if len(v) >= 8 and (is_secret_key(k) or k.endswith(("_TOKEN", "_KEY", "_SECRET", "_PASSWORD")))
    ]
