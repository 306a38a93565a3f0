"""The plan of a run on a device, and the choices `sft train` makes from it.

`auto_settings` is what `sft train` uses: bf16 vs fp32 on a CPU chosen by a measured probe (cached per machine),
and activation checkpointing only when the plan says the run would not fit without it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any

from sft.config import RunConfig
from sft.plan.devices import Device, bf16_gpu, budget_of, gib, resolve_device
from sft.plan.flops import EFFICIENCY, cpu_peak, flops_per_step
from sft.plan.memory import Memory, predict_memory
from sft.plan.precision import choose_cpu_precision
from sft.plan.shape import ModelShape, Settings, model_shape, read_model_config, settings_for, train_value


@dataclass
class Plan:
    config_name: str
    device: Device
    shape: ModelShape
    settings: Settings
    memory: Memory
    flops: dict[str, float]
    step_seconds: float | None
    peak_flops: float | None
    efficiency: float | None
    precision_reason: str
    checkpointing_reason: str
    fits: bool
    budget: int
    alternatives: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        m = self.memory
        return {
            "config": self.config_name,
            "device": {
                "key": self.device.key,
                "name": self.device.name,
                "kind": self.device.kind,
                "memory_bytes": self.device.memory,
                "budget_bytes": self.budget,
            },
            "model": dataclasses.asdict(self.shape) | {"params": self.shape.params},
            "settings": dataclasses.asdict(self.settings) | {"tokens_per_micro_batch": self.settings.tokens},
            "memory": {
                "train_peak_bytes": m.train_total,
                "train": m.train,
                "train_notes": m.train_notes,
                "eval_peak_bytes": m.eval_total,
                "eval": m.evaluation,
                "generation_peak_bytes": m.generation_total,
                "generation": m.generation,
                "peak_bytes": m.peak,
                "activation_bytes_per_token": m.activations_per_token,
                "activation_bytes_per_token_checkpointed": m.activations_per_token_checkpointed,
            },
            "flops_per_step": self.flops["model"],
            "flops_executed_per_step": self.flops["executed"],
            "tokens_per_step": self.flops["tokens"],
            "peak_flops": self.peak_flops,
            "assumed_efficiency": self.efficiency,
            "seconds_per_step": self.step_seconds,
            "precision_reason": self.precision_reason,
            "checkpointing_reason": self.checkpointing_reason,
            "fits": self.fits,
            "alternatives": self.alternatives,
        }


def make_plan(
    config: RunConfig,
    model_config: Any = None,
    device_name: str | None = None,
    config_name: str = "config",
    source: str = "config.json",
    auto: dict[str, Any] | None = None,
) -> Plan:
    """The plan of a run on a device (this machine when None), with the precision and checkpointing `sft train`
    would use there."""
    if model_config is None:
        model_config, source = read_model_config(config)
    shape = model_shape(model_config, source)
    device = resolve_device(device_name)
    if auto is None:
        auto, _ = _decide(config, shape, device)
    compute = "bf16" if train_value(config, "bf16", auto) or train_value(config, "fp16", auto) else "fp32"
    checkpointing = bool(train_value(config, "activation_checkpointing", auto))
    s = settings_for(config, shape, device, compute, checkpointing)
    memory = predict_memory(shape, s)
    flops = flops_per_step(shape, s)
    peak = device.peak_flops.get(compute)
    if device.kind == "cpu":
        peak = cpu_peak(compute)
    efficiency = EFFICIENCY["cuda"] if device.kind == "cuda" else EFFICIENCY[("cpu", compute)]
    seconds = flops["executed"] / (peak * efficiency) if peak else None
    budget = budget_of(device)
    plan = Plan(
        config_name=config_name,
        device=device,
        shape=shape,
        settings=s,
        memory=memory,
        flops=flops,
        step_seconds=seconds,
        peak_flops=peak,
        efficiency=efficiency,
        precision_reason=auto.get("_precision_reason", "set in the config" if _user_set_precision(config) else ""),
        checkpointing_reason=auto.get("_checkpointing_reason", "set in the config"),
        fits=memory.peak <= budget,
        budget=budget,
    )
    if not plan.fits:
        plan.alternatives = alternatives(shape, s, budget)
    return plan


def _user_set_precision(config: RunConfig) -> bool:
    return "bf16" in config.train or "fp16" in config.train


def _decide(config: RunConfig, shape: ModelShape, device: Device) -> tuple[dict[str, Any], list[str]]:
    """Precision and checkpointing for the train options the config leaves unset, with the reasons."""
    auto: dict[str, Any] = {}
    lines: list[str] = []
    if not _user_set_precision(config):
        if device.kind == "cuda" and not bf16_gpu(device):
            auto["bf16"] = False
            auto["_precision_reason"] = f"fp32: {device.name} has no bf16"
        elif device.kind == "cuda":
            auto["bf16"] = True
            auto["_precision_reason"] = "bf16 on a CUDA device that supports it"
        elif config.train.get("use_cpu") is False and device.key == "cpu":
            auto["bf16"] = False  # TRL allows bf16 on a CPU-only machine only with use_cpu
            auto["_precision_reason"] = "fp32: the config sets train.use_cpu=false, which TRL needs for bf16 on a CPU"
        elif config.model.dtype in ("auto", "float32") and device.key == "cpu":
            probe_settings = settings_for(config, shape, device, "fp32", False)
            choice, reason = choose_cpu_precision(shape, probe_settings)
            auto["bf16"] = choice == "bf16"
            if choice == "bf16":
                auto["use_cpu"] = True  # TRL refuses bf16 on a CPU-only machine unless told to use the CPU
            auto["_precision_reason"] = reason
        lines.append(f"precision: {'bf16 autocast' if auto.get('bf16') else 'fp32'} ({auto.get('_precision_reason')})")
    if "activation_checkpointing" not in config.train and "gradient_checkpointing" not in config.train:
        compute = "bf16" if auto.get("bf16") or train_value(config, "bf16") else "fp32"
        budget = budget_of(device)
        without = predict_memory(shape, settings_for(config, shape, device, compute, False)).peak
        with_ckpt = predict_memory(shape, settings_for(config, shape, device, compute, True)).peak
        where = f"{gib(budget)} {'available RAM' if device.kind == 'cpu' else 'usable on ' + device.name}"
        if without <= budget:
            auto["activation_checkpointing"] = False
            reason = f"the plan's peak without it is {gib(without)} of {where}"
        elif with_ckpt <= budget:
            auto["activation_checkpointing"] = True
            reason = f"without it the peak would be {gib(without)}, with it {gib(with_ckpt)}, of {where}"
        else:
            auto["activation_checkpointing"] = True
            reason = f"still not enough: {gib(with_ckpt)} with it ({gib(without)} without) of {where}"
            lines.append(
                f"warning: the plan predicts this run will not fit: {gib(with_ckpt)} at its peak even with "
                f"activation checkpointing, {where}; run `sft plan` for what to change"
            )
        auto["_checkpointing_reason"] = reason
        lines.insert(
            len(lines) - (1 if lines and lines[-1].startswith("warning") else 0),
            f"activation checkpointing: {'on' if auto['activation_checkpointing'] else 'off'} ({reason})",
        )
    return auto, lines


def auto_settings(config: RunConfig, model_config: Any) -> tuple[dict[str, Any], list[str]]:
    """SFTConfig values for options the config's `train` section leaves unset, and log lines saying why.

    - `bf16` (and `use_cpu`, which TRL needs for bf16 on a CPU): on CUDA when supported; on a CPU by a measured
      probe of one of the model's layers in both precisions (cached);
    - `activation_checkpointing`: only when the plan says the run would not fit without it.
    A run that will not fit even with checkpointing gets a warning line (starting with "warning:"), not an error.
    """
    auto, lines = _decide(config, model_shape(model_config), resolve_device(None))
    return {k: v for k, v in auto.items() if not k.startswith("_")}, lines


def will_fit(config: RunConfig, model_config: Any) -> tuple[bool, str]:
    """Whether the run fits this machine at its predicted peak, and a one-line account of it."""
    plan = make_plan(config, model_config)
    line = (
        f"plan: peak {gib(plan.memory.peak)} ({gib(plan.memory.train_total)} training) of "
        f"{gib(plan.budget)} {'available RAM' if plan.device.kind == 'cpu' else 'on ' + plan.device.name}"
    )
    return plan.fits, line


def alternatives(shape: ModelShape, s: Settings, budget: int) -> list[dict[str, Any]]:
    """What to change, each with its predicted peak: single changes that fit on their own, then one combination
    built greedily (each step shrinks whichever phase - training, evaluation, generation - is the largest)."""
    singles: list[Settings] = []
    if not s.checkpointing:
        singles.append(replace(s, checkpointing=True))
    if s.batch > 1:
        singles.append(replace(s, batch=s.batch // 2, accumulation=s.accumulation * 2))
    if s.device == "cuda" and not s.load_in_4bit:
        singles.append(replace(s, load_in_4bit=True))
    if s.max_length > 256:
        singles.append(replace(s, max_length=s.max_length // 2))
    if s.eval_enabled and s.eval_batch > 1:
        singles.append(replace(s, eval_batch=1))
    if s.gen_batch > 1:
        singles.append(replace(s, gen_batch=1))
    rows = []
    for changed in singles:
        peak = predict_memory(shape, changed).peak
        if peak <= budget:
            rows.append({"change": _overrides(s, changed), "peak_bytes": peak, "fits": True})
    current = s
    for _ in range(64):
        memory = predict_memory(shape, current)
        if memory.peak <= budget:
            break
        nxt = _shrink(current, memory)
        if nxt is None:
            break
        current = nxt
    if current != s and not any(r["change"] == _overrides(s, current) for r in rows):
        peak = predict_memory(shape, current).peak
        rows.append({"change": _overrides(s, current), "peak_bytes": peak, "fits": peak <= budget})
    return rows


def _shrink(s: Settings, memory: Memory) -> Settings | None:
    """One step smaller for the largest phase, cheapest change first (in compute and in what is learnt)."""
    phase = max(
        ("train", memory.train_total),
        ("eval", memory.eval_total),
        ("generation", memory.generation_total),
        key=lambda p: p[1],
    )[0]
    quantize = s.device == "cuda" and not s.load_in_4bit
    if phase == "train":
        if not s.checkpointing:
            return replace(s, checkpointing=True)
        if s.batch > 1:
            return replace(s, batch=s.batch // 2, accumulation=s.accumulation * 2)
    elif phase == "eval" and s.eval_batch > 1:
        return replace(s, eval_batch=s.eval_batch // 2)
    elif phase == "generation" and s.gen_batch > 1:
        return replace(s, gen_batch=s.gen_batch // 2)
    if quantize:
        return replace(s, load_in_4bit=True)
    if s.max_length > 256:
        return replace(s, max_length=s.max_length // 2)
    return None


def _overrides(before: Settings, after: Settings) -> str:
    """The dotted overrides that turn one settings into the other."""
    changes = []
    if after.checkpointing != before.checkpointing:
        changes.append(f"train.activation_checkpointing={str(after.checkpointing).lower()}")
    if after.batch != before.batch:
        changes.append(f"train.per_device_train_batch_size={after.batch}")
        changes.append(f"train.gradient_accumulation_steps={after.accumulation}")
    if after.load_in_4bit != before.load_in_4bit:
        changes.append("model.load_in_4bit=true")
    if after.max_length != before.max_length:
        changes.append(f"data.max_length={after.max_length}")
    if after.eval_batch != before.eval_batch:
        changes.append(f"train.per_device_eval_batch_size={after.eval_batch}")
    if after.gen_batch != before.gen_batch:
        changes.append(f"eval.batch_size={after.gen_batch}")
    return " ".join(changes)
