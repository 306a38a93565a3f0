"""`sft sweep`: trials in subprocesses, a table sorted by the objective, resumable, failures recorded, best config
that trains to the same metric. Trials are tiny (a few optimizer steps, 4 held-out prompts) on the tiny default."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sft.config import load_config
from sft.errors import SftError
from sft.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """One stand-in model and token cache for every trial of this module."""
    return tmp_path_factory.mktemp("sweep-shared")


def write_sweep(path: Path, shared: Path, **fields) -> Path:
    sweep = {
        "base": str(ROOT / "configs/tiny.yaml"),
        "overrides": {
            "model.name_or_path": str(shared / "tiny-llama"),
            "data.cache_dir": str(shared / "cache"),
            "data.train": str(ROOT / "data/reverse/train.jsonl"),
            "data.eval": str(ROOT / "data/reverse/eval.jsonl"),
            "eval.max_samples": 4,
            "eval.compare_base": False,
            "export.merged": False,
            "export.verify": False,
        },
        "space": {"train.learning_rate": [1.0e-3, 3.0e-3], "adapter.r": [4, 8]},
        "objective": {"metric": "eval.loss", "direction": "minimize"},
        "budget": {"max_steps": 5},
        "output": {"dir": str(path.parent / "out")},
    }
    for key, value in fields.items():
        if isinstance(value, dict) and key == "overrides":
            sweep[key].update(value)
        else:
            sweep[key] = value
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def status(run: Path) -> str | None:
    path = run / "run.json"
    return json.loads(path.read_text())["status"] if path.is_file() else None


def read_table(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, shared) -> Path:
    folder = tmp_path_factory.mktemp("grid")
    return run_sweep(write_sweep(folder / "grid.yaml", shared), [])


@pytest.mark.slow
def test_grid_of_four_completes_sorted_with_throughput_and_memory(grid_sweep):
    rows = read_table(grid_sweep)
    assert len(rows) == 4 and all(r["status"] == "complete" for r in rows)
    losses = [float(r["eval.loss"]) for r in rows]
    assert losses == sorted(losses)  # minimize: best first
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert {(r["train.learning_rate"], r["adapter.r"]) for r in rows} == {
        (lr, r) for lr in ("0.001", "0.003") for r in ("4", "8")
    }
    for r in rows:
        assert float(r["tokens_per_s"]) > 0 and float(r["peak_rss_mb"]) > 100
        run = json.loads((Path(r["run_dir"]) / "run.json").read_text())
        assert run["status"] == "complete" and run["train"]["train_loss"] == pytest.approx(float(r["train.train_loss"]))
    assert len({r["run_dir"] for r in rows}) == 4
    markdown = (grid_sweep / "results.md").read_text()
    assert markdown.count("| complete |") == 4 and "tokens/s" in markdown and "peak RSS" in markdown
    for key in ("train.learning_rate", "adapter.r"):
        assert (grid_sweep / f"objective_vs_{key}.png").stat().st_size > 1000
    assert not list(grid_sweep.glob(".*.tmp"))


@pytest.mark.slow
def test_rerun_skips_every_finished_trial_without_starting_one(grid_sweep, monkeypatch, capsys):
    before = read_table(grid_sweep)

    def no_trials(*args, **kwargs):
        raise AssertionError("a trial subprocess was started")

    monkeypatch.setattr(subprocess, "Popen", no_trials)
    started = time.time()
    run_sweep(grid_sweep.parent / "grid.yaml", [])
    assert time.time() - started < 30
    assert "4 already complete, 0 run, 0 failed" in capsys.readouterr().err
    after = read_table(grid_sweep)
    assert [(r["trial"], r["eval.loss"], r["peak_rss_mb"]) for r in after] == [
        (r["trial"], r["eval.loss"], r["peak_rss_mb"]) for r in before
    ]


@pytest.mark.slow
def test_best_config_validates_and_trains_to_the_same_metric(grid_sweep, tmp_path):
    best = read_table(grid_sweep)[0]
    config_path = grid_sweep / "best_config.yaml"
    config = load_config(config_path)  # validates
    assert config.output.name == "grid-best"
    assert config.train["learning_rate"] == float(best["train.learning_rate"])
    assert config.adapter.r == int(best["adapter.r"])
    result = subprocess.run(
        [sys.executable, "-m", "sft", "train", str(config_path), f"output.runs_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((tmp_path / "grid-best" / "run.json").read_text())
    trial = json.loads((Path(best["run_dir"]) / "run.json").read_text())
    assert again["status"] == "complete"
    for key in ("exact_match", "loss"):  # same seed, same data, CPU fp32: the same run
        assert again["tuned"][key] == pytest.approx(trial["tuned"][key], abs=1e-6), key
    assert again["train"]["train_loss"] == pytest.approx(trial["train"]["train_loss"], abs=1e-6)


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_others_finish(tmp_path, shared):
    # data.max_length=16 passes validation but every row is longer, and on_too_long=error stops that run.
    # The budget in seconds stops the other trial's training long before its 400 steps.
    sweep = write_sweep(
        tmp_path / "fail.yaml",
        shared,
        overrides={"data.on_too_long": "error"},
        space={"data.max_length": [16, 64]},
        budget={"max_steps": 400, "seconds": 1.5},
    )
    out = run_sweep(sweep, [])
    rows = read_table(out)
    assert [(r["data.max_length"], r["status"]) for r in rows] == [("64", "complete"), ("16", "failed")]
    assert "max_length" in rows[1]["error"] or "too long" in rows[1]["error"], rows[1]["error"]
    assert "trial 1 failed" in (out / "results.md").read_text()
    steps = [json.loads(line)["step"] for line in (Path(rows[0]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert 0 < max(steps) < 400
    assert load_config(out / "best_config.yaml").data.max_length == 64


def test_a_typo_in_the_space_fails_before_any_trial(tmp_path, shared, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a trial was started"))
    sweep = write_sweep(tmp_path / "typo.yaml", shared, space={"train.learing_rate": [1e-3, 3e-3]})
    with pytest.raises(SftError, match="did you mean 'learning_rate'"):
        run_sweep(sweep, [])
    sweep = write_sweep(tmp_path / "typo.yaml", shared, space={"adapter.rr": [4, 8]})
    with pytest.raises(SftError, match=r"adapter.rr: unknown key \(did you mean 'r'\?\)"):
        run_sweep(sweep, [])
    sweep = write_sweep(tmp_path / "typo.yaml", shared, spcae={"adapter.r": [4]})
    with pytest.raises(SftError, match="spcae: unknown key .did you mean 'space'"):
        run_sweep(sweep, [])
    sweep = write_sweep(tmp_path / "typo.yaml", shared, objective={"metric": "eval.exact_mach"})
    with pytest.raises(SftError, match="did you mean 'exact_match'"):
        run_sweep(sweep, [])
    sweep = write_sweep(tmp_path / "typo.yaml", shared, space={"train.learning_rate": {"low": 1e-4, "high": 1e-2}})
    with pytest.raises(SftError, match="grid needs a list of values"):
        run_sweep(sweep, [])
    with pytest.raises(SftError, match="method random needs trials"):
        run_sweep(sweep, ["method=random"])
    sweep = write_sweep(tmp_path / "typo.yaml", shared, space={"adapter.r": {"low": 4, "hgh": 8}}, method="tpe")
    with pytest.raises(SftError, match=r"space.adapter.r.hgh: unknown key \(did you mean 'high'\?\)"):
        run_sweep(sweep, ["trials=2"])
    assert not (tmp_path / "out").exists()


def test_tpe_without_optuna_says_how_to_install_it(tmp_path, shared, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    sweep = write_sweep(tmp_path / "tpe.yaml", shared, method="tpe", trials=2)
    with pytest.raises(SftError, match=r"pip install -e '\.\[optuna\]'"):
        run_sweep(sweep, [])


@pytest.mark.slow
def test_tpe_through_optuna(tmp_path, shared):
    pytest.importorskip("optuna")
    space = {"train.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "adapter.r": {"choices": [4, 8]}}
    sweep = write_sweep(tmp_path / "tpe.yaml", shared, method="tpe", trials=2, seed=3, space=space)
    out = run_sweep(sweep, [])
    rows = read_table(out)
    assert len(rows) == 2 and all(r["status"] == "complete" for r in rows)
    assert all(1e-4 <= float(r["train.learning_rate"]) <= 1e-2 and r["adapter.r"] in ("4", "8") for r in rows)
    assert (out / "objective_vs_train.learning_rate.png").is_file()


@pytest.mark.slow
def test_killed_midway_then_rerun_finishes_only_the_remaining_trials(tmp_path, shared):
    sweep = write_sweep(tmp_path / "kill.yaml", shared, space={"train.learning_rate": [1e-3, 2e-3, 3e-3]})
    trials = tmp_path / "out" / "trials"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "sft", "sweep", str(sweep)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        deadline = time.time() + 240
        while not any(status(run) == "complete" for run in trials.glob("trial-*")):
            assert proc.poll() is None and time.time() < deadline, "the sweep ended before a trial completed"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "out" / "results.csv").exists()

    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = [line for line in result.stderr.splitlines() if "already complete" in line and "trial(s):" in line]
    done, ran = (int(n) for n in re.search(r"(\d+) already complete, (\d+) run", summary[-1]).groups())
    assert done >= 1 and ran >= 1 and done + ran == 3, summary
    rows = read_table(tmp_path / "out")
    assert len(rows) == 3 and all(r["status"] == "complete" for r in rows)
    complete = [run for run in trials.iterdir() if run.is_dir() and status(run) == "complete"]
    assert len(complete) == 3  # no finished trial was run twice


@pytest.mark.slow
def test_trials_dispatched_to_a_local_ray_cluster(tmp_path, shared):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        sweep = write_sweep(
            tmp_path / "ray.yaml",
            shared,
            space={"adapter.r": [4, 8]},
            executor="ray",
            parallel=2,
            ray={"cpus_per_trial": 1},
        )
        out = run_sweep(sweep, [])
    finally:
        ray.shutdown()
    rows = read_table(out)
    assert len(rows) == 2 and all(r["status"] == "complete" for r in rows)
    assert all(float(r["peak_rss_mb"]) > 100 and float(r["tokens_per_s"]) > 0 for r in rows)


def test_ray_executor_without_ray_says_how_to_install_it(tmp_path, shared, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    sweep = write_sweep(tmp_path / "ray.yaml", shared, executor="ray")
    with pytest.raises(SftError, match=r"pip install -e '\.\[ray\]'"):
        run_sweep(sweep, [])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_each_trial_can_run_under_accelerate_launch(tmp_path, shared):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.is_file():
        pytest.skip("no accelerate launcher beside this Python")
    launch = f"{accelerate} launch --num_processes 1 --cpu"
    sweep = write_sweep(tmp_path / "acc.yaml", shared, space={"adapter.r": [4]}, launch=launch)
    rows = read_table(run_sweep(sweep, []))
    assert [r["status"] for r in rows] == ["complete"]
    log = next((tmp_path / "out" / "trials").glob("*.log")).read_text()
    assert log.startswith(f"$ {accelerate} launch --num_processes 1 --cpu -m sft train ")
