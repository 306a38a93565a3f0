"""Plain TRL (its defaults, hand-tuned, and as an expert writes it) against this pipeline's defaults, side by side.

    python benchmarks/trl_vs_sft.py              # the full run (~10 min on 2 CPU cores)
    python benchmarks/trl_vs_sft.py --quick      # a tiny setting, well under a minute

Same random-weight Llama, same data, same real tokens (one epoch of the same rows), same LoRA settings and seed:
  (a) trl_default  SFTTrainer(model, args=SFTConfig(output_dir=...), peft_config=LoraConfig(...)): no packing,
                   padding to the longest row of each batch, gradient checkpointing on, precision as TRL picks it
  (b) trl_tuned    the same with packing=True (best-fit, padding-free) and the best precision for the device
  (x) trl_expert   (b) with gradient checkpointing off (memory allows it), as a user who knows TRL writes it, and
                   Liger's layer kernels on CUDA where installed: the strongest plain-TRL configuration
  (c) sft          SFTConfig from sft.train.build_sft_config (the pipeline's defaults), rows as input_ids + labels
Each run of a variant is its own subprocess (clean peak memory, no cross-talk), interleaved A B X C A B X C ...; every
figure is the median over the repetitions. Writes results/trl_vs_sft.{json,md}; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from common import (
    SIZES,
    Data,
    ModelSpec,
    build_model,
    build_tokenizer,
    chat_data,
    count_batches,
    evaluate_loss,
    head_scores_labels_only,
    length_stats,
    log,
    lora_flops_per_token,
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
LABELS = {
    "trl_default": "(a) plain TRL defaults",
    "trl_tuned": "(b) plain TRL + packing + best precision",
    "trl_expert": "(x) plain TRL expert: packing, best precision, no checkpointing",
    "sft": "(c) this pipeline's defaults",
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def settings_for(args: argparse.Namespace) -> dict[str, Any]:
    """What a user of any of the three would set for this run: batch, length, epochs, learning rate, seed."""
    if args.quick:
        spec = ModelSpec("d64-L2", 64, 2, 2, 176, vocab=4096)
        rows, eval_rows, reps, warmup = 24, 4, 1, 1
    else:
        spec, rows, eval_rows, reps, warmup = SIZES["d512-L8"], args.rows, args.eval_rows, args.reps, args.warmup_steps
    return {
        "model": spec.__dict__,
        "train_rows": rows,
        "eval_rows": eval_rows,
        "repetitions": reps,
        "warmup_steps": warmup,
        # The same ~1.5k real tokens per optimizer step for every variant, so the same tokens make the same number of
        # updates: 8 unpadded rows of ~194 tokens, or 2 packed rows of <= 768 tokens (Alpaca's longest is 682, so
        # nothing is truncated).
        "max_length": 768,
        "batch_rows_unpacked": 8,
        "batch_rows_packed": 2,
        "num_train_epochs": 1,
        "learning_rate": 2e-4,  # LoRA's usual rate, set the same for all three so the held-out losses compare
        "seed": 0,
        "lora": LORA,
        "also": args.also,
        "in_process": args.in_process or args.quick,  # --quick checks the harness: one process is enough
        "quiet_wait_s": 0 if args.quick else args.quiet_wait,
    }


# ---------------------------------------------------------------------------------------------------------------
# One variant, in its own process


def sft_config_for(variant: str, settings: dict[str, Any], output_dir: str, model, overrides: dict[str, Any]):
    """The SFTConfig each variant's user would write, and a note on how its precision and checkpointing were chosen."""
    from trl import SFTConfig

    unpacked = {"per_device_train_batch_size": settings["batch_rows_unpacked"]}
    packed = {"per_device_train_batch_size": settings["batch_rows_packed"]}
    run = {
        "num_train_epochs": settings["num_train_epochs"],
        "learning_rate": settings["learning_rate"],
        "seed": settings["seed"],
        "logging_steps": 1000,  # no mid-run logging in the timed steps; every variant the same
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if variant == "trl_default":
            try:
                return SFTConfig(output_dir, max_length=settings["max_length"], **unpacked, **run), "TRL's defaults"
            except ValueError as err:  # bf16=True by default: on a CPU-only machine that is an error
                note = f"TRL's default bf16=True fails here ({str(err).splitlines()[0]}); a plain user sets bf16=False"
                return SFTConfig(output_dir, max_length=settings["max_length"], bf16=False, **unpacked, **run), note
        if variant == "trl_tuned":
            bf16, note = best_precision(settings["peaks"])
            cpu = not torch.cuda.is_available()
            config = SFTConfig(
                output_dir, max_length=settings["max_length"], packing=True, bf16=bf16, use_cpu=cpu, **packed, **run
            )
            return config, note + "; checkpointing left at TRL's default"
        if variant.startswith("trl_expert"):
            return expert_config(settings, output_dir, packed, run, overrides)
        from sft.train import build_sft_config

        # In-training evaluation is off for the timing: every variant's held-out loss is computed after training.
        train = {**packed, **run, "eval_strategy": "no", "save_strategy": "no"}
        auto, note = pipeline_choices(settings["max_length"], LORA, train, output_dir, model.config)
        train = {**auto, **train, **{k: v for k, v in overrides.items() if not k.startswith("_")}}
        choice = (
            "labelled-positions loss head (sft.model.loss) and per-document attention (sft.model.attention) "
            "where they apply"
        )
        note = f"{note}; {choice}"
        if overrides:
            note += f"; then {overrides}"
        return build_sft_config(train, output_dir, settings["max_length"]), note


def expert_config(settings, output_dir: str, packed: dict[str, Any], run: dict[str, Any], overrides: dict[str, Any]):
    """(x): what a user who knows TRL writes when memory allows: (b) with activation checkpointing off (TRL turns it
    on: about 1/3 more compute), Liger's layer kernels on CUDA where installed (TRL keeps its own fused LM head),
    everything else as (b), so the same tokens make the same updates. Measured here and left as they are: 2 torch
    threads on 2 cores (all of them), no dataloader workers (collating is ~1% of a step and a worker takes a core
    from the matmuls), no torch_compile (packed lengths change every step: a recompile per shape)."""
    import importlib.util

    from trl import SFTConfig

    bf16, note = best_precision(settings["peaks"])
    cuda = torch.cuda.is_available()
    liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    options = {
        "packing": True,
        "bf16": bf16,
        "use_cpu": not cuda,
        "activation_checkpointing": False,
        "use_liger_kernel": liger,
        **packed,
        **run,
        **{k: v for k, v in overrides.items() if not k.startswith("_")},
    }
    note += "; checkpointing off; " + ("Liger layer kernels" if liger else "no Liger (needs CUDA and liger-kernel)")
    if overrides:
        note += f"; then {overrides}"
    return SFTConfig(output_dir, max_length=settings["max_length"], **options), note


def best_precision(peaks: dict[str, float]) -> tuple[bool, str]:
    """bf16 where the device runs it faster: on a CUDA GPU that supports it; on a CPU by the measured matmul rates."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(), "bf16 on a CUDA GPU"
    bf16, fp32 = peaks["bf16"], peaks["fp32"]
    choice = "bf16 autocast" if bf16 > fp32 else "fp32"
    return (
        bf16 > fp32,
        f"{choice}, hand-picked: this CPU's matmul bf16 {bf16 / 1e9:.0f} vs fp32 {fp32 / 1e9:.0f} GFLOP/s",
    )


def model_dtype(variant: str, overrides: dict[str, Any]) -> torch.dtype:
    """fp32 weights for plain TRL (a user's from_pretrained default); the pipeline's `model.dtype: auto` for (c)."""
    if "_dtype" in overrides:
        return getattr(torch, overrides["_dtype"])
    if variant.startswith("sft"):
        from sft.model import resolve_dtype

        return resolve_dtype("auto")
    return torch.float32


def run_variant(job: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTTrainer

    from sft.config import AdapterConfig
    from sft.hardware import peak_memory
    from sft.model import apply_lora, set_attention
    from sft.train import trainer_class

    settings, variant, overrides = job["settings"], job["variant"], job.get("overrides", {})
    spec = ModelSpec(**settings["model"])
    data = Data.load(Path(job["data"]))
    tokenizer = build_tokenizer(spec.vocab)
    dataset = Dataset.from_dict({key: [row[key] for row in data.train] for key in ("input_ids", "labels")})

    clock = step_clock()
    with tempfile.TemporaryDirectory() as out, peak_memory() as peak:
        attn = "sdpa" if variant.startswith("sft") else overrides.get("_attn", "sdpa")  # (c)'s is set below
        model = build_model(spec, seed=settings["seed"], dtype=model_dtype(variant, overrides), attn=attn)
        started = time.perf_counter()
        sft_config, choices = sft_config_for(variant, settings, out, model, overrides)
        set_seed(settings["seed"])  # the LoRA init is random: the same seed before it in every variant
        peft_config = None
        trainer_cls = SFTTrainer
        if variant.startswith("sft"):  # the pipeline's model stage and trainer (sft.model, sft.train)
            set_attention(model, overrides.get("_attn", "auto"))
            model = apply_lora(model, AdapterConfig(**LORA))
            trainer_cls = trainer_class()
        else:
            peft_config = LoraConfig(
                r=LORA["r"],
                lora_alpha=LORA["alpha"],
                lora_dropout=LORA["dropout"],
                target_modules=LORA["target_modules"],
                task_type="CAUSAL_LM",
            )
        trainer = trainer_cls(
            model=model,
            args=sft_config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[clock],
        )
        batches = count_batches(trainer)
        train_started, *start_cpu = snapshot()
        trainer.train()
    loss = evaluate_loss(trainer.model, data.eval)
    counts = param_counts(trainer.model)
    steps = [b - a for a, b in zip([train_started, *clock.ends], clock.ends)]
    warm = min(settings["warmup_steps"], len(steps) - 1)
    # One batch per micro-batch: with gradient accumulation an optimizer step takes several (the last one fewer).
    timed, seconds = batches[warm * sft_config.gradient_accumulation_steps :], sum(steps[warm:])
    linear, attention, head = lora_flops_per_token(counts, spec)
    # sft.model.loss scores labelled positions only; TRL's fused head does so only on Triton devices
    scored = "trained" if getattr(trainer, "labelled_head", False) or head_scores_labels_only() else "real"
    flops = sum(linear * b["real"] + attention * b["sum_s2"] + head * b[scored] for b in timed)
    real, pad = sum(b["real"] for b in batches), sum(b["pad"] for b in batches)
    return {
        "variant": variant,
        "precision": "bf16" if sft_config.bf16 else ("fp16" if sft_config.fp16 else "fp32"),
        "weights_dtype": str(next(trainer.model.base_model.parameters()).dtype).removeprefix("torch."),
        "choices": choices,
        "gradient_checkpointing": bool(sft_config.gradient_checkpointing),
        "packing": bool(sft_config.packing),
        "padding_free": bool(sft_config.padding_free or sft_config.packing),
        "per_device_train_batch_size": sft_config.per_device_train_batch_size,
        "gradient_accumulation_steps": sft_config.gradient_accumulation_steps,
        "attn_implementation": trainer.model.config._attn_implementation,
        "torch_compile": bool(sft_config.torch_compile),
        "steps": len(steps),
        "timed_steps": len(timed),
        "real_tokens": real,
        "pad_tokens": pad,
        "pad_fraction": pad / (pad + real),
        "trained_tokens": sum(b["trained"] for b in batches),
        "real_tokens_per_s": sum(b["real"] for b in timed) / seconds,
        "model_flops_per_s": flops / seconds,
        "lm_head_flops_per": f"{scored} token",
        "time_to_first_step_s": clock.ends[0] - started,
        "step_seconds": [round(t, 3) for t in steps],
        # Cores' worth of CPU other processes took during the timed steps: a disturbed measurement is run again.
        "others_cores": others_cores(clock.cpu[warm - 1] if warm else (train_started, *start_cpu), clock.cpu[-1]),
        "peak_memory_bytes": peak.bytes,
        "peak_memory_kind": peak.kind,
        "heldout_loss": loss,
        "params": counts,
    }


# ---------------------------------------------------------------------------------------------------------------
# The run: data, peaks, interleaved repetitions, the report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and data: checks the harness, not speed")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each variant (median reported)")
    parser.add_argument("--rows", type=int, default=64, help="training rows (one epoch, ~194 tokens each)")
    parser.add_argument("--eval-rows", type=int, default=32, help="held-out rows")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the throughput")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="extra variants with train overrides, e.g. sft_bf16='{\"bf16\": true}' (repeatable): based on (c), or on "
        "(x) when NAME starts with trl_expert; "
        '"_dtype": "bfloat16" loads the weights in bf16, "_attn": "sdpa" sets the attention implementation '
        "(default: the pipeline's auto for (c), sdpa for (x))",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=300,
        help="before each run, wait up to this many seconds for the CPUs to be >= 80%% idle (shared machines)",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="re-runs of a run disturbed by other processes (>0.25 cores taken)"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="no subprocess per variant (faster start, less clean peak memory)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for trl_vs_sft.{json,md}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_variant(json.loads(args.worker))))
        return

    settings = settings_for(args)
    spec = ModelSpec(**settings["model"])
    variants = {name: {} for name in LABELS}
    for extra in args.also:
        name, _, overrides = extra.partition("=")
        variants[name] = json.loads(overrides or "{}")
        LABELS[name] = f"{'(x)' if name.startswith('trl_expert') else '(c)'} + {overrides}"
    began = time.time()
    info = machine()
    log(f"machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, trl {info['trl']}")
    data = chat_data(settings["train_rows"], settings["eval_rows"], spec.vocab, settings["max_length"])
    lengths = {"train": length_stats(data.train), "eval": length_stats(data.eval)}
    log(f"data: {data.source}")
    log(f"train lengths: {lengths['train']}")
    peaks = measure_peaks(0.1 if args.quick else 0.5)
    settings["peaks"] = peaks
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "data.json"
        data.save(data_path)
        # sft.plan caches its measured bf16/fp32 choice under XDG_CACHE_HOME: a fresh cache measures it once in this
        # run (the first (c) variant), under this run's conditions, and every later variant and repetition reuses it.
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        for rep in range(settings["repetitions"]):
            for name, overrides in variants.items():
                job = {"variant": name, "settings": settings, "data": str(data_path), "overrides": overrides}
                result = measure(job, settings, args)
                runs[name].append(result)
                log(
                    f"rep {rep + 1}/{settings['repetitions']} {name}: {result['real_tokens_per_s']:.0f} real tok/s, "
                    f"pad {result['pad_fraction']:.1%}, {result['precision']}, loss {result['heldout_loss']:.4f}"
                )
    # The larger of before and after: MFU errs low, not high.
    for dtype, value in measure_peaks(0.1 if args.quick else 0.5).items():
        peaks[dtype] = max(peaks[dtype], value)
    info["load_average_at_end"] = os.getloadavg()
    report = summarise(settings, info, data.source, lengths, peaks, runs, spec)
    report["wall_seconds"] = round(time.time() - began, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trl_vs_sft.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "trl_vs_sft.md").write_text(markdown(report))
    print(markdown(report))
    log(f"wrote {args.out / 'trl_vs_sft.json'} and trl_vs_sft.md in {report['wall_seconds']:.0f} s")


def measure(job: dict[str, Any], settings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One run of a variant, after waiting for a quiet machine; run again (up to --retries times) while other
    processes took more than a quarter of a core during its timed steps, keeping the least disturbed run."""
    runs = []
    for _ in range(1 + (0 if args.quick else args.retries)):
        quiet = wait_for_quiet(0 if args.quick else args.quiet_wait)
        result = run_variant(job) if settings["in_process"] else subprocess_run(job)
        runs.append({**result, **quiet})
        if result["others_cores"] <= 0.25:
            break
        log(f"{job['variant']}: others took {result['others_cores']:.2f} cores during the timed steps: again")
    best = min(runs, key=lambda r: r["others_cores"])
    return {**best, "attempts": len(runs)}


def measure_peaks(seconds: float) -> dict[str, float]:
    from sft.hardware import matmul_peak

    # Without oneDNN's bf16 kernels (AVX2-only CPUs) one 2048^3 bf16 matmul is a scalar loop of minutes: 256^3 then.
    bf16_n = 2048 if bf16_kernels() else 256
    return {
        "fp32": matmul_peak(torch.float32, seconds=seconds),
        "bf16": matmul_peak(torch.bfloat16, n=bf16_n, seconds=seconds),
    }


def bf16_kernels() -> bool:
    """bf16 matmuls run on real kernels: any CUDA GPU that supports bf16; a CPU with AVX512-BF16 or AMX (oneDNN)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def subprocess_run(job: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"variant {job['variant']} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(settings, info, source, lengths, peaks, runs, spec) -> dict[str, Any]:
    variants = {}
    for name, results in runs.items():
        first = results[0]
        flops = median([r["model_flops_per_s"] for r in results])
        peak = peaks["bf16" if first["precision"] == "bf16" else "fp32"]
        variants[name] = {
            "label": LABELS[name],
            **{k: first[k] for k in ("precision", "weights_dtype", "choices", "gradient_checkpointing", "packing")},
            **{k: first[k] for k in ("padding_free", "per_device_train_batch_size", "gradient_accumulation_steps")},
            "attn_implementation": first["attn_implementation"],
            **{k: first[k] for k in ("torch_compile", "steps", "timed_steps", "real_tokens", "pad_tokens")},
            "pad_fraction": first["pad_fraction"],
            "trained_tokens": first["trained_tokens"],
            "real_tokens_per_s": median([r["real_tokens_per_s"] for r in results]),
            "real_tokens_per_s_all": [round(r["real_tokens_per_s"], 1) for r in results],
            "step_seconds_all": [r["step_seconds"] for r in results],
            "cpu_idle_before_each": [r["idle_before"] for r in results],
            "waited_for_quiet_s": [r["waited_s"] for r in results],
            "others_cores_during_timed_steps": [round(r["others_cores"], 2) for r in results],
            "attempts": [r["attempts"] for r in results],
            "peak_memory_mib": median([r["peak_memory_bytes"] for r in results]) / 2**20,
            "peak_memory_kind": first["peak_memory_kind"],
            "time_to_first_step_s": median([r["time_to_first_step_s"] for r in results]),
            "heldout_loss": median([r["heldout_loss"] for r in results]),
            "matmul_peak_flops": peak,
            "mfu": median([r["model_flops_per_s"] for r in results]) / peak,
            # only where bf16 is the faster arithmetic: on a CPU without bf16 kernels its "peak" is a scalar loop
            "mfu_of_bf16_peak": flops / peaks["bf16"] if peaks["bf16"] > peaks["fp32"] else None,
            "lm_head_flops_per": first["lm_head_flops_per"],
            "params": first["params"],
        }
    a, b, x, c = (variants[k] for k in ("trl_default", "trl_tuned", "trl_expert", "sft"))
    loss_change = c["heldout_loss"] / a["heldout_loss"] - 1
    loss_change_x = c["heldout_loss"] / x["heldout_loss"] - 1
    speedup_x = c["real_tokens_per_s"] / x["real_tokens_per_s"]
    targets = {
        "speedup_vs_trl_default >= 4": c["real_tokens_per_s"] / a["real_tokens_per_s"] >= 4,
        "speedup_vs_trl_tuned >= 1.3": c["real_tokens_per_s"] / b["real_tokens_per_s"] >= 1.3,
        "speedup_vs_trl_expert >= 1.5": speedup_x >= 1.5,
        "pad_fraction <= 1%": c["pad_fraction"] <= 0.01,
        "heldout_loss within 2% of (a)": abs(loss_change) <= 0.02,
        "heldout_loss within 1% of (x)": abs(loss_change_x) <= 0.01,
        "mfu >= 25%": c["mfu"] >= 0.25,
    }
    return {
        "speedup_vs_trl_default": c["real_tokens_per_s"] / a["real_tokens_per_s"],
        "speedup_vs_trl_tuned": c["real_tokens_per_s"] / b["real_tokens_per_s"],
        "speedup_vs_trl_expert": speedup_x,
        "heldout_loss_change_vs_trl_default": loss_change,
        "heldout_loss_change_vs_trl_expert": loss_change_x,
        "targets_met": targets,
        "variants": variants,
        "matmul_peak_flops": peaks,
        "data": {"source": source, "lengths": lengths},
        "model": {**spec.__dict__, "params": c["params"]},
        "settings": settings,
        "machine": info,
        "command": " ".join(["python", "benchmarks/trl_vs_sft.py", *sys.argv[1:]]),
    }


def _load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "n/a"


def markdown(report: dict[str, Any]) -> str:
    m, s, lengths = report["machine"], report["settings"], report["data"]["lengths"]["train"]
    params = report["model"]["params"]
    lines = [
        "# Plain TRL (defaults, hand-tuned, expert) against this pipeline's defaults",
        "",
        f"`{report['command']}` - {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads"
        + (f", {m['cuda']}" if m["cuda"] else "")
        + f"; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, "
        f"peft {m['peft']}. Load average (1, 5, 15 min) {_load(m['load_average_at_start'])} at the start, "
        f"{_load(m['load_average_at_end'])} at the end.",
        "",
        f"Model: random-weight Llama {report['model']['name']} (d={report['model']['hidden']}, "
        f"{report['model']['layers']} layers, vocab {report['model']['vocab']}): {params['decoder_linear']:,} decoder "
        f"linear parameters, {params['lora']:,} LoRA (r={s['lora']['r']}, alpha={s['lora']['alpha']}, "
        f"{s['lora']['target_modules']}), {params['total']:,} in all.",
        f"Data: {report['data']['source']}. Train {lengths['rows']} rows, {lengths['tokens']:,} real tokens "
        f"(length mean {lengths['mean']}, p50 {lengths['p50']}, p95 {lengths['p95']}, max {lengths['max']}); "
        f"{report['data']['lengths']['eval']['rows']} held-out rows.",
        f"Settings: one epoch, lr {s['learning_rate']}, max_length {s['max_length']}, "
        f"{s['batch_rows_unpacked']} rows/step unpacked or {s['batch_rows_packed']} packed rows/step, seed "
        f"{s['seed']}; median of {s['repetitions']} interleaved repetitions, {s['warmup_steps']} warm-up steps left "
        f"out of the throughput. Matmul peak measured here: fp32 {report['matmul_peak_flops']['fp32'] / 1e9:.0f}, "
        f"bf16 {report['matmul_peak_flops']['bf16'] / 1e9:.0f} GFLOP/s.",
        "",
        "| variant | precision | ckpt | packing | rows x accum | real tok/s | x (a) | pad | peak mem MiB | "
        "first step s | held-out loss | MFU (own dtype) | MFU (bf16 peak) |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = report["variants"]["trl_default"]["real_tokens_per_s"]
    for v in report["variants"].values():
        lines.append(
            f"| {v['label']} | {v['precision']}, {v['weights_dtype']} weights | "
            f"{'on' if v['gradient_checkpointing'] else 'off'} | "
            f"{'bfd, padding-free' if v['packing'] else 'no'} | "
            f"{v['per_device_train_batch_size']} x {v['gradient_accumulation_steps']} | {v['real_tokens_per_s']:.0f} | "
            f"{v['real_tokens_per_s'] / base:.2f} | {v['pad_fraction']:.1%} | {v['peak_memory_mib']:.0f} | "
            f"{v['time_to_first_step_s']:.1f} | {v['heldout_loss']:.4f} | {v['mfu']:.1%} | "
            + (f"{v['mfu_of_bf16_peak']:.1%} |" if v["mfu_of_bf16_peak"] is not None else "n/a |")
        )
    lines += ["", "Precision and checkpointing, as each user gets them:"]
    lines += [f"- {v['label']}: {v['choices']}" for v in report["variants"].values()]
    lines += [
        "",
        f"speedup_vs_trl_default = {report['speedup_vs_trl_default']:.2f}, "
        f"speedup_vs_trl_tuned = {report['speedup_vs_trl_tuned']:.2f}, "
        f"**speedup_vs_trl_expert = {report['speedup_vs_trl_expert']:.2f}**; held-out loss (c) vs (a): "
        f"{report['heldout_loss_change_vs_trl_default']:+.2%}, "
        f"vs (x): {report['heldout_loss_change_vs_trl_expert']:+.2%}.",
        "",
        f"CPU idle just before each run (the harness waits up to {s['quiet_wait_s']:.0f} s for >= 80%): "
        + ", ".join(
            f"{k} {min(v['cpu_idle_before_each']):.0%}-{max(v['cpu_idle_before_each']):.0%}"
            for k, v in report["variants"].items()
        )
        + f"; waited {sum(sum(v['waited_for_quiet_s']) for v in report['variants'].values()):.0f} s in all. CPU other "
        "processes took during the timed steps (cores): "
        + ", ".join(
            f"{k} {max(v['others_cores_during_timed_steps']):.2f} at most" for k, v in report["variants"].items()
        )
        + f"; runs measured again because others took > 0.25 cores: "
        f"{sum(sum(v['attempts']) - len(v['attempts']) for v in report['variants'].values())}.",
        "",
        "MFU: model FLOPs of BENCHMARKS.md (4 N_dec + 6 N_lora per real token, 12 L d s attention per real token of a "
        "document of length s, 4 V d LM head per token it scores: "
        + ", ".join(f"{k} per {v['lm_head_flops_per']}" for k, v in report["variants"].items())
        + "; TRL 1.16's fused head scores only labelled positions on Triton devices and every position elsewhere, "
        "sft.model.loss only labelled ones) over the steady-state time, divided by the measured matmul peak of the "
        "dtype the variant computes in (and, last column, by the bf16 peak for all).",
        "",
        "Targets: " + "; ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in report["targets_met"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
