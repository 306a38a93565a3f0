"""The stages composed into one run: data -> model -> tokens -> train -> evaluate -> export.

Validation comes first (config, data, tokenizer, vocabulary, model load) and nothing is written before it passes.
Under `accelerate launch` every rank trains; only the main process writes the run folder, evaluates and exports.
"""

from __future__ import annotations

import difflib
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from transformers import set_seed

from sft.config import RunConfig, to_yaml
from sft.console import log
from sft.data import Dataset, corpus, load_dataset
from sft.data.cache import tokenize_cached
from sft.data.tokenize import prompt_ids
from sft.errors import SftError
from sft.evaluate import evaluate, run_benchmarks, write_report
from sft.export import export
from sft.model import (
    apply_lora,
    build_quantization_config,
    check_vocab,
    embedding_rows,
    ensure_tiny_model,
    ids_past,
    load_model,
    load_model_config,
    load_tokenizer,
)
from sft.runs import (
    check_free_space,
    check_runs_dir,
    create_run_dir,
    environment,
    read_json,
    run_lock,
    write_json,
    write_text,
)
from sft.train import (
    Interrupted,
    StopSignals,
    build_sft_config,
    checkpoints,
    discard_incomplete,
    distributed,
    time_limit,
    train,
    truncate_log,
)


def train_run(
    config: RunConfig, resume: bool | Path = False, force: bool = False, stop_after: float | None = None
) -> Path:
    """`sft train`: a new run folder, or (`resume`) the latest complete checkpoint of an earlier run of this config
    (`resume` may name the run folder). Resuming refuses a changed config or data unless `force`. `stop_after`:
    training stops after that many seconds, then the run evaluates and exports as usual."""
    with StopSignals() as signals:
        return _train_run(config, resume, force, signals, stop_after)


def _train_run(
    config: RunConfig, resume: bool | Path, force: bool, signals: StopSignals, stop_after: float | None
) -> Path:
    started = time.time()

    build_quantization_config(config.model)  # 4-bit without CUDA fails here, before anything is built or read
    check_runs_dir(config.output.runs_dir)
    dataset = load_dataset(config.data)
    for warning in dataset.warnings:
        log(f"warning: {warning}")
    resumed = resumable_run(config, resume, dataset.fingerprint(), force) if resume else None
    # Building the SFTConfig sets up the (possibly distributed) device state the Trainer will use: ask it who we are.
    # It writes nothing; it comes this early so that the ranks can take turns below.
    sft_config = build_sft_config({**planned(config, resumed), **config.train}, "checkpoints", config.data.max_length)
    main = sft_config.process_index == 0
    # Data preparation once per machine, not once per rank: the local main process builds the stand-in model and
    # tokenizes into the cache (atomic writes) while the other ranks wait; they then read both from disk.
    # Without a cache (data.cache_dir: null) every rank tokenizes for itself.
    with sft_config.main_process_first(local=True, desc="data preparation"):
        if ensure_tiny_model(config.model, corpus(dataset)):
            log(f"built the stand-in model at {config.model.name_or_path} (tiny random Llama, not a pretrained model)")
        tokenizer = load_tokenizer(config.model)
        model_config = load_model_config(config.model)  # config.json alone: checks before any weight is loaded
        check_vocab(tokenizer, model_config)
        clock, cache = time.time(), config.data.cache_dir
        train_tokens, hit = tokenize_cached(
            dataset.train, tokenizer, config.data.max_length, config.data.on_too_long, cache
        )
        eval_tokens, _ = tokenize_cached(
            dataset.eval, tokenizer, config.data.max_length, config.data.on_too_long, cache
        )
    log(f"tokens {'loaded from the cache' if hit else 'computed'} in {time.time() - clock:.2f} s")
    stats = {"train": train_tokens.stats.summary(), "eval": eval_tokens.stats.summary()}
    log(f"data: {_describe(stats['train'])} to train, {_describe(stats['eval'])} held out")

    rows = embedding_rows(model_config)
    model = load_model(config.model, tokenizer)
    set_seed(sft_config.seed)  # the LoRA init below is random and comes before the Trainer seeds anything
    added = sorted(ids_past(tokenizer, rows).values()) if rows is not None else []
    if added:
        log(f"added {len(added)} token(s) for the chat template; their embedding rows are trained with the adapter")
    model = apply_lora(model, config.adapter, added)

    # Everything is validated and loaded: from here on the run folder exists.
    if main and resumed is None:  # before creating anything: a full disk is found now, not after hours of training
        check_free_space(Path(config.output.runs_dir), _export_size(model, config), "the export")
    if resumed is not None:
        run_dir, checkpoint = resumed
    else:
        run_dir = create_run_dir(config.output.runs_dir, config.output.name) if main else None
        run_dir, checkpoint = Path(_from_main_process(str(run_dir), sft_config.world_size)), None
    sft_config.output_dir = str(run_dir / "checkpoints")
    with run_lock(run_dir) if main else nullcontext(), failure_recorded(run_dir / "run.json", main):
        if main and checkpoint is None:
            log(f"run folder: {run_dir}")
            write_text(run_dir / "config.yaml", to_yaml(config))
            write_json(run_dir / "environment.json", environment())
            write_json(run_dir / "train_args.json", sft_config.to_dict())  # every SFTConfig value in force
            sources = [{"path": str(s.path), "format": s.format, "sha256": s.sha256} for s in dataset.sources]
            write_json(run_dir / "data.json", {"fingerprint": dataset.fingerprint(), "sources": sources, **stats})
        elif main:
            step = int(checkpoint.name.split("-")[1])
            log(f"resuming {run_dir} from {checkpoint.name} (step {step})")
            for stale in discard_incomplete(run_dir / "checkpoints"):
                log(f"removed an incomplete checkpoint: {stale.name}")
            for name in ("metrics.jsonl", "data_order.jsonl"):
                truncate_log(run_dir / name, step)
            if force:
                write_text(run_dir / "config.yaml", to_yaml(config))
        if main:
            write_json(run_dir / "run.json", {"status": "training", "resumed_from": checkpoint and checkpoint.name})

        def rebuild():  # the same model, unsharded: under FSDP / ZeRO-3 it takes the adapter gathered from the ranks
            return apply_lora(load_model(config.model, tokenizer), config.adapter, added)

        trained = []  # the model to evaluate and export (the one trained, or its unsharded copy on the main process)

        def finished(trainer) -> None:  # on every rank once training ends: every rank joins any gather
            trained.append(distributed.whole_model(trainer, model, rebuild))

        rows = (train_tokens.rows, eval_tokens.rows)
        limit = [time_limit(stop_after)] if stop_after is not None else None
        metrics = train(
            model, tokenizer, *rows, sft_config, run_dir, checkpoint, signals, on_trained=finished, callbacks=limit
        )
        if not main:
            distributed.leave()
            return run_dir
        model = trained[0]

        stop = train_tokens.end_tokens | ({tokenizer.eos_token_id} - {None})
        report: dict = {"train": metrics}
        card = {
            "train_examples": stats["train"]["examples"],
            "trained_tokens": stats["train"]["trained_tokens"],
            "fingerprint": dataset.fingerprint(),
        }
        if config.eval.enabled:
            log("evaluating the base model (adapter off) and the tuned model on held-out data")
            scores = evaluate(model, tokenizer, dataset.eval, eval_tokens.rows, config.eval, stop, sources_of(dataset))
            report.update(scores, **_benchmarks(model, tokenizer, config))
            card["metrics_markdown"] = write_report(run_dir / "report", report, run_dir / "metrics.jsonl")
        log("exporting the adapter" + (" and the merged model" if config.export.merged else ""))
        check_free_space(run_dir, _export_size(model, config), "the export")
        prompts = [prompt_ids(tokenizer, e) for e in dataset.eval if e.kind != "text"][:3]
        report["export"] = export(model, tokenizer, run_dir, config, stop, card, prompts)
        write_json(run_dir / "run.json", {"status": "complete", "seconds": round(time.time() - started, 1), **report})
    if "metrics_markdown" in card:
        print(card["metrics_markdown"])
    log(f"done in {time.time() - started:.0f} s: {run_dir}")
    return run_dir


PLANNED = ("bf16", "use_cpu", "activation_checkpointing")


def planned(config: RunConfig, resumed: tuple[Path, Path] | None) -> dict:
    """Precision and activation checkpointing where the config leaves them unset, from `sft plan` (config.json only,
    before any weight is loaded), with the reasons logged; a warning when the run will not fit. A resumed run keeps
    the values it started with, so that it continues with the same arithmetic."""
    if resumed is not None:
        started = read_json(resumed[0] / "train_args.json")
        return {k: started[k] for k in PLANNED if k in started and k not in config.train}
    from sft.plan import auto_settings, read_model_config

    auto, reasons = auto_settings(config, read_model_config(config)[0])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch_cuda():
        # Several CPU processes must agree on the precision; a timing probe per process could disagree.
        auto = {k: v for k, v in auto.items() if k not in ("bf16", "use_cpu")}
        reasons = [r for r in reasons if not r.startswith("precision")] + ["precision: fp32 (several CPU processes)"]
    for line in reasons:
        log(line)
    return auto


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _export_size(model, config: RunConfig) -> int:
    """Bytes the export writes: the adapter, and the merged model (every parameter in its dtype) when asked."""
    adapter = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    merged = sum(p.numel() * p.element_size() for p in model.parameters()) if config.export.merged else 0
    return adapter + merged


def resumable_run(config: RunConfig, resume: bool | Path, fingerprint: str, force: bool) -> tuple[Path, Path]:
    """The run folder to resume and its latest complete checkpoint; refuses a run whose config or data changed."""
    run_dir = Path(resume) if isinstance(resume, Path) else _newest_run(config)
    if not (run_dir / "config.yaml").is_file():
        raise SftError(f"{run_dir}: not a run folder written by `sft train` (no config.yaml)")
    status = read_json(run_dir / "run.json").get("status")
    if status == "complete":
        raise SftError(f"{run_dir}: nothing to resume, this run is complete (start a new one without --resume)")
    found = checkpoints(run_dir / "checkpoints")
    if not found:
        raise SftError(
            f"{run_dir}: no complete checkpoint to resume from (expected {run_dir}/checkpoints/checkpoint-N with "
            "sft_complete.json; set train.save_steps so runs save checkpoints, e.g. train.save_steps=200)"
        )
    saved = (run_dir / "config.yaml").read_text(encoding="utf-8")
    diff = "".join(
        difflib.unified_diff(
            saved.splitlines(keepends=True), to_yaml(config).splitlines(keepends=True), "run's config", "this config"
        )
    )
    old_fingerprint = read_json(run_dir / "data.json").get("fingerprint")
    changes = []
    if diff:
        changes.append(f"the config changed:\n{diff.rstrip()}")
    if old_fingerprint != fingerprint:
        changes.append(f"the data changed: fingerprint {old_fingerprint} -> {fingerprint}")
    if changes and not force:
        raise SftError(
            f"{run_dir}: refusing to resume a different run; "
            + "; ".join(changes)
            + "\nRun without --resume to start a new run, or add --force to resume anyway"
        )
    for change in changes:
        log(f"warning: resuming anyway (--force): {change}")
    return run_dir, found[-1]


def _newest_run(config: RunConfig) -> Path:
    root, name = Path(config.output.runs_dir), config.output.name
    runs = [p for p in root.glob(f"{name}*") if p.is_dir() and (p.name == name or p.name[len(name) :].startswith("-"))]
    runs = [p for p in runs if p.name == name or p.name[len(name) + 1 :].isdigit()]
    if not runs:
        raise SftError(f"nothing to resume: no run of {name!r} under {root}/ (start one without --resume)")
    return max(runs, key=lambda p: int(p.name[len(name) + 1 :] or 1) if p.name != name else 1)


def _from_main_process(value: str, world_size: int) -> str:
    if world_size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def failure_recorded(status_file: Path, write: bool):
    """A run that stops half-way says so in run.json, with the error, instead of looking merely unfinished."""
    try:
        yield
    except BaseException as err:
        if write:
            stopped = isinstance(err, (Interrupted, KeyboardInterrupt))
            saved = checkpoints(status_file.parent / "checkpoints")
            write_json(
                status_file,
                {
                    "status": "interrupted" if stopped else "failed",
                    "error": f"{type(err).__name__}: {err}",
                    "resume": f"sft train CONFIG --resume (from {saved[-1].name})" if saved else None,
                },
            )
        raise


def _benchmarks(model, tokenizer, config: RunConfig) -> dict:
    result = run_benchmarks(model, tokenizer, config.eval)
    if "benchmarks_skipped" in result:
        log(f"benchmarks skipped: {result['benchmarks_skipped']}")
    return result


def sources_of(dataset: Dataset) -> dict[int, str]:
    """id(example) -> the name of its source file, for per-source scores."""
    return {id(e): s.path.name for s in dataset.sources for e in s.examples}


def eval_run(target: Path, config_overrides: list[str]) -> Path:
    """`sft eval`: score a finished run (base vs tuned) on its held-out data again, into RUN/report/.

    `target` is a run folder, or a config file whose newest complete run is scored. `config_overrides` apply to
    the run's config (e.g. eval.max_samples=50, eval.do_sample=true).
    """
    from sft.config import apply_overrides, read_yaml, validate_config
    from sft.generate import load_for_inference

    run_dir = target if target.is_dir() else latest_run(target)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "adapter").is_dir():
        raise SftError(f"{run_dir}: expected a run folder written by `sft train` (config.yaml and adapter/)")
    raw = apply_overrides(read_yaml(run_dir / "config.yaml"), config_overrides)
    config = validate_config(raw, source=str(run_dir / "config.yaml"))
    dataset = load_dataset(config.data)
    model, tokenizer, stop = load_for_inference(run_dir / "adapter")
    eval_tokens, _ = tokenize_cached(
        dataset.eval, tokenizer, config.data.max_length, config.data.on_too_long, config.data.cache_dir
    )
    log(f"evaluating {run_dir}: base (adapter off) and tuned on {len(dataset.eval)} held-out rows")
    with run_lock(run_dir):
        report = evaluate(model, tokenizer, dataset.eval, eval_tokens.rows, config.eval, stop, sources_of(dataset))
        report.update(_benchmarks(model, tokenizer, config))
        print(write_report(run_dir / "report", report, run_dir / "metrics.jsonl"))
    log(f"report: {run_dir / 'report'}")
    return run_dir


def latest_run(config_path: Path) -> Path:
    from sft.config import load_config

    config = load_config(config_path)
    root = Path(config.output.runs_dir)
    runs = [p for p in root.glob(f"{config.output.name}*") if (p / "adapter" / "adapter_config.json").is_file()]
    runs = [p for p in runs if p.name == config.output.name or p.name[len(config.output.name) :].lstrip("-").isdigit()]
    if not runs:
        raise SftError(f"{config_path}: no finished run of it under {root}/ (expected {root}/{config.output.name})")
    return max(runs, key=lambda p: (p / "adapter").stat().st_mtime)


def _describe(summary: dict) -> str:
    dropped = f", {summary['dropped_too_long']} dropped as too long" if summary["dropped_too_long"] else ""
    return (
        f"{summary['examples']} examples, {summary['tokens']} tokens ({summary['trained_fraction']:.0%} trained, "
        f"median length {summary.get('length_p50')}){dropped}"
    )
