"""Hostile weight files are refused without running them: weights load from safetensors only."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import shared

LOAD = """
import sys
from sft.config import ModelConfig
from sft.errors import SftError
from sft.model import load_model
try:
    load_model(ModelConfig(name_or_path=sys.argv[1]))
except SftError as err:
    print("REFUSED:", err)
else:
    print("LOADED")
"""


@pytest.mark.parametrize("exploit", ["malicious1_v4.pkl", "pytorch_magic_bypass.pt", "malicious1.zip"])
def test_pickle_weights_are_refused_and_their_payload_never_runs(exploit, tmp_path):
    source = shared(f"security/{exploit}")
    folder = tmp_path / "model"
    folder.mkdir()
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
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(source, folder / "pytorch_model.bin")  # where transformers would look for (pickled) weights
    done = subprocess.run([sys.executable, "-c", LOAD, str(folder)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("REFUSED:") and str(folder) in done.stdout and "only pickle weights" in done.stdout
    # the payloads print 456 (eval) or run `echo pwned`: neither may appear anywhere
    assert "456" not in done.stdout + done.stderr and "pwned" not in done.stdout + done.stderr
