"""`sft sweep SWEEP.yaml`: a base config, a search space over any dotted key, one `sft train` run per trial.

Each trial is `python -m sft train BASE key=value ...` in a subprocess, so a crashed trial is recorded as failed and
the sweep goes on. Its run folder is `<output.dir>/trials/trial-<n>-<hash>`, the hash covering the base file and
every override the trial gets: rerunning the same sweep skips each trial that already has a complete run (run.json
status complete), so a killed sweep resumes where it stopped. Every trial's config is validated before the first
one starts. Results (`results.csv`, `results.md`, `objective_vs_<param>.png`, `best_config.yaml`) are rebuilt from
the run folders at the end of every invocation.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import queue
import random
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sft.config import apply_overrides, read_yaml, validate_config
from sft.console import log
from sft.errors import SftError, did_you_mean
from sft.runs import read_json, write_json, write_text

EVAL_METRICS = ("loss", "perplexity", "token_accuracy", "exact_match", "token_f1", "rouge_l")
SPACE_FORMS = "expected a list of values, {low, high, log} or {choices: [...]}"
TRIAL_RECORD = "sweep_trial.json"  # written by the sweep into each finished trial's run folder


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Range(_Strict):
    """A continuous (or integer, when low and high are both integers) range for random search and TPE."""

    low: float | int
    high: float | int
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        return self

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


class Choices(_Strict):
    choices: list[Any] = Field(min_length=1)


class Objective(_Strict):
    metric: str = Field("eval.exact_match", description="eval.<held-out metric of the tuned model> or train.<key>")
    direction: Literal["maximize", "minimize"] = "maximize"

    @model_validator(mode="after")
    def _known_metric(self) -> Objective:
        section, _, name = self.metric.partition(".")
        if section == "eval" and name not in EVAL_METRICS:
            raise ValueError(
                f"unknown eval metric {name!r}{did_you_mean(name, set(EVAL_METRICS))}; one of {EVAL_METRICS}"
            )
        if section not in ("eval", "train") or not name:
            raise ValueError("expected eval.<metric> (e.g. eval.exact_match) or train.<metric> (e.g. train.train_loss)")
        return self


class Budget(_Strict):
    max_steps: int | None = Field(None, gt=0, description="Per trial: sets train.max_steps")
    seconds: float | None = Field(None, gt=0, description="Per trial: training stops after this many seconds")


class RayOptions(_Strict):
    address: str | None = Field(
        None, description="Cluster to join (e.g. auto, ray://host:10001); None: start a local one"
    )
    cpus_per_trial: float = Field(1, ge=0)
    gpus_per_trial: float = Field(0, ge=0)


class Output(_Strict):
    dir: str | None = Field(None, description="Sweep folder; default runs/sweeps/<sweep file name>")


class SweepFile(_Strict):
    base: str = Field(description="Run config the trials start from; relative to the current directory")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted.key: value applied to every trial")
    space: dict[str, list[Any] | Range | Choices] = Field(min_length=1)
    method: Literal["grid", "random", "tpe"] = "grid"
    trials: int | None = Field(None, gt=0, description="Number of trials (random, tpe)")
    seed: int = 0
    objective: Objective = Objective()
    budget: Budget = Budget()
    output: Output = Output()
    parallel: int = Field(1, ge=1, description="Trials at a time, one per CUDA device; sequential on CPU")
    launch: str | None = Field(
        None, description="Launcher before `-m sft train`, e.g. accelerate launch --num_processes 2"
    )
    executor: Literal["local", "ray"] = Field("local", description="ray: each trial is a Ray task (extra `ray`)")
    ray: RayOptions = RayOptions()

    @model_validator(mode="after")
    def _method_fits_space(self) -> SweepFile:
        for key, values in self.space.items():
            if isinstance(values, list) and not values:
                raise ValueError(f"space.{key}: empty list of values")
            if self.method == "grid" and isinstance(values, Range):
                raise ValueError(f"space.{key}: grid needs a list of values, got a range (use method: random or tpe)")
        if self.method != "grid" and self.trials is None:
            raise ValueError(f"method {self.method} needs trials: N")
        return self


def say(message: str) -> None:
    log(message, prefix="sweep")


def load_sweep(path: Path, overrides: list[str]) -> SweepFile:
    """The sweep file, with `key=value` overrides of its own keys (trials=8, budget.max_steps=50, method=random)."""
    raw = apply_overrides(read_yaml(path), overrides)
    try:
        return SweepFile.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = [str(p) for p in e["loc"]]
            if loc[:1] == ["space"] and len(loc) > 2:  # report the form the value was meant as, not all three
                given = (raw.get("space") or {}).get(loc[1])
                if not isinstance(given, (list, dict)):
                    problems.append(f"space.{loc[1]}: {SPACE_FORMS}")
                    continue
                meant = "list[" if isinstance(given, list) else "Choices" if "choices" in given else "Range"
                if meant not in loc[2]:
                    continue
                loc = loc[:2] + loc[3:]
            key = ".".join(loc) or "<top level>"
            if e["type"] == "extra_forbidden":
                section = {"objective": Objective, "budget": Budget, "output": Output, "ray": RayOptions}.get(loc[0])
                options = SweepFile if len(loc) == 1 else section if section and len(loc) == 2 else None
                known = set(options.model_fields) if options else {"low", "high", "log"} if loc[0] == "space" else set()
                problems.append(f"{key}: unknown key{did_you_mean(loc[-1], known) if known else ''}")
            elif e["type"] == "missing":
                problems.append(f"{key}: required key is missing")
            else:
                problems.append(f"{key}: {e['msg'].removeprefix('Value error, ')}")
        problems = list(dict.fromkeys(problems))
        listing = "\n".join(f"  - {p}" for p in problems)
        raise SftError(
            f"{path}: {len(problems)} problem(s) in the sweep file (keys: {', '.join(SweepFile.model_fields)}):\n"
            f"{listing}"
        ) from None


def yaml_value(value: Any) -> str:
    """A value as the right-hand side of a `key=value` override (parsed back as YAML by `sft train`)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("...").strip()


# Trials


def trial_overrides(sweep: SweepFile, params: dict[str, Any]) -> list[str]:
    fixed = {**sweep.overrides}
    if sweep.budget.max_steps is not None:
        fixed["train.max_steps"] = sweep.budget.max_steps
    return [f"{k}={yaml_value(v)}" for k, v in {**fixed, **params}.items()]


def trial_hash(base_text: str, overrides: list[str], seconds: float | None, launch: str | None) -> str:
    launched = {"launch": launch} if launch else {}
    blob = json.dumps({"base": base_text, "overrides": overrides, "seconds": seconds, **launched})
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def check_trial(base: Path, base_raw: dict, overrides: list[str], label: str) -> None:
    """Build the trial's run config exactly as `sft train` will, so a typo fails before anything runs."""
    raw = apply_overrides(json.loads(json.dumps(base_raw)), overrides)
    try:
        validate_config(raw, source=f"{base} + {label}")
    except SftError as err:
        raise SftError(f"sweep trial {label} is not a valid run config: {err}") from None


def grid(space: dict[str, Any]) -> list[dict[str, Any]]:
    values = [v.choices if isinstance(v, Choices) else v for v in space.values()]
    return [dict(zip(space, combo)) for combo in itertools.product(*values)]


def sample(space: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    params = {}
    for key, spec in space.items():
        if isinstance(spec, Range):
            if spec.integer:
                params[key] = rng.randint(int(spec.low), int(spec.high))
            elif spec.log:
                params[key] = math.exp(rng.uniform(math.log(spec.low), math.log(spec.high)))
            else:
                params[key] = rng.uniform(spec.low, spec.high)
        else:
            params[key] = rng.choice(spec.choices if isinstance(spec, Choices) else spec)
    return params


def _values(spec: Any) -> list[Any]:
    if isinstance(spec, Range):
        return [spec.low, spec.high]
    return spec.choices if isinstance(spec, Choices) else spec


def corners(space: dict[str, Any]) -> list[dict[str, Any]]:
    """For TPE (trials not known up front): every listed value and both ends of every range, one key at a time."""
    first = {k: _values(v)[0] for k, v in space.items()}
    return [first, *[{**first, key: v} for key, spec in space.items() for v in _values(spec)]]


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
        label = " ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in params.items())
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
        cmd = ["-m", "sft", "train", str(self.base), *overrides]
        if self.sweep.budget.seconds is not None:  # the same, with a time limit on training (see _trial_main)
            cmd[1:3] = ["sft.sweep", f"--seconds={self.sweep.budget.seconds}", "train"]
        cmd = [*shlex.split(self.sweep.launch or ""), *cmd, f"output.runs_dir={self.trials_dir}", f"output.name={name}"]
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


# The sweep


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
        check_trial(base, base_raw, trial_overrides(sweep, params), f"{label} ({_label(params)})")

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


# Results


def write_results(sweep: SweepFile, out: Path, rows: list[dict[str, Any]], path: Path, base_raw: dict) -> None:
    sign = -1 if sweep.objective.direction == "maximize" else 1

    def order(r: dict[str, Any]) -> tuple:  # failed last; a tie on the objective goes to the lower held-out loss
        held_out = (r.get("eval") or {}).get("loss", 0)
        return r["status"] != "complete", sign * (r.get("objective") or 0), held_out, r["trial"]

    ranked = sorted(rows, key=order)
    keys, metric = list(sweep.space), sweep.objective.metric
    table = []
    for rank, r in enumerate(ranked, 1):
        table.append(
            {
                "rank": rank if r["status"] == "complete" else "",
                "trial": r["trial"],
                "status": r["status"],
                **{k: r["params"][k] for k in keys},
                metric: r.get("objective"),
                "eval.loss": (r.get("eval") or {}).get("loss"),
                "train.train_loss": r.get("train_loss"),
                "tokens_per_s": r.get("tokens_per_s"),
                "peak_rss_mb": r.get("peak_rss_mb"),
                "seconds": r.get("seconds"),
                "run_dir": r.get("run_dir"),
                "error": (r.get("error") or "").strip().splitlines()[-1:][0] if r.get("error") else "",
            }
        )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    write_text(out / "results.csv", buffer.getvalue())

    shown = {"rank": "rank", "trial": "trial", "status": "status", **{k: k for k in keys}, metric: metric}
    shown |= {"tokens_per_s": "tokens/s", "peak_rss_mb": "peak RSS (MB)", "seconds": "time (s)"}
    lines = [
        f"# Sweep {path.name}: {sweep.method}, {sweep.objective.direction} {metric}",
        "",
        "| " + " | ".join(shown.values()) + " |",
        "|" + "|".join("---" if k == "status" else "---:" for k in shown) + "|",
    ]
    lines += ["| " + " | ".join(_short(row[k]) for k in shown) + " |" for row in table]
    failed = [r for r in ranked if r["status"] != "complete"]
    for r in failed:
        lines += ["", f"trial {r['trial']} failed ({_label(r['params'])}):", "```", r.get("error", ""), "```"]
    write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines[2 : 4 + len(rows)]))

    done = [r for r in ranked if r["status"] == "complete"]
    for key in keys:
        _plot(out / f"objective_vs_{key}.png", key, sweep.space[key], done, metric)
    if done:
        _write_best(out, done[0], sweep, path, base_raw)


def _write_best(out: Path, best: dict[str, Any], sweep: SweepFile, path: Path, base_raw: dict) -> None:
    raw = read_yaml(Path(best["run_dir"]) / "config.yaml")
    raw["output"] = {**raw.get("output", {}), "runs_dir": (base_raw.get("output") or {}).get("runs_dir", "runs")}
    raw["output"]["name"] = f"{path.stem}-best"
    validate_config(raw, source=f"best config of {path}")
    note = "# Training stopped by budget.seconds in the sweep; this config trains to its max_steps/epochs.\n"
    text = (
        f"# Best trial of the sweep {path}: trial {best['trial']} ({_label(best['params'])}),\n"
        f"# {sweep.objective.metric} = {best['objective']}, run folder {best['run_dir']}.\n"
        f"# Its resolved config, with a fresh output.name. Train it with: sft train {out / 'best_config.yaml'}\n"
        + (note if sweep.budget.seconds else "")
        + yaml.safe_dump(raw, sort_keys=False)
    )
    write_text(out / "best_config.yaml", text)


def _plot(target: Path, key: str, spec: Any, rows: list[dict[str, Any]], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["params"][key] for r in rows]
    ys = [r["objective"] for r in rows]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if numeric:
        ax.scatter(xs, ys)
        values = spec.choices if isinstance(spec, Choices) else spec if isinstance(spec, list) else []
        logish = isinstance(spec, Range) and spec.log
        logish |= (
            bool(values)
            and all(isinstance(v, (int, float)) and v > 0 for v in values)
            and (max(values) / min(values) >= 100)
        )
        if logish:
            ax.set_xscale("log")
        if values:  # a grid: a tick at each value tried
            ax.set_xticks(sorted(set(values)), [_short(v) for v in sorted(set(values))])
            ax.minorticks_off()
        else:
            ax.tick_params(axis="x", labelrotation=30)
    else:
        labels = sorted({str(x) for x in xs})
        ax.scatter([labels.index(str(x)) for x in xs], ys)
        ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {key} ({len(rows)} complete trials)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = target.with_name(f".{target.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, target)


def _short(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _label(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in params.items())


def _trial_main(argv: list[str]) -> int:
    """`python -m sft.sweep --seconds=S train CONFIG ...`: `sft train` whose training stops after S seconds.

    The time limit is a TrainerCallback added to the pipeline's own callbacks; the run finishes normally after it
    (evaluation, export), so its metrics are those of the model trained for S seconds.
    """
    seconds = float(argv[0].split("=", 1)[1])
    from transformers import TrainerCallback

    import sft.train

    class TimeLimit(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            if time.time() - self.start >= seconds:
                control.should_training_stop = True

    pipeline_callbacks = sft.train.make_callbacks
    sft.train.make_callbacks = lambda *args: [*pipeline_callbacks(*args), TimeLimit()]
    from sft.cli import main

    return main(argv[1:])


if __name__ == "__main__":
    sys.exit(_trial_main(sys.argv[1:]))
