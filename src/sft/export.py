"""Ship the result: the adapter (PEFT, safetensors) with tokenizer, chat template and a model card; optionally a
merged model. Everything written is loaded back and compared with the in-memory model before it is published.

A folder appears complete or not at all: it is written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from sft.config import ModelConfig, RunConfig
from sft.errors import SftError
from sft.model import load_model, resolve_dtype

# fp32 tolerances: a reloaded adapter is the same arithmetic; a merge reorders it (W + BA vs Wx + BAx). In bf16,
# fp16 or 4 bits the differences are recorded and warned about, not enforced: rounding makes them model-dependent.
RELOAD_TOLERANCE = 1e-5
MERGE_TOLERANCE = 1e-4


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling folder; on success it replaces `final`, on failure it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published folder should read like any other
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def probe_inputs(vocab: int, seed: int = 0) -> torch.Tensor:
    """Fixed inputs to compare logits on: 2 rows x 16 tokens."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 16), generator=generator)


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


def base_reference(model_config: ModelConfig) -> str:
    """How an export names its base: local folders absolute, so the export loads from any working directory."""
    path = Path(model_config.name_or_path)
    return str(path.resolve()) if path.exists() else model_config.name_or_path


def export(model, tokenizer, run_dir: Path, config: RunConfig, stop: set[int], card: dict) -> dict:
    """Write adapter/ (and merged/ if asked) into the run folder; return what was written and checked."""
    from peft import PeftModel

    # Judged by the configured precision: QLoRA's preparation upcasts some parameters, which says nothing.
    strict = resolve_dtype(config.model.dtype) == torch.float32 and not config.model.load_in_4bit
    check_finite(model)
    ids = probe_inputs(len(tokenizer))  # every id has a row: checked before training (check_vocab)
    expected = logits_of(model, ids)
    result: dict = {"adapter": str(run_dir / "adapter")}
    base = base_reference(config.model)

    with atomic_dir(run_dir / "adapter") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _point_to_base(tmp / "adapter_config.json", base, config.model.revision)
        tokenizer.save_pretrained(tmp)
        _save_generation_config(model, tmp, stop)
        meta = {
            "base_model": base,
            "stop_token_ids": sorted(stop),
            # how the base was loaded, so `sft generate` loads it the same way
            **config.model.model_dump(include={"revision", "dtype", "attn_implementation", "trust_remote_code"}),
        }
        (tmp / "sft_export.json").write_text(json.dumps(meta, indent=2) + "\n")
        if config.export.verify:
            reloaded = PeftModel.from_pretrained(load_model(config.model, tokenizer), tmp)
            result["adapter_reload_max_abs_diff"] = _compare(
                expected, logits_of(reloaded, ids), RELOAD_TOLERANCE, "adapter", strict
            )
            del reloaded
        (tmp / "README.md").write_text(model_card(config, base, result, card))

    if config.export.merged:
        with atomic_dir(run_dir / "merged") as tmp:
            base = load_model(config.model, tokenizer)
            merged = PeftModel.from_pretrained(base, run_dir / "adapter").merge_and_unload()
            if config.export.verify:
                result["merged_max_abs_diff"] = _compare(
                    expected, logits_of(merged, ids), MERGE_TOLERANCE, "merged model", strict
                )
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            _save_generation_config(merged, tmp, stop)
            result["merged"] = str(run_dir / "merged")
            del merged
    return result


def check_finite(model) -> None:
    """Never export a NaN adapter: every trainable tensor must be finite."""
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param).all():
            raise SftError(f"refusing to export: adapter tensor {name} holds NaN or infinite values")


def _compare(expected: torch.Tensor, got: torch.Tensor, tolerance: float, what: str, strict: bool) -> float:
    diff = (expected - got).abs().max().item()
    if diff <= tolerance:
        return diff
    message = (
        f"the {what} written to disk gives logits {diff:.3g} away from the trained model (fp32 tolerance {tolerance:g})"
    )
    if strict:
        raise SftError(f"export check failed: {message}; nothing was published")
    print(f"[sft] warning: {message}; expected in reduced precision, recorded in the model card", file=sys.stderr)
    return diff


def _point_to_base(adapter_config: Path, base: str, revision: str | None) -> None:
    meta = json.loads(adapter_config.read_text())
    meta["base_model_name_or_path"] = base
    meta["revision"] = revision
    adapter_config.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _save_generation_config(model, folder: Path, stop: set[int]) -> None:
    """EOS includes the template's end-of-turn token, so generation stops where training taught it to."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    generation = base.generation_config
    eos = generation.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    generation.eos_token_id = sorted(set(eos) | stop)
    generation.save_pretrained(folder)


def model_card(config: RunConfig, base: str, checks: dict, card: dict) -> str:
    front = {
        "base_model": config.model.name_or_path,
        "library_name": "peft",
        "tags": ["sft", "lora", "trl"],
        "datasets": [s.path for s in config.data.train],
    }
    metrics = card.get("metrics_markdown", "(evaluation was off)\n")
    return (
        "---\n"
        + yaml.safe_dump(front, sort_keys=False)
        + "---\n\n"
        + f"# LoRA adapter for {config.model.name_or_path}\n\n"
        + f"Fine-tuned with `sft` (TRL SFTTrainer + PEFT LoRA r={config.adapter.r}) on "
        + f"{card.get('train_examples', '?')} examples ({card.get('trained_tokens', '?')} trained tokens); "
        + f"data fingerprint `{card.get('fingerprint', '?')}`.\n\n"
        + "## Held-out evaluation\n\n"
        + metrics
        + "\n## Export checks\n\n"
        + "".join(f"- {k}: {v}\n" for k, v in checks.items() if k.endswith("diff"))
        + "\n## Use it\n\n"
        + "```python\n"
        + "from peft import PeftModel\n"
        + "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        + f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
        + "model = PeftModel.from_pretrained(base, 'path/to/this/folder')\n"
        + "tokenizer = AutoTokenizer.from_pretrained('path/to/this/folder')\n"
        + "```\n\n"
        + "or `sft generate path/to/this/folder --prompt '...'`.\n\n"
        + "## Training config\n\n```yaml\n"
        + yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
        + "```\n"
    )
