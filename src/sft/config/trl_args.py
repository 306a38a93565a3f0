"""The `train` section: any trl.SFTConfig option over this pipeline's defaults. `build_sft_config` is the one place
an SFTConfig is built; the section is validated by building one, so no option is re-declared or silently dropped."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from sft.errors import did_you_mean

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
    "resume_from_checkpoint": "use `sft train CONFIG --resume`: it checks that the config and data are unchanged",
    "logging_nan_inf_filter": "a non-finite loss always stops the run (the filter would hide it from the log)",
}


def defaults() -> dict[str, Any]:
    """This pipeline's defaults, applied under whatever the config's `train` section sets."""
    import importlib.util

    import torch

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # Several CPU processes (torchrun / `accelerate launch --multi_gpu` on a CPU-only machine): accelerate makes them
    # one gloo group (DistributedType.MULTI_CPU) only when told to use the CPU. Without `use_cpu` it reports
    # DistributedType.NO with num_processes=2: no DDP wrapper and no gradient all-reduce, so each rank trains alone on
    # its half of the data while TRL still multiplies its loss by the number of processes (a 2x loss and gradient).
    cpu_ranks = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return {
        "learning_rate": 2e-4,  # LoRA wants ~10x the full fine-tuning rate (TRL's default is 2e-5)
        "packing": True,  # best-fit packing, padding-free: no compute spent on pad tokens
        # Best-fit decreasing, with which TRL forces padding-free: a batch is one flattened row whose per-example
        # position_ids keep attention inside each example (tests/test_packing.py). TRL's default, pinned: "wrapped"
        # cuts examples across rows. No example is cut: data.max_length drops longer ones before packing.
        "packing_strategy": "bfd",
        # Liger's layer kernels (RMSNorm, SwiGLU, RoPE; TRL keeps its own fused LM-head loss) on CUDA when installed;
        # the hub `use_kernels` would download kernels at load time, which offline machines cannot.
        "use_liger_kernel": torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None,
        "activation_checkpointing": False,  # TRL turns it on (about +1/3 compute); on only when memory needs it
        "bf16": bf16,  # TRL turns bf16 on everywhere, which is an error on a CPU-only machine
        "report_to": "none",
        "logging_steps": 10,
        "eval_strategy": "steps",  # a held-out loss curve beside the training one: overfitting shows at a glance
        "eval_steps": 0.1,  # a fraction: ten evaluations per run, whatever its length
        "save_strategy": "steps",
        "save_steps": 500,
        "save_total_limit": 2,
        "logging_nan_inf_filter": False,  # the Trainer would drop NaN/inf losses from the log, hiding a diverged run
        "include_num_input_tokens_seen": "non_padding",
        "seed": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),  # pinning without a GPU only warns
        "use_cpu": cpu_ranks,
        "ddp_backend": "gloo" if cpu_ranks else None,
    }


def sft_fields() -> set[str]:
    from trl import SFTConfig

    return {f.name for f in dataclasses.fields(SFTConfig) if f.init}


def trl_default(name: str) -> Any:
    """TRL's own default for an SFTConfig option."""
    from trl import SFTConfig

    found = {f.name: f for f in dataclasses.fields(SFTConfig)}[name]
    return found.default if found.default is not dataclasses.MISSING else found.default_factory()


# Values SFTConfig takes without complaint and that only fail (or silently misbehave) once training starts.
POSITIVE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")


def check_train_section(train: dict[str, Any]) -> list[str]:
    """Every problem with a `train` section: unknown or reserved keys, wrong types (checked against SFTConfig's own
    annotations), values that would only fail mid-run, then whatever building the SFTConfig rejects."""
    valid = sft_fields()
    problems = []
    for key in train:
        if key in RESERVED:
            problems.append(f"train.{key}: not settable here: {RESERVED[key]}")
        elif key not in valid:
            problems.append(f"train.{key}: not a trl.SFTConfig option{did_you_mean(key, valid - set(RESERVED))}")
        else:
            problems += _check_value(key, train[key])
    if problems:
        return problems
    try:
        with tempfile.TemporaryDirectory() as tmp:
            build_sft_config(train, output_dir=tmp, max_length=1024)
    except Exception as err:  # SFTConfig raises TypeError, ValueError, FileNotFoundError, ImportError...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        problems.append(f"train: trl.SFTConfig rejected these options: {first}")
    return problems


def _check_value(key: str, value: Any) -> list[str]:
    import typing

    from pydantic import TypeAdapter, ValidationError
    from trl import SFTConfig

    hint = typing.get_type_hints(SFTConfig).get(key)
    try:
        TypeAdapter(hint).validate_python(value)
    except ValidationError as err:
        expected = getattr(hint, "__name__", None) or str(hint)
        return [f"train.{key}: expected {expected}, got {value!r} ({err.errors()[0]['msg']})"]
    except Exception:  # an annotation pydantic cannot check: SFTConfig itself will judge the value
        pass
    if key in POSITIVE and (not isinstance(value, int) or value < 1):
        return [f"train.{key}: expected an integer >= 1, got {value!r}"]
    if key == "max_steps" and isinstance(value, int) and (value == 0 or value < -1):
        return [f"train.{key}: expected -1 (use num_train_epochs) or a number of steps >= 1, got {value!r}"]
    if key == "num_train_epochs" and isinstance(value, (int, float)) and value <= 0:
        return [f"train.{key}: expected a number of epochs > 0, got {value!r}"]
    if key == "packing_strategy" and value not in PACKING_STRATEGIES:
        return [f"train.{key}: expected one of {list(PACKING_STRATEGIES)}, got {value!r}"]
    if key == "report_to":
        from transformers.integrations import get_available_reporting_integrations

        wanted = [value] if isinstance(value, str) else list(value or [])
        missing = [r for r in wanted if r not in ("none", "all") and r not in get_available_reporting_integrations()]
        if missing:
            return [f"train.report_to: {missing} not installed here (pip install {' '.join(missing)}), or use 'none'"]
    return []


def build_sft_config(train: dict[str, Any], output_dir: str | Path, max_length: int):
    """The one place a trl.SFTConfig is built: our defaults, then the config's `train` section."""
    from trl import SFTConfig

    options = {**defaults(), **train}
    if not options.get("packing") and "train_sampling_strategy" not in train:
        # Without packing, batches of similar lengths waste less on padding (measured: pad 49% -> 21%, 2x real tokens/s)
        options["train_sampling_strategy"] = "group_by_length"
    if "gradient_checkpointing" in train:  # deprecated alias in transformers 5: keep one of the two
        options.pop("activation_checkpointing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return SFTConfig(output_dir=str(output_dir), max_length=max_length, **options)
