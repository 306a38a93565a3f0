"""Inference from an export: the adapter on its base (or a merged model), with the chat template saved with it."""

from __future__ import annotations

import json
from pathlib import Path

from sft.config import ModelConfig
from sft.errors import SftError
from sft.evaluate import generate
from sft.model import load_model, load_tokenizer, read_adapter_base
from sft.tokenize import render


def resolve_export(path: Path) -> Path:
    """A run folder, an adapter folder or a merged-model folder -> the folder to load."""
    for candidate in (path / "adapter", path):
        if (candidate / "adapter_config.json").is_file() or (candidate / "config.json").is_file():
            return candidate
    if not path.exists():
        raise SftError(f"{path}: no such folder; expected a run folder (runs/NAME), its adapter/ or merged/ folder")
    raise SftError(f"{path}: holds no adapter_config.json or config.json; expected an export written by `sft train`")


def load_for_inference(path: Path):
    """(model, tokenizer, stop token ids) from an export folder."""
    from peft import PeftModel

    folder = resolve_export(path)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(folder)))
    meta_path = folder / "sft_export.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if (folder / "adapter_config.json").is_file():
        base_name = meta.get("base_model") or read_adapter_base(folder)
        settings = {k: meta[k] for k in ("revision", "dtype", "attn_implementation", "trust_remote_code") if k in meta}
        base = ModelConfig(name_or_path=base_name, **settings)
        model = PeftModel.from_pretrained(load_model(base, tokenizer), folder)
    else:
        model = load_model(ModelConfig(name_or_path=str(folder)))
    eos = model.generation_config.eos_token_id
    stop = set(meta.get("stop_token_ids") or ([eos] if isinstance(eos, int) else eos or []))
    stop |= {tokenizer.eos_token_id} - {None}
    return model, tokenizer, stop


def answer(model, tokenizer, stop: set[int], messages: list[dict], max_new_tokens: int) -> str:
    text = render(tokenizer, messages, generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return generate(model, tokenizer, [ids], max_new_tokens, batch_size=1, stop=stop)[0]
