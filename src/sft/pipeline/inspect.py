"""See what the model will be trained on, before training: per-source token counts and the trained tokens marked.

`inspect` runs the same stages as `sft train` up to tokenization (data, stand-in model if asked, tokenizer, vocabulary
check) and tokenizes each source on its own, so a file that is mostly dropped as too long, or barely trained, shows
up by name. `render_trained` decodes a tokenized row with its trained tokens marked: green with colour, `[[...]]`
without. Nothing here decides what is trained: that is `sft.data.tokenize`, reused as is.
"""

from __future__ import annotations

from pathlib import Path

from sft.config import RunConfig
from sft.data import Example, corpus, load_dataset
from sft.data.tokenize import IGNORE, TokenStats, tokenize_examples
from sft.model import check_vocab, ensure_tiny_model, load_model_config, load_tokenizer

GREEN, DIM, RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"
OPEN, CLOSE = "[[", "]]"
UNLIMITED = 2**62  # a max_length no row reaches: rendered examples are shown even when training would drop them


def inspect(config: RunConfig, examples: int = 3) -> dict:
    """Per-source token statistics and the first `examples` rows rendered with their trained tokens marked.

    Builds the stand-in model at `model.name_or_path` when the config asks for one and it is absent, as training
    would. Raises `SftError` where training would (bad data, a tokenizer that does not fit the model, a row that
    cannot be labelled, `data.on_too_long=error` with a row that is too long, a source left with no rows).
    """
    dataset = load_dataset(config.data)
    ensure_tiny_model(config.model, corpus(dataset))
    tokenizer = load_tokenizer(config.model)
    notes = list(dataset.warnings)
    folder = Path(config.model.name_or_path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        # A tokenizer alone is enough to see the tokens; training would need the model and check this then.
        notes.append(f"{folder} holds no config.json: the vocabulary was not checked against the embedding rows")
    else:
        check_vocab(tokenizer, load_model_config(config.model))

    n_train = len(config.data.train)
    sources, total = [], TokenStats()
    for i, source in enumerate(dataset.sources):
        stats = tokenize_examples(source.examples, tokenizer, config.data.max_length, config.data.on_too_long).stats
        for name in ("examples", "tokens", "trained_tokens", "dropped_too_long"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
        total.lengths += stats.lengths
        sources.append(
            {
                "path": str(source.path),
                "format": source.format,
                "split": "train" if i < n_train else "eval",
                "rows": len(source.examples),
                **stats.summary(),
            }
        )

    first: list[tuple[str, Example]] = []
    for source in dataset.sources:
        first += [(str(source.path), e) for e in source.examples[: max(examples - len(first), 0)]]
    rendered = []
    if first:
        # Tokenized again without a length limit, so each row lines up with its example even where one is dropped.
        rows = tokenize_examples([e for _, e in first], tokenizer, UNLIMITED).rows
        for (path, example), row in zip(first, rows):
            ids, labels = row["input_ids"], row["labels"]
            rendered.append(
                {
                    "source": path,
                    "where": example.where,
                    "tokens": len(ids),
                    "trained_tokens": sum(label != IGNORE for label in labels),
                    "too_long": len(ids) > config.data.max_length,
                    "text": render_trained(tokenizer, ids, labels, color=False),
                    "color": render_trained(tokenizer, ids, labels, color=True),
                }
            )
    return {
        "model": config.model.name_or_path,
        "max_length": config.data.max_length,
        "on_too_long": config.data.on_too_long,
        "fingerprint": dataset.fingerprint(),
        "sources": sources,
        "total": {"rows": sum(s["rows"] for s in sources), **total.summary()},
        "warnings": notes,
        "examples": rendered,
    }


def render_trained(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The row's text, special tokens included, with its trained tokens marked.

    Consecutive tokens of the same state (trained or not) are decoded together, so a character split across tokens
    is decoded whole. With `color`, trained text is green and the rest dim; without, each trained span is `[[...]]`.
    """
    parts = []
    start = 0
    for end in range(1, len(input_ids) + 1):
        if end < len(input_ids) and (labels[end] != IGNORE) == (labels[start] != IGNORE):
            continue
        text = tokenizer.decode(input_ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        trained = labels[start] != IGNORE
        if color:
            parts.append(f"{GREEN if trained else DIM}{text}{RESET}")
        else:
            parts.append(f"{OPEN}{text}{CLOSE}" if trained else text)
        start = end
    return "".join(parts)


def format_report(report: dict, color: bool) -> str:
    """A per-source table, the totals, the dataset's warnings, then the rendered examples headed by their location."""
    header = ["source", "split", "format", "rows", "kept", "tokens", "trained", "p50", "p95", "max", "dropped"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
    ]
    for s in [*report["sources"], {**report["total"], "path": "total", "split": "", "format": ""}]:
        cells = [s["path"], s["split"], s["format"], s["rows"], s["examples"], s["tokens"]]
        cells += [f"{s['trained_fraction']:.1%}", s.get("length_p50", "-"), s.get("length_p95", "-")]
        cells += [s.get("length_p100", "-"), s["dropped_too_long"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append(
        f"\nmodel {report['model']}, data.max_length={report['max_length']} (longer rows: {report['on_too_long']}), "
        f"fingerprint {report['fingerprint']}"
    )
    lines += [f"warning: {w}" for w in report["warnings"]]
    if report["examples"]:
        legend = f"{GREEN}trained{RESET}, {DIM}not trained{RESET}" if color else f"trained tokens are in {OPEN} {CLOSE}"
        lines.append(f"\nfirst {len(report['examples'])} example(s), special tokens shown; {legend}:")
    for e in report["examples"]:
        note = ", over max_length: training drops it" if e["too_long"] else ""
        lines.append(f"\n--- {e['where']} ({e['tokens']} tokens, {e['trained_tokens']} trained{note})")
        lines.append(e["color"] if color else e["text"])
    return "\n".join(lines) + "\n"
