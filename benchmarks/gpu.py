"""Plain TRL against this pipeline on one CUDA GPU, at real model shapes, in one call (see gpu.sh).

    python benchmarks/gpu.py --out benchmarks/results/gpu        # on the GPU machine, < 8 minutes on an H100/H200
    python benchmarks/gpu.py --dry-run --out /tmp/gpu            # tiny shapes on a CPU: checks the harness only

Random-weight models built from the real configs of Llama-3.2-1B and Llama-3.1-8B (speed and memory do not depend
on weight values), synthetic chat rows with Alpaca-shaped lengths (lognormal, mean ~194 tokens, ~76% of each row
trained). Cases, each in its own process (clean CUDA peak memory) with its own time limit, most important first:
  1b-lora   LoRA bf16: (a) plain TRL defaults (padded batches of 8, gradient checkpointing, bf16), (x) plain TRL as an
            expert writes it (packing, padding-free, bf16, no checkpointing, Liger's layer kernels where installed,
            one packed row of <= 2048 tokens per step, as the pipeline) and (c) this pipeline's defaults
  8b-lora   the same at 8B: MFU is reported against the vendor bf16 peak and the measured matmul peak
  8b-qlora  this pipeline with model.load_in_4bit at 2k tokens per micro-batch: peak memory (goal <= 9 GiB); without
            bitsandbytes (or CUDA) it runs as LoRA from the same saved folder and says so
Real tokens/s are counted after warm-up steps; MFU uses the LoRA FLOP formula of BENCHMARKS.md. gpu.json and gpu.md
are written after every case (a run cut short keeps what finished); progress goes to stderr. Goals: pipeline >= 1.8x
plain TRL defaults, MFU >= 30% for 8B LoRA, QLoRA 8B <= 9 GiB; the speedup over (x) is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_tokenizer, chat_data, count_batches, length_stats, log, step_clock  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gpu"
# The real configs' shapes (meta-llama/Llama-3.2-1B, meta-llama/Llama-3.1-8B); rope scaling does not change cost.
SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    # --dry-run: the same code on a CPU in seconds
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
        tie_word_embeddings=False,
    ),
}
VENDOR_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")


# Seconds each case may take on an H200 (process start, model build, training); the whole run has --budget.
LIMITS = {"1b-lora": 100, "8b-lora": 150, "8b-qlora": 200}


def cases(dry_run: bool) -> list[dict[str, Any]]:
    one, eight = ("tiny", "tiny") if dry_run else ("llama-3.2-1b", "llama-3.1-8b")
    rows = 24 if dry_run else 384
    base = {"max_length": 2048, "rows": rows, "steps_warmup": 2}
    return [
        {**base, "case": "1b-lora", "shape": one, "variant": "trl_default"},
        {**base, "case": "1b-lora", "shape": one, "variant": "trl_expert"},
        {**base, "case": "1b-lora", "shape": one, "variant": "sft"},
        {**base, "case": "8b-lora", "shape": eight, "variant": "trl_default"},
        {**base, "case": "8b-lora", "shape": eight, "variant": "trl_expert"},
        {**base, "case": "8b-lora", "shape": eight, "variant": "sft"},
        {**base, "case": "8b-qlora", "shape": eight, "variant": "sft_qlora", "rows": 24 if dry_run else 96},
    ]


def build(shape: str, folder: Path | None = None):
    """A random bf16 model of the shape, on the GPU (or CPU); saved to `folder` when given (for 4-bit loading)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, use_cache=False, pad_token_id=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    if folder is not None:
        model.save_pretrained(folder)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        return None
    return model


def run_case(job: dict[str, Any]) -> dict[str, Any]:
    import importlib.util

    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from sft.config import AdapterConfig, ModelConfig
    from sft.model import apply_lora, load_model, set_attention
    from sft.train import build_sft_config, trainer_class

    cuda = torch.cuda.is_available()
    vocab = SHAPES[job["shape"]]["vocab_size"]
    data = chat_data(job["rows"], 0, vocab, job["max_length"], seed=0)
    dataset = Dataset.from_dict({k: [r[k] for r in data.train] for k in ("input_ids", "labels")})
    tokenizer = build_tokenizer(vocab)  # SFTTrainer needs its pad token; nothing is tokenized

    clock = step_clock()
    run = {"num_train_epochs": 1, "logging_steps": 1000, "save_strategy": "no", "report_to": "none", "seed": 0}
    note = ""
    with tempfile.TemporaryDirectory() as out:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if job["variant"].startswith("trl_"):
            model = build(job["shape"])
            if job["variant"] == "trl_default":
                args = SFTConfig(out, max_length=job["max_length"], bf16=cuda, use_cpu=not cuda, **run)
            else:  # (x): packing (padding-free), bf16, no checkpointing, Liger where installed, 1 packed row per step
                liger = cuda and job.get("liger", True) and importlib.util.find_spec("liger_kernel") is not None
                args = SFTConfig(
                    out,
                    max_length=job["max_length"],
                    packing=True,
                    bf16=cuda,
                    use_cpu=not cuda,
                    activation_checkpointing=False,
                    use_liger_kernel=liger,
                    per_device_train_batch_size=1,
                    **run,
                )
            peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear", task_type="CAUSAL_LM")
            trainer = SFTTrainer(
                model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft
            )
        else:
            if job["variant"] == "sft_qlora":
                folder = Path(out) / "model"
                build(job["shape"], folder)
                four_bit = cuda and importlib.util.find_spec("bitsandbytes") is not None
                if not four_bit:
                    note = "no CUDA or no bitsandbytes: LoRA on the bf16/fp32 weights instead of 4-bit (QLoRA fallback)"
                model = load_model(
                    ModelConfig(name_or_path=str(folder), load_in_4bit=four_bit, attn_implementation="auto")
                )
                set_attention(model, "auto")
            else:
                model = build(job["shape"])
                set_attention(model, "auto")
            model = apply_lora(model, AdapterConfig(**LORA))
            train = {**run, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "eval_strategy": "no"}
            train.update({"bf16": cuda, "use_cpu": not cuda, "activation_checkpointing": job["variant"] == "sft_qlora"})
            if not job.get("liger", True):  # the pipeline turns Liger on by itself on CUDA where it is installed
                train["use_liger_kernel"] = False
            args = build_sft_config(train, out, job["max_length"])
            trainer = trainer_class()(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.add_callback(clock)
        batches = count_batches(trainer)
        started = time.perf_counter()
        trainer.train()
    warm = min(job["steps_warmup"], len(clock.ends) - 1)
    per_step = len(batches) // max(len(clock.ends), 1)
    timed = batches[warm * per_step :]
    seconds = clock.ends[-1] - clock.ends[warm - 1] if warm else clock.ends[-1] - started
    counts = {"decoder": 0, "lora": 0}
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            counts["lora"] += p.numel()
        elif ".layers." in name and p.dim() == 2:
            counts["decoder"] += p.numel()
    if job["variant"] == "sft_qlora":  # 4-bit weights are stored packed: count the shapes' parameters instead
        s = SHAPES[job["shape"]]
        d, i, kv = s["hidden_size"], s["intermediate_size"], s["num_key_value_heads"] * s["head_dim"]
        counts["decoder"] = s["num_hidden_layers"] * (2 * d * d + 2 * d * kv + 3 * d * i)
    s = SHAPES[job["shape"]]
    labelled = getattr(trainer, "labelled_head", False) or cuda  # TRL's head scores labelled positions on CUDA
    flops = sum(
        (4 * counts["decoder"] + 6 * counts["lora"]) * b["real"]
        + 12 * s["num_hidden_layers"] * s["num_attention_heads"] * s["head_dim"] * b["sum_s2"]
        + 4 * s["vocab_size"] * s["hidden_size"] * (b["trained"] if labelled else b["real"])
        for b in timed
    )
    real, pad = sum(b["real"] for b in batches), sum(b["pad"] for b in batches)
    return {
        **job,
        "note": note,
        "attn_implementation": trainer.model.config._attn_implementation,
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "packing": bool(trainer.args.packing),
        "use_liger_kernel": bool(trainer.args.use_liger_kernel),
        "labelled_head": bool(getattr(trainer, "labelled_head", False)),
        "load_in_4bit": bool(getattr(trainer.model, "is_loaded_in_4bit", False))
        or any("4bit" in type(m).__name__ for m in trainer.model.modules()),
        "steps": len(clock.ends),
        "real_tokens": real,
        "pad_fraction": pad / max(pad + real, 1),
        "real_tokens_per_s": sum(b["real"] for b in timed) / seconds,
        "model_flops_per_s": flops / seconds,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_memory_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
    }


def matmul_peak() -> float:
    """Measured large matmul rate in the dtype the cases compute in: bf16 8192^3 on a GPU; on a CPU (a dry run, in
    fp32: a CPU without bf16 kernels runs bf16 matmuls as a scalar loop) fp32 1024^3."""
    from sft.hardware import matmul_peak as measured

    if torch.cuda.is_available():
        return measured(torch.bfloat16, n=8192)
    return measured(torch.float32, n=1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, any device: checks the harness")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", help="comma-separated cases to run (1b-lora, 8b-lora, 8b-qlora)")
    parser.add_argument("--budget", type=float, default=420, help="seconds for all cases; a case that cannot finish "
                        "in what is left is skipped, each case also has its own limit (LIMITS)")  # fmt: skip
    parser.add_argument("--stack", default="", help="which packages gpu.sh installed (recorded in the report)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker))))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    started = time.perf_counter()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = matmul_peak()
    vendor = next((v for k, v in VENDOR_BF16_PEAK.items() if k in device), None)
    log(f"device {device}; measured matmul peak {peak / 1e12:.2f} TFLOP/s")
    results: list[dict[str, Any]] = []
    for job in cases(args.dry_run):
        if args.only and job["case"] not in args.only.split(","):
            continue
        left = args.budget - (time.perf_counter() - started)
        limit = min(LIMITS[job["case"]] * (3 if args.dry_run else 1), left)
        if limit < 20:
            log(f"{job['case']} {job['variant']}: skipped, {left:.0f} s of the budget left")
            results.append({**job, "error": f"skipped: {left:.0f} s of the {args.budget:.0f} s budget left"})
            continue
        log(f"{job['case']} {job['variant']} (limit {limit:.0f} s) ...")
        result = run_job(job, limit, peak, vendor)
        left = args.budget - (time.perf_counter() - started)
        if "error" in result and liger_may_be_why(job) and left >= 30:
            # Liger's Triton kernels are the one part not exercised on a CPU: measure without them rather than lose
            # the case, and say so
            log(f"{job['case']} {job['variant']}: again without Liger ({left:.0f} s left)")
            again = run_job({**job, "liger": False}, min(LIMITS[job["case"]], left), peak, vendor)
            again["note"] = (again.get("note", "") + f"; with Liger it failed: {result['error']}").lstrip("; ")
            result = again
        results.append(result)
        write(results, device, peak, vendor, args, started)  # after every case: a run cut short keeps what finished
    report = write(results, device, peak, vendor, args, started)
    log(f"wrote {args.out / 'gpu.json'} and gpu.md in {report['wall_seconds']:.0f} s")


def liger_may_be_why(job: dict[str, Any]) -> bool:
    """Whether the case ran with Liger's kernels (plain TRL's expert and the pipeline, on CUDA where installed)."""
    import importlib.util

    return (
        torch.cuda.is_available()
        and job.get("liger", True)
        and job["variant"] != "trl_default"
        and importlib.util.find_spec("liger_kernel") is not None
    )


def run_job(job: dict[str, Any], limit: float, peak: float, vendor: float | None) -> dict[str, Any]:
    began = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(job)],
            capture_output=True,
            text=True,
            check=False,
            timeout=limit,
        )
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"").decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
        log(f"{job['case']} {job['variant']}: over its {limit:.0f} s limit; stderr ends:\n{tail[-1500:]}")
        return {**job, "error": f"timed out after {limit:.0f} s", "seconds": round(time.perf_counter() - began, 1)}
    if done.returncode != 0:
        log(f"{job['case']} {job['variant']} failed:\n{done.stderr[-3000:]}")
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return {**job, "error": last, "seconds": round(time.perf_counter() - began, 1)}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["seconds"] = round(time.perf_counter() - began, 1)
    result["mfu_measured_peak"] = result["model_flops_per_s"] / peak
    result["mfu_vendor_peak"] = result["model_flops_per_s"] / vendor if vendor else None
    memory = result["peak_memory_bytes"]
    log(
        f"{job['case']} {job['variant']}: {result['real_tokens_per_s']:,.0f} real tok/s, MFU "
        f"{result['mfu_measured_peak']:.1%} of measured peak"
        + (f", peak {memory / 2**30:.2f} GiB" if memory else "")
        + f", {result['seconds']:.0f} s"
        + (f"; {result['note']}" if result.get("note") else "")
    )
    return result


def write(results, device, peak, vendor, args, started) -> dict[str, Any]:
    report = summarise(results, device, peak, vendor, args, time.perf_counter() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu.md").write_text(markdown(report))
    return report


def summarise(results, device, peak, vendor, args, wall) -> dict[str, Any]:
    import peft
    import transformers
    import trl

    by = {(r["case"], r["variant"]): r for r in results if "error" not in r}

    def speedups(base: str) -> dict[str, float]:
        return {
            case: by[(case, "sft")]["real_tokens_per_s"] / by[(case, base)]["real_tokens_per_s"]
            for case in ("1b-lora", "8b-lora")
            if (case, "sft") in by and (case, base) in by
        }

    qlora = by.get(("8b-qlora", "sft_qlora"), {})
    qlora_peak = qlora.get("peak_memory_bytes") if qlora.get("load_in_4bit") else None
    mfu_8b = by.get(("8b-lora", "sft"), {}).get("mfu_vendor_peak") or by.get(("8b-lora", "sft"), {}).get(
        "mfu_measured_peak"
    )
    default, expert = speedups("trl_default"), speedups("trl_expert")
    return {
        "device": device,
        "dry_run": args.dry_run,
        "stack": args.stack,
        "matmul_peak_flops": peak,
        "matmul_peak_dtype": "bf16" if torch.cuda.is_available() else "fp32",
        "vendor_peak_bf16_flops": vendor,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
        },
        "data": length_stats(chat_data(cases(args.dry_run)[0]["rows"], 0, 512, 2048).train),
        "results": results,
        "speedup_vs_trl_default": default,
        "speedup_vs_trl_expert": expert,
        "goals": {
            "speedup >= 1.8": {k: v >= 1.8 for k, v in default.items()},
            "mfu_8b_lora >= 30%": None if mfu_8b is None else mfu_8b >= 0.30,
            "qlora_8b_peak <= 9 GiB": None if qlora_peak is None else qlora_peak <= 9 * 2**30,
        },
        "wall_seconds": wall,
        "command": " ".join(["python", "benchmarks/gpu.py", *sys.argv[1:]]),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Plain TRL against this pipeline on {report['device']}",
        "",
        f"`{report['command']}`; torch {report['versions']['torch']}, transformers {report['versions']['transformers']}"
        f", trl {report['versions']['trl']}, peft {report['versions']['peft']}"
        f"; measured {report['matmul_peak_dtype']} matmul peak {report['matmul_peak_flops'] / 1e12:.2f} TFLOP/s"
        + (" (dry run: tiny shapes)" if report["dry_run"] else ""),
        "",
        "| case | variant | attention | ckpt | Liger | 4-bit | real tok/s | pad | MFU (measured peak) "
        "| MFU (vendor peak) | peak GiB | s |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['variant']} | failed: {r['error']} | | | | | | | | | |")
            continue
        vendor = f"{r['mfu_vendor_peak']:.1%}" if r["mfu_vendor_peak"] else "-"
        memory = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r["peak_memory_bytes"] else "-"
        lines.append(
            f"| {r['case']} | {r['variant']} | {r['attn_implementation']} | "
            f"{'on' if r['gradient_checkpointing'] else 'off'} | {'yes' if r['use_liger_kernel'] else 'no'} | "
            f"{'yes' if r['load_in_4bit'] else 'no'}"
            f" | {r['real_tokens_per_s']:,.0f} | {r['pad_fraction']:.1%} | {r['mfu_measured_peak']:.1%} | {vendor} | "
            f"{memory} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        f"speedup_vs_trl_default: {json.dumps({k: round(v, 2) for k, v in report['speedup_vs_trl_default'].items()})}",
        f"speedup_vs_trl_expert: {json.dumps({k: round(v, 2) for k, v in report['speedup_vs_trl_expert'].items()})}",
    ]
    lines += [f"- {r['case']} {r['variant']}: {r['note']}" for r in report["results"] if r.get("note")]
    if report["stack"]:
        lines += ["", f"Packages: {report['stack']}"]
    lines += ["", "Goals: " + json.dumps(report["goals"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
