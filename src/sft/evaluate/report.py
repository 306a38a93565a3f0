"""The evaluation report of a run folder: report.json, the before/after table (report.md) and report.png."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sft.runs import atomic_dir

METRICS = ("loss", "perplexity", "token_accuracy", "exact_match", "token_f1", "rouge_l")


def report_markdown(report: dict) -> str:
    """The before/after table."""
    has_base = "base" in report
    head = "| metric | base | tuned | change |\n|---|---:|---:|---:|" if has_base else "| metric | tuned |\n|---|---:|"
    lines = [head]
    for metric in METRICS:
        tuned = report["tuned"].get(metric)
        if tuned is None:
            continue
        if has_base:
            base = report["base"][metric]
            lines.append(f"| {metric} | {_fmt(base)} | {_fmt(tuned)} | {_fmt(tuned - base, signed=True)} |")
        else:
            lines.append(f"| {metric} | {_fmt(tuned)} |")
    by_source = report["tuned"].get("by_source") or {}
    if by_source:
        lines += ["", "Per source (exact match / token F1 / ROUGE-L):", "", "| source | n | base | tuned |"]
        lines.append("|---|---:|---|---|")
        for name, tuned in by_source.items():
            base = report.get("base", {}).get("by_source", {}).get(name)
            cells = [
                " / ".join(f"{s[m]:.3f}" for m in ("exact_match", "token_f1", "rouge_l")) if s else "-"
                for s in (base, tuned)
            ]
            lines.append(f"| {name} | {tuned['generated']} | {cells[0]} | {cells[1]} |")
    samples = report["tuned"]["samples"]
    if samples:
        base_text = {s["where"]: s["generated"] for s in report.get("base", {}).get("samples", [])}
        lines += ["", "Sample generations, side by side:", "", "| row | expected | base | tuned |", "|---|---|---|---|"]
        for s in samples[:3]:
            base = _short(base_text.get(s["where"], "-"), 50)
            lines.append(f"| {s['where']} | {_short(s['reference'], 50)} | {base} | {_short(s['generated'], 50)} |")
    return "\n".join(lines) + "\n"


def write_report(folder: Path, report: dict, metrics_path: Path) -> str:
    """report.json, report.md and report.png into `folder`, which appears complete or not at all."""
    markdown = report_markdown(report)
    with atomic_dir(folder) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(markdown)
        plot_training(metrics_path, report, tmp / "report.png")
    return markdown


def _fmt(value: float, signed: bool = False) -> str:
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def _short(text: str, limit: int = 80) -> str:
    text = re.sub(r"\s+", " ", text).strip().replace("|", "\\|")  # one table cell
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def plot_training(metrics_path: Path, report: dict | None, out: Path) -> None:
    """loss.png: training (and eval) loss against step; beside it, held-out metrics base vs tuned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
    train = [(e["step"], e["loss"]) for e in logs if "loss" in e]
    held_out = [(e["step"], e["eval_loss"]) for e in logs if "eval_loss" in e]
    compare = report is not None and "base" in report
    fig, axes = plt.subplots(1, 2 if compare else 1, figsize=(11 if compare else 6, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if held_out:
        ax.plot(*zip(*held_out), "o-", label="held-out loss", color="tab:orange")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy per trained token (nats)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if compare:
        ax = axes[0][1]
        names = [m for m in METRICS[2:] if report["tuned"].get(m) is not None]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [report["base"][m] for m in names], 0.4, label="base", color="tab:gray")
        ax.bar([i + 0.2 for i in x], [report["tuned"][m] for m in names], 0.4, label="tuned", color="tab:green")
        for i, m in enumerate(names):
            ax.text(i + 0.2, report["tuned"][m] + 0.02, f"{report['tuned'][m]:.2f}", ha="center")
            ax.text(i - 0.2, report["base"][m] + 0.02, f"{report['base'][m]:.2f}", ha="center")
        ax.set_xticks(list(x), names)
        ax.set(ylim=(0, 1.25), title="Held-out: base vs tuned")
        ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
