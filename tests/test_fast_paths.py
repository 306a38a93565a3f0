"""The two hand-written fast paths of training compute exactly what the library paths they replace compute.

- `sft.loss`: cross-entropy on labelled positions with dL/dh computed in the forward pass, against autograd through
  a full-vocabulary cross-entropy, and a few real optimizer steps against TRL's own fused head.
- `sft.attention` (`sdpa_packed`): per-document sdpa, against each document alone (grouped-query attention
  included), against transformers' sdpa for padded batches and generation, without ever building a dense mask for
  packed rows; and `auto` falls back to sdpa for models whose layers are not all plain causal attention.
Packed rows through the whole pipeline (TRL's collator, LoRA, the trainer's loss) are covered in test_packing.py.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig

from sft.config import AdapterConfig, ModelConfig, TinyModelSpec
from sft.errors import SftError
from sft.model import apply_lora, attention, load_model, loss, set_attention


def _head_case(n: int = 300, d: int = 48, vocab: int = 500, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = torch.randn(vocab, d, generator=g) * 0.3
    labels = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_elements", [1 << 24, 7 * 500], ids=["one-chunk", "many-chunks"])
def test_labelled_loss_and_gradient_equal_autograd_in_fp32(monkeypatch, chunk_elements):
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", chunk_elements)
    hidden, weight, labels = _head_case()
    total, correct = loss.labelled_cross_entropy(hidden, weight, labels)
    (total / 7).backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    logits = hidden @ weight.T
    reference = F.cross_entropy(logits, labels, reduction="sum")
    (reference / 7).backward()
    torch.testing.assert_close(total, reference, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(ours, hidden.grad, rtol=1e-5, atol=1e-7)
    assert correct.item() == (logits.argmax(-1) == labels).sum().item()
    assert 0 < correct.item() < len(labels)  # the count is not trivially 0 or all


def test_labelled_loss_under_bf16_autocast_matches_transformers_head():
    """Under autocast the logits come from a bf16 matmul, as transformers' own LM head gives them."""
    hidden, weight, labels = _head_case(n=200, d=64, vocab=2000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = loss.labelled_cross_entropy(hidden, weight, labels)
        total.backward()
        ours = hidden.grad.clone()
        hidden.grad = None
        reference = F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")
        reference.backward()
    torch.testing.assert_close(total, reference, rtol=1e-4, atol=1e-3)
    assert ((ours - hidden.grad).norm() / hidden.grad.norm()).item() < 1e-2


def test_no_labelled_position_gives_a_differentiable_zero():
    hidden, weight, _ = _head_case()
    total, correct = loss.labelled_cross_entropy(hidden[:0], weight, torch.zeros(0, dtype=torch.long))
    total.backward()
    assert total.item() == 0 and correct.item() == 0 and hidden.grad.abs().sum() == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sft.data.demo import make_reverse_rows
    from sft.model import load_tokenizer
    from sft.model.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("fast") / "tiny"
    rows = make_reverse_rows(48, random.Random(1))
    spec = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=300)
    build_tiny_model(spec, path, [m["content"] for r in rows for m in r["messages"]])
    return path, load_tokenizer(ModelConfig(name_or_path=str(path))), rows


def _train_steps(tiny, tmp_path, labelled: bool, steps: int = 4):
    from datasets import Dataset
    from transformers import set_seed

    from sft.data import Example
    from sft.tokenize import tokenize_examples
    from sft.train import build_sft_config, trainer_class

    path, tokenizer, rows = tiny
    examples = [Example(kind="chat", where=f"row {i}", messages=r["messages"]) for i, r in enumerate(rows)]
    tokenized = tokenize_examples(examples, tokenizer, 64).rows
    set_seed(0)
    model = apply_lora(load_model(ModelConfig(name_or_path=str(path), dtype="float32")), AdapterConfig(r=8))
    train = {
        "per_device_train_batch_size": 4,
        "max_steps": steps,
        "learning_rate": 5e-3,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_steps": 1,
        "bf16": False,
        "use_cpu": True,
        "report_to": [],
    }
    args = build_sft_config(train, tmp_path / ("ours" if labelled else "trl"), 64)
    dataset = Dataset.from_dict({key: [row[key] for row in tokenized] for key in ("input_ids", "labels")})
    trainer = trainer_class()(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert trainer.labelled_head  # the pipeline's default for this model
    trainer.labelled_head = labelled
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    accuracy = [e.get("mean_token_accuracy") for e in trainer.state.log_history if "loss" in e]
    weights = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    return losses, accuracy, weights


def test_training_with_the_labelled_head_follows_trls_head(tiny, tmp_path):
    """Same batches, same seed, fp32: the logged losses and the adapter after four AdamW steps agree with TRL's fused
    head (which scores every position and recomputes in backward); only summation order differs."""
    ours, our_accuracy, our_weights = _train_steps(tiny, tmp_path, labelled=True)
    theirs, their_accuracy, their_weights = _train_steps(tiny, tmp_path, labelled=False)
    assert len(ours) == 4 and ours[-1] < ours[0]  # it trains
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(our_accuracy, their_accuracy, rtol=1e-4, atol=1e-4)
    for name, value in our_weights.items():
        torch.testing.assert_close(value, their_weights[name], rtol=1e-3, atol=1e-5)


def test_the_labelled_head_stands_aside_where_it_does_not_apply(tiny):
    path, _, _ = tiny
    model = apply_lora(load_model(ModelConfig(name_or_path=str(path))), AdapterConfig(r=4))
    assert loss.usable(model) is None
    model.get_output_embeddings().weight.requires_grad_(True)  # a trained LM head (modules_to_save)
    assert "trained" in loss.usable(model)


def _llama(heads: int = 4, kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=200,
        use_cache=False,
    )
    return LlamaForCausalLM(config).eval()


def test_sdpa_packed_gives_each_document_its_own_outputs_without_a_dense_mask(monkeypatch):
    model = _llama()  # grouped-query attention: 4 query heads share 2 key/value heads
    assert set_attention(model, "auto") == attention.NAME
    lengths = [5, 17, 1, 9, 30]
    ids = torch.randint(0, 200, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]

    def no_dense_mask(*args, **kwargs):
        raise AssertionError("a dense mask was built for a packed row")

    monkeypatch.setattr(attention, "sdpa_mask", no_dense_mask)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions).logits[0]
        start = 0
        for n in lengths:
            alone = model(input_ids=ids[:, start : start + n]).logits[0]
            torch.testing.assert_close(packed[start : start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
        leaky = model(input_ids=ids).logits[0]  # control: without position_ids it is one causal document
    assert (leaky[lengths[0] :] - packed[lengths[0] :]).abs().max() > 1e-2


def test_sdpa_packed_is_plain_sdpa_for_padded_batches_and_generation():
    ours, theirs = _llama(), _llama()
    set_attention(ours, "sdpa_packed")
    assert ours.config._attn_implementation == attention.NAME and theirs.config._attn_implementation == "sdpa"
    ids = torch.randint(1, 200, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=ids, attention_mask=mask).logits, theirs(input_ids=ids, attention_mask=mask).logits
        )
    for model in (ours, theirs):
        model.config.use_cache = True
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(
        ours.generate(input_ids=ids, attention_mask=mask, **kwargs),
        theirs.generate(input_ids=ids, attention_mask=mask, **kwargs),
    )
    assert torch.equal(ours.generate(input_ids=ids[1:2], **kwargs), theirs.generate(input_ids=ids[1:2], **kwargs))


def test_auto_keeps_sdpa_where_layers_are_not_plain_causal_attention():
    sliding = MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=50,
        sliding_window=8,
    )
    assert not attention.supports_packed(sliding)
    assert attention.resolve("auto", sliding) == "sdpa"
    assert attention.supports_packed(LlamaConfig()) and attention.resolve("auto", LlamaConfig()) == attention.NAME
    from transformers import MistralForCausalLM

    model = MistralForCausalLM(sliding)
    assert set_attention(model, "auto") == "sdpa"
    with pytest.raises(SftError, match="sliding window"):
        set_attention(model, "sdpa_packed", "'mistral'")


def test_a_saved_model_does_not_name_sdpa_packed(tmp_path):
    """Exported models load anywhere: the implementation is a runtime choice, not written to config.json."""
    model = _llama()
    set_attention(model, "auto")
    model.save_pretrained(tmp_path)
    assert "sdpa_packed" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))


def test_after_bf16_training_the_model_computes_in_its_own_dtype(tiny, tmp_path):
    """accelerate wraps the forward in bf16 autocast for training; evaluation and the export checks must see the
    model as it is saved and reloaded (fp32 here), or a reloaded adapter looks different from the trained one."""
    from sft.data import Example
    from sft.export import logits_of, probe_inputs
    from sft.tokenize import tokenize_examples
    from sft.train import build_sft_config, train

    path, tokenizer, rows = tiny
    examples = [Example(kind="chat", where=f"row {i}", messages=r["messages"]) for i, r in enumerate(rows)]
    tokenized = tokenize_examples(examples, tokenizer, 64).rows
    model = apply_lora(load_model(ModelConfig(name_or_path=str(path), dtype="float32")), AdapterConfig(r=8))
    options = {"max_steps": 2, "bf16": True, "use_cpu": True, "eval_strategy": "no", "save_strategy": "no"}
    config = build_sft_config({**options, "report_to": []}, tmp_path / "out", 64)
    train(model, tokenizer, tokenized, [], config, tmp_path)
    ids = probe_inputs(len(tokenizer))
    fresh = apply_lora(load_model(ModelConfig(name_or_path=str(path), dtype="float32")), AdapterConfig(r=8))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits_of(model, ids), logits_of(fresh, ids), rtol=0, atol=1e-6)
