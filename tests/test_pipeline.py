"""The stages as a Python user composes them, on a tiny model trained for a few steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from sft.config import validate_config
from sft.data import corpus, load_dataset
from sft.errors import SftError
from sft.export import export, logits_of, probe_inputs
from sft.model import apply_lora, check_vocab, ensure_tiny_model, load_model, load_model_config, load_tokenizer
from sft.tokenize import IGNORE, tokenize_examples
from sft.train import build_sft_config, train

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp: Path, **train) -> dict:
    return {
        "model": {
            "name_or_path": str(tmp / "base"),
            "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128},
        },
        "data": {
            "train": str(ROOT / "data/reverse/train.jsonl"),
            "eval": str(ROOT / "data/reverse/eval.jsonl"),
            "max_length": 64,
        },
        "adapter": {"r": 8, "alpha": 16},
        "train": {
            "max_steps": 12,
            "per_device_train_batch_size": 8,
            "learning_rate": 3e-3,
            "logging_steps": 4,
            "save_strategy": "no",
            **train,
        },
        "eval": {"max_samples": 8, "max_new_tokens": 8},
        "export": {"merged": True, "max_shard_size": "100KB"},
        "output": {"runs_dir": str(tmp / "runs"), "name": "t"},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    config = validate_config(tiny_config(tmp))
    dataset = load_dataset(config.data)
    assert ensure_tiny_model(config.model, corpus(dataset))
    tokenizer = load_tokenizer(config.model)
    check_vocab(tokenizer, load_model_config(config.model))
    train_tokens = tokenize_examples(dataset.train[:300], tokenizer, config.data.max_length)
    eval_tokens = tokenize_examples(dataset.eval[:32], tokenizer, config.data.max_length)
    model = apply_lora(load_model(config.model), config.adapter)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    sft_config = build_sft_config(config.train, tmp / "checkpoints", config.data.max_length)
    train(model, tokenizer, train_tokens.rows, eval_tokens.rows, sft_config, tmp)
    run_dir = tmp / "run"
    run_dir.mkdir()
    stop = train_tokens.end_tokens
    exported = export(model, tokenizer, run_dir, config, stop, card={})
    return SimpleNamespace(
        config=config,
        tokenizer=tokenizer,
        model=model,
        before=before,
        run_dir=run_dir,
        tmp=tmp,
        exported=exported,
        train_tokens=train_tokens,
        stop=stop,
        dataset=dataset,
    )


def test_lora_weights_changed_and_base_weights_unchanged(trained):
    params = dict(trained.model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for name, param in params.items():
        if param.requires_grad:
            assert not torch.equal(param.detach(), trained.before[name]), f"{name} did not change"
        else:
            assert torch.equal(param.detach(), trained.before[name]), f"frozen {name} changed"


def test_loss_is_finite_and_falls(trained):
    logs = [json.loads(line) for line in (trained.tmp / "metrics.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    assert len(losses) >= 3
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_labels_are_exactly_the_answer_and_end_of_turn(trained):
    tokenizer = trained.tokenizer
    for example, row in zip(trained.dataset.train[:50], trained.train_tokens.rows[:50]):
        trained_ids = [label for label in row["labels"] if label != IGNORE]
        answer = example.messages[-1]["content"]
        assert trained_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert tokenizer.decode(trained_ids[:-1]).strip() == answer
        assert tokenizer.decode(trained_ids).endswith("<|im_end|>")
        # one contiguous span; after <|im_end|> only template decoration (a newline), never trained
        marked = [i for i, label in enumerate(row["labels"]) if label != IGNORE]
        assert marked == list(range(marked[0], marked[-1] + 1))
        assert tokenizer.decode(row["input_ids"][marked[-1] + 1 :]).strip() == ""


def test_export_layout_and_model_card(trained):
    adapter = trained.run_dir / "adapter"
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
        "README.md",
        "sft_export.json",
    ):
        assert (adapter / name).is_file(), name
    assert not list(adapter.glob("*.bin")), "weights must be safetensors"
    meta = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(meta["base_model_name_or_path"]).is_absolute()
    eot = trained.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eot in json.loads((adapter / "generation_config.json").read_text())["eos_token_id"]
    card = (adapter / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "peft" and front["base_model"] == trained.config.model.name_or_path
    assert (trained.run_dir / "merged" / "model.safetensors.index.json").is_file()  # sharded: max_shard_size
    assert not [p for p in trained.run_dir.iterdir() if p.name.startswith(".")], "temporary folders left behind"


FRESH_PROCESS = """
import sys, torch
from sft.generate import load_for_inference
from sft.export import logits_of
model, tokenizer, stop = load_for_inference(__import__("pathlib").Path(sys.argv[1]))
ids = torch.load(sys.argv[2])
torch.save(logits_of(model, ids), sys.argv[3])
"""


@pytest.mark.parametrize(("folder", "tolerance"), [("adapter", 1e-5), ("merged", 1e-4)])
def test_export_reloaded_in_a_fresh_process_gives_the_same_logits(trained, folder, tolerance, tmp_path):
    ids = probe_inputs(len(trained.tokenizer), seed=1)
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(trained.run_dir / folder), tmp_path / "ids.pt", tmp_path / "out.pt"],
        check=True,
        cwd=tmp_path,
    )
    reloaded = torch.load(tmp_path / "out.pt")
    expected = logits_of(trained.model, ids)
    assert expected.dtype == torch.float32
    assert (reloaded - expected).abs().max().item() <= tolerance
    assert (
        trained.exported[f"{folder}_reload_max_abs_diff" if folder == "adapter" else "merged_max_abs_diff"] <= tolerance
    )


def test_a_non_finite_adapter_is_never_exported(trained, tmp_path):
    param = next(p for n, p in trained.model.named_parameters() if p.requires_grad)
    saved = param.detach().clone()
    try:
        with torch.no_grad():
            param[0, 0] = float("nan")
        with pytest.raises(SftError, match="NaN"):
            export(trained.model, trained.tokenizer, tmp_path, trained.config, trained.stop, card={})
    finally:
        with torch.no_grad():
            param.copy_(saved)
    assert not (tmp_path / "adapter").exists()


def test_four_bit_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = validate_config({**tiny_config(tmp_path), "model": {"name_or_path": "x/y", "load_in_4bit": True}})
    with pytest.raises(SftError, match="needs a CUDA GPU"):
        load_model(config.model)


def test_missing_model_is_a_clear_error(tmp_path):
    config = validate_config({**tiny_config(tmp_path), "model": {"name_or_path": str(tmp_path / "nothing")}})
    with pytest.raises(SftError, match="no such folder"):
        load_tokenizer(config.model)


def test_train_without_held_out_rows_and_a_stale_stand_in(trained, tmp_path):
    """The README's Python example passes no eval rows: training must not need them. And a stand-in model built
    from another recipe is refused instead of silently reused."""
    model = apply_lora(load_model(trained.config.model), trained.config.adapter)
    args = build_sft_config({"max_steps": 2, "save_strategy": "no"}, tmp_path / "out", 64)
    metrics = train(model, trained.tokenizer, trained.train_tokens.rows[:16], [], args, tmp_path)
    assert metrics["epoch"] > 0
    other = trained.config.model.model_copy(update={"tiny": trained.config.model.tiny.model_copy(update={"seed": 1})})
    with pytest.raises(SftError, match="built from another"):
        ensure_tiny_model(other, corpus(trained.dataset))


def test_conversational_prompt_completion_learns_only_the_completion(trained):
    from sft.data import normalise

    row = {
        "prompt": [
            {"role": "user", "content": "reverse: a b"},
            {"role": "assistant", "content": "b a"},
            {"role": "user", "content": "reverse: the cat"},
        ],
        "completion": [{"role": "assistant", "content": "cat the"}],
    }
    example = normalise(row, "prompt_completion", "t row 0")
    (tokens,) = tokenize_examples([example], trained.tokenizer, 64).rows
    trained_ids = [label for label in tokens["labels"] if label != IGNORE]
    assert trained.tokenizer.decode(trained_ids).strip() == "cat the<|im_end|>"


def test_merged_model_is_sharded_and_the_cards_loading_snippet_runs(trained, tmp_path):
    merged = trained.run_dir / "merged"
    assert len(list(merged.glob("model-*.safetensors"))) > 1 and (merged / "model.safetensors.index.json").is_file()
    card = (trained.run_dir / "adapter" / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    snippet += "import torch\nprint(model(torch.tensor([[1, 2, 3]])).logits.shape)\n"
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"torch.Size([1, 3, {len(trained.tokenizer)}])" in done.stdout
    assert "## Export checks" in card and "adapter_reload_max_abs_diff: 0.0" in card


def test_benchmarks_are_skipped_with_a_message_when_the_harness_cannot_run(trained):
    from sft.config import EvalConfig
    from sft.evaluate import run_benchmarks

    assert run_benchmarks(trained.model, trained.tokenizer, EvalConfig()) == {}
    result = run_benchmarks(trained.model, trained.tokenizer, EvalConfig(benchmarks=["hellaswag"], benchmark_limit=2))
    assert (
        set(result) == {"benchmarks_skipped"}
        and "hellaswag" in result["benchmarks_skipped"]
        or ("not installed" in result["benchmarks_skipped"])
    )


def test_a_failed_write_leaves_the_previous_folder_intact(tmp_path):
    from sft.runs import atomic_dir, is_complete

    final = tmp_path / "report"
    with atomic_dir(final) as tmp:
        (tmp / "report.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "report.json").write_text("half")
        raise RuntimeError("disk full")
    assert (final / "report.json").read_text() == "old" and is_complete(final)
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary folder left behind
    with atomic_dir(final) as tmp:
        (tmp / "report.json").write_text("new")
    assert (final / "report.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["report"]


def test_same_seed_same_adapter_bytes_and_losses_other_seed_differs(trained, tmp_path):
    """CPU fp32: a run is a function of its config and data (the LoRA initialisation is seeded too)."""
    from sft.pipeline import train_run

    def run(seed: int, name: str) -> tuple[bytes, list[float]]:
        raw = tiny_config(trained.tmp, max_steps=6, seed=seed, eval_strategy="no")
        raw.update(eval={"enabled": False}, export={"merged": False, "verify": False})
        raw["output"] = {"runs_dir": str(tmp_path), "name": name}
        raw["data"]["cache_dir"] = str(tmp_path / "cache")
        folder = train_run(validate_config(raw))
        logs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return (folder / "adapter" / "adapter_model.safetensors").read_bytes(), [e["loss"] for e in logs if "loss" in e]

    first, second, other = run(0, "a"), run(0, "b"), run(1, "c")
    assert first == second
    assert other[0] != first[0] and other[1] != first[1]
