"""Supervised fine-tuning with TRL's SFTTrainer: the only place a trainer is run.

The SFTConfig comes from `sft.config.trl_args.build_sft_config`. Rows arrive already tokenized and labelled (see
`sft.data.tokenize`); TRL packs them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sft.errors import SftError
from sft.runs import check_free_space, publish
from sft.train.checkpoint_dirs import CHECKPOINT, STAGING, checkpoints, rotate
from sft.train.signals import Interrupted, StopSignals


def _rows_to_dataset(rows: list[dict[str, list[int]]]):
    from datasets import Dataset

    return Dataset.from_dict({key: [row[key] for row in rows] for key in ("input_ids", "labels")})


def make_callbacks(metrics_path: Path, signals: StopSignals):
    from transformers import TrainerCallback

    class MetricsToJsonl(TrainerCallback):
        """Every log line to metrics.jsonl; a non-finite loss or gradient norm stops the run at that step."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            for key in ("loss", "grad_norm", "eval_loss"):
                value = logs.get(key)
                if isinstance(value, float) and not math.isfinite(value):
                    raise SftError(
                        f"training stopped at step {state.global_step}: {key} is {value}. Likely causes: a learning "
                        "rate too high, fp16 overflow (use bf16 or fp32), or rows with no trained tokens. The last "
                        "good checkpoint (if any) is kept; nothing was exported"
                    )
            if state.is_world_process_zero:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

    class StopOnSignal(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if signals.stop_now(args.device):
                control.should_save = True
                control.should_training_stop = True

    return [MetricsToJsonl(), StopOnSignal()]


def time_limit(seconds: float):
    """A callback that stops training once `seconds` have passed since training began (checked at the end of each
    step); the run then evaluates and exports as usual (`sft train --stop-after`, sweep budgets)."""
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            if time.time() - self.start >= seconds:
                control.should_training_stop = True

    return TimeLimit()


def trainer_class():
    from trl import SFTTrainer

    from sft.model import loss

    class Trainer(SFTTrainer):
        """SFTTrainer whose checkpoints are complete or absent, checked for space and finite weights, which
        records the order of the batches it trains on (data_order.jsonl: identical runs see identical batches), and
        whose training loss is sft.model.loss's labelled-positions head wherever it applies (`labelled_head`)."""

        order_log: Path | None = None

        def _get_output_dir(self, trial) -> str:
            root = super()._get_output_dir(trial)
            return os.path.join(root, STAGING) if getattr(self, "_staging", False) else root

        def _save_checkpoint(self, model, trial) -> None:
            step = self.state.global_step
            final_root = Path(super()._get_output_dir(trial))
            staged = final_root / STAGING / f"checkpoint-{step}"
            trainable = [p for p in model.parameters() if p.requires_grad]
            if not all(torch.isfinite(p).all() for p in trainable):
                raise SftError(
                    f"training stopped at step {step}: the adapter weights are not finite (NaN or inf). Likely "
                    "causes: a learning rate too high or fp16 overflow. The last good checkpoint is kept; "
                    "nothing was saved or exported"
                )
            if self.is_world_process_zero():
                size = sum(p.numel() * (p.element_size() + 8) for p in trainable)  # weights + AdamW's two moments
                check_free_space(final_root, size + (1 << 20), f"the checkpoint at step {step}")
                shutil.rmtree(staged, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            self._staging = True
            try:
                super()._save_checkpoint(model, trial)
            except OSError as err:  # disk full, quota, permissions: the previous checkpoint is untouched
                shutil.rmtree(final_root / STAGING, ignore_errors=True)
                kept = checkpoints(final_root)
                raise SftError(
                    f"saving the checkpoint at step {step} in {final_root} failed ({err}); "
                    + (f"the previous one, {kept[-1].name}, is intact" if kept else "no earlier checkpoint exists")
                ) from err
            finally:
                self._staging = False
            self.accelerator.wait_for_everyone()
            if self.is_world_process_zero():
                publish(staged, final_root / f"checkpoint-{step}", step=step)
                rotate(final_root, self.args.save_total_limit, self.state.best_model_checkpoint)
                shutil.rmtree(final_root / STAGING, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            self.last_saved_step = step

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.labelled_head = self._labelled_head_reason() is None
            if self.labelled_head:
                loss.install(self.model)

        def _labelled_head_reason(self) -> str | None:
            """Why sft.model.loss's labelled-positions head cannot replace TRL's for training, or None when it can."""
            args = self.args
            if args.loss_type != "nll" or self.compute_loss_func is not None or self.label_smoother is not None:
                return "the loss is not plain cross-entropy"
            if self.aux_loss_enabled or self.is_fsdp_enabled or self.is_deepspeed_enabled:
                return "router aux loss, FSDP or DeepSpeed"
            config = self.accelerator.parallelism_config
            if config is not None and (getattr(config, "sp_enabled", False) or getattr(config, "cp_enabled", False)):
                return "sequence or context parallelism"
            return loss.usable(self.model)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or not self.model.training or not self.labelled_head or "shift_labels" in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            outputs = model(**inputs, labelled_loss=True, num_items_in_batch=num_items_in_batch)
            result = outputs.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                result = result * (self.accelerator.num_processes // self.get_tp_size())  # as TRL: DDP averages
            gather = self.accelerator.gather_for_metrics
            valid = gather(outputs.label_mask.sum()).sum()
            correct = gather(outputs.correct).sum()
            metrics = self._metrics["train"]
            metrics["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
            if "attention_mask" in inputs:
                tokens = gather(inputs["attention_mask"].sum()).sum().item()
            else:
                tokens = (
                    gather(torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)).sum().item()
                )
            self._total_train_tokens += tokens // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]
            return result

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.order_log is not None and self.is_world_process_zero():
                ids = inputs["input_ids"]
                digest = hashlib.sha1(ids.detach().cpu().numpy().tobytes()).hexdigest()[:16]
                line = {"step": self.state.global_step + 1, "shape": list(ids.shape), "sha1": digest}
                with open(self.order_log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(line) + "\n")
            return super().training_step(model, inputs, num_items_in_batch)

    return Trainer


def train(
    model,
    tokenizer,
    train_rows,
    eval_rows,
    sft_config,
    run_dir: Path,
    resume_from: Path | None = None,
    signals: StopSignals | None = None,
    on_trained: Callable[[Any], None] | None = None,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Run SFTTrainer on tokenized rows (from a checkpoint when resuming); return the final training metrics.
    `callbacks`: TrainerCallbacks beside the pipeline's own (e.g. `time_limit`).

    Writes checkpoints under RUN/checkpoints/, one line per log to RUN/metrics.jsonl and one per batch to
    RUN/data_order.jsonl. When the save strategy keeps checkpoints, the last step is saved too, so a run stopped
    during evaluation or export resumes without training again.
    """
    from transformers.trainer_utils import IntervalStrategy

    signals = signals or StopSignals()  # not entered: the caller's signal handlers stay as they are
    run_dir = Path(run_dir)
    if not eval_rows:  # nothing held out: no evaluation during training (the Trainer would refuse to start)
        sft_config.eval_strategy = IntervalStrategy.NO
    trainer = trainer_class()(
        model=model,
        args=sft_config,
        train_dataset=_rows_to_dataset(train_rows),
        eval_dataset=_rows_to_dataset(eval_rows) if sft_config.eval_strategy != "no" else None,
        processing_class=tokenizer,
        callbacks=[*make_callbacks(run_dir / "metrics.jsonl", signals), *(callbacks or [])],
    )
    trainer.order_log = run_dir / "data_order.jsonl"
    trainer.last_saved_step = None
    signals.training = True
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        step = trainer.state.global_step
        if signals.requested is None and sft_config.save_strategy != "no" and trainer.last_saved_step != step:
            if resume_from is None or step != int(CHECKPOINT.match(resume_from.name).group(1)):
                trainer._save_checkpoint(trainer.model, None)  # the final state: evaluation/export can resume
    finally:
        signals.training = False
    if signals.requested is not None:
        name, step = signal.Signals(signals.requested).name, trainer.last_saved_step
        saved = f"checkpoint saved: {Path(sft_config.output_dir) / f'checkpoint-{step}'}" if step else "nothing saved"
        raise Interrupted(
            f"stopped by {name} at step {trainer.state.global_step}; {saved}. Continue with: sft train CONFIG --resume",
            signals.requested,
        )
    if trainer.state.global_step == 0:
        raise SftError("training ran no optimizer step (check train.max_steps / num_train_epochs and the data size)")
    # accelerate wrapped the model's forward in autocast for mixed precision: evaluation and the export checks see
    # the model as it is saved and reloaded (its own dtype), so that wrapper goes
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    if (
        on_trained is not None
    ):  # on every rank, while the trainer and its process group are live (sft.train.distributed)
        on_trained(trainer)
    return dict(result.metrics)
