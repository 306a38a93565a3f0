"""Tokenization throughput of the data stage, cold and from the cache, against a naive per-example loop.

    python benchmarks/tokenize_throughput.py [DATA_FILE] [TOKENIZER_FOLDER] [--repeats N]

Defaults: ../shared/fixtures/datasets/llamafactory/alpaca_en_demo.json with the Qwen2.5 tokenizer. Prints rows/s
(median of N repetitions, side by side in one run) and writes nothing outside a temporary cache folder.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from sft.cache import tokenize_cached
from sft.config import SourceConfig
from sft.data import read_source
from sft.tokenize import tokenize_examples

SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def naive(examples, tokenizer) -> None:
    """What a hand-written loop does: tokenize each rendered conversation alone (no labels, no checks)."""
    for example in examples:
        tokenizer.apply_chat_template(example.messages, tokenize=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", nargs="?", default=SHARED / "datasets/llamafactory/alpaca_en_demo.json")
    parser.add_argument("tokenizer", nargs="?", default=SHARED / "tokenizers/qwen2_5")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    examples = read_source(SourceConfig(path=str(args.data))).examples
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    timings: dict[str, list[float]] = {"naive loop": [], "sft cold": [], "sft cached": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            naive(examples, tokenizer)
            timings["naive loop"].append(time.perf_counter() - start)
            start = time.perf_counter()
            tokenize_cached(examples, tokenizer, 4096, "drop", cache)
            timings["sft cold"].append(time.perf_counter() - start)
            start = time.perf_counter()
            _, hit = tokenize_cached(examples, tokenizer, 4096, "drop", cache)
            timings["sft cached"].append(time.perf_counter() - start)
            assert hit
    tokens = tokenize_examples(examples, tokenizer, 4096).stats
    print(f"{args.data} ({len(examples)} rows, {tokens.tokens} tokens), tokenizer {args.tokenizer}")
    cold = statistics.median(timings["sft cold"])
    for name, values in timings.items():
        seconds = statistics.median(values)
        print(f"  {name:11s} {seconds:8.3f} s  {len(examples) / seconds:10.0f} rows/s  ({seconds / cold:.1%} of cold)")


if __name__ == "__main__":
    main()
