"""`sft plan`: the memory plan from config.json alone, how it responds to settings, its check against two real
training steps, the precision and checkpointing choices `sft train` takes from it, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from sft import plan as planner
from sft.config import load_config
from sft.plan import GPUS, devices, make_plan, model_shape, precision, predict_memory, read_model_config, settings_for

ROOT = Path(__file__).resolve().parents[1]
# Llama-3.1-8B's shapes: what config.json says, no weights
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory) -> Path:
    """A private ~/.cache for the precision probe, shared by this module's tests so it is measured once."""
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(autouse=True)
def _private_cache(cache_home, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))


def sft(*args: str, cache_home: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "XDG_CACHE_HOME": str(cache_home)}
    return subprocess.run(
        [sys.executable, "-m", "sft", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def tiny(tmp_path: Path, *overrides: str):
    """configs/tiny.yaml with its stand-in model in a folder that does not exist yet."""
    return load_config(ROOT / "configs/tiny.yaml", [f"model.name_or_path={tmp_path / 'tiny'}", *overrides])


def llama_8b(tmp_path: Path) -> Path:
    folder = tmp_path / "llama-8b-shapes"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_8B))
    config = tmp_path / "8b.yaml"
    config.write_text(
        f"model: {{name_or_path: {folder}}}\n"
        f"data: {{train: {ROOT / 'data/reverse/train.jsonl'}, max_length: 2048}}\n"
        "train: {per_device_train_batch_size: 8}\n"
    )
    return config


def test_the_plan_of_the_tiny_default_prints_a_table_and_the_same_as_json(tmp_path, cache_home):
    table = sft("plan", "configs/tiny.yaml", f"model.name_or_path={tmp_path / 'tiny'}", cache_home=cache_home)
    assert table.returncode == 0, table.stderr
    for needle in (
        "weights",
        "activations",
        "attention mask",
        "logits and loss",
        "adamw states",
        "evaluation",
        "generation",
        "fits: peak",
        "GFLOP per optimizer step",
        "s per step",
        "precision:",
    ):
        assert needle in table.stdout, (needle, table.stdout)
    assert "stand-in not built yet" in table.stdout  # planned from model.tiny alone
    assert not (tmp_path / "tiny").exists()  # nothing built, nothing loaded

    raw = sft("plan", "configs/tiny.yaml", f"model.name_or_path={tmp_path / 'tiny'}", "--json", cache_home=cache_home)
    assert raw.returncode == 0, raw.stderr
    plan = json.loads(raw.stdout)
    assert plan["fits"] is True
    assert plan["memory"]["train_peak_bytes"] == sum(plan["memory"]["train"].values())
    assert plan["settings"]["tokens_per_micro_batch"] == 16 * 64
    assert plan["model"]["layers"] == 4 and plan["model"]["hidden"] == 128
    assert plan["flops_per_step"] > 0 and plan["seconds_per_step"] > 0
    if precision._cpu_has_bf16_kernels():
        assert "measured" in plan["precision_reason"]  # the second process found the first one's probe in the cache
        assert "earlier" in plan["precision_reason"]
    else:  # AVX2-only CPUs: bf16 would run a scalar loop, so fp32 is chosen without the (minutes long) probe
        assert "not probed" in plan["precision_reason"] and plan["settings"]["compute"] == "fp32"


def test_predictions_respond_to_settings(tmp_path):
    config = tiny(tmp_path)
    shape = model_shape(read_model_config(config)[0])

    def train(s):
        return predict_memory(shape, s).train

    base = settings_for(config, shape, GPUS["h100"], "bf16", checkpointing=False)
    assert base.attention == "sdpa_packed" and train(base)["attention_mask"] == 0  # auto: no dense mask
    base = replace(base, attention="sdpa")  # with sdpa, packed rows carry a T x T mask

    # 4 bits for the decoder linears; the tied embedding stays (fp32) beside them
    assert train(replace(base, load_in_4bit=True))["weights"] < train(base)["weights"] * 0.6
    assert train(replace(base, checkpointing=True))["activations"] < train(base)["activations"] / 2
    doubled = train(replace(base, max_length=2 * base.max_length))["activations"] / train(base)["activations"]
    assert 1.9 < doubled < 2.1  # activations are linear in tokens; the packed-row mask (its own line) is not
    masks = train(replace(base, max_length=2 * base.max_length))["attention_mask"] / train(base)["attention_mask"]
    assert 3.9 < masks < 4.1
    assert train(replace(base, compute="fp32", weight_bytes=4))["activations"] > train(base)["activations"]
    halved = train(replace(base, batch=base.batch // 2, accumulation=2))
    assert halved["activations"] < train(base)["activations"] and halved["adamw_states"] == train(base)["adamw_states"]


def test_a_run_too_big_for_a_small_gpu_says_what_to_change(tmp_path, cache_home):
    config = llama_8b(tmp_path)
    result = sft("plan", str(config), "--device", "l4", cache_home=cache_home)
    assert result.returncode == 0, result.stderr
    assert "DOES NOT FIT" in result.stdout
    tries = [line for line in result.stdout.splitlines() if line.strip().startswith("try ")]
    assert tries and any(line.endswith("(fits)") for line in tries), result.stdout
    assert any("train.per_device_train_batch_size=" in line or "load_in_4bit" in line for line in tries)
    on_h200 = json.loads(sft("plan", str(config), "--device", "h200", "--json", cache_home=cache_home).stdout)
    assert on_h200["fits"] and not on_h200["alternatives"]
    assert on_h200["device"]["memory_bytes"] > 130 * 2**30


def test_qlora_upcasts_what_it_does_not_quantize(tmp_path):
    config = load_config(llama_8b(tmp_path), ["model.load_in_4bit=true"])
    plan = make_plan(config, device_name="h100")
    weights = plan.memory.train["weights"]
    # 7.0B decoder-linear params at ~0.52 B each, plus 1.05B embedding/head params in fp32
    assert 7.0 * 2**30 < weights < 7.6 * 2**30
    assert "fp32" in plan.memory.train_notes["weights"]


def test_measure_on_the_tiny_default_is_within_15_percent(tmp_path, cache_home):
    result = sft(
        "plan",
        "configs/tiny.yaml",
        f"model.name_or_path={tmp_path / 'tiny'}",
        "--measure",
        "--json",
        cache_home=cache_home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout)["measured"]
    assert measured["steps"] == 2 and len(measured["step_seconds"]) == 2
    assert measured["peak_bytes"] > 50 * 2**20
    assert abs(measured["relative_error"]) <= 0.15, measured


def test_a_cpu_without_bf16_kernels_gets_fp32_without_a_probe(tmp_path, monkeypatch):
    config = tiny(tmp_path)
    model_config, _ = read_model_config(config)
    monkeypatch.setattr(precision, "_cpu_has_bf16_kernels", lambda: False)
    monkeypatch.setattr(precision, "_probe_layer", lambda *a: pytest.fail("probed on a CPU without bf16 kernels"))
    values, lines = planner.auto_settings(config, model_config)
    assert values["bf16"] is False and "use_cpu" not in values
    assert any(line.startswith("precision: fp32 (this CPU has no bf16 matmul kernels") for line in lines)


def test_auto_settings_choose_precision_and_checkpointing_with_reasons(tmp_path, monkeypatch):
    config = tiny(tmp_path)
    monkeypatch.setattr(precision, "_cpu_has_bf16_kernels", lambda: True)  # the probe path, whatever this CPU has
    model_config, _ = read_model_config(config)
    values, lines = planner.auto_settings(config, model_config)
    assert isinstance(values["bf16"], bool) and values["activation_checkpointing"] is False
    assert values.get("use_cpu") is (True if values["bf16"] else None)
    assert any(line.startswith("precision: ") and "ms" in line for line in lines)
    assert any(line.startswith("activation checkpointing: off") for line in lines)

    monkeypatch.setattr(precision, "_probe_layer", lambda *a: pytest.fail("probed again: the cache was not used"))
    plan = make_plan(config, model_config)
    without = plan.memory.train_total
    with_ckpt = predict_memory(plan.shape, replace(plan.settings, checkpointing=True)).peak
    monkeypatch.setattr(devices, "available_ram", lambda: (without + with_ckpt) // 2)
    values, lines = planner.auto_settings(config, model_config)
    assert values["activation_checkpointing"] is True
    assert any(line.startswith("activation checkpointing: on") for line in lines)
    assert not any(line.startswith("warning") for line in lines)
    fits, line = planner.will_fit(config, model_config)
    assert fits and "plan: peak" in line

    monkeypatch.setattr(devices, "available_ram", lambda: with_ckpt // 2)
    values, lines = planner.auto_settings(config, model_config)
    assert values["activation_checkpointing"] is True
    assert any(line.startswith("warning: the plan predicts this run will not fit") for line in lines)
    assert planner.will_fit(config, model_config)[0] is False

    chosen = tiny(tmp_path, "train.bf16=false", "train.activation_checkpointing=false")
    assert planner.auto_settings(chosen, model_config)[0] == {}  # the config's own choices are kept


def test_bad_inputs_are_user_errors(tmp_path, cache_home):
    unknown = sft("plan", "configs/tiny.yaml", "--device", "tpu9", cache_home=cache_home)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "sft: error: --device 'tpu9': unknown device; expected one of h100, h200, a100" in unknown.stderr

    empty = tmp_path / "no-config"
    empty.mkdir()
    missing = sft("plan", "configs/tiny.yaml", f"model.name_or_path={empty}", "model.tiny=null", cache_home=cache_home)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "sft: error: " in missing.stderr and "no config.json" in missing.stderr
