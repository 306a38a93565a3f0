"""sft: LoRA supervised fine-tuning of causal language models, correct by construction and checked at every stage."""

__version__ = "0.1.0"
