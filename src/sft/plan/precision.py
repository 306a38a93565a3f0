"""bf16 autocast or fp32 on a CPU, chosen by timing one of the model's own layers both ways; cached per machine."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from sft.plan.devices import cpu_name
from sft.plan.shape import ModelShape, Settings


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "sft" / "precision.json"


BF16_MARGIN = 0.9  # bf16 autocast on a CPU must be at least 10% faster than fp32 to be chosen


def choose_cpu_precision(shape: ModelShape, s: Settings) -> tuple[str, str]:
    """bf16 autocast or fp32 on this CPU, by timing forward + backward of one of the model's own decoder layers
    (with LoRA, at this run's tokens per micro-batch) in both; cached per machine, torch version and shape.

    bf16 autocast speeds up large matmuls on CPUs with AMX or AVX512-BF16 and slows down small, overhead-bound
    models (every op casts its inputs), so neither is right everywhere."""
    import torch

    if not _cpu_has_bf16_kernels():
        # Without oneDNN's bf16 kernels (no AVX512-BF16 / AMX) a bf16 matmul falls back to a scalar loop: ~0.07
        # GFLOP/s against ~20 in fp32 on a 2-core AVX2 EPYC, so the probe alone would take minutes per layer.
        capability = torch.backends.cpu.get_cpu_capability()
        return "fp32", f"this CPU has no bf16 matmul kernels ({capability}): fp32, not probed"
    tokens = min(s.tokens, 2048)
    key = "|".join(
        str(x)
        for x in (
            cpu_name(),
            torch.__version__,
            torch.get_num_threads(),
            shape.model_type,
            shape.hidden,
            shape.intermediate,
            shape.heads,
            shape.kv_heads,
            shape.head_dim,
            s.lora_r,
            len(s.lora_roles),
            tokens,
            s.attention,
        )
    )
    cache = _cache_file()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        hit = known[key]
        return hit["choice"], _precision_reason(hit, cached=True)
    timing = _probe_layer(shape, s, tokens)
    # bf16 changes the arithmetic: worth it only for a clear gain, not for a difference within timing noise
    timing["choice"] = "bf16" if timing["bf16_s"] < BF16_MARGIN * timing["fp32_s"] else "fp32"
    known[key] = timing
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home: measured again next time
    return timing["choice"], _precision_reason(timing, cached=False)


def _cpu_has_bf16_kernels() -> bool:
    """Whether torch can run bf16 matmuls with oneDNN's kernels on this CPU (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the check: let the probe decide
        return True


def _precision_reason(timing: dict, cached: bool) -> str:
    how = "measured earlier on this machine" if cached else "measured now"
    return (
        f"{timing['what']} forward+backward: bf16 autocast {timing['bf16_s'] * 1e3:.1f} ms, fp32 "
        f"{timing['fp32_s'] * 1e3:.1f} ms ({how}; cache {_cache_file()})"
    )


def _probe_layer(shape: ModelShape, s: Settings, tokens: int) -> dict[str, Any]:
    """Best time of forward + backward through one decoder layer of the model's shape with LoRA, in fp32 and in
    bf16 autocast (A B A B ...); layers too big to time in well under a second are timed at fewer tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    layer_params = shape.decoder_linear_params // max(shape.layers, 1)
    # about 0.1 s of fp32 work per run at ~100 GFLOP/s: 6 FLOPs a parameter a token (forward, backward)
    tokens = max(16, min(tokens, int(1e10 / (6 * layer_params))))
    config = AutoConfig.for_model(
        "llama",
        vocab_size=64,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=1,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=max(tokens, 64),
    )
    import sft.model.attention  # noqa: F401  (registers sdpa_packed)

    config._attn_implementation = "sdpa_packed" if s.attention == "sdpa_packed" else "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.02)  # values do not change the speed; random init of a big layer would take seconds
    roles = list(s.lora_roles) or ["q_proj"]
    model = get_peft_model(model, LoraConfig(r=s.lora_r, target_modules=roles, task_type="CAUSAL_LM"))
    x = torch.randn(1, tokens, shape.hidden) * 0.1
    position_ids = torch.arange(tokens)[None]
    if s.padding_free:  # two documents in the row, as packed: sdpa with a block-diagonal mask, sdpa_packed per document
        position_ids = torch.cat([torch.arange(tokens // 2), torch.arange(tokens - tokens // 2)])[None]

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model.base_model.model.model(inputs_embeds=x, position_ids=position_ids).last_hidden_state
        out.float().square().mean().backward()
        return time.perf_counter() - start

    step(False), step(True)  # warm-up: kernel selection, AMX tile setup
    runs: dict[bool, list[float]] = {False: [], True: []}
    deadline = time.perf_counter() + 0.4
    while len(runs[True]) < 2 or (time.perf_counter() < deadline and len(runs[True]) < 9):
        for bf16 in (False, True):
            runs[bf16].append(step(bf16))
    return {  # the fastest run of each: other processes on the machine only ever add time
        "fp32_s": min(runs[False]),
        "bf16_s": min(runs[True]),
        "what": f"one decoder layer (d={shape.hidden}, LoRA r={s.lora_r}) at {tokens} tokens,",
    }
