"""A base model whose tokenizer has no chat template: `model.chat_template: chatml` adds <|im_start|>/<|im_end|>,
grows the embeddings, trains the new rows with the adapter, and the export reloads with them (real GPT-2 vocab)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft.config import validate_config
from sft.pipeline import train_run
from tests.conftest import shared

ROOT = Path(__file__).resolve().parents[1]


def base_model(folder: Path, tied: bool) -> Path:
    from transformers import GPT2Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = GPT2Tokenizer.from_pretrained(shared("tokenizers/gpt2"))  # vocab.json + merges.txt
    assert tokenizer.chat_template is None and len(tokenizer) == 50257
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tied", [False, True], ids=["untied-head", "tied-head"])
def test_chatml_on_a_base_tokenizer_grows_trains_and_exports(tmp_path, tied):
    model = base_model(tmp_path / "base", tied)
    # 3 steps x 4 rows train on 12 rows and each held-out pass is over 8: the rest of the shipped files would only be
    # tokenized and scored against GPT-2's 50k-row head (a minute of CPU per run), changing none of the checks below.
    for name, rows in (("train", 16), ("eval", 8)):
        lines = (ROOT / f"data/reverse/{name}.jsonl").read_text().splitlines()[:rows]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    config = validate_config(
        {
            "model": {"name_or_path": str(model), "chat_template": "chatml"},
            "data": {
                "train": str(tmp_path / "train.jsonl"),
                "eval": str(tmp_path / "eval.jsonl"),
                "max_length": 64,
                "cache_dir": None,
            },
            "adapter": {"r": 4, "alpha": 8},
            "train": {"max_steps": 3, "per_device_train_batch_size": 4, "save_strategy": "no", "eval_strategy": "no"},
            "eval": {"max_samples": 4, "max_new_tokens": 4},
            "export": {"merged": True},
            "output": {"runs_dir": str(tmp_path / "runs"), "name": "chatml"},
        }
    )
    run = train_run(config)
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "complete"
    assert status["export"]["adapter_reload_max_abs_diff"] <= 1e-5
    assert status["export"]["merged_max_abs_diff"] <= 1e-4

    adapter = run / "adapter"
    tokenizer_config = json.loads((adapter / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tokenizer_config["added_tokens"]}
    assert added["<|im_start|>"] == 50257 and added["<|im_end|>"] == 50258
    assert 50258 in json.loads((adapter / "generation_config.json").read_text())["eos_token_id"]
    from safetensors.torch import load_file

    saved = load_file(adapter / "adapter_model.safetensors")
    assert any("trainable_tokens" in k for k in saved), "the new embedding rows must travel with the adapter"
    # untied head: trained in full (TRL's fused loss reads its weight, out of LoRA's reach); tied: follows the rows
    assert any("lm_head.modules_to_save" in k for k in saved) != tied
    merged = json.loads((run / "merged" / "config.json").read_text())
    assert merged["vocab_size"] == 50259

    # A fresh process finds the grown vocabulary from the export alone.
    result = subprocess.run(
        [sys.executable, "-m", "sft", "generate", str(run), "--prompt", "reverse: a b", "--max-new-tokens", "3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
