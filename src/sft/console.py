"""Progress lines on stderr, the same from every stage: `[sft] message`, the rank under a multi-process launch,
secrets masked."""

from __future__ import annotations

import os
import sys

from sft.runs import redact_text


def log(message: str, prefix: str = "sft") -> None:
    """Progress to stderr, prefixed with the rank under a multi-process launch (torchrun/accelerate set RANK)."""
    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print(redact_text(f"[{prefix}] {rank}{message}"), file=sys.stderr, flush=True)
