"""The README's import path for tokenization, which lives in `sft.data.tokenize`."""

from sft.data.tokenize import *  # noqa: F403
