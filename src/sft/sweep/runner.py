"""Running a sweep: one `sft train` run per trial, in a subprocess (locally, on CUDA devices, or as Ray tasks).

Each trial is `python -m sft train BASE key=value ...` in a subprocess, so a crashed trial is recorded as failed and
the sweep goes on. Its run folder is `<output.dir>/trials/trial-<n>-<hash>`, the hash covering the base file and
every override the trial gets: rerunning the same sweep skips each trial that already has a complete run (run.json
status complete), so a killed sweep resumes where it stopped. Every trial's config is validated before the first
one starts. Results (`results.csv`, `results.md`, `objective_vs_<param>.png`, `best_config.yaml`) are rebuilt from
the run folders at the end of every invocation.
"""

from __future__ import annotations

import json
import os
import queue
import random
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sft.config import read_yaml
from sft.console import log
from sft.errors import SftError
from sft.runs import read_json, write_json
from sft.sweep.results import write_results
from sft.sweep.space import (
    EVAL_METRICS,
    Choices,
    Range,
    SweepFile,
    check_trial,
    corners,
    grid,
    load_sweep,
    params_label,
    sample,
    short,
    trial_hash,
    trial_overrides,
)

TRIAL_RECORD = "sweep_trial.json"  # written by the sweep into each finished trial's run folder


def say(message: str) -> None:
    log(message, prefix="sweep")


def execute(cmd: list[str], env: dict[str, str], log_path: str, cwd: str) -> tuple[int, float]:
    """Run `python CMD...` (or `LAUNCHER CMD...`) with its output in log_path; its exit code and peak RSS in MB.

    The peak RSS is the kernel's for this child (os.wait4): the largest resident set of the trial process, or of
    any process it waited for (each accelerate rank, under a launcher), not their sum.
    """
    if not cmd[0].startswith("-"):  # a launcher such as `accelerate launch ...`: it starts Python itself
        argv = cmd
    else:
        argv = [sys.executable, *cmd]
    with open(log_path, "a", encoding="utf-8") as log_file:
        log_file.write(f"$ {shlex.join(argv)}\n")
        log_file.flush()
        environment = {**os.environ, "PYTHONWARNINGS": "ignore", **env}
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=environment, cwd=cwd)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, round(usage.ru_maxrss / 1024, 1)  # Linux reports KiB


def ray_executor(sweep: SweepFile):
    """`executor: ray`: each trial's subprocess runs as a Ray task (on any node of the cluster, with its resources).

    Trials write to output.dir, so it (and the data and model paths) must be on a filesystem every node sees.
    """
    try:
        import ray
    except ImportError:
        raise SftError(
            "executor: ray needs ray, an optional extra: pip install -e '.[ray]' (or pip install ray)"
        ) from None
    if not ray.is_initialized():
        ray.init(address=sweep.ray.address, log_to_driver=False, include_dashboard=False)
        say(f"ray: connected to {sweep.ray.address or 'a new local cluster'} ({ray.cluster_resources()})")
    task = ray.remote(execute).options(num_cpus=sweep.ray.cpus_per_trial, num_gpus=sweep.ray.gpus_per_trial)

    def on_ray(cmd: list[str], env: dict[str, str], log_path: str, cwd: str) -> tuple[int, float]:
        return ray.get(task.remote(cmd, env, log_path, cwd))

    return on_ray


class Runner:
    """Runs (or finds) trials; one object per `sft sweep` invocation."""

    def __init__(self, sweep: SweepFile, base: Path, out: Path, total: int):
        self.sweep, self.base, self.out, self.total = sweep, base, out, total
        self.base_text = base.read_text(encoding="utf-8")
        self.trials_dir = out / "trials"
        self.started = self.skipped = 0
        self.execute = ray_executor(sweep) if sweep.executor == "ray" else execute

    def name(self, n: int, params: dict[str, Any]) -> tuple[str, list[str]]:
        overrides = trial_overrides(self.sweep, params)
        hashed = trial_hash(self.base_text, overrides, self.sweep.budget.seconds, self.sweep.launch)
        return f"trial-{n}-{hashed}", overrides

    def finished(self, name: str) -> Path | None:
        hashed = name.split("-", 2)[2]
        for run in sorted(self.trials_dir.glob(f"trial-*-{hashed}*")):
            if run.is_dir() and read_json(run / "run.json").get("status") == "complete":
                return run
        return None

    def run(self, n: int, params: dict[str, Any], device: str | None = None) -> dict[str, Any]:
        name, overrides = self.name(n, params)
        label = " ".join(f"{k.rsplit('.', 1)[-1]}={short(v)}" for k, v in params.items())
        done = self.finished(name)
        if done is not None:
            self.skipped += 1
            record = done / TRIAL_RECORD  # absent if the sweep was killed just as the trial finished
            row = json.loads(record.read_text()) if record.is_file() else {"seconds": None, "peak_rss_mb": None}
            row.update(trial=n, name=name, params=params, run_dir=str(done))
            row.update(read_metrics(done, self.sweep.objective.metric))
            say(f"trial {n}/{self.total} {label}: already complete in {done}, skipped")
            return row
        self.started += 1
        self.trials_dir.mkdir(parents=True, exist_ok=True)
        before = set(self.trials_dir.iterdir())
        cmd = [*shlex.split(self.sweep.launch or ""), "-m", "sft", "train", str(self.base), *overrides]
        cmd += [f"output.runs_dir={self.trials_dir}", f"output.name={name}"]
        if self.sweep.budget.seconds is not None:  # training stops after that long, then evaluates and exports
            cmd.append(f"--stop-after={self.sweep.budget.seconds}")
        env = {"CUDA_VISIBLE_DEVICES": device} if device is not None else {}
        log_path = self.trials_dir / f"{name}.log"
        clock = time.time()
        returncode, peak_rss_mb = self.execute(cmd, env, str(log_path), os.getcwd())
        seconds = round(time.time() - clock, 1)
        mine = [p for p in self.trials_dir.iterdir() if p.name == name or p.name.startswith(f"{name}-")]
        new = sorted((p for p in mine if p.is_dir() and p not in before), key=lambda p: p.stat().st_mtime)
        run_dir = new[-1] if new else None
        row: dict[str, Any] = {
            "trial": n,
            "name": name,
            "params": params,
            "run_dir": str(run_dir) if run_dir else None,
            "seconds": seconds,
            "peak_rss_mb": peak_rss_mb,
            "command": cmd,
        }
        row.update(read_metrics(run_dir, self.sweep.objective.metric) if run_dir else {"status": "failed"})
        if returncode != 0 or row["status"] != "complete" or row.get("objective") is None:
            tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-12:]
            row["status"] = "failed"
            row["error"] = f"exit code {returncode}: " + "\n".join(tail)
            say(f"trial {n}/{self.total} {label} -> FAILED ({seconds:.0f} s), log: {log_path}\n    " + tail[-1:][0])
        else:
            write_json(run_dir / TRIAL_RECORD, row)
            metric = self.sweep.objective.metric.split(".", 1)[1]
            say(f"trial {n}/{self.total} {label} -> {metric} {row['objective']:.4g} ({seconds:.0f} s)")
        return row


def read_metrics(run_dir: Path, metric: str) -> dict[str, Any]:
    """Status, objective, held-out scores and real training throughput from a trial's run folder."""
    path = run_dir / "run.json"
    if not path.is_file():
        return {"status": "failed"}
    run = json.loads(path.read_text())
    train, tuned = run.get("train") or {}, run.get("tuned") or {}
    section, _, name = metric.partition(".")
    value = (tuned if section == "eval" else train).get(name)
    runtime, tokens = train.get("train_runtime"), train.get("num_input_tokens_seen")
    return {
        "status": run.get("status", "failed"),
        "objective": value,
        "eval": {k: tuned[k] for k in EVAL_METRICS if tuned.get(k) is not None},
        "train_loss": train.get("train_loss"),
        "tokens_per_s": round(tokens / runtime, 1) if tokens and runtime else None,
    }


def run_sweep(path: Path, overrides: list[str]) -> Path:
    sweep = load_sweep(path, overrides)
    base = Path(sweep.base)
    base_raw = read_yaml(base)
    out = Path(sweep.output.dir or f"runs/sweeps/{path.stem}")

    if sweep.method == "grid":
        planned = grid(sweep.space)
    elif sweep.method == "random":
        rng = random.Random(sweep.seed)
        planned = [sample(sweep.space, rng) for _ in range(sweep.trials or 0)]
    else:
        _optuna()  # missing extra: an error before anything runs
        planned = corners(sweep.space)
    for i, params in enumerate(planned, 1):  # a typo in any key fails here, before the first trial
        label = f"{i}" if sweep.method != "tpe" else "check"
        check_trial(base, base_raw, trial_overrides(sweep, params), f"{label} ({params_label(params)})")

    total = len(planned) if sweep.method != "tpe" else sweep.trials or 0
    runner = Runner(sweep, base, out, total)
    out.mkdir(parents=True, exist_ok=True)
    say(
        f"{path}: {sweep.method}, {total} trial(s) of {base}, objective {sweep.objective.direction} "
        f"{sweep.objective.metric}; folder {out}"
    )
    if sweep.method == "tpe":
        rows = _tpe(sweep, runner)
    else:
        rows = _run_all(sweep, runner, planned)
    write_results(sweep, out, rows, path, base_raw)
    say(
        f"{len(rows)} trial(s): {runner.skipped} already complete, {runner.started} run, "
        f"{sum(r['status'] != 'complete' for r in rows)} failed; results in {out}/results.md"
    )
    return out


def _run_all(sweep: SweepFile, runner: Runner, planned: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if sweep.executor == "ray":  # Ray places each trial on a node with its resources; `parallel` caps how many at once
        with ThreadPoolExecutor(sweep.parallel) as pool:
            return list(pool.map(runner.run, range(1, len(planned) + 1), planned))
    devices = _cuda_devices() if sweep.parallel > 1 else []
    workers = min(sweep.parallel, len(devices))
    if sweep.parallel > 1 and workers < 2:
        say(f"parallel: {sweep.parallel} needs that many CUDA devices; found {len(devices)}: running one at a time")
    if workers < 2:
        return [runner.run(n, p) for n, p in enumerate(planned, 1)]
    free: queue.Queue[str] = queue.Queue()
    for d in devices[:workers]:
        free.put(d)

    def on_a_device(n: int, params: dict[str, Any]) -> dict[str, Any]:
        device = free.get()
        try:
            return runner.run(n, params, device)
        finally:
            free.put(device)

    say(f"running {workers} trials at a time on CUDA devices {', '.join(devices[:workers])}")
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(on_a_device, range(1, len(planned) + 1), planned))


def _tpe(sweep: SweepFile, runner: Runner) -> list[dict[str, Any]]:
    """Optuna's TPE, one trial at a time. Seeded: a rerun asks for the same trials, which are then skipped."""
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction=sweep.objective.direction, sampler=optuna.samplers.TPESampler(seed=sweep.seed)
    )
    rows = []
    for n in range(1, (sweep.trials or 0) + 1):
        trial = study.ask()
        params = {}
        for key, spec in sweep.space.items():
            if isinstance(spec, Range) and spec.integer:
                params[key] = trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log)
            elif isinstance(spec, Range):
                params[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
            else:
                params[key] = trial.suggest_categorical(key, spec.choices if isinstance(spec, Choices) else spec)
        row = runner.run(n, params)
        rows.append(row)
        if row["status"] == "complete":
            study.tell(trial, row["objective"])
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return rows


def _optuna():
    try:
        import optuna
    except ImportError:
        raise SftError(
            "method: tpe needs optuna, an optional extra: pip install -e '.[optuna]' (or pip install optuna); "
            "method: grid and method: random need nothing more"
        ) from None
    return optuna


def _cuda_devices() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else []
    return ids[: torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]
