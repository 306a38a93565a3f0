"""Ship a run: adapter/ (and merged/) with tokenizer, template and card, each checked in a fresh process first."""

from sft.export.card import model_card
from sft.export.write import (
    MERGE_TOLERANCE,
    RELOAD_TOLERANCE,
    base_reference,
    check_finite,
    export,
    export_run,
    logits_of,
    probe_inputs,
    vllm_warnings,
)
