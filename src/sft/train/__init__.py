"""Training: TRL's SFTTrainer with complete-or-absent checkpoints, clean stops on signals, and sharded gathers."""

from sft.config.trl_args import build_sft_config, defaults  # their old home was here
from sft.train.checkpoint_dirs import CHECKPOINT, STAGING, checkpoints, discard_incomplete, truncate_log
from sft.train.signals import Interrupted, StopSignals
from sft.train.trainer import make_callbacks, time_limit, train, trainer_class
