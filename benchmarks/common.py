"""What the benchmark harnesses share: the random-weight Llama shapes, the chat-shaped data, token accounting and the
LoRA FLOP count of ../shared/docs/BENCHMARKS.md.

Speed and memory do not depend on weight values, so the models are random; the token ids come from real text (the
Alpaca demo set tokenized with Qwen2.5, ids folded into the model's vocabulary) so that the held-out loss has real
structure to learn, and the lengths are the real lengths.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"  # the test suite's vendored files (tests/fixtures/SOURCES.md), kept plain
ALPACA = FIXTURES / "datasets/llamafactory/alpaca_en_demo.json"
QWEN = FIXTURES / "tokenizers/qwen2_5"
# Measured once on ALPACA with QWEN's chat template (999 rows): used only to shape the fallback without them.
ALPACA_MEAN, ALPACA_STD, ALPACA_ANSWER_SHARE = 194.4, 131.2, 0.756
PAD_ID, EOS_ID = 0, 1  # reserved: folded text ids start at 2, so a pad id never collides with a real token


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ModelSpec:
    """Llama shapes: SwiGLU MLP of ~8/3 d, head_dim 64, untied 32k vocabulary (as Llama 2)."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int = 32000

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=8192,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            bos_token_id=None,
            tie_word_embeddings=False,
            use_cache=False,
        )


SIZES = {
    "d256-L4": ModelSpec("d256-L4", 256, 4, 4, 688),  # 3.2M decoder linear parameters
    "d384-L6": ModelSpec("d384-L6", 384, 6, 6, 1024),  # 10.6M
    "d512-L8": ModelSpec("d512-L8", 512, 8, 8, 1376),  # 25.3M: the BENCHMARKS.md reference model
    "d768-L12": ModelSpec("d768-L12", 768, 12, 12, 2048),  # 85M: minutes per step at 4k tokens on 2 cores
}


def build_model(spec: ModelSpec, seed: int, dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
    """A random-weight Llama built from a seed: the same spec and seed give the same weights in every process."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = spec.config()
    config._attn_implementation = attn
    return LlamaForCausalLM(config).to(dtype)


def build_tokenizer(vocab: int):
    """A word-level tokenizer over the folded ids: SFTTrainer needs one for its pad token; nothing is tokenized."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD_ID, "<eos>": EOS_ID, **{f"t{i}": i for i in range(2, vocab)}}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def param_counts(model) -> dict[str, int]:
    """N_dec (decoder linear weights, frozen), N_lora (trainable), embedding and LM head, as the MFU formula needs."""
    decoder = lora = other = 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            lora += param.numel()
        elif ".layers." in name and name.endswith("weight") and param.dim() == 2:
            decoder += param.numel()
        else:
            other += param.numel()
    return {"decoder_linear": decoder, "lora": lora, "embeddings_head_norms": other, "total": decoder + lora + other}


def lora_flops_per_token(counts: dict[str, int], spec: ModelSpec) -> tuple[float, float, float]:
    """Per-token FLOP terms of BENCHMARKS.md: (linear part per real token, attention factor per real token and unit
    of document length, LM head per scored token). F = a * real + b * sum(s^2) + c * scored."""
    linear = 4 * counts["decoder_linear"] + 6 * counts["lora"]
    attention = 12 * spec.layers * spec.hidden  # n_heads * head_dim = hidden for these shapes
    head = 4 * spec.vocab * spec.hidden
    return linear, attention, head


def head_scores_labels_only() -> bool:
    """TRL 1.16's fused LM head projects only the positions with a label on Triton devices (CUDA, XPU) and every
    position elsewhere (CPU), so the head's FLOPs count per trained token there and per real token here."""
    try:
        from trl.kernels.chunked_logprob import _use_triton
    except ImportError:
        return torch.cuda.is_available()
    return _use_triton(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class Data:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    source: str

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @staticmethod
    def load(path: Path) -> Data:
        return Data(**json.loads(path.read_text()))


def chat_data(n_train: int, n_eval: int, vocab: int, max_length: int, seed: int = 0) -> Data:
    """Rows of input_ids + labels (-100 on the prompt, the answer and its end-of-turn trained), as `sft.tokenize`
    produces them. Real Alpaca lengths and text from tests/fixtures; otherwise lognormal lengths of the same
    mean and spread with Zipf-distributed ids."""
    if ALPACA.is_file() and QWEN.is_dir():
        pairs, source = _alpaca_pairs(vocab)
        source += f"; ids folded into {vocab} (2 + id mod {vocab - 2})"
    else:
        pairs, source = (
            _lognormal_pairs(n_train + n_eval, vocab, seed),
            (
                f"tests/fixtures absent: lognormal lengths (mean {ALPACA_MEAN}, std {ALPACA_STD}, as alpaca_en_demo "
                "with Qwen2.5), Zipf-distributed synthetic ids"
            ),
        )
    random.Random(seed).shuffle(pairs)
    if n_train + n_eval > len(pairs):  # more rows than the file has: go round it again (only for long runs)
        pairs = (pairs * math.ceil((n_train + n_eval) / len(pairs)))[: n_train + n_eval]
    rows = []
    for prompt, answer in pairs[: n_train + n_eval]:
        ids = (prompt + answer)[:max_length]
        labels = ([-100] * len(prompt) + answer)[:max_length]
        rows.append({"input_ids": ids, "labels": labels})
    return Data(train=rows[n_eval:], eval=rows[:n_eval], source=source)


def _alpaca_pairs(vocab: int) -> tuple[list[tuple[list[int], list[int]]], str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(QWEN)
    fold = lambda ids: [2 + i % (vocab - 2) for i in ids]  # noqa: E731
    pairs = []
    for record in json.loads(ALPACA.read_text()):
        user = {"role": "user", "content": (record["instruction"] + "\n" + record["input"]).strip()}
        answer = {"role": "assistant", "content": record["output"]}
        prompt = tokenizer.apply_chat_template([user], tokenize=True, add_generation_prompt=True)["input_ids"]
        full = tokenizer.apply_chat_template([user, answer], tokenize=True)["input_ids"]
        # Train the answer and its <|im_end|>, not the newline after it (never generated).
        end = len(full) - 1 if tokenizer.decode(full[-1:]) == "\n" else len(full)
        pairs.append((fold(full[: len(prompt)]), fold(full[len(prompt) : end])))
    return pairs, f"{ALPACA.name} tokenized with Qwen2.5's chat template ({len(pairs)} rows)"


def _lognormal_pairs(n: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    sigma = math.sqrt(math.log(1 + (ALPACA_STD / ALPACA_MEAN) ** 2))
    mu = math.log(ALPACA_MEAN) - sigma**2 / 2
    # cumulative once: the same draws as weights=, without summing a 128k vocabulary again for every row
    cumulative = list(itertools.accumulate(1 / (rank + 1) for rank in range(vocab - 2)))
    pairs = []
    for _ in range(n):
        length = max(8, round(rng.lognormvariate(mu, sigma)))
        ids = rng.choices(range(2, vocab), cum_weights=cumulative, k=length)
        split = max(2, round(length * (1 - ALPACA_ANSWER_SHARE)))
        pairs.append((ids[:split], ids[split:]))
    return pairs


def length_stats(rows: list[dict[str, list[int]]]) -> dict[str, float]:
    lengths = sorted(len(r["input_ids"]) for r in rows)
    return {
        "rows": len(lengths),
        "tokens": sum(lengths),
        "trained_tokens": sum(sum(1 for x in r["labels"] if x != -100) for r in rows),
        "mean": round(statistics.mean(lengths), 1),
        "p50": lengths[len(lengths) // 2],
        "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        "max": lengths[-1],
    }


def batch_tokens(inputs: dict[str, Any]) -> dict[str, float]:
    """Real, pad and trained tokens of one collated batch, and sum(s^2) over its documents (attention FLOPs).

    Padded batches carry an attention_mask; padding-free ones carry position_ids restarting at 0 for each document."""
    ids = inputs["input_ids"]
    labels = inputs["labels"]
    if "attention_mask" in inputs:
        mask = inputs["attention_mask"].bool()
        lengths = mask.sum(-1).tolist()
        real, pad = int(mask.sum()), int((~mask).sum())
    else:
        starts = (inputs["position_ids"][0] == 0).nonzero().flatten().tolist() + [ids.shape[-1]]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
        real, pad = int(ids.numel()), 0
    return {
        "real": real,
        "pad": pad,
        "trained": int((labels != -100).sum()),
        "sum_s2": float(sum(s * s for s in lengths)),
        "docs": len(lengths),
    }


def evaluate_loss(model, rows: list[dict[str, list[int]]]) -> float:
    """Mean loss per trained token of the held-out rows, each row alone (no padding, no packing): the same
    computation whichever way the model was trained."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            if n:
                loss = model(input_ids=ids, labels=labels, use_cache=False).loss
                total, count = total + float(loss) * n, count + n
    return total / count


def pipeline_choices(
    max_length: int, lora: dict[str, Any], train: dict[str, Any], folder: str, model_config
) -> tuple[dict[str, Any], str]:
    """Precision and checkpointing as `sft train` decides them (sft.plan.auto_settings: a measured probe and the
    memory plan), for the options the run's `train` section leaves unset."""
    try:
        from sft.plan import auto_settings
    except ImportError:
        return {}, "sft.train.defaults() (no sft.plan.auto_settings in this checkout)"
    from sft.config import RunConfig

    config = RunConfig.model_validate(
        {
            "model": {"name_or_path": folder},
            "data": {"train": folder, "max_length": max_length},
            "adapter": lora,
            "train": train,
        }
    )
    auto, lines = auto_settings(config, model_config)
    return auto, "sft.train.defaults() + sft.plan.auto_settings: " + "; ".join(lines)


def machine() -> dict[str, Any]:
    import peft
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds every process on the machine has used, CPU seconds this process has used), both since an
    arbitrary origin: the difference over a stretch of work says how much CPU others took meanwhile."""
    own = os.times()
    try:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    busy = sum(values) - values[3] - values[4]  # all but idle and iowait, in clock ticks
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def others_cores(start: tuple[float, float, float], end: tuple[float, float, float]) -> float:
    """Cores' worth of CPU that other processes used between two (wall, all, own) snapshots."""
    wall = end[0] - start[0]
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / wall) if wall > 0 else 0.0


def snapshot() -> tuple[float, float, float]:
    return (time.perf_counter(), *cpu_seconds())


def step_clock():
    """A TrainerCallback that records, at the end of each optimizer step (after a CUDA sync on a GPU), `ends` (wall
    time) and `cpu` ((wall, machine CPU s, own CPU s) snapshots, for `others_cores`)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.cpu: list[tuple[float, float, float]] = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.cpu.append(snapshot())
            self.ends.append(self.cpu[-1][0])

    return StepClock()


def count_batches(trainer) -> list[dict[str, float]]:
    """The `batch_tokens` of every micro-batch the trainer trains on (what its collator produced), filled in as it
    trains."""
    batches: list[dict[str, float]] = []
    step = trainer.training_step

    def counted(model, inputs, *args, **kwargs):
        batches.append(batch_tokens(inputs))
        return step(model, inputs, *args, **kwargs)

    trainer.training_step = counted
    return batches


def cpu_idle(seconds: float = 2.0) -> float:
    """Fraction of all CPUs idle over the next `seconds` (from /proc/stat; 1.0 where it cannot be read)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except OSError:
        return 1.0
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet(max_wait: float, idle: float = 0.8) -> dict[str, float]:
    """Wait until the CPUs are mostly idle (others' work would slow the next measurement down), at most `max_wait`
    seconds; return how long it waited and the idle fraction seen last. On a shared machine every measurement then
    starts as quiet as it can, and the report says how quiet that was."""
    start = time.perf_counter()
    seen = cpu_idle(2.0 if max_wait > 0 else 0.2)
    while seen < idle and time.perf_counter() - start < max_wait:
        seen = cpu_idle(5.0)
    return {"waited_s": round(time.perf_counter() - start, 1), "idle_before": round(seen, 2)}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
