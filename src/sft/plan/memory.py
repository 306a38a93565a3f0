"""The memory model: peak bytes of a training step, evaluation and generation, by component.

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
- the training loss: sft.model.loss's labelled-positions head holds one chunk of logits (about 16M) and the hidden
  states' gradient; where it does not apply, TRL's fused LM head: on a GPU (Triton) one [4096 x 32768] tile,
  elsewhere its torch fallback about eight fp32 [tokens x vocab] arrays (tiles of at most 4096 x 32768) in backward;
  evaluation always runs TRL's head;
- evaluation (no saved activations) and generation (KV cache) as separate phases."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sft.plan.devices import MiB
from sft.plan.shape import ModelShape, Settings, lora_params

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
    """Working memory of sft.model.loss's head over at most `tokens` labelled positions (every position, the worst
    case): one chunk of logits in the compute dtype plus its fp32 softmax (and, in bf16, its bf16 copy for the
    gradient matmul), the gathered hidden states and their gradient (fp32), and the head weight cast to bf16 under
    autocast."""
    from sft.model.loss import chunk_tokens

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
            f"labelled-positions head (sft.model.loss), at most {head_tokens:,} tok x {shape.vocab:,} vocab in chunks"
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
