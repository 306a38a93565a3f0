"""Never lose a run: a real SIGKILL, SIGTERM or SIGINT mid-training, then `sft train --resume`, ends with the same
adapter bytes, the same loss log and the same batches as a run that was never stopped; a failed save keeps the
previous checkpoint; a half-written checkpoint is never resumed from; a changed config or data is refused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_cli import ROOT, assert_user_error, sft
from tests.test_pipeline import tiny_config

STEPS = 60


def write_config(tmp: Path, name: str, **train) -> Path:
    raw = tiny_config(tmp, max_steps=STEPS, logging_steps=1, save_strategy="steps", save_steps=5, eval_steps=10)
    raw["train"].update(train)
    raw["data"]["cache_dir"] = str(tmp / "cache")
    raw.update(eval={"enabled": False}, export={"merged": False, "verify": False})
    raw["output"]["name"] = name
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def losses(run: Path) -> list[tuple]:
    """The loss log without timings: step, loss, gradient norm, learning rate, held-out loss."""
    keys = ("step", "loss", "grad_norm", "learning_rate", "eval_loss")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [tuple(entry.get(k) for k in keys) for entry in lines if "loss" in entry or "eval_loss" in entry]


def outcome(run: Path) -> tuple[bytes, list[tuple], str]:
    return (run / "adapter/adapter_model.safetensors").read_bytes(), losses(run), (run / "data_order.jsonl").read_text()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference: the same config trained to the end without a stop."""
    tmp = tmp_path_factory.mktemp("resume")
    result = sft("train", str(write_config(tmp, "straight")))
    assert result.returncode == 0, result.stderr
    run = tmp / "runs" / "straight"
    assert len(losses(run)) == STEPS + STEPS // 10
    return tmp, outcome(run)


def stop_after(config: Path, run: Path, step: int, signum: int) -> subprocess.CompletedProcess:
    """Start `sft train` in a subprocess and send it `signum` once the loss of `step` is logged."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sft", "train", str(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    metrics = run / "metrics.jsonl"
    while f'"step": {step},' not in (metrics.read_text() if metrics.is_file() else ""):
        assert proc.poll() is None, f"sft train ended before step {step}: {proc.stderr.read()}"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_stopped_then_resumed_equals_never_stopped(straight, signum):
    tmp, expected = straight
    name = f"stopped-{signum.name.lower()}"
    config, run = write_config(tmp, name), tmp / "runs" / name
    stopped = stop_after(config, run, 23, signum)
    assert stopped.returncode == -signal.SIGKILL if signum == signal.SIGKILL else 128 + signum
    assert not (run / "adapter").exists()  # nothing exported from a stopped run
    saved = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*"))
    assert saved and saved[-1] >= 20 and saved[-1] < STEPS
    if signum != signal.SIGKILL:  # preemption: the step in progress is finished and saved, and the exit is clean
        assert "Traceback" not in stopped.stderr and f"sft: stopped by {signum.name}" in stopped.stderr
        assert "--resume" in stopped.stderr and saved[-1] >= 23  # saved at the step it was stopped in
        assert json.loads((run / "run.json").read_text())["status"] == "interrupted"

    resumed = sft("train", str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} from checkpoint-{saved[-1]}" in resumed.stderr
    adapter, loss_log, order = outcome(run)
    assert loss_log == expected[1]
    assert order == expected[2]  # the same batches, in the same order
    assert adapter == expected[0]  # byte for byte
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


def test_a_failed_save_keeps_the_previous_checkpoint_and_the_run_resumes(tmp_path, monkeypatch):
    """Fault injection: the third save dies half-way (after the weights, before the optimizer state)."""
    from transformers import Trainer

    from sft.config import load_config
    from sft.errors import SftError
    from sft.pipeline import train_run
    from sft.runs import is_complete

    config = write_config(tmp_path, "fault", max_steps=20)
    real, calls = Trainer._save_optimizer_and_scheduler, []

    def failing(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 3:
            (Path(output_dir) / "optimizer.pt").write_bytes(b"half")
            raise OSError(28, "No space left on device")
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", failing)
    with pytest.raises(SftError, match="saving the checkpoint at step 15 .* failed .*checkpoint-10, is intact"):
        train_run(load_config(config))
    run = tmp_path / "runs" / "fault"
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert names == ["checkpoint-10", "checkpoint-5"]  # nothing half-written, no staging folder left
    assert all(is_complete(run / "checkpoints" / n) for n in names)
    assert json.loads((run / "run.json").read_text())["status"] == "failed"

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", real)
    train_run(load_config(config), resume=True)
    assert (run / "adapter/adapter_model.safetensors").is_file()
    assert [entry[0] for entry in losses(run) if entry[1] is not None] == list(range(1, 21))


def test_a_half_written_checkpoint_is_never_resumed_from(tmp_path):
    from sft.config import load_config
    from sft.pipeline import resumable_run
    from sft.train import checkpoints

    config = write_config(tmp_path, "half", max_steps=10)
    assert sft("train", str(config)).returncode == 0
    run = tmp_path / "runs" / "half"
    (run / "run.json").write_text('{"status": "training"}')  # as if killed during the export
    last = run / "checkpoints" / "checkpoint-10"
    weights = last / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated after its marker was written
    assert [p.name for p in checkpoints(run / "checkpoints")] == ["checkpoint-5"]
    (run / "checkpoints" / "checkpoint-15").mkdir()  # a save cut before its marker
    assert resumable_run(load_config(config), True, _fingerprint(run), False) == (run, run / "checkpoints/checkpoint-5")


def _fingerprint(run: Path) -> str:
    return json.loads((run / "data.json").read_text())["fingerprint"]


def test_resume_refuses_a_changed_config_or_data_and_obeys_force(tmp_path):
    config = write_config(tmp_path, "changed", max_steps=10)
    assert sft("train", str(config), "train.max_steps=5").returncode == 0
    run = tmp_path / "runs" / "changed"
    (run / "run.json").write_text('{"status": "interrupted"}')

    result = sft("train", str(config), "--resume", "train.max_steps=5", "train.learning_rate=0.01")
    assert_user_error(result, "refusing to resume a different run", "-  learning_rate: 0.003", "+  learning_rate: 0.01")
    assert "--force" in result.stderr

    data = tmp_path / "other.jsonl"
    data.write_text((ROOT / "data/reverse/train.jsonl").read_text().replace("the", "a"))
    result = sft("train", str(config), "--resume", "train.max_steps=5", f"data.train={data}")
    assert_user_error(result, "the data changed: fingerprint")

    forced = sft("train", str(config), "--resume", "--force", "train.max_steps=10")
    assert forced.returncode == 0, forced.stderr
    assert "resuming anyway (--force)" in forced.stderr and "max_steps: 10" in (run / "config.yaml").read_text()
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert_user_error(sft("train", str(config), "--resume"), "nothing to resume, this run is complete")


def test_nothing_to_resume_and_a_run_in_use(tmp_path):
    from sft.runs import run_lock

    config = write_config(tmp_path, "none", max_steps=5, save_strategy="no")
    assert_user_error(sft("train", str(config), "--resume"), "nothing to resume: no run of 'none'")
    assert sft("train", str(config)).returncode == 0
    run = tmp_path / "runs" / "none"
    (run / "run.json").write_text('{"status": "failed"}')
    assert_user_error(sft("train", str(config), "--resume"), "no complete checkpoint to resume from", "save_steps")

    with run_lock(run):  # another sft process is writing into this run
        assert_user_error(sft("export", str(run)), f"{run}: in use by another sft process")
