"""Attention for padding-free packed rows without a T x T mask: `sdpa_packed`.

Padding-free packing puts many documents in one row and gives each its own `position_ids` (0, 1, ... per document).
With `sdpa`, transformers then builds a dense block-diagonal T x T mask per micro-batch and sdpa computes every query
against every key of the row before masking: memory and FLOPs grow with T^2 (T = all tokens of the micro-batch), not
with the documents' own lengths. flash-attention's varlen kernels avoid that, but they are CUDA-only and often not
installed. `sdpa_packed` is plain sdpa run once per document (causal, the documents found from `position_ids` exactly
as transformers finds them), so no mask is built and no FLOP is spent across documents. Everything that is not a
padding-free causal row without a cache (padded batches, generation with a KV cache) goes to transformers' own sdpa
path unchanged, so the implementation is safe to use for loading, evaluation, generation and export alike.

`auto` (the default of `model.attn_implementation`) picks `sdpa_packed` for models whose every layer is plain causal
attention (no sliding window, no logit soft-capping), else `sdpa`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

NAME = "sdpa_packed"


def packed_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """No mask where the attention below needs none (no padding, no cache: documents come from `position_ids`);
    otherwise sdpa's own mask."""
    if attention_mask is None and q_length == kv_length and not _nonzero(q_offset) and not _nonzero(kv_offset):
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


def _nonzero(offset: int | torch.Tensor) -> bool:
    return bool(offset.item() if isinstance(offset, torch.Tensor) else offset)


def document_lengths(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the lengths of its documents: a document starts wherever a position is not the previous one plus 1
    (transformers' own rule, `find_packed_sequence_indices`)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    rows = []
    for row in starts:
        edges = torch.nonzero(row).flatten().tolist() + [row.numel()]
        rows.append([b - a for a, b in zip(edges, edges[1:])])
    return rows


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    position_ids = kwargs.get("position_ids")
    plain = (
        attention_mask is not None
        or position_ids is None
        or key.shape[2] != query.shape[2]
        or not getattr(module, "is_causal", True)
        or any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "sliding_window", "s_aux"))
    )
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    batch, _, length, _ = query.shape
    position_ids = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    lengths = document_lengths(position_ids)
    if all(len(row) == 1 for row in lengths):  # one document per row: plain causal sdpa
        return sdpa_attention_forward(module, query, key, value, None, dropout, scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention: sdpa shares each k/v head, no repeated copies
    rows = []
    for b, row in enumerate(lengths):
        pieces = zip(*(t[b : b + 1].split(row, dim=2) for t in (query, key, value)))
        outputs = [
            F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
            for q, k, v in pieces
        ]
        rows.append(torch.cat(outputs, dim=2))
    output = torch.cat(rows) if batch > 1 else rows[0]
    return output.transpose(1, 2).contiguous(), None


def supports_packed(config: PretrainedConfig) -> bool:
    """Whether every layer is plain causal attention, so per-document causal sdpa computes what sdpa would."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False):
        return False
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        if any(kind != "full_attention" for kind in layer_types):
            return False
    elif getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return False
    return not any(getattr(text, k, None) for k in ("attn_logit_softcapping", "attention_chunk_size"))


def resolve(requested: str, config: PretrainedConfig) -> str:
    """The implementation `model.attn_implementation` asks for, with `auto` made concrete for this model."""
    if requested != "auto":
        return requested
    return NAME if supports_packed(config) else "sdpa"


def register() -> None:
    """Make `sdpa_packed` a name transformers accepts (idempotent; done on import)."""
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(NAME, packed_attention_forward)
        AttentionMaskInterface.register(NAME, packed_mask)


register()
