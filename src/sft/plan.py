"""`sft plan`: peak memory, FLOPs and time per step of a run, predicted from the model's config.json alone.

Nothing here loads weights. The memory model counts what this stack really allocates (torch 2.13, transformers 5,
peft 0.21, TRL 1.16), read from their source and checked tensor by tensor against training steps:

- weights in the load dtype; QLoRA: 4-bit decoder linears with their block constants, and every other parameter
  (embeddings, LM head, norms) upcast to fp32 by peft's `prepare_model_for_kbit_training`;
- LoRA parameters, their gradients and AdamW's two moments, all fp32 (peft upcasts adapters): 16 bytes a parameter;
- activations saved for backward, per layer and token, for fp32 or bf16 autocast (see `_layer_bytes`), and with
  activation checkpointing only each layer's input plus one layer recomputed during backward;
- the attention mask of padding-free packed rows: sdpa turns the boolean T x T block-diagonal mask into an additive
  float one in every layer and keeps it for backward, so it grows with the square of the tokens per micro-batch
  (`sdpa_packed`, the default where the model allows it, builds none);
- the training loss: sft.loss's labelled-positions head holds one chunk of logits (about 16M) and the hidden
  states' gradient; where it does not apply, TRL's fused LM head: on a GPU (Triton) one [4096 x 32768] tile,
  elsewhere its torch fallback about eight fp32 [tokens x vocab] arrays (tiles of at most 4096 x 32768) in backward;
  evaluation always runs TRL's head;
- evaluation (no saved activations) and generation (KV cache) as separate phases.

`auto_settings` is what `sft train` uses: bf16 vs fp32 on a CPU chosen by a measured probe (cached per machine),
and activation checkpointing only when the plan says the run would not fit without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sft.config import RunConfig
from sft.errors import SftError

GiB, MiB = 2**30, 2**20
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Fused projections of some families (Phi-3, ...) stand for several roles.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

# TRL's fused LM head (trl/kernels/chunked_logprob.py): tiles of at most 4096 tokens x 32768 vocabulary columns.
HEAD_TOKENS, HEAD_VOCAB = 4096, 32768
# Its torch fallback (no Triton: CPUs) holds, during backward, the tile plus these [tokens x vocab] arrays: the fp32
# logits, scaled logits, log-probs, probs, gradient, target one-hot (fp32), its difference with the probs (7 fp32)
# and the boolean target mask; the forward holds about five.
HEAD_BWD_BYTES, HEAD_FWD_BYTES = 7 * 4 + 1, 5 * 4 + 1
# What a CPU training process holds besides tensors, by compute dtype: measured as the peak of two steps of a
# 1-layer d=64 model (tensors: 2 MiB) in a fresh process after the warm-up `measure` does (so torch's code pages are
# already resident), less what the plan counts for it: model, peft, Trainer and dataloader objects, the packed Arrow
# dataset, OpenMP/oneDNN thread pools and kernel caches; bf16 autocast JIT-compiles more oneDNN kernels.
CPU_RUNTIME = {"fp32": 6 * MiB, "bf16": 15 * MiB}
# glibc malloc serves blocks under its dynamic mmap threshold (which rises to at most 32 MiB as blocks are freed)
# from its heap, and the heap never shrinks below its highest live block. Through the forward pass it grows layer by
# layer: the temporaries each layer frees (base-layer and LoRA outputs before their sum, RoPE halves, casts) leave
# holes between the tensors kept for backward (or the layer checkpoints) that later, differently sized requests do
# not fill. Watched with mallinfo2 over training steps (fp32 and bf16, with and without checkpointing, d=128 and
# d=512): the heap's free bytes at the step's peak are 0.6-1.15x what one forward pass allocates for its saved
# activations and masks, more in fp32 than under bf16 autocast and less with checkpointing (a checkpointed layer
# frees its temporaries before the next one allocates). The factors below are fitted to `sft plan --measure` on
# configs/tiny.yaml and a d=512, 8-layer Llama at 1k-2k tokens (nine runs; README gives the errors, and those of runs
# not used for the fit). (MALLOC_MMAP_THRESHOLD_=65536 would remove the retention, at the cost of page faults.)
GLIBC_RETENTION = {("fp32", False): 1.15, ("fp32", True): 1.0, ("bf16", False): 0.64, ("bf16", True): 0.44}
GLIBC_MMAP_MAX = 32 * MiB
# A CUDA process: the context and cuBLAS/cuDNN workspaces sit outside PyTorch's allocator.
CUDA_CONTEXT = 600 * MiB
# The caching allocator reserves more than it hands out (block rounding, fragmentation).
CUDA_FRAGMENTATION = 0.05
# Assumed share of the peak matmul rate a LoRA step reaches: GPUs as torchtitan's 8B runs (33-39% MFU); CPUs as
# measured here for an 8-layer d=512 model (fp32 ~51%, bf16 ~18% of the measured matmul peak; see BENCHMARKS.md).
EFFICIENCY = {"cuda": 0.35, ("cpu", "fp32"): 0.5, ("cpu", "bf16"): 0.2}


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    kind: str  # "cuda" or "cpu"
    memory: int  # bytes a run may use: GPU memory, or RAM available now
    peak_flops: dict[str, float]  # dtype -> FLOP/s
    peak_source: str = "vendor dense peak"


# nvidia-smi totals, and the vendor bf16 dense peaks of BENCHMARKS.md.
GPUS = {
    "h100": Device("h100", "NVIDIA H100 80GB (SXM)", "cuda", 81559 * MiB, {"bf16": 989e12, "fp32": 67e12}),
    "h200": Device("h200", "NVIDIA H200 141GB (SXM)", "cuda", 143771 * MiB, {"bf16": 989e12, "fp32": 67e12}),
    "a100": Device("a100", "NVIDIA A100 80GB", "cuda", 81920 * MiB, {"bf16": 312e12, "fp32": 19.5e12}),
    "a100-40gb": Device("a100-40gb", "NVIDIA A100 40GB", "cuda", 40960 * MiB, {"bf16": 312e12, "fp32": 19.5e12}),
    "l4": Device("l4", "NVIDIA L4 24GB", "cuda", 23034 * MiB, {"bf16": 121e12, "fp32": 30e12}),
}
DEVICE_NAMES = (*GPUS, "cpu")


@dataclass(frozen=True)
class ModelShape:
    """What memory and FLOPs depend on, from a decoder-only config.json."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    source: str
    packed_attention: bool = True  # every layer plain causal attention: `auto` runs sdpa_packed (sft.attention)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection of one decoder layer."""
        d, i = self.hidden, self.intermediate
        return {
            "q_proj": (d, self.q_dim),
            "k_proj": (d, self.kv_dim),
            "v_proj": (d, self.kv_dim),
            "o_proj": (self.q_dim, d),
            "gate_proj": (d, i),
            "up_proj": (d, i),
            "down_proj": (i, d),
        }

    @property
    def decoder_linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def other_params(self) -> int:
        """Embeddings, an untied LM head and the norms: what QLoRA leaves unquantized."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.decoder_linear_params + self.other_params


def model_shape(model_config: Any, source: str = "config.json") -> ModelShape:
    """The shapes of a decoder-only model from its (text) config; a clear error when they are not there."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [f for f in fields if getattr(text, f, None) is None]
    if missing:
        raise SftError(
            f"{source}: no {', '.join(missing)}; `sft plan` needs a decoder-only transformer config "
            "(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size)"
        )
    from sft.attention import supports_packed

    heads = text.num_attention_heads
    return ModelShape(
        model_type=getattr(text, "model_type", "?"),
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        tied=bool(getattr(model_config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", False))),
        source=source,
        packed_attention=supports_packed(model_config),
    )


def read_model_config(config: RunConfig) -> tuple[Any, str]:
    """config.json of the model, or the stand-in's when `model.tiny` will build it; and where it came from."""
    from sft.model import load_model_config

    path = Path(config.model.name_or_path)
    if not path.exists() and config.model.tiny is not None:
        from sft.demo import stand_in_config

        return stand_in_config(config.model.tiny), "model.tiny (stand-in not built yet; vocabulary at most)"
    return load_model_config(config.model), str(path / "config.json") if path.is_dir() else config.model.name_or_path


# Settings


@dataclass(frozen=True)
class Settings:
    """Everything about a run that changes its memory or compute."""

    device: str  # "cuda" or "cpu"
    compute: str  # "fp32" or "bf16" (autocast, or bf16 weights)
    weight_bytes: int  # 4 or 2, of the parameters as loaded
    load_in_4bit: bool
    double_quant: bool
    batch: int  # rows per micro-batch
    accumulation: int
    max_length: int
    packing: bool
    padding_free: bool
    checkpointing: bool
    attention: str
    eval_batch: int
    eval_enabled: bool
    gen_batch: int
    gen_new_tokens: int
    lora_r: int
    lora_roles: tuple[str, ...]
    use_dora: bool
    full_modules: tuple[str, ...]  # modules_to_save trained in full (embed_tokens, lm_head)
    labelled_head: bool = True  # training's loss is sft.loss's (a frozen LM head); else TRL's fused head

    @property
    def tokens(self) -> int:
        """Tokens in one forward pass: packed rows are flattened into one row (padding-free); others pad to the
        longest row, at most max_length."""
        return self.batch * self.max_length

    @property
    def single_row(self) -> bool:
        return self.padding_free

    def describe(self) -> str:
        layout = (
            "packed, padding-free"
            if self.packing and self.padding_free
            else "packed"
            if self.packing
            else ("padding-free" if self.padding_free else "padded to the longest row")
        )
        return (
            f"{self.batch} rows x {self.max_length} tokens = {self.tokens:,} tokens per micro-batch ({layout}), "
            f"x{self.accumulation} accumulation = {self.tokens * self.accumulation:,} tokens per optimizer step"
        )


def _trl_default(name: str) -> Any:
    from trl import SFTConfig

    found = {f.name: f for f in dataclasses.fields(SFTConfig)}[name]
    return found.default if found.default is not dataclasses.MISSING else found.default_factory()


def train_value(config: RunConfig, name: str, auto: dict[str, Any] | None = None) -> Any:
    """A train option as the run will see it: the config's train section, else auto settings, else this
    pipeline's defaults, else TRL's."""
    from sft.train import defaults

    if name == "activation_checkpointing" and "gradient_checkpointing" in config.train:
        return config.train["gradient_checkpointing"]
    for source in (config.train, auto or {}, defaults()):
        if name in source:
            return source[name]
    return _trl_default(name)


def lora_roles(target_modules: str | list[str]) -> tuple[str, ...]:
    if target_modules == "all-linear":
        return ROLES
    names = [target_modules] if isinstance(target_modules, str) else target_modules
    roles = {role for name in names for role in FUSED.get(name.split(".")[-1], (name.split(".")[-1],))}
    return tuple(r for r in ROLES if r in roles)


def settings_for(config: RunConfig, shape: ModelShape, device: Device, compute: str, checkpointing: bool) -> Settings:
    packing = bool(train_value(config, "packing"))
    strategy = train_value(config, "packing_strategy")
    padding_free = bool(train_value(config, "padding_free")) or (packing and strategy in ("bfd", "bfd_split"))
    dtype = config.model.dtype
    weight_bytes = 4 if dtype == "float32" or (dtype == "auto" and device.kind == "cpu") else 2
    eval_batch = int(train_value(config, "per_device_eval_batch_size"))
    eval_strategy = str(train_value(config, "eval_strategy"))
    full_modules = tuple(m for m in (config.adapter.modules_to_save or []) if m in ("embed_tokens", "lm_head"))
    return Settings(
        device=device.kind,
        compute=compute,
        weight_bytes=weight_bytes,
        load_in_4bit=config.model.load_in_4bit,
        double_quant=config.model.bnb_4bit_use_double_quant,
        batch=int(train_value(config, "per_device_train_batch_size")),
        accumulation=int(train_value(config, "gradient_accumulation_steps")),
        max_length=config.data.max_length,
        packing=packing,
        padding_free=padding_free,
        checkpointing=checkpointing,
        attention=_attention(config.model.attn_implementation, shape),
        eval_batch=eval_batch,
        eval_enabled=eval_strategy not in ("no", "IntervalStrategy.NO"),
        gen_batch=config.eval.batch_size if config.eval.enabled else 0,
        gen_new_tokens=config.eval.max_new_tokens,
        lora_r=config.adapter.r,
        lora_roles=lora_roles(config.adapter.target_modules),
        use_dora=config.adapter.use_dora,
        full_modules=full_modules,
        labelled_head=not ("lm_head" in full_modules or (shape.tied and "embed_tokens" in full_modules)),
    )


def _attention(requested: str, shape: ModelShape) -> str:
    if requested == "auto":
        return "sdpa_packed" if shape.packed_attention else "sdpa"
    return requested


# Memory


def _layer_bytes(shape: ModelShape, s: Settings, masked: bool) -> tuple[int, int]:
    """Bytes one decoder layer saves for backward, per token (Llama-style layer, LoRA on `s.lora_roles`).

    fp32: LoRA's A sees the very tensor the frozen base layer sees, so inputs are shared: the two norms' inputs
    (the residual stream) and outputs, q/k after RoPE, v, the attention output, gate, up, silu(gate), the MLP
    product when down_proj has LoRA, and each LoRA A output (r wide). bf16 autocast: every LoRA A keeps its own bf16
    copy of its input (peft casts it to the fp32 adapter dtype, autocast back to bf16); the residual stream stays
    fp32 where the norms keep it. Returned in two parts: intermediate-wide tensors, and the rest (hidden-wide or
    narrower), because the allocator treats blocks by size.
    """
    d, i, r, h = shape.hidden, shape.intermediate, s.lora_r, shape.heads
    roles = set(s.lora_roles)
    # With a mask, sdpa cannot use grouped-query attention natively: transformers repeats k and v to all heads.
    kv = shape.q_dim if (masked and shape.kv_heads < shape.heads and s.attention.startswith("sdpa")) else shape.kv_dim
    attention = shape.q_dim + 2 * kv + shape.q_dim  # q, k (after RoPE), v, output
    mlp = 3 * i  # gate, up, silu(gate)
    lora_out = r * len(roles)
    norms_in = 2 * d * 4  # the residual stream entering both norms, fp32 on a CPU (and upcast by the norm on GPU)
    stats = 2 * 4 + 4 * h  # rsqrt of both norms, attention log-sum-exp per head
    wide = mlp + (i if "down_proj" in roles else 0)  # with down_proj's LoRA, its input (or a copy) too
    if s.compute == "fp32" and s.weight_bytes == 4:
        shared = (d if roles & {"q_proj", "k_proj", "v_proj"} else 0) + (d if roles & {"gate_proj", "up_proj"} else 0)
        return 4 * wide, norms_in + stats + 4 * (shared + attention + lora_out)
    sizes = {"o_proj": shape.q_dim}
    copies = sum(sizes.get(role, d) for role in roles if role != "down_proj")
    return 2 * wide, norms_in + stats + 2 * (copies + attention + lora_out)


def _mask_elements(s: Settings, batch: int) -> int:
    """Elements of the attention mask sdpa is given: padding-free rows hold several documents (a block-diagonal
    T x T mask); padded rows a (rows x L x L) one. flash_attention_2 and flex take no dense mask, nor does
    sdpa_packed for padding-free rows (it finds the documents from position_ids)."""
    if s.attention not in ("sdpa", "eager", "sdpa_packed") or (s.packing and not s.padding_free):
        return 0  # wrapped rows: no padding
    if s.attention == "sdpa_packed" and s.padding_free:
        return 0
    return (batch * s.max_length) ** 2 if s.padding_free else batch * s.max_length**2


def _head_bytes(shape: ModelShape, s: Settings, tokens: int, backward: bool) -> int:
    """Working memory of TRL's fused LM head over `tokens` positions."""
    n, v = min(tokens, HEAD_TOKENS), min(shape.vocab, HEAD_VOCAB)
    tile_bytes = 2 if s.compute == "bf16" else 4
    grad_hidden = tokens * shape.hidden * 4 if backward else 0  # fp32 accumulator
    if s.device == "cuda":  # Triton folds tiles in place; the caching allocator holds the whole tile buffer
        return n * HEAD_VOCAB * tile_bytes + grad_hidden + tokens * shape.hidden * tile_bytes
    # torch fallback: only the first `v` columns of each 32768-wide tile row are touched (pages of 4 KiB)
    touched = n * (math.ceil(v * tile_bytes / 4096) * 4096 if v < HEAD_VOCAB else v * tile_bytes)
    return touched + n * v * (HEAD_BWD_BYTES if backward else HEAD_FWD_BYTES) + grad_hidden


def _labelled_head_bytes(shape: ModelShape, s: Settings, tokens: int) -> int:
    """Working memory of sft.loss's head over at most `tokens` labelled positions (every position, the worst case):
    one chunk of logits in the compute dtype plus its fp32 softmax (and, in bf16, its bf16 copy for the gradient
    matmul), the gathered hidden states and their gradient (fp32), and the head weight cast to bf16 under autocast."""
    from sft.loss import chunk_tokens

    chunk = min(tokens, chunk_tokens(shape.vocab))
    per_logit = 8 if s.compute == "bf16" else 4
    weight_cast = shape.vocab * shape.hidden * 2 if s.compute == "bf16" and s.weight_bytes == 4 else 0
    return chunk * shape.vocab * per_logit + 2 * tokens * shape.hidden * 4 + weight_cast


def _weights_bytes(shape: ModelShape, s: Settings) -> tuple[int, str]:
    if s.load_in_4bit:
        # NF4: 4 bits a weight plus one absmax per 64: fp32 (4/64 B), or with double quantization an 8-bit absmax
        # and one fp32 constant per 256 blocks (1/64 + 4/16384 B).
        per = 0.5 + (1 / 64 + 4 / 16384 if s.double_quant else 4 / 64)
        quantized = shape.decoder_linear_params * per
        return int(quantized + shape.other_params * 4), (
            f"4-bit decoder linears ({per:.3f} B/param with block constants) + {shape.other_params / 1e6:,.0f}M "
            "embedding/head/norm params in fp32 (peft's prepare_model_for_kbit_training upcasts them)"
        )
    dtype = "fp32" if s.weight_bytes == 4 else "bf16"
    return shape.params * s.weight_bytes, f"{shape.params / 1e6:,.1f}M params in {dtype}"


def lora_params(shape: ModelShape, s: Settings) -> int:
    linears = shape.linears()
    per_layer = sum(
        s.lora_r * (linears[r][0] + linears[r][1]) + (linears[r][1] if s.use_dora else 0) for r in s.lora_roles
    )
    full = sum(shape.vocab * shape.hidden for _ in s.full_modules)
    return shape.layers * per_layer + full


@dataclass
class Memory:
    """Predicted peaks in bytes, by component."""

    train: dict[str, int]
    train_notes: dict[str, str]
    evaluation: dict[str, int]
    generation: dict[str, int]
    activations_per_token: int  # all layers, without checkpointing
    activations_per_token_checkpointed: int

    @property
    def train_total(self) -> int:
        return sum(self.train.values())

    @property
    def eval_total(self) -> int:
        return sum(self.evaluation.values())

    @property
    def generation_total(self) -> int:
        return sum(self.generation.values())

    @property
    def peak(self) -> int:
        return max(self.train_total, self.eval_total, self.generation_total)


def predict_memory(shape: ModelShape, s: Settings) -> Memory:
    """Peak memory of the training step, evaluation and generation, by component."""
    weights, weights_note = _weights_bytes(shape, s)
    n_lora = lora_params(shape, s)
    if s.full_modules:  # a trained copy of each full module sits beside the frozen original
        weights += len(s.full_modules) * shape.vocab * shape.hidden * s.weight_bytes
    tokens = s.tokens
    rows = 1 if s.single_row else s.batch
    head_tokens = tokens - rows  # the last position of each row predicts nothing
    masked = _mask_elements(s, s.batch) > 0
    wide, narrow = _layer_bytes(shape, s, masked)
    per_layer = wide + narrow
    act_bytes = 2 if s.compute == "bf16" else 4
    mask_elems = _mask_elements(s, s.batch)
    # sdpa converts the boolean mask (built once, 1 B/elem) to an additive float mask in the compute dtype in each
    # layer and keeps it for backward; eager builds a float mask once but keeps each layer's softmax (fp32) instead.
    if s.attention == "eager":
        mask_saved = mask_elems * 4
        scores = shape.layers * shape.heads * (mask_elems if masked else rows * s.max_length**2) * (4 + act_bytes)
    else:
        mask_saved, scores = mask_elems * (1 + (0 if s.checkpointing else shape.layers * act_bytes)), 0
    residual = shape.hidden * (4 if s.weight_bytes == 4 or s.device == "cpu" else 2)
    checkpoints = shape.layers * tokens * residual
    layer_all = per_layer * tokens
    if s.checkpointing:
        # each layer's input, plus one layer recomputed (its mask included) while it is back-propagated
        activations = checkpoints + layer_all + mask_elems * act_bytes + scores // max(shape.layers, 1)
        act_note = f"{shape.layers} layer inputs x {tokens:,} tok x {residual} B + one layer recomputed"
    else:
        activations = shape.layers * layer_all + scores
        act_note = f"{shape.layers} layers x {tokens:,} tok x {per_layer:,} B"
    head = _labelled_head_bytes(shape, s, head_tokens) if s.labelled_head else _head_bytes(shape, s, head_tokens, True)
    # Backward through a layer holds a few [tokens x intermediate] gradients at once; the LM head's backward comes
    # first, with every activation still saved. The larger of the two sits on top of the activations.
    layer_grads = 3 * tokens * shape.intermediate * 4
    train = {
        "weights": weights,
        "lora_parameters": n_lora * 4,
        "lora_gradients": n_lora * 4,
        "adamw_states": n_lora * 8,
        "activations": activations,
        "attention_mask": mask_saved,
        "logits_and_loss": max(head, layer_grads),
    }
    notes = {
        "weights": weights_note,
        "lora_parameters": f"{n_lora / 1e6:,.2f}M params, fp32",
        "adamw_states": "exp_avg + exp_avg_sq, fp32",
        "activations": act_note,
        "attention_mask": f"{mask_elems:,} elements" if mask_elems else "none (no dense mask)",
        "logits_and_loss": (
            f"labelled-positions head (sft.loss), at most {head_tokens:,} tok x {shape.vocab:,} vocab in chunks"
            if s.labelled_head
            else f"TRL's fused LM head over {head_tokens:,} tok x {shape.vocab:,} vocab"
        ),
    }
    if s.load_in_4bit:  # each linear is dequantized to the compute dtype while it runs
        largest = max(a * b for a, b in shape.linears().values())
        train["dequantized_weight"] = largest * 2
    if s.device == "cpu":
        # glibc's heap (GLIBC_RETENTION) grows with what the forward pass allocates per layer in blocks under the
        # mmap threshold, checkpointed or not (then those tensors are freed at each layer's end instead of kept).
        heap_wide = wide if tokens * shape.intermediate * act_bytes <= GLIBC_MMAP_MAX else 0
        heap_narrow = narrow if tokens * shape.hidden * 4 <= GLIBC_MMAP_MAX else 0
        heap_mask = mask_elems * act_bytes if mask_elems * act_bytes <= GLIBC_MMAP_MAX else 0
        in_heap = shape.layers * (tokens * (heap_wide + heap_narrow) + heap_mask)
        retention = GLIBC_RETENTION[(s.compute, s.checkpointing)]
        train["allocator_retention"] = int(retention * in_heap)
        train["runtime"] = CPU_RUNTIME[s.compute]
        notes["allocator_retention"] = f"glibc heap keeps freed forward temporaries (~{retention}x)"
        notes["runtime"] = "objects, thread pools, kernels loaded on first use (measured)"

    eval_tokens = s.eval_batch * s.max_length
    eval_rows = 1 if s.single_row else s.eval_batch
    eval_mask = _mask_elements(s, s.eval_batch)
    # no saved activations: one layer's working set at a time (gate, up, product and a few hidden-size tensors)
    eval_working = eval_tokens * (3 * shape.intermediate + 6 * shape.hidden) * act_bytes
    evaluation = (
        {
            "weights": weights,
            "lora_and_optimizer": n_lora * 12,
            "working_set": eval_working + eval_mask * (1 + act_bytes),
            "logits_and_loss": _head_bytes(shape, s, eval_tokens - eval_rows, backward=False),
        }
        if s.eval_enabled
        else {}
    )

    generation: dict[str, int] = {}
    if s.gen_batch:
        context = s.max_length + s.gen_new_tokens  # prompts are at most max_length tokens
        kv_bytes = 2 if s.weight_bytes == 2 or s.load_in_4bit else 4  # the weights' (compute) dtype
        prefill = s.gen_batch * s.max_length
        generation = {
            "weights": weights,
            "lora_parameters": n_lora * 4,
            "kv_cache": 2 * shape.layers * shape.kv_dim * s.gen_batch * context * kv_bytes,
            "prefill_working_set": prefill * (3 * shape.intermediate + 6 * shape.hidden) * act_bytes
            + s.gen_batch * s.max_length * context,  # boolean mask
            "logits": s.gen_batch * shape.vocab * 4 * 2,  # last position only, fp32, and its softmax
        }
    if s.device == "cpu":  # the process keeps its runtime through every phase
        for phase in (evaluation, generation):
            if phase:
                phase["runtime"] = CPU_RUNTIME[s.compute]
    return Memory(
        train=train,
        train_notes=notes,
        evaluation=evaluation,
        generation=generation,
        activations_per_token=shape.layers * per_layer,
        activations_per_token_checkpointed=shape.layers * residual,
    )


# FLOPs and time


def flops_per_step(shape: ModelShape, s: Settings) -> dict[str, float]:
    """BENCHMARKS.md's LoRA formula per token, times the tokens of one optimizer step; and what is executed."""
    n_dec = shape.decoder_linear_params
    n_lora = lora_params(shape, s)
    doc = s.max_length  # documents are at most max_length tokens: causal attention is not discounted
    attention = 12 * shape.layers * shape.q_dim * doc
    # The head scores labelled positions only (sft.loss; TRL's on a GPU), every position with TRL's head on a CPU:
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


# Devices, RAM and precision


def available_ram() -> int:
    """RAM this process could still use: MemAvailable, bounded by a cgroup limit when there is one."""
    available = _meminfo("MemAvailable") or _meminfo("MemFree")
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit_text = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text.isdigit() and int(limit_text) < 2**60:
            available = min(available, int(limit_text) - usage)
    return max(0, available)


def _meminfo(field_name: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(name: str | None) -> Device:
    """A named device, or this machine (its GPU when there is one, else its CPU and available RAM)."""
    import torch

    if name is not None and name.lower() not in DEVICE_NAMES:
        raise SftError(f"--device {name!r}: unknown device; expected one of {', '.join(DEVICE_NAMES)}")
    if name is not None and name.lower() in GPUS:
        return GPUS[name.lower()]
    if name is None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        known = next((d for key, d in GPUS.items() if key.split("-")[0].upper() in props.name.upper()), None)
        peak = known.peak_flops if known else {"bf16": 0.0, "fp32": 0.0}
        return Device("cuda", props.name, "cuda", props.total_memory, peak, "vendor dense peak" if known else "")
    cores = torch.get_num_threads()
    return Device("cpu", f"{cpu_name()} ({cores} threads)", "cpu", available_ram(), {}, "measured matmul")


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
    import sft.attention  # noqa: F401  (registers sdpa_packed)

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


# The plan


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


def _budget(device: Device) -> int:
    if device.kind == "cuda":
        return int((device.memory - CUDA_CONTEXT) / (1 + CUDA_FRAGMENTATION))
    if device.key == "cpu":  # processes of a multi-process CPU run on this machine share its RAM
        return device.memory // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return device.memory


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
        peak = _cpu_peak(compute)
    efficiency = EFFICIENCY["cuda"] if device.kind == "cuda" else EFFICIENCY[("cpu", compute)]
    seconds = flops["executed"] / (peak * efficiency) if peak else None
    budget = _budget(device)
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


_PEAKS: dict[str, float] = {}


def _cpu_peak(compute: str) -> float:
    """This CPU's large-matmul rate in the compute dtype, measured once per process (0.3 s)."""
    import torch

    from sft.hardware import matmul_peak

    if compute not in _PEAKS:
        _PEAKS[compute] = matmul_peak(torch.bfloat16 if compute == "bf16" else torch.float32, seconds=0.3)
    return _PEAKS[compute]


def _decide(config: RunConfig, shape: ModelShape, device: Device) -> tuple[dict[str, Any], list[str]]:
    """Precision and checkpointing for the train options the config leaves unset, with the reasons."""
    auto: dict[str, Any] = {}
    lines: list[str] = []
    if not _user_set_precision(config):
        if device.kind == "cuda" and not _bf16_gpu(device):
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
        budget = _budget(device)
        without = predict_memory(shape, settings_for(config, shape, device, compute, False)).peak
        with_ckpt = predict_memory(shape, settings_for(config, shape, device, compute, True)).peak
        where = f"{_gib(budget)} {'available RAM' if device.kind == 'cpu' else 'usable on ' + device.name}"
        if without <= budget:
            auto["activation_checkpointing"] = False
            reason = f"the plan's peak without it is {_gib(without)} of {where}"
        elif with_ckpt <= budget:
            auto["activation_checkpointing"] = True
            reason = f"without it the peak would be {_gib(without)}, with it {_gib(with_ckpt)}, of {where}"
        else:
            auto["activation_checkpointing"] = True
            reason = f"still not enough: {_gib(with_ckpt)} with it ({_gib(without)} without) of {where}"
            lines.append(
                f"warning: the plan predicts this run will not fit: {_gib(with_ckpt)} at its peak even with "
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


def _bf16_gpu(device: Device) -> bool:
    """Named GPUs here all have bf16; this machine's GPU is asked."""
    if device.key in GPUS:
        return True
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def will_fit(config: RunConfig, model_config: Any) -> tuple[bool, str]:
    """Whether the run fits this machine at its predicted peak, and a one-line account of it."""
    plan = make_plan(config, model_config)
    line = (
        f"plan: peak {_gib(plan.memory.peak)} ({_gib(plan.memory.train_total)} training) of "
        f"{_gib(plan.budget)} {'available RAM' if plan.device.kind == 'cpu' else 'on ' + plan.device.name}"
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


# Output


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB" if n >= GiB else f"{n / MiB:,.1f} MiB"


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
    lines += ["", f"{verdict}: peak {_gib(m.peak)} of {_gib(plan.budget)} {where}"]
    for alt in plan.alternatives:
        mark = "fits" if alt["fits"] else "still too big"
        lines.append(f"  try {alt['change']}: {_gib(alt['peak_bytes'])} ({mark})")
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


# Measuring


def measure_in_child(config_path: str, overrides: list[str], plan: Plan, steps: int = 2) -> dict[str, Any]:
    """`measure` in a fresh Python process, as `sft train` runs: what this process did first (the precision probe,
    building the stand-in) would otherwise have warmed up kernels and thread pools and moved the baseline."""
    import subprocess

    request = {
        "config": config_path,
        "overrides": overrides,
        "settings": dataclasses.asdict(plan.settings),
        "vocab": plan.shape.vocab,
        "train_options": _plan_train_options(plan),
        "steps": steps,
    }
    child = subprocess.run(
        [sys.executable, "-m", "sft.plan"], input=json.dumps(request), stdout=subprocess.PIPE, text=True
    )  # the child's progress goes to our stderr as it comes
    if child.returncode != 0:
        raise SftError(f"--measure: the training steps failed (exit {child.returncode}); see the messages above")
    return json.loads(child.stdout.strip().splitlines()[-1])


def _measure_child() -> None:
    from sft.config import load_config

    request = json.loads(sys.stdin.read())
    config = load_config(request["config"], request["overrides"])
    fields = request["settings"]
    settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its progress and metrics: keep stdout clean
        result = measure(config, settings, request["vocab"], request["train_options"], request["steps"])
    print(json.dumps(result), flush=True)


def measure(
    config: RunConfig, s: Settings, vocab: int, train_options: dict[str, Any], steps: int = 2
) -> dict[str, Any]:
    """Build the model and run `steps` real training steps with the plan's settings on rows of exactly
    data.max_length tokens, every one trained (the worst case the plan predicts); peak memory from just before the
    model is built, and each step's time."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from sft.hardware import peak_memory
    from sft.model import apply_lora, load_model, load_tokenizer
    from sft.train import build_sft_config, trainer_class

    _build_stand_in(config)
    tokenizer = load_tokenizer(config.model)
    rows_needed = s.batch * s.accumulation * steps
    vocab = min(vocab, len(tokenizer))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows_needed, s.max_length), generator=generator).tolist()
    if s.packing:  # two documents to a packed row, as real data packs: a block-diagonal mask, as planned
        half = s.max_length // 2
        rows = [part for row in ids for part in (row[:half], row[half:])]
    else:  # one row of each batch a token shorter: padding, so a mask, as planned
        rows = [row[:-1] if i % s.batch == s.batch - 1 else row for i, row in enumerate(ids)]
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
    train = {
        **{k: v for k, v in train_options.items() if k not in config.train},
        **config.train,
        "max_steps": steps,
        "num_train_epochs": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
    }
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as tmp:
        sft_config = build_sft_config(train, tmp, s.max_length)
        trainer_cls = trainer_class()  # imports trl's trainer modules: before the window, as `sft train` does
        _warm_up(config, tokenizer, trainer_cls, train, s.max_length)
        _release_free_memory()
        with peak_memory() as peak:
            model = apply_lora(load_model(config.model, tokenizer), config.adapter)
            trainer = trainer_cls(
                model=model,
                args=sft_config,
                train_dataset=dataset,
                processing_class=tokenizer,
                callbacks=[StepTimer()],
            )
            trainer.train()
    return {"peak_bytes": peak.bytes, "kind": peak.kind, "steps": steps, "step_seconds": times}


def _warm_up(config: RunConfig, tokenizer, trainer_cls, train: dict[str, Any], max_length: int) -> None:
    """One training step of a 1-layer, d=64 copy of the model through the same code (precision, attention, LoRA,
    trainer), before the measured window. The first step touches code pages of torch's libraries (tens of MiB, and
    more or fewer depending on how the kernel maps the code of a given install: 20 MiB apart between two installs of
    the same packages); once resident they are not counted as the run's memory. Best effort: a model whose config
    cannot be shrunk this way is measured without it."""
    import tempfile

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from sft.model import apply_lora, load_model_config, resolve_dtype, set_attention
    from sft.train import build_sft_config

    try:
        small = load_model_config(config.model)
        text = small.get_text_config() if hasattr(small, "get_text_config") else small
        heads = 2 if (getattr(text, "num_key_value_heads", None) or 2) >= 2 else 1
        text.update({"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "head_dim": 32})
        text.update({"num_attention_heads": 2, "num_key_value_heads": heads})
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[:1]
        model = AutoModelForCausalLM.from_config(small, dtype=resolve_dtype(config.model.dtype))
        set_attention(model, config.model.attn_implementation)
        model = apply_lora(model, config.adapter)
        length = min(max_length, 32)
        row = [i % len(tokenizer) for i in range(length)]
        dataset = Dataset.from_dict({"input_ids": [row, row], "labels": [row, row]})
        with tempfile.TemporaryDirectory() as tmp:
            args = build_sft_config({**train, "max_steps": 1}, tmp, length)
            trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train()
    except Exception:  # noqa: BLE001 - only a warm-up
        pass


def _release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc), so the peak measured from here counts what the run adds:
    memory freed earlier in this process (building the stand-in model, reading data) would otherwise be reused
    without showing up, by a different amount each time."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _build_stand_in(config: RunConfig) -> None:
    from sft.data import load_dataset
    from sft.model import ensure_tiny_model
    from sft.pipeline import corpus

    if config.model.tiny is not None and not Path(config.model.name_or_path).exists():
        ensure_tiny_model(config.model, corpus(load_dataset(config.data)))


def _plan_train_options(plan: Plan) -> dict[str, Any]:
    options: dict[str, Any] = {"activation_checkpointing": plan.settings.checkpointing}
    if plan.device.kind == "cpu":
        options["bf16"] = plan.settings.compute == "bf16"
        if options["bf16"]:
            options["use_cpu"] = True
    return options


# CLI


def run_plan(config_path: str, overrides: list[str], device: str | None, do_measure: bool, as_json: bool) -> int:
    from sft.config import load_config

    if device is not None and device.lower() not in DEVICE_NAMES:
        raise SftError(f"--device {device!r}: unknown device; expected one of {', '.join(DEVICE_NAMES)}")
    config = load_config(config_path, overrides)
    if do_measure and device is not None and device.lower() != "cpu" and resolve_device(None).key != "cuda":
        raise SftError(f"--measure runs on this machine; it has no {device} (drop --device or use --device cpu)")
    if do_measure:
        _build_stand_in(config)  # measuring builds the model anyway: plan with its real vocabulary
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


if __name__ == "__main__":  # `sft plan --measure` runs its steps here, in a fresh process (see measure_in_child)
    _measure_child()
