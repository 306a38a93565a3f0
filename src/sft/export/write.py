"""Ship the result: the adapter (PEFT, safetensors) with tokenizer, chat template and a model card; optionally a
merged model. Everything written is loaded back and compared with the in-memory model before it is published.

A folder appears complete or not at all: it is written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from sft.config import ModelConfig, RunConfig, read_yaml, validate_config
from sft.console import log
from sft.errors import SftError
from sft.evaluate import generate
from sft.export.card import model_card
from sft.generate import load_for_inference
from sft.model import load_model, resolve_dtype
from sft.runs import atomic_dir, redact_text, run_lock

# fp32 tolerances: a reloaded adapter is the same arithmetic; a merge reorders it (W + BA vs Wx + BAx). In bf16,
# fp16 or 4 bits the differences are recorded and warned about, not enforced: rounding makes them model-dependent.
RELOAD_TOLERANCE = 1e-5
MERGE_TOLERANCE = 1e-4


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


def export(
    model, tokenizer, run_dir: Path, config: RunConfig, stop: set[int], card: dict, prompts: list[list[int]] = ()
) -> dict:
    """Write adapter/ (and merged/ if asked) into the run folder, each checked before it is published.

    The checks load what was written in a fresh process and compare with the in-memory model: logits on fixed
    inputs, and greedy generations on `prompts` (a few held-out prompts). Returns what was written and measured.
    """
    from peft import PeftModel

    # Judged by the configured precision: QLoRA's preparation upcasts some parameters, which says nothing.
    strict = resolve_dtype(config.model.dtype) == torch.float32 and not config.model.load_in_4bit
    check_finite(model)
    ids = probe_inputs(len(tokenizer))  # every id has a row: checked before training (check_vocab)
    expected = logits_of(model, ids)
    expected_text = generate(model, tokenizer, list(prompts), 16, 1, stop) if prompts else []
    result: dict = {"adapter": str(run_dir / "adapter"), "vllm_warnings": vllm_warnings(model, config)}
    for warning in result["vllm_warnings"]:
        log(f"warning: vLLM: {warning}")
    base = base_reference(config.model)

    with atomic_dir(run_dir / "adapter") as adapter:
        model.save_pretrained(adapter, safe_serialization=True)
        _point_to_base(adapter / "adapter_config.json", base, config.model.revision)
        tokenizer.save_pretrained(adapter)
        _save_generation_config(model, adapter, stop)
        meta = {
            "base_model": base,
            "stop_token_ids": sorted(stop),
            # how the base was loaded, so `sft generate` loads it the same way
            **config.model.model_dump(include={"revision", "dtype", "attn_implementation", "trust_remote_code"}),
        }
        (adapter / "sft_export.json").write_text(json.dumps(meta, indent=2) + "\n")
        if config.export.verify:
            logits, texts = _load_in_fresh_process(adapter, ids, prompts)
            result["adapter_reload_max_abs_diff"] = _compare(expected, logits, RELOAD_TOLERANCE, "adapter", strict)
            result["adapter_generations_equal"] = _same_text(expected_text, texts, "adapter", strict)

        if config.export.merged:
            with atomic_dir(run_dir / "merged") as merged_dir:
                if config.model.load_in_4bit:
                    result["merged_warning"] = MERGE_4BIT_WARNING
                    log(f"warning: {MERGE_4BIT_WARNING}")
                merged = PeftModel.from_pretrained(load_model(_for_merging(config.model), tokenizer), adapter)
                merged = merged.merge_and_unload()
                merged.save_pretrained(merged_dir, safe_serialization=True, max_shard_size=config.export.max_shard_size)
                tokenizer.save_pretrained(merged_dir)
                _save_generation_config(merged, merged_dir, stop)
                del merged
                if config.export.verify:
                    logits, texts = _load_in_fresh_process(merged_dir, ids, prompts)
                    result["merged_max_abs_diff"] = _compare(expected, logits, MERGE_TOLERANCE, "merged model", strict)
                    # a merge rounds differently (~1e-5): a near-tie may flip a token, so this one only warns
                    result["merged_generations_equal"] = _same_text(expected_text, texts, "merged model", False)
                result["merged"] = str(run_dir / "merged")
                (merged_dir / "README.md").write_text(redact_text(model_card(config, base, result, card, merged=True)))
        (adapter / "README.md").write_text(redact_text(model_card(config, base, result, card)))
    return result


MERGE_4BIT_WARNING = (
    "the adapter was trained on a 4-bit base; it is merged into the base dequantized to the compute dtype, so the "
    "merged model differs from what was trained by the quantization error (measured difference in the card)"
)


def _for_merging(model_config: ModelConfig) -> ModelConfig:
    """A 4-bit base cannot hold merged weights: merge into the base loaded in the compute dtype instead."""
    if not model_config.load_in_4bit:
        return model_config
    return model_config.model_copy(update={"load_in_4bit": False, "dtype": model_config.bnb_4bit_compute_dtype})


def _load_in_fresh_process(folder: Path, ids: torch.Tensor, prompts) -> tuple[torch.Tensor, list[str]]:
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "inputs.json").write_text(json.dumps({"ids": ids.tolist(), "prompts": list(prompts)}))
        done = subprocess.run(
            [sys.executable, "-m", "sft.export.verify", str(folder), work], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise SftError(f"export check failed: {folder.name} did not load in a fresh process:\n{tail}")
        texts = json.loads((Path(work) / "generated.json").read_text())
        return load_file(str(Path(work) / "logits.safetensors"))["logits"], texts


def _same_text(expected: list[str], got: list[str], what: str, strict: bool) -> bool:
    same = expected == got
    if not same:
        message = f"greedy generations of the {what} reloaded differ from the trained model's: {got!r} vs {expected!r}"
        if strict:
            raise SftError(f"export check failed: {message}; nothing was published")
        log(f"warning: {message}")
    return same


def vllm_warnings(model, config: RunConfig) -> list[str]:
    """What in this adapter vLLM's LoRA support cannot serve (as of vLLM 0.x: linear-layer LoRA only)."""
    warnings = []
    peft_config = getattr(model, "peft_config", {}).get("default")
    if peft_config is None:
        return warnings
    if peft_config.modules_to_save:
        warnings.append(f"modules_to_save {sorted(peft_config.modules_to_save)} (fully trained modules) are ignored")
    if peft_config.trainable_token_indices:
        warnings.append("the adapter carries resized embeddings (added tokens): serve the merged model instead")
    if peft_config.use_dora:
        warnings.append("DoRA adapters are not supported: serve the merged model")
    if peft_config.bias != "none":
        warnings.append(f"bias={peft_config.bias!r}: trained biases are not applied")
    targets = peft_config.target_modules
    names = set(targets) if not isinstance(targets, str) else {targets}
    if names & {"lm_head", "embed_tokens", "wte"}:
        warnings.append(f"LoRA on {sorted(names & {'lm_head', 'embed_tokens', 'wte'})} is not supported")
    return warnings


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
    log(f"warning: {message}; expected in reduced precision, recorded in the model card")
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


def export_run(run_dir: Path, merged: bool) -> dict:
    """`sft export RUN`: load the run's adapter on its base and export it again (adapter, merged model, card,
    checks), as the end of `sft train` does."""
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise SftError(f"{run_dir}: expected a run folder written by `sft train` (config.yaml and adapter/)")
    config = validate_config(read_yaml(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"))
    config.export.merged = merged or config.export.merged
    model, tokenizer, stop = load_for_inference(run_dir / "adapter")
    data = json.loads((run_dir / "data.json").read_text()) if (run_dir / "data.json").is_file() else {}
    card = {
        "train_examples": data.get("train", {}).get("examples", "?"),
        "trained_tokens": data.get("train", {}).get("trained_tokens", "?"),
        "fingerprint": data.get("fingerprint", "?"),
    }
    if (run_dir / "report" / "report.md").is_file():
        card["metrics_markdown"] = (run_dir / "report" / "report.md").read_text()
    with run_lock(run_dir):
        return export(model, tokenizer, run_dir, config, stop, card)
