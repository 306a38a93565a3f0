"""Preemption (SIGTERM) and Ctrl-C (SIGINT) during training: finish the step, save, stop with 128 + the signal."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch

from sft.console import log
from sft.errors import SftError


class Interrupted(SftError):
    """SIGTERM or SIGINT: training saved a checkpoint at the end of the step and stopped; exit 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """Preemption (SIGTERM) and Ctrl-C (SIGINT) while training: finish the step, save a checkpoint, stop cleanly.

    Outside the training loop the signal stops the process at once (the run folder records it). A second Ctrl-C
    while the checkpoint is being written stops at once too. Every rank stops at the same step.
    """

    def __init__(self):
        self.requested: int | None = None
        self.training = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None or not self.training:
            self.requested = signum
            raise Interrupted(f"stopped by {name}", signum)
        self.requested = signum
        log(f"{name}: finishing this step, saving a checkpoint, then stopping")

    def stop_now(self, device) -> bool:
        """Whether any rank was asked to stop (a tiny all-reduce under several processes, so all agree)."""
        wanted = self.requested is not None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1 if wanted else 0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            wanted = bool(flag.item())
        return wanted
