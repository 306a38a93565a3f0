"""The demo task's data (`data/reverse/`): reverse the word order of a short sentence.

python -m sft.data.demo     # regenerates data/reverse/{train,eval}.jsonl (seed 0)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# The demo task: reverse the word order of a short sentence. The base model cannot do it (0% exact match); the
# answer is a pure function of the prompt, so a working fine-tune reaches ~100% on sentences it never saw.
WORDS = (
    "the a one two red blue green small big old new fast slow happy sad cold warm dark bright quiet loud "
    "cat dog bird fish horse cow fox bear mouse frog tree river hill road house door window garden city town "
    "boat car train ship book lamp chair table cup bowl apple bread milk tea rain snow wind sun moon star "
    "sees likes finds takes makes reads eats drinks wants holds moves opens closes paints builds carries "
    "near under over behind beside inside with from into across and then but also very always never often"
).split()


def make_reverse_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(3, 6))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "reverse: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(reversed(words))},
                ]
            }
        )
    return rows


def write_demo_data(folder: Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> None:
    """Regenerate data/reverse/{train,eval}.jsonl; eval sentences never appear in train."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_eval:
        row = make_reverse_rows(1, rng)[0]
        key = row["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            rows.append(row)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:n_train]), ("eval", rows[n_train:])):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    write_demo_data(Path("data/reverse"))
