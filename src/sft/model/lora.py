"""Wrap the base model with LoRA: the only place a peft LoraConfig is built; and the base an exported adapter names."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedModel

from sft.config import AdapterConfig
from sft.errors import SftError


def build_lora_config(config: AdapterConfig, new_tokens: list[int], train_head: str | None):
    """The one place a peft LoraConfig is built.

    `new_tokens`: embedding rows added for a chat template, trained and saved with the adapter. `train_head`: the
    name of an untied LM head to train in full alongside (TRL's fused loss reads the head's weight directly, so LoRA
    cannot reach it): without it the model could not learn to emit the end-of-turn token it was just given.
    """
    from peft import LoraConfig

    modules_to_save = [*(config.modules_to_save or []), *([train_head] if train_head else [])]
    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        trainable_token_indices=new_tokens or None,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        modules_to_save=sorted(set(modules_to_save)) or None,
        bias=config.bias,
        task_type="CAUSAL_LM",
    )


def apply_lora(model: PreTrainedModel, config: AdapterConfig, new_tokens: list[int] | None = None):
    """Wrap the model with LoRA; tokens added to the vocabulary (`new_tokens`) get trained embedding rows."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    head = model.get_output_embeddings()
    train_head = None
    if new_tokens and head is not None and head.weight is not model.get_input_embeddings().weight:
        train_head = next(name for name, module in model.named_modules() if module is head).split(".")[-1]
    try:
        peft_model = get_peft_model(model, build_lora_config(config, list(new_tokens or []), train_head))
    except ValueError as err:
        raise SftError(f"adapter: peft could not wrap the model: {err}") from None
    head = peft_model.get_output_embeddings()
    if new_tokens and not hasattr(head, "bias") and getattr(head.original_module, "bias", None) is None:
        # A tied head wrapped for trainable tokens exposes `weight` (merged) but not `bias` (peft 0.21), and TRL's
        # fused loss reads both: the head has no bias, so say so.
        head.bias = None
    return peft_model


def read_adapter_base(adapter_dir: Path) -> str:
    """The base model an exported adapter was trained on."""
    meta = adapter_dir / "adapter_config.json"
    if not meta.is_file():
        raise SftError(f"{adapter_dir}: no adapter_config.json; expected an adapter exported by `sft train`")
    try:
        base = json.loads(meta.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (ValueError, AttributeError) as err:  # not JSON, not UTF-8, or not an object
        raise SftError(f"{meta}: not a JSON object ({err}); expected the adapter_config.json peft writes") from None
    if not isinstance(base, str):
        raise SftError(f"{meta}: no base_model_name_or_path; expected the base model the adapter was trained on")
    return base
