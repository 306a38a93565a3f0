"""The data of a run: sources read and checked, rows normalised to examples, split, weighted, tokenized, cached."""

from sft.data.formats import SHAREGPT_ROLES, Example, detect_format, normalise
from sft.data.load import Dataset, apply_weight, check_duplicates, corpus, load_dataset, split_off_eval
from sft.data.sources import Source, read_source
