"""The benchmark harnesses run end to end on their tiny `--quick` setting and write well-formed results.

Only the shape of what they write is checked: timings on a shared machine are for the harnesses to print, not for
tests to assert.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("trl_default", "trl_tuned", "trl_expert", "sft")


def run_quick(script: str, out: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_trl_vs_sft_quick_writes_its_report(tmp_path):
    run_quick("trl_vs_sft.py", tmp_path)
    report = json.loads((tmp_path / "trl_vs_sft.json").read_text())
    variants = report["variants"]
    assert set(VARIANTS) <= set(variants)
    for key in ("speedup_vs_trl_default", "speedup_vs_trl_tuned", "speedup_vs_trl_expert"):
        assert report[key] > 0 and math.isfinite(report[key])
    for key, base in (("speedup_vs_trl_default", "trl_default"), ("speedup_vs_trl_expert", "trl_expert")):
        assert report[key] == pytest.approx(variants["sft"]["real_tokens_per_s"] / variants[base]["real_tokens_per_s"])
    assert report["heldout_loss_change_vs_trl_expert"] == pytest.approx(
        variants["sft"]["heldout_loss"] / variants["trl_expert"]["heldout_loss"] - 1
    )
    assert {"speedup_vs_trl_expert >= 1.5", "heldout_loss within 1% of (x)"} <= set(report["targets_met"])
    tokens = {name: variants[name]["real_tokens"] for name in VARIANTS}
    assert len(set(tokens.values())) == 1, f"every variant must see the same real tokens: {tokens}"
    for name in VARIANTS:
        v = variants[name]
        assert v["real_tokens_per_s"] > 0 and v["time_to_first_step_s"] > 0 and v["peak_memory_mib"] >= 0
        assert 0 <= v["pad_fraction"] < 1 and 0 < v["mfu"] < 1 and v["matmul_peak_flops"] > 0
        assert math.isfinite(v["heldout_loss"]) and v["precision"] in ("fp32", "bf16", "fp16")
    assert variants["trl_default"]["pad_fraction"] > 0 and not variants["trl_default"]["packing"]
    assert variants["trl_default"]["gradient_checkpointing"] and variants["trl_tuned"]["packing"]
    # (x): (b) with checkpointing off, the same precision and the same packed rows per step
    expert, tuned = variants["trl_expert"], variants["trl_tuned"]
    assert expert["packing"] and expert["padding_free"] and not expert["gradient_checkpointing"]
    assert expert["precision"] == tuned["precision"] and expert["pad_fraction"] == 0
    assert expert["per_device_train_batch_size"] == variants["sft"]["per_device_train_batch_size"]
    assert variants["sft"]["pad_fraction"] == 0 and variants["sft"]["packing"]
    assert set(report["data"]["lengths"]["train"]) >= {"mean", "p50", "p95", "max"}
    assert set(report["matmul_peak_flops"]) == {"fp32", "bf16"} and set(report["targets_met"])
    assert {"cpu", "torch", "transformers", "trl", "peft"} <= set(report["machine"])

    table = (tmp_path / "trl_vs_sft.md").read_text()
    assert "| variant |" in table and "real tok/s" in table and "MFU" in table
    for v in variants.values():
        assert v["label"] in table


@pytest.mark.slow
def test_step_profile_quick_splits_a_step_into_phases(tmp_path):
    run_quick("step_profile.py", tmp_path)
    report = json.loads((tmp_path / "step_profile.json").read_text())
    phases = report["phases_seconds"]
    assert {"data", "forward", "backward", "optimizer", "callbacks", "logging", "rest"} <= set(phases)
    assert phases["forward"] > 0 and phases["backward"] > 0 and phases["optimizer"] > 0
    assert sum(phases.values()) == pytest.approx(report["step_seconds"])  # the phases and the rest make the step
    own = report["pipeline_own_seconds"]
    assert any(k.startswith("MetricsToJsonl.on_log") for k in own) and own["StopOnSignal.on_step_end"] >= 0
    assert set(report["targets_met"]) == set(own) and report["operators"]
    assert "| forward |" in (tmp_path / "step_profile.md").read_text()


@pytest.mark.slow
def test_scaling_quick_writes_table_and_plot(tmp_path):
    run_quick("scaling.py", tmp_path)
    report = json.loads((tmp_path / "scaling.json").read_text())
    points = report["points"]
    lengths = report["settings"]["lengths"]
    assert len(points) == len(report["models"]) * len(lengths) * 2  # with and without checkpointing
    assert {(p["model"], p["length"], p["checkpointing"]) for p in points} == {
        (m, s, c) for m in report["models"] for s in lengths for c in (False, True)
    }
    for p in points:
        assert p["real_tokens_per_s"] > 0 and p["peak_memory_bytes"] >= 0 and p["pad_tokens"] == 0
        assert p["tokens_per_step"] == p["rows_per_step"] * p["length"]
    table = (tmp_path / "scaling.md").read_text()
    assert table.count("\n| ") == 1 + len(points) // 2  # header + one row per (model, length)
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_gpu_harness_dry_run_writes_its_report(tmp_path):
    """benchmarks/gpu.py at tiny shapes on whatever device is here: the harness that the GPU machine runs."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--only", "1b-lora", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    results = {r["variant"]: r for r in report["results"]}
    assert set(results) == {"trl_default", "trl_expert", "sft"} and not any("error" in r for r in results.values())
    assert results["trl_default"]["pad_fraction"] > 0 and results["sft"]["pad_fraction"] == 0
    assert results["sft"]["attn_implementation"] == "sdpa_packed"
    expert = results["trl_expert"]
    assert expert["packing"] and expert["pad_fraction"] == 0 and not expert["gradient_checkpointing"]
    for r in results.values():
        assert r["real_tokens_per_s"] > 0 and 0 < r["mfu_measured_peak"] < 1
    assert report["speedup_vs_trl_default"]["1b-lora"] == pytest.approx(
        results["sft"]["real_tokens_per_s"] / results["trl_default"]["real_tokens_per_s"]
    )
    assert report["speedup_vs_trl_expert"]["1b-lora"] == pytest.approx(
        results["sft"]["real_tokens_per_s"] / results["trl_expert"]["real_tokens_per_s"]
    )
    assert "| 1b-lora | sft |" in (tmp_path / "gpu.md").read_text()


@pytest.mark.slow
def test_gpu_sh_check_runs_every_case_from_the_carried_wheels(tmp_path):
    """`bash benchmarks/gpu.sh --check`: what the GPU call does, on this CPU at tiny shapes. With .whl/ present
    (benchmarks/gpu_wheels.sh) it installs the wheels with CPython 3.12 as the GPU machine does and runs every case
    on them; without, on this venv's packages. The script checks its own outputs and exits non-zero when one is
    missing or a case failed."""
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--check", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "--check: all 7 cases ran" in done.stdout
    preflight = (tmp_path / "preflight.txt").read_text()
    for package in ("transformers", "trl", "peft", "datasets", "pydantic"):
        assert f"\n{package} " in "\n" + preflight and f"{package} FAILED" not in preflight
    if (ROOT / ".whl").is_dir():  # the carried packages, not the venv's, were imported
        assert "sft-site" in next(line for line in preflight.splitlines() if line.startswith("trl "))
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["dry_run"] and {r["variant"] for r in report["results"]} == {
        "trl_default",
        "trl_expert",
        "sft",
        "sft_qlora",
    }
