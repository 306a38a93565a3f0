"""The FLOP/time model: FLOPs of an optimizer step (BENCHMARKS.md's LoRA formula) and what the kernels execute."""

from __future__ import annotations

from sft.plan.shape import ModelShape, Settings, lora_params

# Assumed share of the peak matmul rate a LoRA step reaches: GPUs as torchtitan's 8B runs (33-39% MFU); CPUs as
# measured here for an 8-layer d=512 model (fp32 ~51%, bf16 ~18% of the measured matmul peak; see BENCHMARKS.md).
EFFICIENCY = {"cuda": 0.35, ("cpu", "fp32"): 0.5, ("cpu", "bf16"): 0.2}


def flops_per_step(shape: ModelShape, s: Settings) -> dict[str, float]:
    """BENCHMARKS.md's LoRA formula per token, times the tokens of one optimizer step; and what is executed."""
    n_dec = shape.decoder_linear_params
    n_lora = lora_params(shape, s)
    doc = s.max_length  # documents are at most max_length tokens: causal attention is not discounted
    attention = 12 * shape.layers * shape.q_dim * doc
    # The head scores labelled positions only (sft.model.loss; TRL's on a GPU), every position with TRL's head on a CPU:
    # counted for every token here (the worst case).
    head = 4 * shape.vocab * shape.hidden
    per_token = 4 * n_dec + 6 * n_lora + attention + head
    tokens = s.tokens * s.accumulation
    model = per_token * tokens
    executed = model
    if s.padding_free and s.attention in ("sdpa", "eager"):
        # with a dense mask the kernel computes the whole T x T block, not each document's own triangle
        executed += 12 * shape.layers * shape.q_dim * (s.tokens - doc) * tokens
    if s.checkpointing:  # the forward runs again during backward
        executed += (2 * n_dec + 2 * n_lora + 4 * shape.layers * shape.q_dim * doc) * tokens
    if not s.labelled_head:  # TRL's fused head recomputes each logits tile in backward
        executed += 2 * shape.vocab * shape.hidden * tokens
    return {"model": float(model), "executed": float(executed), "tokens": float(tokens)}


_PEAKS: dict[str, float] = {}


def cpu_peak(compute: str) -> float:
    """This CPU's large-matmul rate in the compute dtype, measured once per process (0.3 s)."""
    import torch

    from sft.hardware import matmul_peak

    if compute not in _PEAKS:
        _PEAKS[compute] = matmul_peak(torch.bfloat16 if compute == "bf16" else torch.float32, seconds=0.3)
    return _PEAKS[compute]
