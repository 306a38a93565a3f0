"""Where one training step of this pipeline goes, on the benchmark model: phases by wall clock, each of the pipeline's
own per-step costs on its own, and the operators that dominate (torch.profiler).

    python benchmarks/step_profile.py              # d512-L8, (c) of trl_vs_sft.py as `sft train` runs it (~3 min)
    python benchmarks/step_profile.py --quick      # a tiny model: checks the script
Writes results/step_profile.{json,md}; progress goes to stderr.

The trainer is built as `sft.train.train` builds it: the pipeline's trainer class (labelled-positions loss head,
data-order log), its callbacks (MetricsToJsonl, StopOnSignal) and its SFTConfig defaults (logging every 10 steps,
tokens-seen counting), with precision and checkpointing from `sft.plan.auto_settings`; in-training evaluation and
checkpoints are off (periodic, not per step: the finite-weights check of a checkpoint is timed on its own). Every
phase is timed by wrapping the method that does it on this trainer instance; a step runs from one
`get_batch_samples` to the next. On a CPU everything is synchronous, so wall clocks are exact per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from common import SIZES, ModelSpec, build_model, build_tokenizer, chat_data, log, machine, pipeline_choices

RESULTS = Path(__file__).resolve().parent / "results"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
TARGET = 0.02  # each of the pipeline's own per-step costs: < 2% of a step
# Exclusive phases of a step, in the order they happen; "rest" is the step minus all of them.
PHASES = {
    "data": "data loading and collate (get_batch_samples: sampler, packed rows, padding-free collator)",
    "data_order_log": "pipeline: sha1 of the batch's token ids + one line to data_order.jsonl (training_step)",
    "forward": "model forward, with sft.model.loss's head (its gradient is computed here, chunk by chunk)",
    "head_metrics": "pipeline: token accuracy and token count gathered, .item() (compute_loss minus the forward)",
    "backward": "backward (accelerator.backward)",
    "training_step_other": "the rest of Trainer.training_step (model.train(), input preparation, loss scaling)",
    "tokens_seen": "Trainer: include_num_input_tokens_seen='non_padding' and floating_point_ops",
    "grad_clip": "gradient norm and clipping (max_grad_norm 1.0)",
    "optimizer": "AdamW step (on_pre_optimizer_step .. on_optimizer_step)",
    "scheduler_zero_grad": "learning-rate scheduler step and zero_grad",
    "callbacks": "every callback's hooks (the pipeline's MetricsToJsonl and StopOnSignal, TRL's and the Trainer's)",
    "logging": "Trainer._maybe_log_save_evaluate less the on_log callbacks (loss .item(), TRL's metric averages)",
}


def settings_for(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return {"model": ModelSpec("d64-L2", 64, 2, 2, 176, vocab=4096).__dict__, "rows": 48, "warmup": 1}
    return {"model": SIZES["d512-L8"].__dict__, "rows": args.rows, "warmup": args.warmup_steps}


def build_trainer(settings: dict[str, Any], data, out: Path):
    """The trainer `sft.train.train` builds for (c), before it starts."""
    from transformers import set_seed

    from sft.config import AdapterConfig
    from sft.model import apply_lora, set_attention
    from sft.train import StopSignals, build_sft_config, make_callbacks, trainer_class
    from sft.train.trainer import _rows_to_dataset

    spec = ModelSpec(**settings["model"])
    model = build_model(spec, seed=0)
    train = {"per_device_train_batch_size": 2, "num_train_epochs": 1, "learning_rate": 2e-4, "seed": 0}
    train |= {"eval_strategy": "no", "save_strategy": "no"}
    auto, choices = pipeline_choices(768, LORA, train, str(out), model.config)
    sft_config = build_sft_config({**auto, **train}, out, 768)
    set_seed(0)
    set_attention(model, "auto")
    model = apply_lora(model, AdapterConfig(**LORA))
    trainer = trainer_class()(
        model=model,
        args=sft_config,
        train_dataset=_rows_to_dataset(data.train),
        processing_class=build_tokenizer(spec.vocab),
        callbacks=make_callbacks(out / "metrics.jsonl", StopSignals()),
    )
    trainer.order_log = out / "data_order.jsonl"
    return trainer, choices


class Clock:
    """Seconds per named phase, per optimizer step; `mark` starts a new step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.calls: dict[str, int] = defaultdict(int)
        self.current: dict[str, float] = defaultdict(float)
        self.started: float | None = None
        self.stamps: dict[str, float] = {}

    def mark(self) -> None:
        now = time.perf_counter()
        if self.started is not None:
            self.steps.append({**self.current, "step": now - self.started})
        self.current, self.started = defaultdict(float), now

    def add(self, name: str, seconds: float) -> None:
        self.current[name] += seconds
        self.calls[name] += 1

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)

        return timed


def instrument(trainer, clock: Clock):
    """Wrap, on this trainer instance, every method a step goes through (see PHASES); returns the undo of the one
    class-level wrapper (the pipeline trainer's super().training_step, which no instance attribute can reach)."""
    from transformers import TrainerCallback
    from trl import SFTTrainer

    fetch = trainer.get_batch_samples

    def get_batch_samples(*args, **kwargs):
        clock.mark()
        start = time.perf_counter()
        try:
            return fetch(*args, **kwargs)
        finally:
            clock.add("data", time.perf_counter() - start)

    trainer.get_batch_samples = get_batch_samples
    # The pipeline's training_step (data-order log, then super()) around Trainer's own (forward + backward)
    trainer.training_step = clock.wrap("training_step_outer", trainer.training_step)
    inner = SFTTrainer.training_step
    SFTTrainer.training_step = clock.wrap("training_step_inner", inner)
    trainer.compute_loss = clock.wrap("compute_loss", trainer.compute_loss)
    model = trainer.model
    model.register_forward_pre_hook(lambda *a: clock.stamps.__setitem__("forward", time.perf_counter()))
    model.register_forward_hook(lambda *a: clock.add("forward", time.perf_counter() - clock.stamps["forward"]))
    trainer.accelerator.backward = clock.wrap("backward", trainer.accelerator.backward)
    trainer._track_num_input_tokens = clock.wrap("tokens_seen", trainer._track_num_input_tokens)
    trainer.floating_point_ops = clock.wrap("tokens_seen", trainer.floating_point_ops)
    trainer._clip_grad_norm = clock.wrap("grad_clip", trainer._clip_grad_norm)
    trainer._get_grad_norm = clock.wrap("grad_clip", trainer._get_grad_norm)
    trainer._maybe_log_save_evaluate = clock.wrap("log_save_evaluate", trainer._maybe_log_save_evaluate)
    for callback in trainer.callback_handler.callbacks:
        for event in ("on_step_begin", "on_step_end", "on_log", "on_pre_optimizer_step", "on_optimizer_step"):
            method = getattr(callback, event, None)
            if method is not None:
                setattr(callback, event, clock.wrap(f"callback:{type(callback).__name__}.{event}", method))

    class Stamps(TrainerCallback):
        """First in the list: the optimizer's step lies between these two hooks, the scheduler after it."""

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            clock.stamps["pre_optimizer"] = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            clock.stamps["optimizer"] = time.perf_counter()
            clock.add("optimizer", clock.stamps["optimizer"] - clock.stamps["pre_optimizer"])

        def on_step_end(self, args, state, control, **kwargs):
            clock.add("scheduler_zero_grad", time.perf_counter() - clock.stamps["optimizer"])

    trainer.callback_handler.callbacks.insert(0, Stamps())
    return lambda: setattr(SFTTrainer, "training_step", inner)


def exclusive(step: dict[str, float]) -> dict[str, float]:
    """Per-step seconds of the PHASES (each excluding what is nested inside it) and the rest."""

    def hooks(event: str = "") -> float:
        return sum(v for k, v in step.items() if k.startswith("callback:") and k.endswith(event))

    phases = {
        "data": step.get("data", 0.0),
        "data_order_log": step.get("training_step_outer", 0.0) - step.get("training_step_inner", 0.0),
        "forward": step.get("forward", 0.0),
        "head_metrics": step.get("compute_loss", 0.0) - step.get("forward", 0.0),
        "backward": step.get("backward", 0.0),
        "training_step_other": step.get("training_step_inner", 0.0)
        - step.get("compute_loss", 0.0)
        - step.get("backward", 0.0),
        "tokens_seen": step.get("tokens_seen", 0.0),
        "grad_clip": step.get("grad_clip", 0.0),
        # the other callbacks' hooks run inside these two intervals (Stamps is called first)
        "optimizer": step.get("optimizer", 0.0) - hooks(".on_pre_optimizer_step"),
        "scheduler_zero_grad": step.get("scheduler_zero_grad", 0.0) - hooks(".on_optimizer_step"),
        "callbacks": hooks(),
        "logging": step.get("log_save_evaluate", 0.0) - hooks(".on_log"),
    }
    phases["rest"] = step["step"] - sum(phases.values())
    return phases


def on_log_seconds(trainer) -> float:
    """One call of the pipeline's MetricsToJsonl.on_log with a training log line (its finite checks and its write to
    metrics.jsonl), best of 20: called once per logging_steps, which a short run may not reach."""
    callback = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "MetricsToJsonl")
    logs = {"loss": 2.5, "grad_norm": 0.7, "learning_rate": 2e-4, "entropy": 3.1, "num_tokens": 12000.0}
    logs |= {"mean_token_accuracy": 0.4, "epoch": 0.5}
    best = float("inf")
    for _ in range(20):
        start = time.perf_counter()
        callback.on_log(trainer.args, trainer.state, trainer.control, logs=dict(logs))
        best = min(best, time.perf_counter() - start)
    return best


def finite_check_seconds(model) -> float:
    """The finite-weights check `_save_checkpoint` runs before each checkpoint (best of 5)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        assert all(torch.isfinite(p).all() for p in trainable)
        best = min(best, time.perf_counter() - start)
    return best


def _stop_now_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from sft.train import StopSignals

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    signals = StopSignals()
    for _ in range(5):
        signals.stop_now(torch.device("cpu"))
    start = time.perf_counter()
    for _ in range(50):
        signals.stop_now(torch.device("cpu"))
    if rank == 0:
        Path(out).write_text(str((time.perf_counter() - start) / 50))
    dist.destroy_process_group()


def stop_now_two_ranks() -> float | None:
    """StopOnSignal's check under 2 gloo processes (a 1-element all_reduce), per call; None where it cannot run."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "seconds")
        try:
            mp.spawn(_stop_now_rank, args=(port, out), nprocs=2, join=True)
            return float(Path(out).read_text())
        except Exception as err:  # no loopback networking, say: the single-process figure stands
            log(f"StopOnSignal under 2 gloo ranks not measured: {err}")
            return None


def operator_table(settings: dict[str, Any], data, steps: int) -> list[dict[str, Any]]:
    """torch.profiler over `steps` optimizer steps of a fresh trainer: the operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = build_trainer(settings, data, Path(tmp))
        trainer.args.max_steps = steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {
            "op": e.key,
            "calls_per_step": e.count / steps,
            "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "share": e.self_cpu_time_total / total,
        }
        for e in events[:20]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and data: checks the script, not speed")
    parser.add_argument("--rows", type=int, default=192, help="training rows (one epoch, 2 packed rows per step)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the averages")
    parser.add_argument("--profile-steps", type=int, default=4, help="steps under torch.profiler (0: none)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for step_profile.{json,md}")
    args = parser.parse_args()

    settings = settings_for(args)
    spec = ModelSpec(**settings["model"])
    data = chat_data(settings["rows"], 0, spec.vocab, 768)
    info = machine()
    log(f"machine: {info['cpu']}, {info['cores']} cores; load average {info['load_average_at_start']}")
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, choices = build_trainer(settings, data, Path(tmp))
        undo = instrument(trainer, clock)
        try:
            trainer.train()
        finally:
            undo()
        clock.mark()  # closes the last step, which then holds the end of training too: left out below
        finite_s = finite_check_seconds(trainer.model)
        on_log_s = on_log_seconds(trainer)
        logging_steps = trainer.args.logging_steps
    timed = clock.steps[settings["warmup"] : -1]
    per_step = [exclusive(s) for s in timed]
    step_s = sum(s["step"] for s in timed) / len(timed)
    phases = {k: sum(p[k] for p in per_step) / len(per_step) for k in [*PHASES, "rest"]}
    callbacks = sorted({k for s in timed for k in s if k.startswith("callback:")})
    per_callback = {k.removeprefix("callback:"): sum(s.get(k, 0.0) for s in timed) / len(timed) for k in callbacks}
    own = {
        # the larger of what the timed steps saw and one call spread over logging_steps
        "MetricsToJsonl.on_log (incl. its finite checks)": max(
            per_callback.get("MetricsToJsonl.on_log", 0.0), on_log_s / logging_steps
        ),
        "StopOnSignal.on_step_end": per_callback.get("StopOnSignal.on_step_end", 0.0),
        "data-order sha1 + log line (training_step)": phases["data_order_log"],
        "labelled head's metric gathering (.item())": phases["head_metrics"],
        f"finite-weights check per checkpoint, over save_steps={trainer.args.save_steps}": finite_s
        / trainer.args.save_steps,
    }
    two_ranks = stop_now_two_ranks()
    if two_ranks is not None:
        own["StopOnSignal.on_step_end under 2 gloo ranks (all_reduce)"] = two_ranks
    operators = operator_table(settings, data, args.profile_steps) if args.profile_steps else []
    tokens = sum(len(r["input_ids"]) for r in data.train)
    report = {
        "model": spec.__dict__,
        "rows": settings["rows"],
        "real_tokens": tokens,
        "steps": len(clock.steps),
        "timed_steps": len(timed),
        "choices": choices,
        "logging_steps": logging_steps,
        "step_seconds": step_s,
        "phases_seconds": phases,
        "phases_share": {k: v / step_s for k, v in phases.items()},
        "phase_meaning": {**PHASES, "rest": "the Trainer's loop itself: Python between the timed calls"},
        "callbacks_seconds": per_callback,
        "pipeline_own_seconds": own,
        "pipeline_own_share": {k: v / step_s for k, v in own.items()},
        "finite_check_seconds_per_checkpoint": finite_s,
        "target": f"each of the pipeline's own per-step costs < {TARGET:.0%} of a step",
        "targets_met": {k: v / step_s < TARGET for k, v in own.items()},
        "operators": operators,
        "machine": {**info, "load_average_at_end": os.getloadavg()},
        "command": " ".join(["python", "benchmarks/step_profile.py", *sys.argv[1:]]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_profile.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "step_profile.md").write_text(markdown(report))
    print(markdown(report))
    log(f"wrote {args.out / 'step_profile.json'} and step_profile.md")


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    load = "/".join(f"{x:.1f}" for x in m["load_average_at_start"])
    lines = [
        "# One training step of this pipeline, phase by phase",
        "",
        f"`{r['command']}` - {m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}, "
        f"trl {m['trl']}. Load average at the start {load} (other processes on a shared machine slow every phase "
        "alike; the shares matter more than the times).",
        "",
        f"Model {r['model']['name']}; {r['rows']} rows ({r['real_tokens']:,} real tokens), 2 packed rows of <= 768 "
        f"per step, {r['timed_steps']} steps timed after {r['steps'] - r['timed_steps']} warm-up; logging every "
        f"{r['logging_steps']} steps. Choices: {r['choices']}.",
        "",
        f"Mean step: **{r['step_seconds'] * 1e3:.0f} ms**.",
        "",
        "| phase | ms per step | share | what |",
        "|---|---:|---:|---|",
    ]
    for k, v in r["phases_seconds"].items():
        lines.append(f"| {k} | {v * 1e3:.1f} | {r['phases_share'][k]:.1%} | {r['phase_meaning'][k]} |")
    lines += ["", "The pipeline's own per-step costs (target: each < 2% of a step):", ""]
    lines += ["| cost | ms per step | share | < 2% |", "|---|---:|---:|---|"]
    for k, v in r["pipeline_own_seconds"].items():
        met = "yes" if r["targets_met"][k] else "**no**"
        lines.append(f"| {k} | {v * 1e3:.3f} | {r['pipeline_own_share'][k]:.2%} | {met} |")
    lines += ["", "Callbacks, per step (amortised over the steps that call them):", ""]
    lines += [f"- {k}: {v * 1e3:.3f} ms" for k, v in r["callbacks_seconds"].items()]
    if r["operators"]:
        lines += ["", "Operators by self CPU time (torch.profiler, a separate short run):", ""]
        lines += ["| operator | calls per step | self ms per step | share |", "|---|---:|---:|---:|"]
        for o in r["operators"]:
            lines.append(
                f"| `{o['op']}` | {o['calls_per_step']:.0f} | {o['self_ms_per_step']:.1f} | {o['share']:.1%} |"
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
