"""The dataset of a run: every source read, eval split off (or read), training sources weighted, duplicates found."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from sft.config import DataConfig
from sft.data.formats import Example
from sft.data.sources import Source, read_source
from sft.errors import SftError


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    sources: list[Source]
    warnings: list[str]

    def fingerprint(self) -> str:
        """The sources' content, and the rows made of it for training and eval: a mapping, template, weight or seed
        turns the same bytes into other rows."""
        digest = hashlib.sha256()
        for source in self.sources:
            digest.update(f"{source.path.name}:{source.format}:{source.sha256}\n".encode())
        for split in (self.train, self.eval):
            digest.update(b"split\n")
            for example in split:
                digest.update(example.key().encode() + b"\n")
        return digest.hexdigest()[:16]


def load_dataset(config: DataConfig) -> Dataset:
    """Read every source, split train/eval, weight the training sources; raise `SftError` on bad input.

    The split comes first so eval rows are drawn from the data as given and never hold a weight's repeated copies;
    duplicates are checked on the rows before weighting too, since a weight's repeats are on purpose.
    """
    train_sources = [read_source(s) for s in config.train]
    eval_sources = [read_source(s) for s in config.eval] if config.eval else []
    if eval_sources:
        parts = [s.examples for s in train_sources]
        evals = [e for s in eval_sources for e in s.examples]
        for source in eval_sources:
            source.used = len(source.examples)
    else:
        parts, evals = split_off_eval(train_sources, config.eval_fraction, config.seed)
    warnings = check_duplicates([e for part in parts for e in part], evals, config.duplicates)
    train = []
    for i, (spec, source, part) in enumerate(zip(config.train, train_sources, parts)):
        taken = apply_weight(part, spec.weight, random.Random(f"{config.seed}:{i}"), spec.path)
        source.used, source.held_out = len(taken), len(source.examples) - len(part)
        train += taken
    return Dataset(train=train, eval=evals, sources=train_sources + eval_sources, warnings=warnings)


def split_off_eval(sources: list[Source], fraction: float, seed: int) -> tuple[list[list[Example]], list[Example]]:
    """Hold out `fraction` of all training rows, drawn with `seed` over the sources pooled in order.

    Returns each source's training part (in file order) and the eval rows. The draw does not depend on weights, so
    changing a weight never moves a row between train and eval.
    """
    pooled = [(i, e) for i, source in enumerate(sources) for e in source.examples]
    order = list(range(len(pooled)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(pooled) * fraction))
    if len(pooled) - n_eval < 1:
        raise SftError(f"data: {len(pooled)} row(s) are too few to split off an eval set; give data.eval")
    held = set(order[:n_eval])
    parts: list[list[Example]] = [[] for _ in sources]
    for j, (i, example) in enumerate(pooled):
        if j not in held:
            parts[i].append(example)
    return parts, [pooled[j][1] for j in sorted(held)]


def apply_weight(rows: list[Example], weight: float, rng: random.Random, name: str) -> list[Example]:
    """round(weight * len(rows)) rows, half up: whole copies of every row, then a seeded sample of the remainder
    without replacement (kept in file order), so a weight of 0.5 is half the rows and 2.5 is every row 2 or 3 times.
    """
    if weight == 1 or not rows:
        return list(rows)
    n = math.floor(weight * len(rows) + 0.5)
    if n == 0:
        raise SftError(
            f"data source {name}: weight {weight} of its {len(rows)} training row(s) rounds to 0 rows; expected a "
            f"weight of at least {0.5 / len(rows):.3g}, or remove the source"
        )
    copies, rest = divmod(n, len(rows))
    picked = sorted(rng.sample(range(len(rows)), rest))
    return rows * copies + [rows[i] for i in picked]


def check_duplicates(train: list[Example], evals: list[Example], mode: str) -> list[str]:
    """Exact duplicate training rows, and eval rows that are also training rows: warnings, each with one location,
    or (mode "error") one `SftError` naming the counts and those locations."""
    first_seen: dict[str, str] = {}
    repeats: list[tuple[str, str]] = []
    for example in train:
        key = example.key()
        if key in first_seen:
            repeats.append((example.where, first_seen[key]))
        else:
            first_seen[key] = example.where
    leaked: dict[str, str] = {}
    for example in evals:
        key = example.key()
        if key in first_seen and key not in leaked:
            leaked[key] = example.where
    problems = []
    if repeats:
        where, first = repeats[0]
        problems.append(
            f"{len(repeats)} training row(s) are exact duplicates of another (first: {where} repeats {first})"
        )
    if leaked:
        key, where = next(iter(leaked.items()))
        problems.append(
            f"{len(leaked)} eval row(s) also appear in the training data: eval scores are inflated "
            f"(e.g. eval {where} is train {first_seen[key]})"
        )
    if problems and mode == "error":
        raise SftError(
            "data: " + "; ".join(problems) + ". Expected no duplicates (data.duplicates=error): remove them, or set "
            "data.duplicates=warn"
        )
    return problems


def corpus(dataset: Dataset) -> list[str]:
    """Every text of the training data: what the stand-in model's tokenizer is learnt from."""
    texts = []
    for example in dataset.train:
        texts += [m["content"] for m in example.messages] + [example.prompt, example.completion, example.text]
    return [t for t in texts if t]
