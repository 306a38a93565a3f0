"""`sft plan --measure`: real training steps with the plan's settings, in a fresh process, and their peak memory.

python -m sft.plan.measure     # the child: a JSON request on stdin, the measurement as the last line of stdout
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from sft.config import RunConfig
from sft.errors import SftError
from sft.plan.decide import Plan
from sft.plan.shape import Settings


def measure_in_child(config_path: str, overrides: list[str], plan: Plan, steps: int = 2) -> dict[str, Any]:
    """`measure` in a fresh Python process, as `sft train` runs: what this process did first (the precision probe,
    building the stand-in) would otherwise have warmed up kernels and thread pools and moved the baseline."""
    import subprocess

    request = {
        "config": config_path,
        "overrides": overrides,
        "settings": dataclasses.asdict(plan.settings),
        "vocab": plan.shape.vocab,
        "train_options": _plan_train_options(plan),
        "steps": steps,
    }
    child = subprocess.run(
        [sys.executable, "-m", "sft.plan.measure"], input=json.dumps(request), stdout=subprocess.PIPE, text=True
    )  # the child's progress goes to our stderr as it comes
    if child.returncode != 0:
        raise SftError(f"--measure: the training steps failed (exit {child.returncode}); see the messages above")
    return json.loads(child.stdout.strip().splitlines()[-1])


def _measure_child() -> None:
    from sft.config import load_config

    request = json.loads(sys.stdin.read())
    config = load_config(request["config"], request["overrides"])
    fields = request["settings"]
    settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its progress and metrics: keep stdout clean
        result = measure(config, settings, request["vocab"], request["train_options"], request["steps"])
    print(json.dumps(result), flush=True)


def measure(
    config: RunConfig, s: Settings, vocab: int, train_options: dict[str, Any], steps: int = 2
) -> dict[str, Any]:
    """Build the model and run `steps` real training steps with the plan's settings on rows of exactly
    data.max_length tokens, every one trained (the worst case the plan predicts); peak memory from just before the
    model is built, and each step's time."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from sft.hardware import peak_memory
    from sft.model import apply_lora, load_model, load_tokenizer
    from sft.train import build_sft_config, trainer_class

    build_stand_in(config)
    tokenizer = load_tokenizer(config.model)
    rows_needed = s.batch * s.accumulation * steps
    vocab = min(vocab, len(tokenizer))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows_needed, s.max_length), generator=generator).tolist()
    if s.packing:  # two documents to a packed row, as real data packs: a block-diagonal mask, as planned
        half = s.max_length // 2
        rows = [part for row in ids for part in (row[:half], row[half:])]
    else:  # one row of each batch a token shorter: padding, so a mask, as planned
        rows = [row[:-1] if i % s.batch == s.batch - 1 else row for i, row in enumerate(ids)]
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
    train = {
        **{k: v for k, v in train_options.items() if k not in config.train},
        **config.train,
        "max_steps": steps,
        "num_train_epochs": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
    }
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as tmp:
        sft_config = build_sft_config(train, tmp, s.max_length)
        trainer_cls = trainer_class()  # imports trl's trainer modules: before the window, as `sft train` does
        _warm_up(config, tokenizer, trainer_cls, train, s.max_length)
        _release_free_memory()
        with peak_memory() as peak:
            model = apply_lora(load_model(config.model, tokenizer), config.adapter)
            trainer = trainer_cls(
                model=model,
                args=sft_config,
                train_dataset=dataset,
                processing_class=tokenizer,
                callbacks=[StepTimer()],
            )
            trainer.train()
    return {"peak_bytes": peak.bytes, "kind": peak.kind, "steps": steps, "step_seconds": times}


def _warm_up(config: RunConfig, tokenizer, trainer_cls, train: dict[str, Any], max_length: int) -> None:
    """One training step of a 1-layer, d=64 copy of the model through the same code (precision, attention, LoRA,
    trainer), before the measured window. The first step touches code pages of torch's libraries (tens of MiB, and
    more or fewer depending on how the kernel maps the code of a given install: 20 MiB apart between two installs of
    the same packages); once resident they are not counted as the run's memory. Best effort: a model whose config
    cannot be shrunk this way is measured without it."""
    import tempfile

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from sft.model import apply_lora, load_model_config, resolve_dtype, set_attention
    from sft.train import build_sft_config

    try:
        small = load_model_config(config.model)
        text = small.get_text_config() if hasattr(small, "get_text_config") else small
        heads = 2 if (getattr(text, "num_key_value_heads", None) or 2) >= 2 else 1
        text.update({"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "head_dim": 32})
        text.update({"num_attention_heads": 2, "num_key_value_heads": heads})
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[:1]
        model = AutoModelForCausalLM.from_config(small, dtype=resolve_dtype(config.model.dtype))
        set_attention(model, config.model.attn_implementation)
        model = apply_lora(model, config.adapter)
        length = min(max_length, 32)
        row = [i % len(tokenizer) for i in range(length)]
        dataset = Dataset.from_dict({"input_ids": [row, row], "labels": [row, row]})
        with tempfile.TemporaryDirectory() as tmp:
            args = build_sft_config({**train, "max_steps": 1}, tmp, length)
            trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train()
    except Exception:  # noqa: BLE001 - only a warm-up
        pass


def _release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc), so the peak measured from here counts what the run adds:
    memory freed earlier in this process (building the stand-in model, reading data) would otherwise be reused
    without showing up, by a different amount each time."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def build_stand_in(config: RunConfig) -> None:
    from sft.data import corpus, load_dataset
    from sft.model import ensure_tiny_model

    if config.model.tiny is not None and not Path(config.model.name_or_path).exists():
        ensure_tiny_model(config.model, corpus(load_dataset(config.data)))


def _plan_train_options(plan: Plan) -> dict[str, Any]:
    options: dict[str, Any] = {"activation_checkpointing": plan.settings.checkpointing}
    if plan.device.kind == "cpu":
        options["bf16"] = plan.settings.compute == "bf16"
        if options["bf16"]:
            options["use_cpu"] = True
    return options


if __name__ == "__main__":  # `sft plan --measure` runs its steps here, in a fresh process (see measure_in_child)
    _measure_child()
