"""The model stage: tokenizer and base model loaded and checked, LoRA applied, per-document attention, the loss head."""

from sft.model.load import (
    EXPECTED,
    build_quantization_config,
    check_vocab,
    embedding_rows,
    ensure_pad_token,
    ids_past,
    load_model,
    load_model_config,
    load_tokenizer,
    resolve_dtype,
    rows_needed,
    set_attention,
)
from sft.model.lora import apply_lora, build_lora_config, read_adapter_base
from sft.model.templates import CHATML_TEMPLATE, NAMED_TEMPLATES, TEMPLATE_TOKENS
from sft.model.tiny import ensure_tiny_model
