"""Supervised fine-tuning with TRL's SFTTrainer: the only place an SFTConfig is built and a trainer is run.

The `train` section of a config is passed to `trl.SFTConfig` as is, over this pipeline's defaults, so every
TRL/Trainer option is reachable. Rows arrive already tokenized and labelled (see `sft.tokenize`); TRL packs them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from sft.errors import SftError

# Options this pipeline owns: setting them in `train` would fight the pipeline, so they point elsewhere.
RESERVED = {
    "output_dir": "the run folder comes from output.runs_dir and output.name",
    "max_length": "set data.max_length (it changes the tokens, so it lives with the data)",
    "assistant_only_loss": "labels are always exactly the answers plus end-of-turn; nothing to set",
    "completion_only_loss": "labels are always exactly the answers plus end-of-turn; nothing to set",
    "dataset_text_field": "set the format of each data source (data.train[].format)",
    "chat_template_path": "set model.chat_template",
    "model_init_kwargs": "set model.dtype / model.attn_implementation / model.load_in_4bit",
    "trust_remote_code": "set model.trust_remote_code",
    "pad_token": "the pad token is chosen by the model stage",
    "eos_token": "the end-of-turn token comes from the chat template",
}


def defaults() -> dict[str, Any]:
    """This pipeline's defaults, applied under whatever the config's `train` section sets."""
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {
        "learning_rate": 2e-4,  # LoRA wants ~10x the full fine-tuning rate (TRL's default is 2e-5)
        "packing": True,  # best-fit packing, padding-free: no compute spent on pad tokens
        "activation_checkpointing": False,  # TRL turns it on (about +1/3 compute); on only when memory needs it
        "bf16": bf16,  # TRL turns bf16 on everywhere, which is an error on a CPU-only machine
        "report_to": "none",
        "logging_steps": 10,
        "eval_strategy": "steps",  # a held-out loss curve beside the training one: overfitting shows at a glance
        "eval_steps": 0.1,  # a fraction: ten evaluations per run, whatever its length
        "save_strategy": "steps",
        "save_steps": 500,
        "save_total_limit": 2,
        "include_num_input_tokens_seen": "non_padding",
        "seed": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),  # pinning without a GPU only warns
        # Several CPU processes (torchrun / accelerate launch --multi_gpu on a CPU machine) talk through gloo;
        # left unset, each process would train alone.
        "ddp_backend": None if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) == 1 else "gloo",
    }


def sft_fields() -> set[str]:
    from trl import SFTConfig

    return {f.name for f in dataclasses.fields(SFTConfig) if f.init}


def check_train_section(train: dict[str, Any]) -> list[str]:
    """Every problem with a `train` section, by building the SFTConfig it describes."""
    from sft.config import did_you_mean

    valid = sft_fields()
    problems = []
    for key in train:
        if key in RESERVED:
            problems.append(f"train.{key}: not settable here: {RESERVED[key]}")
        elif key not in valid:
            problems.append(f"train.{key}: not a trl.SFTConfig option{did_you_mean(key, valid - set(RESERVED))}")
    if problems:
        return problems
    try:
        with tempfile.TemporaryDirectory() as tmp:
            build_sft_config(train, output_dir=tmp, max_length=1024)
    except (TypeError, ValueError) as err:
        problems.append(f"train: trl.SFTConfig rejected these options: {err}")
    return problems


def build_sft_config(train: dict[str, Any], output_dir: str | Path, max_length: int):
    """The one place a trl.SFTConfig is built: our defaults, then the config's `train` section."""
    from trl import SFTConfig

    options = {**defaults(), **train}
    if "gradient_checkpointing" in train:  # deprecated alias in transformers 5: keep one of the two
        options.pop("activation_checkpointing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return SFTConfig(output_dir=str(output_dir), max_length=max_length, **options)


def _rows_to_dataset(rows: list[dict[str, list[int]]]):
    from datasets import Dataset

    return Dataset.from_dict({key: [row[key] for row in rows] for key in ("input_ids", "labels")})


def make_callbacks(metrics_path: Path):
    from transformers import TrainerCallback

    class MetricsToJsonl(TrainerCallback):
        """Every log line to metrics.jsonl; a non-finite loss or gradient norm stops the run at that step."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            for key in ("loss", "grad_norm", "eval_loss"):
                value = logs.get(key)
                if isinstance(value, float) and not math.isfinite(value):
                    raise SftError(
                        f"training stopped at step {state.global_step}: {key} is {value}. Likely causes: a learning "
                        "rate too high, fp16 overflow (use bf16 or fp32), or rows with no trained tokens"
                    )
            if state.is_world_process_zero:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

    return [MetricsToJsonl()]


def train(model, tokenizer, train_rows, eval_rows, sft_config, metrics_path: Path) -> dict[str, Any]:
    """Run SFTTrainer on tokenized rows; return the final training metrics."""
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=sft_config,
        train_dataset=_rows_to_dataset(train_rows),
        eval_dataset=_rows_to_dataset(eval_rows) if eval_rows and sft_config.eval_strategy != "no" else None,
        processing_class=tokenizer,
        callbacks=make_callbacks(metrics_path),
    )
    result = trainer.train()
    return dict(result.metrics)
