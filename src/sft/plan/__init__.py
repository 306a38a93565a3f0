"""`sft plan`: a run's peak memory, FLOPs and time per step, predicted from config.json alone; the choices of `sft
train` made from it (precision, activation checkpointing); --measure to check it."""

from sft.plan.decide import Plan, alternatives, auto_settings, make_plan, will_fit
from sft.plan.devices import DEVICE_NAMES, GPUS, Device, available_ram, resolve_device
from sft.plan.flops import flops_per_step
from sft.plan.memory import Memory, predict_memory
from sft.plan.precision import choose_cpu_precision
from sft.plan.report import format_measurement, format_plan, run_plan
from sft.plan.shape import ModelShape, Settings, lora_params, model_shape, read_model_config, settings_for, train_value
