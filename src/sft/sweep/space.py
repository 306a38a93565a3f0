"""The sweep file (pydantic, unknown keys rejected with a did-you-mean), its search space, each trial's overrides."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sft.config import apply_overrides, read_yaml, validate_config
from sft.errors import SftError, did_you_mean

EVAL_METRICS = ("loss", "perplexity", "token_accuracy", "exact_match", "token_f1", "rouge_l")
SPACE_FORMS = "expected a list of values, {low, high, log} or {choices: [...]}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Range(_Strict):
    """A continuous (or integer, when low and high are both integers) range for random search and TPE."""

    low: float | int
    high: float | int
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        return self

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


class Choices(_Strict):
    choices: list[Any] = Field(min_length=1)


class Objective(_Strict):
    metric: str = Field("eval.exact_match", description="eval.<held-out metric of the tuned model> or train.<key>")
    direction: Literal["maximize", "minimize"] = "maximize"

    @model_validator(mode="after")
    def _known_metric(self) -> Objective:
        section, _, name = self.metric.partition(".")
        if section == "eval" and name not in EVAL_METRICS:
            raise ValueError(
                f"unknown eval metric {name!r}{did_you_mean(name, set(EVAL_METRICS))}; one of {EVAL_METRICS}"
            )
        if section not in ("eval", "train") or not name:
            raise ValueError("expected eval.<metric> (e.g. eval.exact_match) or train.<metric> (e.g. train.train_loss)")
        return self


class Budget(_Strict):
    max_steps: int | None = Field(None, gt=0, description="Per trial: sets train.max_steps")
    seconds: float | None = Field(None, gt=0, description="Per trial: training stops after this many seconds")


class RayOptions(_Strict):
    address: str | None = Field(
        None, description="Cluster to join (e.g. auto, ray://host:10001); None: start a local one"
    )
    cpus_per_trial: float = Field(1, ge=0)
    gpus_per_trial: float = Field(0, ge=0)


class Output(_Strict):
    dir: str | None = Field(None, description="Sweep folder; default runs/sweeps/<sweep file name>")


class SweepFile(_Strict):
    base: str = Field(description="Run config the trials start from; relative to the current directory")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted.key: value applied to every trial")
    space: dict[str, list[Any] | Range | Choices] = Field(min_length=1)
    method: Literal["grid", "random", "tpe"] = "grid"
    trials: int | None = Field(None, gt=0, description="Number of trials (random, tpe)")
    seed: int = 0
    objective: Objective = Objective()
    budget: Budget = Budget()
    output: Output = Output()
    parallel: int = Field(1, ge=1, description="Trials at a time, one per CUDA device; sequential on CPU")
    launch: str | None = Field(
        None, description="Launcher before `-m sft train`, e.g. accelerate launch --num_processes 2"
    )
    executor: Literal["local", "ray"] = Field("local", description="ray: each trial is a Ray task (extra `ray`)")
    ray: RayOptions = RayOptions()

    @model_validator(mode="after")
    def _method_fits_space(self) -> SweepFile:
        for key, values in self.space.items():
            if isinstance(values, list) and not values:
                raise ValueError(f"space.{key}: empty list of values")
            if self.method == "grid" and isinstance(values, Range):
                raise ValueError(f"space.{key}: grid needs a list of values, got a range (use method: random or tpe)")
        if self.method != "grid" and self.trials is None:
            raise ValueError(f"method {self.method} needs trials: N")
        return self


def load_sweep(path: Path, overrides: list[str]) -> SweepFile:
    """The sweep file, with `key=value` overrides of its own keys (trials=8, budget.max_steps=50, method=random)."""
    raw = apply_overrides(read_yaml(path), overrides)
    try:
        return SweepFile.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = [str(p) for p in e["loc"]]
            if loc[:1] == ["space"] and len(loc) > 2:  # report the form the value was meant as, not all three
                given = (raw.get("space") or {}).get(loc[1])
                if not isinstance(given, (list, dict)):
                    problems.append(f"space.{loc[1]}: {SPACE_FORMS}")
                    continue
                meant = "list[" if isinstance(given, list) else "Choices" if "choices" in given else "Range"
                if meant not in loc[2]:
                    continue
                loc = loc[:2] + loc[3:]
            key = ".".join(loc) or "<top level>"
            if e["type"] == "extra_forbidden":
                section = {"objective": Objective, "budget": Budget, "output": Output, "ray": RayOptions}.get(loc[0])
                options = SweepFile if len(loc) == 1 else section if section and len(loc) == 2 else None
                known = set(options.model_fields) if options else {"low", "high", "log"} if loc[0] == "space" else set()
                problems.append(f"{key}: unknown key{did_you_mean(loc[-1], known) if known else ''}")
            elif e["type"] == "missing":
                problems.append(f"{key}: required key is missing")
            else:
                problems.append(f"{key}: {e['msg'].removeprefix('Value error, ')}")
        problems = list(dict.fromkeys(problems))
        listing = "\n".join(f"  - {p}" for p in problems)
        raise SftError(
            f"{path}: {len(problems)} problem(s) in the sweep file (keys: {', '.join(SweepFile.model_fields)}):\n"
            f"{listing}"
        ) from None


def yaml_value(value: Any) -> str:
    """A value as the right-hand side of a `key=value` override (parsed back as YAML by `sft train`)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("...").strip()


def trial_overrides(sweep: SweepFile, params: dict[str, Any]) -> list[str]:
    fixed = {**sweep.overrides}
    if sweep.budget.max_steps is not None:
        fixed["train.max_steps"] = sweep.budget.max_steps
    return [f"{k}={yaml_value(v)}" for k, v in {**fixed, **params}.items()]


def trial_hash(base_text: str, overrides: list[str], seconds: float | None, launch: str | None) -> str:
    launched = {"launch": launch} if launch else {}
    blob = json.dumps({"base": base_text, "overrides": overrides, "seconds": seconds, **launched})
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def check_trial(base: Path, base_raw: dict, overrides: list[str], label: str) -> None:
    """Build the trial's run config exactly as `sft train` will, so a typo fails before anything runs."""
    raw = apply_overrides(json.loads(json.dumps(base_raw)), overrides)
    try:
        validate_config(raw, source=f"{base} + {label}")
    except SftError as err:
        raise SftError(f"sweep trial {label} is not a valid run config: {err}") from None


def grid(space: dict[str, Any]) -> list[dict[str, Any]]:
    values = [v.choices if isinstance(v, Choices) else v for v in space.values()]
    return [dict(zip(space, combo)) for combo in itertools.product(*values)]


def sample(space: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    params = {}
    for key, spec in space.items():
        if isinstance(spec, Range):
            if spec.integer:
                params[key] = rng.randint(int(spec.low), int(spec.high))
            elif spec.log:
                params[key] = math.exp(rng.uniform(math.log(spec.low), math.log(spec.high)))
            else:
                params[key] = rng.uniform(spec.low, spec.high)
        else:
            params[key] = rng.choice(spec.choices if isinstance(spec, Choices) else spec)
    return params


def _values(spec: Any) -> list[Any]:
    if isinstance(spec, Range):
        return [spec.low, spec.high]
    return spec.choices if isinstance(spec, Choices) else spec


def corners(space: dict[str, Any]) -> list[dict[str, Any]]:
    """For TPE (trials not known up front): every listed value and both ends of every range, one key at a time."""
    first = {k: _values(v)[0] for k, v in space.items()}
    return [first, *[{**first, key: v} for key, spec in space.items() for v in _values(spec)]]


def short(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def params_label(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={short(v)}" for k, v in params.items())
