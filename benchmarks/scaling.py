"""Real tokens/s and peak memory of this pipeline's training against sequence length and model size, with and
without gradient checkpointing.

    python benchmarks/scaling.py            # 3 sizes x 5 lengths (256-4096) x checkpointing off/on, ~15 min on 2 cores
    python benchmarks/scaling.py --quick    # a tiny setting: checks the harness, not speed

Every point trains through the pipeline's trainer (sft.train.trainer_class: its labelled-positions loss head) and
model stage (`model.attn_implementation: auto`) with the SFTConfig of sft.train.build_sft_config (the pipeline's
defaults, packing included; precision from sft.plan.auto_settings as `sft train` decides it; checkpointing as
swept) in its own subprocess, on rows of exactly s tokens: one row per micro-batch, accumulated to the same tokens
per optimizer step at every length (tokens per step / s micro-batches, at least one), so only the cost of longer
attention changes along a curve. Peak memory is the resident (CPU) or allocated (CUDA) high-water mark above the process
before the model was built: weights, LoRA, optimizer, activations. Writes results/scaling.{json,md,png}; progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from common import (
    SIZES,
    ModelSpec,
    build_model,
    build_tokenizer,
    count_batches,
    log,
    machine,
    median,
    others_cores,
    param_counts,
    pipeline_choices,
    snapshot,
    step_clock,
    wait_for_quiet,
)

RESULTS = Path(__file__).resolve().parent / "results"
LENGTHS = [256, 512, 1024, 2048, 4096]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def run_point(job: dict[str, Any]) -> dict[str, Any]:
    """One (model, length, checkpointing) point in this process: a few steps, the later ones timed."""
    from datasets import Dataset
    from transformers import set_seed

    from sft.config import AdapterConfig
    from sft.hardware import peak_memory
    from sft.model import apply_lora, resolve_dtype, set_attention
    from sft.train import build_sft_config, trainer_class

    spec, length, steps = ModelSpec(**job["model"]), job["length"], job["warmup_steps"] + job["timed_steps"]
    # One row per micro-batch, accumulated to the tokens per step: padding-free packing flattens a micro-batch into
    # one sequence whose attention (sdpa, block-diagonal mask) costs (rows x s)^2, which would hide the cost of s.
    rows_per_step = max(1, job["tokens_per_step"] // length)
    rng = random.Random(0)
    # Answers are the second half of each row: a loss on half the positions, as in chat data.
    rows = [[rng.randrange(2, spec.vocab) for _ in range(length)] for _ in range(rows_per_step * steps)]
    dataset = Dataset.from_dict(
        {"input_ids": rows, "labels": [[-100] * (length // 2) + r[length // 2 :] for r in rows]}
    )

    clock = step_clock()
    with tempfile.TemporaryDirectory() as out, peak_memory() as peak:
        model = build_model(spec, seed=0, dtype=resolve_dtype("auto"))
        train = {
            "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": rows_per_step,
            "max_steps": steps,
            "activation_checkpointing": job["checkpointing"],  # the swept setting; the plan picks the precision
            "eval_strategy": "no",
            "save_strategy": "no",
            "logging_steps": 1000,
            **job["overrides"],
        }
        auto, choices = pipeline_choices(length, LORA, train, out, model.config)
        set_seed(0)
        set_attention(model, "auto")  # the pipeline's model stage, loss head and trainer
        model = apply_lora(model, AdapterConfig(**LORA))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            config = build_sft_config({**auto, **train}, out, max_length=length)
        trainer = trainer_class()(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=build_tokenizer(spec.vocab),
            callbacks=[clock],
        )
        batches = count_batches(trainer)
        started, *start_cpu = snapshot()
        trainer.train()
    times = [b - a for a, b in zip([started, *clock.ends], clock.ends)][job["warmup_steps"] :]
    timed = batches[job["warmup_steps"] * rows_per_step :]  # one batch per micro-batch
    return {
        "model": spec.name,
        "length": length,
        "checkpointing": job["checkpointing"],
        "precision": "bf16" if config.bf16 else "fp32",
        "choices": choices,
        "rows_per_step": rows_per_step,
        "tokens_per_step": rows_per_step * length,
        "real_tokens_per_s": sum(b["real"] for b in timed) / sum(times),
        "step_s": median(times),
        "pad_tokens": sum(b["pad"] for b in batches),
        "others_cores": others_cores(
            clock.cpu[job["warmup_steps"] - 1] if job["warmup_steps"] else (started, *start_cpu), clock.cpu[-1]
        ),
        "peak_memory_bytes": peak.bytes,
        "peak_memory_kind": peak.kind,
        "params": param_counts(trainer.model),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model at two short lengths")
    parser.add_argument("--sizes", nargs="+", default=["d256-L4", "d384-L6", "d512-L8"], choices=list(SIZES))
    parser.add_argument("--lengths", nargs="+", type=int, default=LENGTHS)
    parser.add_argument("--tokens-per-step", type=int, default=2048, help="rows per step = this / length, >= 1")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--timed-steps", type=int, default=2)
    parser.add_argument("--train", default="{}", metavar="JSON", help="train overrides for every point, e.g. bf16")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120,
        help="before each point, wait up to this many seconds for the CPUs to be >= 80%% idle (shared machines)",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="re-runs of a point disturbed by other processes (>0.25 cores taken)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_point(json.loads(args.worker))))
        return

    if args.quick:
        models = [ModelSpec("d64-L2", 64, 2, 2, 176, vocab=4096), ModelSpec("d128-L2", 128, 2, 2, 352, vocab=4096)]
        lengths, tokens_per_step, warmup, timed = [64, 128], 256, 1, 1
    else:
        models = [SIZES[name] for name in args.sizes]
        lengths, tokens_per_step, warmup, timed = (
            args.lengths,
            args.tokens_per_step,
            args.warmup_steps,
            args.timed_steps,
        )
    began, info = time.time(), machine()
    # sft.plan caches its measured bf16/fp32 choice under XDG_CACHE_HOME: measured afresh in this run, once per shape.
    cache = tempfile.TemporaryDirectory()
    os.environ["XDG_CACHE_HOME"] = cache.name
    log(f"machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, trl {info['trl']}")
    points = []
    for spec in models:
        for length in lengths:
            for checkpointing in (False, True):
                job = {
                    "model": spec.__dict__,
                    "length": length,
                    "checkpointing": checkpointing,
                    "tokens_per_step": tokens_per_step,
                    "warmup_steps": warmup,
                    "timed_steps": timed,
                    "overrides": json.loads(args.train),
                }
                point = measure(job, args)
                points.append(point)
                log(
                    f"{spec.name} s={length} ckpt={'on' if checkpointing else 'off'}: "
                    f"{point['real_tokens_per_s']:.0f} real tok/s, {point['peak_memory_bytes'] / 2**20:.0f} MiB "
                    f"({time.time() - began:.0f} s so far)"
                )
    info["load_average_at_end"] = os.getloadavg()
    report = {
        "points": points,
        "models": {
            s.name: {**s.__dict__, "params": next(p["params"] for p in points if p["model"] == s.name)} for s in models
        },
        "settings": {
            "lengths": lengths,
            "tokens_per_step": tokens_per_step,
            "warmup_steps": warmup,
            "timed_steps": timed,
            "train_overrides": json.loads(args.train),
            "in_process": args.quick,
            "quiet_wait_s": 0 if args.quick else args.quiet_wait,
            "retries": 0 if args.quick else args.retries,
        },
        "machine": info,
        "command": " ".join(["python", "benchmarks/scaling.py", *sys.argv[1:]]),
        "wall_seconds": round(time.time() - began, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "scaling.md").write_text(markdown(report))
    plot(report, args.out / "scaling.png")
    print(markdown(report))
    log(f"wrote {args.out}/scaling.{{json,md,png}} in {report['wall_seconds']:.0f} s")
    cache.cleanup()


def measure(job: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One point after waiting for a quiet machine; again (up to --retries times) while other processes took more
    than a quarter of a core during its timed steps, keeping the least disturbed run."""
    runs = []
    for _ in range(1 + (0 if args.quick else args.retries)):
        quiet = wait_for_quiet(0 if args.quick else args.quiet_wait)
        runs.append({**(run_point(job) if args.quick else subprocess_run(job)), **quiet})
        if runs[-1]["others_cores"] <= 0.25:
            break
        log(f"others took {runs[-1]['others_cores']:.2f} cores during the timed steps: again")
    return {**min(runs, key=lambda r: r["others_cores"]), "attempts": len(runs)}


def subprocess_run(job: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"point {job['model']['name']} s={job['length']} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        "# Scaling: real tokens/s and peak memory against sequence length and model size",
        "",
        f"`{report['command']}` - {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads"
        + (f", {m['cuda']}" if m["cuda"] else "")
        + f"; torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, peft {m['peft']}; load average "
        f"{'/'.join(f'{v:.1f}' for v in m['load_average_at_start'])} at the start, "
        f"{'/'.join(f'{v:.1f}' for v in m['load_average_at_end'])} at the end. "
        f"{s['tokens_per_step']} tokens per optimizer step (micro-batches of one row of exactly s tokens), "
        f"{s['warmup_steps']} warm-up + {s['timed_steps']} timed steps per point; the pipeline's SFTConfig defaults"
        + (f" + {s['train_overrides']}" if s["train_overrides"] else "")
        + f"; LoRA r=16 all-linear. {report['wall_seconds']:.0f} s in all.",
        "",
        "Models: "
        + "; ".join(
            f"{name} ({v['params']['decoder_linear'] / 1e6:.1f}M decoder linear, "
            f"{v['params']['total'] / 1e6:.1f}M in all)"
            for name, v in report["models"].items()
        ),
        "",
        "| model | seq len | precision | real tok/s (ckpt off) | real tok/s (ckpt on) | on/off | "
        "peak MiB (off) | peak MiB (on) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    by_key = {(p["model"], p["length"], p["checkpointing"]): p for p in report["points"]}
    for (model, length, ckpt), off in by_key.items():
        if ckpt:
            continue
        on = by_key[(model, length, True)]
        lines.append(
            f"| {model} | {length} | {off['precision']} | {off['real_tokens_per_s']:.0f} | "
            f"{on['real_tokens_per_s']:.0f} | {on['real_tokens_per_s'] / off['real_tokens_per_s']:.2f} | "
            f"{off['peak_memory_bytes'] / 2**20:.0f} | {on['peak_memory_bytes'] / 2**20:.0f} |"
        )
    disturbed = [p for p in report["points"] if p["others_cores"] > 0.25]
    lines += [
        "",
        f"Each point waited for >= 80% idle CPUs (up to {report['settings']['quiet_wait_s']:.0f} s) and was run again "
        f"(up to {report['settings']['retries']} times) while other processes took > 0.25 cores during its timed "
        f"steps: {sum(p['attempts'] - 1 for p in report['points'])} re-runs; "
        + (
            f"{len(disturbed)} point(s) still disturbed: "
            + ", ".join(f"{p['model']} s={p['length']} ckpt={p['checkpointing']}" for p in disturbed)
            if disturbed
            else "no point left disturbed"
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(report["models"]):
        for ckpt, style in ((False, "-"), (True, "--")):  # one colour per model; checkpointing is the line style
            points = sorted(
                (p for p in report["points"] if p["model"] == name and p["checkpointing"] == ckpt),
                key=lambda p: p["length"],
            )
            x = [p["length"] for p in points]
            kwargs = {"color": colours[i % len(colours)], "marker": "o", "linestyle": style}
            label = f"{name}, checkpointing {'on' if ckpt else 'off'}"
            speed.plot(x, [p["real_tokens_per_s"] for p in points], label=label, **kwargs)
            memory.plot(x, [p["peak_memory_bytes"] / 2**20 for p in points], **kwargs)
    for ax, ylabel in ((speed, "real tokens / s"), (memory, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["settings"]["lengths"], [str(n) for n in report["settings"]["lengths"]])
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    speed.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(
        f"LoRA SFT on {m['cuda'] or m['cpu']} ({m['torch_threads']} threads), "
        f"{report['settings']['tokens_per_step']} tokens/step",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
