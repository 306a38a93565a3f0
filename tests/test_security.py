"""Hostile weight files are refused without running them (weights load from safetensors; pickle only on request and
then with torch's weights_only unpickler); secrets never reach a file or a log; a full disk is found before a write."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sft.errors import SftError
from tests.conftest import shared

LOAD = """
import json, sys
from sft.config import ModelConfig
from sft.errors import SftError
from sft.model import load_model
for folder, opt_in in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        load_model(ModelConfig(name_or_path=folder, allow_pickle=opt_in == "opt-in"))
    except SftError as err:
        result = f"REFUSED: {err}"
    else:
        result = "LOADED"
    print(json.dumps([folder, opt_in, result]), flush=True)
"""
EXPLOITS = ["malicious1_v4.pkl", "pytorch_magic_bypass.pt", "malicious1.zip"]
OPT_IN = ["default", "opt-in"]


@pytest.fixture(scope="module")
def loads(tmp_path_factory) -> tuple[dict, subprocess.CompletedProcess]:
    """Each exploit as the only weights of a model folder, loaded with and without the opt-in, all in one fresh
    process (one import of torch and transformers instead of six): {(exploit, opt_in): (folder, output)}."""
    root = tmp_path_factory.mktemp("exploits")
    config = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "architectures": ["LlamaForCausalLM"],
    }
    args = []
    for exploit in EXPLOITS:
        folder = root / exploit
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        shutil.copy(shared(f"security/{exploit}"), folder / "pytorch_model.bin")  # where pickled weights would be
        args += [arg for opt_in in OPT_IN for arg in (str(folder), opt_in)]
    done = subprocess.run([sys.executable, "-c", LOAD, *args], capture_output=True, text=True, cwd=root)
    results = {}
    for line in done.stdout.splitlines():
        folder, opt_in, output = json.loads(line)
        results[(Path(folder).name, opt_in)] = (folder, output)
    return results, done


@pytest.mark.parametrize("opt_in", OPT_IN)
@pytest.mark.parametrize("exploit", EXPLOITS)
def test_pickle_weights_are_refused_and_their_payload_never_runs(exploit, opt_in, loads):
    """Refused by default; with model.allow_pickle the weights_only unpickler refuses them in turn."""
    results, done = loads
    assert done.returncode == 0, done.stderr[-2000:]
    folder, output = results[(exploit, opt_in)]
    assert output.startswith("REFUSED:") and folder in output
    if opt_in == "default":
        assert "only pickle weights" in output and "allow_pickle" in output
    else:
        assert "weights_only" in output or "did not load" in output
        assert "weights_only` set to `False`" not in output  # never advise the unsafe load
    # the payloads print 456 (eval) or run `echo pwned`: neither may appear anywhere, in any of the loads
    assert "456" not in done.stdout + done.stderr and "pwned" not in done.stdout + done.stderr


def test_pickle_weights_load_on_request_when_they_are_only_tensors(tmp_path):
    """The opt-in is useful, not just a different refusal: a plain state dict in pytorch_model.bin loads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft.config import ModelConfig
    from sft.model import load_model

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=100,
    )
    model = LlamaForCausalLM(config)
    config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # transformers 5 itself writes safetensors only
    assert (tmp_path / "pytorch_model.bin").is_file() and not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(SftError, match="only pickle weights"):
        load_model(ModelConfig(name_or_path=str(tmp_path)))
    loaded = load_model(ModelConfig(name_or_path=str(tmp_path), allow_pickle=True))
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


SECRET = "hf_" + "Zq7" * 12  # token-shaped, as a real hub token
TRACKER = "wandb-" + "k3y" * 10


def test_secrets_never_reach_saved_files_logs_or_the_model_card(tmp_path):
    from tests.test_cli import sft
    from tests.test_pipeline import tiny_config

    raw = tiny_config(tmp_path, max_steps=2, hub_token=SECRET, eval_strategy="no")
    raw["eval"] = {"max_samples": 2, "max_new_tokens": 4}
    raw["export"] = {"merged": False, "verify": False}
    config = tmp_path / "secret.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {"WANDB_API_KEY": TRACKER, "HF_TOKEN": SECRET}
    result = sft("train", str(config), env=env)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "t"
    written = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert run / "config.yaml" in written and run / "adapter" / "README.md" in written
    for secret in (SECRET, TRACKER):
        assert secret not in result.stdout + result.stderr
        leaks = [str(p) for p, data in written.items() if secret.encode() in data]
        assert not leaks, leaks
    assert "hub_token: <redacted>" in (run / "config.yaml").read_text()  # it was there, and it was redacted


def test_a_secret_in_an_error_message_is_redacted(tmp_path):
    from tests.test_cli import sft

    config = tmp_path / "c.yaml"
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    raw = {"model": {"name_or_path": f"./{SECRET}"}, "data": {"train": str(data), "eval": str(data)}}
    config.write_text(yaml.safe_dump(raw))
    result = sft("train", str(config))  # the model folder does not exist: the error names it
    assert result.returncode == 2 and SECRET not in result.stderr and "<redacted>" in result.stderr
    checked = sft("check", str(config))
    assert checked.returncode == 0 and SECRET not in checked.stdout


def test_no_disk_space_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import sft.runs
    from sft.config import validate_config
    from sft.pipeline import train_run
    from tests.test_pipeline import tiny_config

    monkeypatch.setattr(sft.runs, "free_bytes", lambda path: 10 << 20)  # 10 MiB left
    raw = tiny_config(tmp_path, max_steps=2)
    with pytest.raises(SftError, match=r"not enough disk space for the export in .*runs: about .* needed, 10 MiB free"):
        train_run(validate_config(raw))
    assert not (tmp_path / "runs").exists()


def test_no_disk_space_for_a_checkpoint_stops_with_the_previous_one_intact(tmp_path, monkeypatch):
    import sft.runs
    from sft.config import validate_config
    from sft.pipeline import train_run
    from sft.train import checkpoints
    from tests.test_pipeline import tiny_config

    real, calls = sft.runs.free_bytes, []

    def shrinking(path):  # plenty of space until the second checkpoint
        calls.append(path)
        return real(path) if len(calls) < 3 else 1 << 20

    monkeypatch.setattr(sft.runs, "free_bytes", shrinking)
    raw = tiny_config(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, eval_strategy="no")
    with pytest.raises(SftError, match="not enough disk space for the checkpoint at step 4"):
        train_run(validate_config(raw))
    assert [p.name for p in checkpoints(tmp_path / "runs" / "t" / "checkpoints")] == ["checkpoint-2"]
