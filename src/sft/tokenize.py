"""The README's import path for tokenization, which lives in `sft.data.tokenize`."""

from sft.data.tokenize import (  # noqa: F401
    IGNORE,
    Tokenized,
    TokenStats,
    end_of_turn_candidates,
    prompt_ids,
    reference_answer,
    render,
    special_tokens,
    tokenize_examples,
)
