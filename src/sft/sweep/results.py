"""What a sweep leaves: results.csv and results.md sorted by the objective, a plot per swept key, best_config.yaml."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import yaml

from sft.config import read_yaml, validate_config
from sft.runs import write_text
from sft.sweep.space import Choices, Range, SweepFile, params_label, short


def write_results(sweep: SweepFile, out: Path, rows: list[dict[str, Any]], path: Path, base_raw: dict) -> None:
    sign = -1 if sweep.objective.direction == "maximize" else 1

    def order(r: dict[str, Any]) -> tuple:  # failed last; a tie on the objective goes to the lower held-out loss
        held_out = (r.get("eval") or {}).get("loss", 0)
        return r["status"] != "complete", sign * (r.get("objective") or 0), held_out, r["trial"]

    ranked = sorted(rows, key=order)
    keys, metric = list(sweep.space), sweep.objective.metric
    table = []
    for rank, r in enumerate(ranked, 1):
        table.append(
            {
                "rank": rank if r["status"] == "complete" else "",
                "trial": r["trial"],
                "status": r["status"],
                **{k: r["params"][k] for k in keys},
                metric: r.get("objective"),
                "eval.loss": (r.get("eval") or {}).get("loss"),
                "train.train_loss": r.get("train_loss"),
                "tokens_per_s": r.get("tokens_per_s"),
                "peak_rss_mb": r.get("peak_rss_mb"),
                "seconds": r.get("seconds"),
                "run_dir": r.get("run_dir"),
                "error": (r.get("error") or "").strip().splitlines()[-1:][0] if r.get("error") else "",
            }
        )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    write_text(out / "results.csv", buffer.getvalue())

    shown = {"rank": "rank", "trial": "trial", "status": "status", **{k: k for k in keys}, metric: metric}
    shown |= {"tokens_per_s": "tokens/s", "peak_rss_mb": "peak RSS (MB)", "seconds": "time (s)"}
    lines = [
        f"# Sweep {path.name}: {sweep.method}, {sweep.objective.direction} {metric}",
        "",
        "| " + " | ".join(shown.values()) + " |",
        "|" + "|".join("---" if k == "status" else "---:" for k in shown) + "|",
    ]
    lines += ["| " + " | ".join(short(row[k]) for k in shown) + " |" for row in table]
    failed = [r for r in ranked if r["status"] != "complete"]
    for r in failed:
        lines += ["", f"trial {r['trial']} failed ({params_label(r['params'])}):", "```", r.get("error", ""), "```"]
    write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines[2 : 4 + len(rows)]))

    done = [r for r in ranked if r["status"] == "complete"]
    for key in keys:
        _plot(out / f"objective_vs_{key}.png", key, sweep.space[key], done, metric)
    if done:
        _write_best(out, done[0], sweep, path, base_raw)


def _write_best(out: Path, best: dict[str, Any], sweep: SweepFile, path: Path, base_raw: dict) -> None:
    raw = read_yaml(Path(best["run_dir"]) / "config.yaml")
    raw["output"] = {**raw.get("output", {}), "runs_dir": (base_raw.get("output") or {}).get("runs_dir", "runs")}
    raw["output"]["name"] = f"{path.stem}-best"
    validate_config(raw, source=f"best config of {path}")
    note = "# Training stopped by budget.seconds in the sweep; this config trains to its max_steps/epochs.\n"
    text = (
        f"# Best trial of the sweep {path}: trial {best['trial']} ({params_label(best['params'])}),\n"
        f"# {sweep.objective.metric} = {best['objective']}, run folder {best['run_dir']}.\n"
        f"# Its resolved config, with a fresh output.name. Train it with: sft train {out / 'best_config.yaml'}\n"
        + (note if sweep.budget.seconds else "")
        + yaml.safe_dump(raw, sort_keys=False)
    )
    write_text(out / "best_config.yaml", text)


def _plot(target: Path, key: str, spec: Any, rows: list[dict[str, Any]], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["params"][key] for r in rows]
    ys = [r["objective"] for r in rows]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if numeric:
        ax.scatter(xs, ys)
        values = spec.choices if isinstance(spec, Choices) else spec if isinstance(spec, list) else []
        logish = isinstance(spec, Range) and spec.log
        logish |= (
            bool(values)
            and all(isinstance(v, (int, float)) and v > 0 for v in values)
            and (max(values) / min(values) >= 100)
        )
        if logish:
            ax.set_xscale("log")
        if values:  # a grid: a tick at each value tried
            ax.set_xticks(sorted(set(values)), [short(v) for v in sorted(set(values))])
            ax.minorticks_off()
        else:
            ax.tick_params(axis="x", labelrotation=30)
    else:
        labels = sorted({str(x) for x in xs})
        ax.scatter([labels.index(str(x)) for x in xs], ys)
        ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {key} ({len(rows)} complete trials)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = target.with_name(f".{target.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, target)
