"""Packed rows train exactly as their examples would alone: no attention across example boundaries.

This runs TRL's own code path with this pipeline's SFTConfig (`sft.train.build_sft_config`): SFTTrainer packs the
tokenized rows best-fit, its padding-free collator flattens a batch into one row that carries per-example
`position_ids` and no attention mask, and the model is called as `SFTTrainer.compute_loss` calls it. Each example
of such a batch must give the logits, log-probabilities and loss it gives alone (one unpacked row), for every
attention implementation `model.attn_implementation` allows, base and LoRA. Controls show the check can fail: the
same row without `position_ids`, with an all-ones attention mask, or with a KV cache attends across boundaries.
"""

from __future__ import annotations

import contextlib
import random
import typing

import pytest
import torch
import torch.nn.functional as F

from sft.config import AdapterConfig, ModelConfig, TinyModelSpec
from sft.data import Example
from sft.data.demo import make_reverse_rows
from sft.model import apply_lora, load_model, load_tokenizer
from sft.model.tiny import build_tiny_model
from sft.tokenize import tokenize_examples
from sft.train import build_sft_config

MAX_LENGTH = 64  # examples of ~30 tokens: two or three to a packed row
BATCH = 4  # packed rows per batch, flattened by the collator into one row of ~8 examples
CUDA = torch.cuda.is_available()


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


_cuda = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
IMPLEMENTATIONS = [
    pytest.param(("auto", "cpu"), id="auto-cpu"),  # sdpa_packed for this Llama: checked to resolve so below
    pytest.param(("sdpa_packed", "cpu"), id="sdpa_packed-cpu"),
    pytest.param(("sdpa", "cpu"), id="sdpa-cpu"),
    pytest.param(("eager", "cpu"), id="eager-cpu"),
    # Compiled by torch.compile on first use: ~1 minute on 2 busy cores
    pytest.param(("flex_attention", "cpu"), id="flex_attention-cpu", marks=pytest.mark.slow),
    pytest.param(("sdpa_packed", "cuda"), id="sdpa_packed-cuda", marks=_cuda),
    pytest.param(("sdpa", "cuda"), id="sdpa-cuda", marks=_cuda),
    pytest.param(("eager", "cuda"), id="eager-cuda", marks=_cuda),
    pytest.param(("flex_attention", "cuda"), id="flex_attention-cuda", marks=_cuda),
    pytest.param(
        ("flash_attention_2", "cuda"),
        id="flash_attention_2-cuda",
        marks=[*_cuda, pytest.mark.skipif(not _has_flash_attn(), reason="needs the flash-attn package")],
    ),
]


def test_every_allowed_attention_implementation_is_checked():
    allowed = set(typing.get_args(ModelConfig.model_fields["attn_implementation"].annotation))
    assert {p.values[0][0] for p in IMPLEMENTATIONS} == allowed


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """A tiny random Llama with its tokenizer, and chat rows tokenized and labelled by the pipeline."""
    path = tmp_path_factory.mktemp("packing") / "tiny"
    rows = make_reverse_rows(40, random.Random(0))
    spec = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=300)
    build_tiny_model(spec, path, [m["content"] for r in rows for m in r["messages"]])
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))
    examples = [Example(kind="chat", where=f"row {i}", messages=r["messages"]) for i, r in enumerate(rows)]
    return path, tokenizer, tokenize_examples(examples, tokenizer, MAX_LENGTH).rows


@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def packed(request, stand_in, tmp_path_factory):
    """An SFTTrainer as the pipeline builds it (LoRA model, our SFTConfig) and the first batch it would train on."""
    from datasets import Dataset

    from sft.train import trainer_class

    implementation, device = request.param
    path, tokenizer, rows = stand_in
    # flash-attn runs in half precision only; the others are checked in fp32, where isolation must be exact
    dtype = "bfloat16" if implementation == "flash_attention_2" else "float32"
    model = load_model(ModelConfig(name_or_path=str(path), attn_implementation=implementation, dtype=dtype))
    expected = "sdpa_packed" if implementation == "auto" else implementation
    assert model.config._attn_implementation == expected
    model = apply_lora(model, AdapterConfig(r=8))
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: make the adapter change the outputs, so it is checked too
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    train = {"per_device_train_batch_size": BATCH, "eval_strategy": "no", "bf16": False, "use_cpu": device == "cpu"}
    args = build_sft_config(train, tmp_path_factory.mktemp("out"), MAX_LENGTH)
    dataset = Dataset.from_dict({key: [row[key] for row in rows] for key in ("input_ids", "labels")})
    # The pipeline's trainer: in training mode its loss is sft.loss's labelled-positions head
    trainer = trainer_class()(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert trainer.labelled_head
    trainer.model.train()  # as during training (dropout is 0: the outputs do not depend on the mode)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    return implementation, trainer, batch, rows


def segments(batch) -> list[tuple[int, int]]:
    """(start, end) of each example in the flattened row: a new example wherever its position restarts at 0."""
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    return list(zip(starts, [*starts[1:], batch["position_ids"].shape[1]]))


def tolerance(implementation: str) -> dict:
    # fp32: only summation order differs between a masked and an unmasked kernel (~1e-6 seen on logits of size ~1)
    return {"atol": 5e-2, "rtol": 2e-2} if implementation == "flash_attention_2" else {"atol": 1e-5, "rtol": 1e-5}


def alone(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and fused-head log-probabilities of one example run as its own unpacked row."""
    logits = model(input_ids=input_ids[None], use_cache=False).logits[0]
    log_probs = model(input_ids=input_ids[None], labels=labels[None], use_cache=False, fused_lm_head=True).log_probs[0]
    return logits, log_probs


def test_the_batch_is_packed_and_padding_free(packed):
    _, trainer, batch, rows = packed
    assert trainer.args.packing and trainer.args.packing_strategy == "bfd" and trainer.padding_free
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    parts = segments(batch)
    assert len(parts) > BATCH  # more examples than packed rows: some rows hold several
    originals = {tuple(row["input_ids"]): row["labels"] for row in rows}
    for a, b in parts:  # whole examples, each with exactly its own labels
        tokens = tuple(batch["input_ids"][0, a:b].tolist())
        assert tokens in originals
        assert batch["labels"][0, a:b].tolist() == originals[tokens]


@pytest.mark.parametrize("adapter", [True, False], ids=["lora", "base"])
def test_each_packed_example_gives_its_logits_and_log_probs_alone(packed, adapter):
    implementation, trainer, batch, _ = packed
    model, inputs = trainer.model, {**batch, "use_cache": False}  # as SFTTrainer.compute_loss calls the model
    with torch.no_grad(), contextlib.nullcontext() if adapter else model.disable_adapter():
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[0]
        log_probs = model(**inputs, fused_lm_head=True).log_probs[0]
        for a, b in segments(batch):
            ids, labels = batch["input_ids"][0, a:b], batch["labels"][0, a:b]
            alone_logits, alone_log_probs = alone(model, ids, labels)
            torch.testing.assert_close(logits[a:b], alone_logits, **tolerance(implementation))
            # log_probs[t] scores token t+1: the example's own next tokens, then its last position scores the next
            # example's first token, which is never a label
            torch.testing.assert_close(log_probs[a : b - 1], alone_log_probs, **tolerance(implementation))
            assert b == log_probs.shape[0] + 1 or log_probs[b - 1] == 0


def test_adapter_changes_the_outputs(packed):
    """Otherwise the LoRA case above would only repeat the base one."""
    _, trainer, batch, _ = packed
    ids = batch["input_ids"][:, : segments(batch)[0][1]]
    with torch.no_grad():
        tuned = trainer.model(input_ids=ids, use_cache=False).logits
        with trainer.model.disable_adapter():
            base = trainer.model(input_ids=ids, use_cache=False).logits
    assert (tuned - base).abs().max() > 1e-2


def test_the_trainer_loss_is_the_loss_of_the_examples_alone(packed):
    """The trainer's loss on the packed batch (sft.loss's labelled head, as in training): the mean NLL of every
    trained token, each scored alone."""
    implementation, trainer, batch, _ = packed
    total, count = 0.0, 0
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        for a, b in segments(batch):
            ids, labels = batch["input_ids"][0, a:b], batch["labels"][0, a:b]
            logits = trainer.model(input_ids=ids[None], use_cache=False).logits[0].float()
            total += F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
            count += int((labels[1:] != -100).sum())
    torch.testing.assert_close(loss.item(), total / count, **tolerance(implementation))


CONTROLS = {
    "no position_ids": lambda batch: {"input_ids": batch["input_ids"], "use_cache": False},
    "all-ones attention mask": lambda batch: {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "attention_mask": torch.ones_like(batch["input_ids"]),
        "use_cache": False,
    },
    "KV cache on": lambda batch: {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "use_cache": True,  # as in generation, or in an evaluation loop that leaves the model's default on
    },
}


@pytest.mark.parametrize("control", list(CONTROLS))
def test_the_check_fails_when_examples_can_see_each_other(packed, control):
    """The same packed row, called so that attention gets one causal mask over the whole row, contaminates: every
    example after the first differs from itself alone, far beyond the tolerance above."""
    implementation, trainer, batch, _ = packed
    if implementation == "flash_attention_2" and control != "no position_ids":
        pytest.skip("flash-attn's varlen path is driven by position_ids; only their absence is a control there")
    if implementation in ("auto", "sdpa_packed") and control != "no position_ids":
        pytest.skip(
            "sdpa_packed separates documents wherever position_ids restart, also under an all-ones mask or with a "
            "cache: only their absence is a control there"
        )
    with torch.no_grad():
        logits = trainer.model(**CONTROLS[control](batch)).logits[0]
        for a, b in segments(batch)[1:]:
            alone_logits = trainer.model(input_ids=batch["input_ids"][:, a:b], use_cache=False).logits[0]
            assert (logits[a:b] - alone_logits).abs().max() > 1e-1, (control, a, b)
