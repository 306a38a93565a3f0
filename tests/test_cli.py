"""The CLI as a new user meets it: the demo end to end, generation from the export in a new process, and clear
errors (one message, exit code 2, no traceback, nothing written) for the usual mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def sft(*args: str, cwd: Path = ROOT, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sft", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert any(line.startswith("sft: error: ") for line in result.stderr.splitlines()), result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.mark.slow
def test_demo_meets_its_targets_and_the_export_generates_in_a_new_process(tmp_path):
    """configs/tiny.yaml, built from nothing: base <= 5% and tuned >= 90% held-out exact match."""
    runs, model = tmp_path / "runs", tmp_path / "tiny-llama"
    result = sft("train", "configs/tiny.yaml", f"output.runs_dir={runs}", f"model.name_or_path={model}")
    assert result.returncode == 0, result.stderr[-3000:]
    run = runs / "tiny"
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["base"]["exact_match"] <= 0.05
    assert report["tuned"]["exact_match"] >= 0.90
    assert report["tuned"]["loss"] < report["base"]["loss"]
    assert report["tuned"]["rouge_l"] >= 0.9 and report["base"]["rouge_l"] < 0.5
    assert "| exact_match |" in result.stdout  # the before/after table is printed
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "complete"
    assert status["export"]["adapter_reload_max_abs_diff"] <= 1e-5
    assert status["export"]["merged_max_abs_diff"] <= 1e-4
    for name in (
        "config.yaml",
        "environment.json",
        "data.json",
        "metrics.jsonl",
        "report/report.md",
        "report/report.png",
    ):
        assert (run / name).is_file(), name
    env = json.loads((run / "environment.json").read_text())
    assert env["versions"]["trl"] and env["versions"]["peft"] and "git_sha" in env
    assert len(json.loads((run / "data.json").read_text())["fingerprint"]) == 16

    # A new shell somewhere else: the export finds its base and its chat template by itself.
    row = json.loads((ROOT / "data/reverse/eval.jsonl").read_text().splitlines()[7])
    prompt, expected = row["messages"][0]["content"], row["messages"][1]["content"]
    generated = sft("generate", str(run), "--prompt", prompt, "--max-new-tokens", "16", cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip() == expected
    merged = sft("generate", str(run / "merged"), "--prompt", prompt, "--max-new-tokens", "16", cwd=tmp_path)
    assert merged.stdout.strip() == expected

    # Scored again later, with other settings, into the same report folder; then exported again.
    again = sft("eval", str(run), "eval.max_samples=40", cwd=ROOT)
    assert again.returncode == 0, again.stderr
    rescored = json.loads((run / "report" / "report.json").read_text())
    assert rescored["tuned"]["generated"] == 40 and rescored["tuned"]["exact_match"] >= 0.9
    exported = sft("export", str(run), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["adapter_reload_max_abs_diff"] <= 1e-5


def test_help_everywhere():
    for args in ([], ["train"], ["check"], ["generate"]):
        result = sft(*args, "--help")
        assert result.returncode == 0 and "usage: sft" in result.stdout


def test_misspelt_key_fails_with_a_suggestion_and_writes_nothing(tmp_path):
    result = sft("train", "configs/tiny.yaml", "train.learing_rate=1e-3", f"output.runs_dir={tmp_path / 'runs'}")
    assert_user_error(result, "train.learing_rate", "did you mean 'learning_rate'")
    assert not (tmp_path / "runs").exists()


def test_missing_data_file_names_the_path_and_writes_nothing(tmp_path):
    missing = tmp_path / "nowhere" / "train.jsonl"
    result = sft("train", "configs/tiny.yaml", f"data.train={missing}", f"output.runs_dir={tmp_path / 'runs'}")
    assert_user_error(result, str(missing))
    assert not (tmp_path / "runs").exists()


def test_bad_data_row_names_file_and_line_and_writes_nothing(tmp_path):
    data = tmp_path / "train.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    data.write_text(good + "\n" + '{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = sft("train", "configs/tiny.yaml", f"data.train={data}", f"output.runs_dir={tmp_path / 'runs'}")
    assert_user_error(result, f"{data} line 2", "expected it to end with the assistant")
    assert not (tmp_path / "runs").exists()


def test_missing_config_and_missing_export(tmp_path):
    assert_user_error(sft("train", str(tmp_path / "none.yaml")), "config file not found")
    assert_user_error(sft("generate", str(tmp_path / "none"), "--prompt", "x"), "no such folder")


def test_four_bit_on_cpu_is_refused_before_anything_is_written(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = sft(
        "train",
        "configs/tiny.yaml",
        "model.load_in_4bit=true",
        f"model.name_or_path={tmp_path / 'm'}",
        f"output.runs_dir={tmp_path / 'runs'}",
    )
    assert_user_error(result, "load_in_4bit", "CUDA")
    assert not (tmp_path / "runs").exists()


def test_data_report_marks_trained_tokens_and_speaks_json(tmp_path):
    model = f"model.name_or_path={tmp_path / 'tiny'}"
    shown = sft("data", "configs/tiny.yaml", model, "--examples", "2")
    assert shown.returncode == 0, shown.stderr
    assert "| data/reverse/train.jsonl | train | messages | 2000 | 2000 |" in shown.stdout
    assert "[[paints garden table fish city opens<|im_end|>]]" in shown.stdout  # train.jsonl line 1
    assert "\x1b[" not in shown.stdout  # not a terminal: brackets, no colour
    report = json.loads(sft("data", "configs/tiny.yaml", model, "--json", "--examples", "1").stdout)
    assert report["total"]["rows"] == 2200 and len(report["examples"]) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    assert_user_error(sft("data", "configs/tiny.yaml", model, f"data.train={bad}"), f"{bad} line 1")
