"""Tokenization throughput of the data stage, cold and from the cache, against a naive per-example loop.

    python benchmarks/tokenize_throughput.py [DATA_FILE] [TOKENIZER_FOLDER] [--repeats N]

Defaults: ../shared/fixtures/datasets/llamafactory/alpaca_en_demo.json with the Qwen2.5 tokenizer. Each repetition
runs the three side by side (naive, cold, cached) in one process; prints rows/s (medians), the cached time split into
computing the cache key and loading the tokens, the row lengths and the machine. Writes nothing outside a temporary
cache folder.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import tokenizers
import transformers
from transformers import AutoTokenizer

from sft.config import SourceConfig
from sft.data import read_source
from sft.data.cache import cache_key, tokenize_cached

SHARED = Path(os.environ.get("SFT_SHARED_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


def naive(examples, tokenizer) -> None:
    """What a hand-written loop does: tokenize each rendered conversation alone (no labels, no checks)."""
    for example in examples:
        tokenizer.apply_chat_template(example.messages, tokenize=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", nargs="?", default=SHARED / "datasets/llamafactory/alpaca_en_demo.json")
    parser.add_argument("tokenizer", nargs="?", default=SHARED / "tokenizers/qwen2_5")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    examples = read_source(SourceConfig(path=str(args.data))).examples
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    timings: dict[str, list[float]] = {"naive loop": [], "sft cold": [], "sft cached": [], "  cache key": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            naive(examples, tokenizer)
            timings["naive loop"].append(time.perf_counter() - start)
            start = time.perf_counter()
            tokenized, hit = tokenize_cached(examples, tokenizer, 4096, "drop", cache)
            timings["sft cold"].append(time.perf_counter() - start)
            assert not hit
            start = time.perf_counter()
            cached, hit = tokenize_cached(examples, tokenizer, 4096, "drop", cache)
            timings["sft cached"].append(time.perf_counter() - start)
            assert hit and cached.rows == tokenized.rows
            start = time.perf_counter()
            cache_key(examples, tokenizer, 4096, "drop")
            timings["  cache key"].append(time.perf_counter() - start)
            stats = tokenized.stats
            del tokenized, cached  # freed here, not inside the next repetition's timings
    print(f"{args.data}, tokenizer {args.tokenizer}")
    print(f"  lengths (tokens per row): mean {stats.tokens / stats.examples:.1f}, {stats.summary()}")
    print(
        f"  machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}; python {platform.python_version()}, transformers {transformers.__version__}, "
        f"tokenizers {tokenizers.__version__}"
    )
    print(f"  medians of {args.repeats} repetitions, side by side:")
    cold = statistics.median(timings["sft cold"])
    for name, values in timings.items():
        seconds = statistics.median(values)
        print(f"  {name:11s} {seconds:8.4f} s  {len(examples) / seconds:10.0f} rows/s  ({seconds / cold:.1%} of cold)")


if __name__ == "__main__":
    main()
