"""What `sft plan` prints: the plan as a table (or JSON) and, with --measure, the prediction against the measurement."""

from __future__ import annotations

import json
import sys
from typing import Any

from sft.errors import SftError
from sft.plan.decide import Plan, make_plan
from sft.plan.devices import DEVICE_NAMES, MiB, gib, resolve_device


def format_plan(plan: Plan, measured: dict[str, Any] | None = None) -> str:
    s, m, shape = plan.settings, plan.memory, plan.shape
    lines = [
        f"sft plan: {plan.config_name} on {plan.device.name}",
        f"model: {shape.model_type}, {shape.layers} layers, d={shape.hidden}, ffn={shape.intermediate}, "
        f"{shape.heads} heads ({shape.kv_heads} kv), vocab {shape.vocab:,}, {shape.params / 1e6:,.1f}M params "
        f"({shape.source})",
        f"step: {s.describe()}",
        f"precision: {s.compute}{' autocast' if s.compute == 'bf16' and s.weight_bytes == 4 else ''}"
        + (f" ({plan.precision_reason})" if plan.precision_reason else ""),
        f"activation checkpointing: {'on' if s.checkpointing else 'off'} ({plan.checkpointing_reason})",
        "",
        f"{'training step, at its peak':<34}{'MiB':>12}  notes",
    ]
    for key, value in m.train.items():
        lines.append(f"  {key.replace('_', ' '):<32}{value / MiB:>12,.1f}  {m.train_notes.get(key, '')}")
    lines.append(f"  {'total':<32}{m.train_total / MiB:>12,.1f}")
    per_token = m.activations_per_token
    lines.append(
        f"  activations per token: {per_token / 1024:,.1f} KiB without checkpointing, "
        f"{m.activations_per_token_checkpointed / 1024:,.1f} KiB with it"
    )
    if m.evaluation:
        parts = ", ".join(f"{k.replace('_', ' ')} {v / MiB:,.1f}" for k, v in m.evaluation.items())
        lines.append(f"{'evaluation (batch ' + str(s.eval_batch) + ')':<34}{m.eval_total / MiB:>12,.1f}  {parts}")
    if m.generation:
        parts = ", ".join(f"{k.replace('_', ' ')} {v / MiB:,.1f}" for k, v in m.generation.items())
        title = f"generation (batch {s.gen_batch}, +{s.gen_new_tokens} tok)"
        lines.append(f"{title:<34}{m.generation_total / MiB:>12,.1f}  {parts}")
    where = "available RAM" if plan.device.kind == "cpu" else "usable (less CUDA context, 5% fragmentation)"
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines += ["", f"{verdict}: peak {gib(m.peak)} of {gib(plan.budget)} {where}"]
    for alt in plan.alternatives:
        mark = "fits" if alt["fits"] else "still too big"
        lines.append(f"  try {alt['change']}: {gib(alt['peak_bytes'])} ({mark})")
    if plan.alternatives and any(a["change"].startswith("data.max_length") for a in plan.alternatives):
        lines.append("  (a shorter data.max_length drops or cuts the rows longer than it; check with `sft data`)")
    flops = plan.flops
    lines.append(
        f"compute: {flops['model'] / 1e9:,.1f} GFLOP per optimizer step ({flops['tokens']:,.0f} tokens; LoRA formula "
        f"of BENCHMARKS.md), {flops['executed'] / 1e9:,.1f} GFLOP executed (recomputation, full masked attention)"
    )
    if plan.step_seconds is not None and plan.peak_flops:
        source = "measured" if plan.device.kind == "cpu" else "vendor"
        lines.append(
            f"time: {plan.step_seconds:,.3f} s per step at {plan.efficiency:.0%} (assumed) of the {source} "
            f"{s.compute} peak {plan.peak_flops / 1e12:,.2f} TFLOP/s"
        )
    if measured:
        lines += ["", format_measurement(plan, measured)]
    return "\n".join(lines)


def format_measurement(plan: Plan, measured: dict[str, Any]) -> str:
    predicted = plan.memory.train_total
    error = (predicted - measured["peak_bytes"]) / measured["peak_bytes"]
    lines = [
        f"measured ({measured['steps']} steps, {measured['kind']}, from just before the model is built):",
        f"  peak memory: predicted {predicted / MiB:,.1f} MiB, measured {measured['peak_bytes'] / MiB:,.1f} MiB "
        f"(error {error:+.1%})",
    ]
    if measured.get("step_seconds"):
        t = measured["step_seconds"][-1]
        err = f" (error {(plan.step_seconds - t) / t:+.0%})" if plan.step_seconds else ""
        lines.append(f"  last step: {t:.3f} s, predicted {plan.step_seconds or float('nan'):.3f} s{err}")
    return "\n".join(lines)


def run_plan(config_path: str, overrides: list[str], device: str | None, do_measure: bool, as_json: bool) -> int:
    from sft.config import load_config
    from sft.plan.measure import build_stand_in, measure_in_child  # not at the top: see sft/plan/measure.py's __main__

    if device is not None and device.lower() not in DEVICE_NAMES:
        raise SftError(f"--device {device!r}: unknown device; expected one of {', '.join(DEVICE_NAMES)}")
    config = load_config(config_path, overrides)
    if do_measure and device is not None and device.lower() != "cpu" and resolve_device(None).key != "cuda":
        raise SftError(f"--measure runs on this machine; it has no {device} (drop --device or use --device cpu)")
    if do_measure:
        build_stand_in(config)  # measuring builds the model anyway: plan with its real vocabulary
    plan = make_plan(config, device_name=device, config_name=config_path)
    measured = measure_in_child(config_path, overrides, plan) if do_measure else None
    if as_json:
        out = plan.to_json()
        if measured:
            out["measured"] = measured | {
                "relative_error": (plan.memory.train_total - measured["peak_bytes"]) / measured["peak_bytes"]
            }
        print(json.dumps(out, indent=2, default=str))
    else:
        print(format_plan(plan, measured))
    sys.stdout.flush()
    return 0
