"""The model card (README.md) of an export: metrics, export checks, serving caveats, loading snippets, the config."""

from __future__ import annotations

from pathlib import Path

import yaml

from sft.config import RunConfig
from sft.runs import redact


def model_card(config: RunConfig, base: str, checks: dict, card: dict, merged: bool = False) -> str:
    """README.md with YAML front matter, metrics, the export checks and loading snippets that run as written."""
    folder = Path(checks["merged"] if merged else checks["adapter"]).resolve()
    front = {
        "base_model": config.model.name_or_path,
        "library_name": "transformers" if merged else "peft",
        "tags": ["sft", "lora", "trl", "merged" if merged else "adapter"],
        "datasets": [s.path for s in config.data.train],
    }
    grown = any("resized embeddings" in w for w in checks.get("vllm_warnings", []))
    checks_md = "".join(f"- {k}: {v}\n" for k, v in checks.items() if k.endswith(("diff", "equal", "warning")))
    warnings_md = "".join(f"- vLLM: {w}\n" for w in checks.get("vllm_warnings", [])) or "- none\n"
    if merged:
        load = (
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})\n```\n\n"
            f"vLLM: `vllm serve {folder}`\n"
        )
    else:
        load = (
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})\n"
            f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
            + ("base.resize_token_embeddings(len(tokenizer))  # the adapter added tokens\n" if grown else "")
            + f"model = PeftModel.from_pretrained(base, {str(folder)!r})\n```\n\n"
            f"vLLM: `vllm serve {base} --enable-lora --lora-modules sft={folder}`\n"
        )
    return (
        "---\n"
        + yaml.safe_dump(front, sort_keys=False)
        + "---\n\n"
        + f"# {'Merged model' if merged else 'LoRA adapter'} fine-tuned from {config.model.name_or_path}\n\n"
        + f"Fine-tuned with `sft` (TRL SFTTrainer + PEFT LoRA r={config.adapter.r}) on "
        + f"{card.get('train_examples', '?')} examples ({card.get('trained_tokens', '?')} trained tokens); "
        + f"data fingerprint `{card.get('fingerprint', '?')}`.\n\n"
        + "## Held-out evaluation\n\n"
        + card.get("metrics_markdown", "(evaluation was off)\n")
        + "\n## Export checks\n\n"
        + "Reloaded in a fresh process and compared with the trained model (max abs logit difference, greedy "
        + "generations on held-out prompts):\n\n"
        + checks_md
        + "\n## Serving caveats\n\n"
        + warnings_md
        + "\n## Use it\n\n"
        + load
        + f"\nor `sft generate {folder} --prompt '...'` (`sft chat {folder}` for a conversation).\n\n"
        + "## Training config\n\n```yaml\n"
        + yaml.safe_dump(redact(config.model_dump(mode="json")), sort_keys=False)
        + "```\n"
    )
