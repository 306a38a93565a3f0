"""Held-out loss, perplexity and generations scored against the labels, base vs tuned, per source.

The base model is the same weights with the adapter switched off, so both columns come from one load.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import asdict, dataclass, field

import torch
from transformers import GenerationConfig

from sft.config import EvalConfig
from sft.data.formats import Example
from sft.data.tokenize import IGNORE, prompt_ids, reference_answer

LOSS_TOKENS_PER_BATCH = 8192  # logits are batch x length x vocab floats: bound the batch by tokens, not rows


@dataclass
class Scores:
    loss: float
    perplexity: float
    token_accuracy: float
    exact_match: float | None = None
    token_f1: float | None = None
    rouge_l: float | None = None
    generated: int = 0
    by_source: dict[str, dict] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)


@torch.no_grad()
def heldout_loss(model, rows: list[dict[str, list[int]]]) -> tuple[float, float]:
    """Mean cross-entropy per trained token and the accuracy of the argmax on those tokens."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    total_loss, total_right, total_tokens = 0.0, 0, 0
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(rows[order[end]]["input_ids"]) <= LOSS_TOKENS_PER_BATCH:
            end += 1
        batch = [rows[i] for i in order[start:end]]
        longest = max(len(r["input_ids"]) for r in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for b, row in enumerate(batch):
            n = len(row["input_ids"])
            ids[b, :n] = torch.tensor(row["input_ids"])
            labels[b, :n] = torch.tensor(row["labels"])
            mask[b, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        logits, targets = logits[:, :-1], labels[:, 1:].to(device)
        keep = targets != IGNORE
        total_loss += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
        total_right += (logits[keep].argmax(-1) == targets[keep]).sum().item()
        total_tokens += keep.sum().item()
        start = end
    return total_loss / max(total_tokens, 1), total_right / max(total_tokens, 1)


@torch.no_grad()
def decoding_config(tokenizer, stop: set[int], max_new_tokens: int, sampling: dict | None = None) -> GenerationConfig:
    """Plain greedy decoding (or plain sampling) whatever the model's generation_config says (Qwen2.5 ships
    repetition_penalty=1.05), so scores measure the model. Every value is explicit: generate() fills unset ones from
    the model's own config. Stops at the end-of-turn token(s)."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_length=0,
        eos_token_id=sorted(stop),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **({"do_sample": True, "top_k": 0, **sampling} if sampling else {}),
    )


def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    stop: set[int],
    sampling: dict | None = None,
):
    """Batched, left-padded generation, greedy unless `sampling` ({temperature, top_p}); the new text per prompt."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    greedy = decoding_config(tokenizer, stop, max_new_tokens, sampling)
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=greedy)
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return outputs


def normalise(text: str) -> str:
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalise(prediction).split(), normalise(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum(min(pred.count(w), ref.count(w)) for w in set(pred))
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@functools.cache
def _rouge():
    from rouge_score import rouge_scorer  # Google's reference implementation; needs no downloads

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, reference: str) -> float:
    return _rouge().score(reference, prediction)["rougeL"].fmeasure


def _generation_scores(predictions: list[str], references: list[str]) -> dict:
    n = len(references)
    return {
        "exact_match": sum(normalise(p) == normalise(r) for p, r in zip(predictions, references)) / n,
        "token_f1": sum(token_f1(p, r) for p, r in zip(predictions, references)) / n,
        "rouge_l": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
        "generated": n,
    }


def score(
    model, tokenizer, examples: list[Example], rows, config: EvalConfig, stop: set[int], sources: dict | None = None
) -> Scores:
    """Held-out loss on every row, then generation on up to `max_samples` prompts, scored per source too
    (`sources`: id(example) -> source name)."""
    loss, accuracy = heldout_loss(model, rows)
    result = Scores(loss=loss, perplexity=math.exp(min(loss, 50.0)), token_accuracy=accuracy)
    prompted = [e for e in examples if e.kind != "text"][: config.max_samples]
    if not prompted:
        return result
    sampling = {"temperature": config.temperature, "top_p": config.top_p} if config.do_sample else None
    if sampling:
        torch.manual_seed(config.seed)
    prompts = [prompt_ids(tokenizer, e) for e in prompted]
    predictions = generate(model, tokenizer, prompts, config.max_new_tokens, config.batch_size, stop, sampling)
    references = [reference_answer(e) for e in prompted]
    for key, value in _generation_scores(predictions, references).items():
        setattr(result, key, value)
    groups: dict[str, list[int]] = {}
    for i, example in enumerate(prompted):
        groups.setdefault((sources or {}).get(id(example), "all"), []).append(i)
    if len(groups) > 1:
        result.by_source = {
            name: _generation_scores([predictions[i] for i in idx], [references[i] for i in idx])
            for name, idx in groups.items()
        }
    result.samples = [
        {"where": e.where, "reference": r, "generated": p} for e, r, p in zip(prompted, references, predictions)
    ][:5]
    return result


def evaluate(
    model, tokenizer, examples: list[Example], rows, config: EvalConfig, stop: set[int], sources: dict | None = None
) -> dict:
    """Scores of the tuned model and, when asked, of the base (adapter off): {"tuned": {...}, "base": {...}}."""
    report = {"tuned": asdict(score(model, tokenizer, examples, rows, config, stop, sources))}
    if config.compare_base:
        off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with off:
            report["base"] = asdict(score(model, tokenizer, examples, rows, config, stop, sources))
    return report


def run_benchmarks(model, tokenizer, config: EvalConfig) -> dict:
    """Standard benchmarks through lm-evaluation-harness, when it is installed and its data can be reached.

    Returns {"benchmarks": {task: metrics}} or {"benchmarks_skipped": why}: a missing extra or an offline machine
    is a message, not a failed run.
    """
    if not config.benchmarks:
        return {}
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return {"benchmarks_skipped": "lm-evaluation-harness is not installed: pip install 'sft[bench]'"}
    try:
        results = simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size),
            tasks=config.benchmarks,
            limit=config.benchmark_limit,
        )
    except Exception as err:  # the harness raises many types when a task's data cannot be fetched
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return {"benchmarks_skipped": f"{config.benchmarks} could not run (offline, or unknown task?): {first}"}
    return {"benchmarks": results.get("results", {})}
