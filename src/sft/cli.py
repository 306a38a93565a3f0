"""`sft ...`: the command line. User errors become one clear message and exit code 2; --debug shows tracebacks."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sft.errors import SftError

EXAMPLES = """examples:
  sft train configs/tiny.yaml                          # the offline demo
  sft train configs/tiny.yaml train.learning_rate=1e-3 # dotted overrides
  sft train configs/tiny.yaml --resume                 # continue after a crash or preemption
  sft check configs/qwen2_5_0_5b/lora.yaml             # validate a config without loading anything
  sft data configs/tiny.yaml --examples 5              # token counts and the trained tokens, per source
  sft generate runs/tiny --prompt "reverse: the cat sat"
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sft",
        description="LoRA supervised fine-tuning of a causal LM: data -> tokens -> train -> evaluate -> export.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="run every stage into runs/<name>/", description=_doc_train())
    train.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=1e-4")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the newest run of this config from its latest complete checkpoint (model, optimizer, "
        "scheduler, RNG and data order); refuses if the config or the data changed",
    )
    train.add_argument("--run", type=Path, help="with --resume: the run folder to continue (default: the newest)")
    train.add_argument("--force", action="store_true", help="with --resume: resume even if config or data changed")
    train.add_argument(
        "--stop-after",
        type=_positive_seconds,
        metavar="SECONDS",
        help="stop training after SECONDS of training, then evaluate and export as usual (used by sweep budgets)",
    )

    data = commands.add_parser(
        "data",
        help="show per-source token counts and examples with the trained tokens marked",
        description="Tokenize the config's data exactly as `sft train` would and show, per source: rows, format, "
        "token-length percentiles, the share of trained tokens and rows dropped as too long; then examples with "
        "the trained tokens in green (in [[brackets]] when not a terminal). Exits 2 on a fatal data problem.",
    )
    data.add_argument("config")
    data.add_argument("overrides", nargs="*")
    data.add_argument("--examples", type=_non_negative, default=3, help="rows to render (default 3)")
    data.add_argument("--json", action="store_true", help="print the report as JSON")

    check = commands.add_parser("check", help="validate a config (schema and trl.SFTConfig) and exit")
    check.add_argument("config")
    check.add_argument("overrides", nargs="*")

    gen = commands.add_parser("generate", help="generate with an exported adapter or merged model")
    gen.add_argument("path", help="a run folder, its adapter/ folder, or a merged/ folder")
    gen.add_argument("--prompt", required=True, help="the user message")
    gen.add_argument("--system", help="an optional system message")
    gen.add_argument("--max-new-tokens", type=_positive, default=256)

    evaluate = commands.add_parser("eval", help="score a finished run again: base vs tuned, into RUN/report/")
    evaluate.add_argument("target", help="a run folder, or a config whose newest run is scored")
    evaluate.add_argument("overrides", nargs="*", help="e.g. eval.max_samples=50 eval.do_sample=true")

    chat = commands.add_parser("chat", help="talk to an exported adapter or merged model in the terminal")
    chat.add_argument("path", help="a run folder, its adapter/ folder, or a merged/ folder")
    chat.add_argument("--system", help="an optional system message")
    chat.add_argument("--max-new-tokens", type=_positive, default=512)

    export = commands.add_parser("export", help="re-export a run: adapter, merged model, card, checks")
    export.add_argument("run", help="a run folder written by `sft train`")
    export.add_argument("--merged", action="store_true", help="also write the merged model")

    sweep = commands.add_parser(
        "sweep",
        help="run a config sweep: one run folder per trial, a results table, plots and the best config",
        description="Run the trials of a sweep file (a base config plus a search space over any nested key), one "
        "after another; rerunning the same sweep skips finished trials.",
    )
    sweep.add_argument("sweep", help="sweep YAML, e.g. configs/sweeps/tiny_lr.yaml")
    sweep.add_argument("overrides", nargs="*", help="dotted overrides of the sweep file, e.g. trials=8")

    plan = commands.add_parser(
        "plan",
        help="predict peak memory, FLOPs and time per step from config.json alone; --measure checks it",
        description="Predict a run's peak memory by component (weights, LoRA, optimizer, activations with and "
        "without checkpointing, logits, evaluation, generation), its FLOPs and time per step on a device, and "
        "whether it fits; no weights are loaded. --measure runs two real training steps here and compares.",
    )
    plan.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_length=2048")
    plan.add_argument("--device", help="h100, h200, a100, a100-40gb, l4 or cpu (default: this machine)")
    plan.add_argument("--measure", action="store_true", help="also run two training steps and compare")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # `sft train CONFIG --resume a.b=1`: overrides may follow the options too
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.debug:
        _quiet_libraries()
    try:
        return _run(args)
    except SftError as err:
        if args.debug:
            raise
        from sft.runs import redact_text

        stopped = getattr(err, "exit_code", 2) > 128  # SIGTERM/SIGINT: a clean stop, not an error
        print(f"sft: {'' if stopped else 'error: '}{redact_text(str(err))}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print("sft: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sft data ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(args: argparse.Namespace) -> int:
    from sft.config import load_config

    if args.command == "check":
        config = load_config(args.config, args.overrides)
        from sft.runs import redact_text

        print(redact_text(f"{args.config}: valid ({config.model.name_or_path}, LoRA r={config.adapter.r})"))
        return 0
    if args.command == "data":
        from sft.pipeline.inspect import format_report, inspect

        report = inspect(load_config(args.config, args.overrides), examples=args.examples)
        if args.json:
            print(
                json.dumps(
                    {**report, "examples": [{k: v for k, v in e.items() if k != "color"} for e in report["examples"]]},
                    indent=2,
                )
            )
        else:
            print(format_report(report, color=sys.stdout.isatty()))
        return 0
    if args.command == "train":
        from sft.pipeline import train_run

        if (args.run or args.force) and not args.resume:
            raise SftError("--run and --force only apply with --resume")
        config = load_config(args.config, args.overrides)
        train_run(config, resume=args.run or args.resume, force=args.force, stop_after=args.stop_after)
        return 0
    if args.command == "generate":
        from sft.generate import answer, load_for_inference

        model, tokenizer, stop = load_for_inference(Path(args.path))
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        print(answer(model, tokenizer, stop, messages, args.max_new_tokens))
        return 0
    if args.command == "eval":
        from sft.pipeline import eval_run

        eval_run(Path(args.target), args.overrides)
        return 0
    if args.command == "plan":
        from sft.plan import run_plan

        return run_plan(args.config, args.overrides, args.device, args.measure, args.json)
    if args.command == "sweep":
        from sft.sweep import run_sweep

        run_sweep(Path(args.sweep), args.overrides)
        return 0
    if args.command == "chat":
        from sft.generate import chat_loop

        chat_loop(Path(args.path), args.system, args.max_new_tokens)
        return 0
    if args.command == "export":
        from sft.export import export_run

        print(json.dumps(export_run(Path(args.run), merged=args.merged), indent=2))
        return 0
    raise AssertionError(args.command)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):  # nan fails this too
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return seconds


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _quiet_libraries() -> None:
    """Keep the console for progress and results: library warnings about deprecations are not the user's."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars; training keeps its own progress bar


def _doc_train() -> str:
    return (
        "Validate the config and data, tokenize with the model's own tokenizer and chat template, fine-tune with "
        "LoRA through TRL's SFTTrainer, evaluate base vs tuned on held-out data, and export the adapter. "
        "Nothing is written until validation passes."
    )


if __name__ == "__main__":
    sys.exit(main())
