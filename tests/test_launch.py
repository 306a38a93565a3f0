"""`accelerate launch`: the launcher configs load with accelerate's own loader, and on this CPU machine two gloo ranks
(one machine, and two loopback "machines") train the tiny default into ONE complete run folder, with the loss of a
1-process run of the same global batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
TIMEOUT = 300

# Small launches: 6 optimizer steps, a loss logged at each, a 4-row evaluation, the adapter only.
SMALL = [
    "train.max_steps=6",
    "train.logging_steps=1",
    'train.eval_strategy="no"',
    "eval.max_samples=4",
    "export.merged=false",
    "export.verify=false",
    "train.bf16=false",  # one process may measure bf16 faster here; several always run fp32: compare like for like
]
GLOBAL_BATCH = 8


# --- the launcher configs -------------------------------------------------------------------------------------------

EXPECTED = {
    "single_gpu.yaml": {"distributed_type": "NO", "num_processes": 1, "num_machines": 1},
    "multi_gpu.yaml": {"distributed_type": "MULTI_GPU", "num_processes": 8, "num_machines": 1},
    "fsdp2.yaml": {"distributed_type": "FSDP", "num_processes": 8, "num_machines": 1},
    "deepspeed_zero2.yaml": {"distributed_type": "DEEPSPEED", "num_processes": 8, "num_machines": 1},
    "deepspeed_zero3.yaml": {"distributed_type": "DEEPSPEED", "num_processes": 8, "num_machines": 1},
    "multi_node.yaml": {"distributed_type": "MULTI_GPU", "num_processes": 16, "num_machines": 2},
}


def test_every_launcher_config_is_known_here():
    assert sorted(p.name for p in ACCELERATE_CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_loads_with_accelerates_own_loader(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))  # unknown keys or bad enum values raise here
    assert isinstance(config, ClusterConfig)
    expected = EXPECTED[path.name]
    assert config.distributed_type.value == expected["distributed_type"]
    assert config.num_processes == expected["num_processes"]
    assert config.num_machines == expected["num_machines"]
    assert config.use_cpu is False
    text = path.read_text()
    assert text.startswith("#") and f"accelerate launch --config_file configs/accelerate/{path.name}" in text
    assert "-m sft train configs/" in text
    for named in (part.split()[0] for part in text.split("-m sft train ")[1:]):
        assert (ROOT / named).is_file(), f"{path.name} names {named}, which does not exist"


def test_fsdp2_is_full_shard_with_transformer_wrapping_and_a_full_state_dict():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin

    fsdp = load_config_from_file(str(ROOT / "configs/accelerate/fsdp2.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_reshard_after_forward"] is True  # FSDP2's full shard
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp  # taken from the model's _no_split_modules
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # one loadable adapter file, gathered on rank 0
    assert "fsdp_use_orig_params" not in fsdp  # FSDP1 only
    # The plugin accelerate builds from these values accepts them (as `accelerate launch` passes them on).
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=fsdp["fsdp_reshard_after_forward"],
        auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"],
        state_dict_type=fsdp["fsdp_state_dict_type"],
        cpu_ram_efficient_loading=fsdp["fsdp_cpu_ram_efficient_loading"],
    )
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_shard_and_zero3_saves_gathered_weights(stage):
    from accelerate.commands.config.config_args import load_config_from_file

    ds = load_config_from_file(str(ROOT / f"configs/accelerate/deepspeed_zero{stage}.yaml")).deepspeed_config
    assert ds["zero_stage"] == stage
    assert ds["offload_optimizer_device"] == "none" and ds["offload_param_device"] == "none"
    if stage == 3:
        # stage3_gather_16bit_weights_on_model_save: without it the saved adapter is empty under ZeRO-3
        assert ds["zero3_save_16bit_model"] is True
    assert "gradient_accumulation_steps" not in ds  # comes from the train section, never two sources


def test_multi_node_template_documents_its_placeholders():
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "configs/accelerate/multi_node.yaml"
    config = load_config_from_file(str(path))
    assert (config.num_machines, config.machine_rank, config.main_process_port) == (2, 0, 29500)
    assert config.main_process_ip
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    for placeholder in ("machine_rank", "main_process_ip", "main_process_port", "num_processes", "TOTAL"):
        assert placeholder in header
    assert "--machine_rank 0" in header and "--machine_rank 1" in header


def test_run_config_checks_leave_the_launcher_configs_alone():
    from tests.test_configs import RUN_CONFIGS

    assert RUN_CONFIGS and not any("accelerate" in p.parts for p in RUN_CONFIGS)


# --- launches on this CPU machine -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch_args(*flags: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, "-m", "sft", "train", "configs/tiny.yaml"]


def run_all(commands: list[list[str]]) -> list[tuple[int, str, str]]:
    """Start every command at once (each in its own process group), wait for all, kill what is left."""
    procs = [
        subprocess.Popen(
            c, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        for c in commands
    ]
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def losses(run: Path) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def assert_one_complete_run(runs: Path) -> Path:
    folders = [p for p in runs.iterdir() if p.is_dir()]
    assert [p.name for p in folders] == ["tiny"], folders
    run = folders[0]
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "complete", status
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    for name in ("config.yaml", "environment.json", "data.json", "metrics.jsonl", "report/report.json"):
        assert (run / name).is_file(), name
    return run


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The 1-process baseline with the whole global batch on one rank; it also builds the tiny model once."""
    tmp = tmp_path_factory.mktemp("launch")
    model, runs = tmp / "tiny-llama", tmp / "runs-1"
    command = [sys.executable, "-m", "sft", "train", "configs/tiny.yaml", *SMALL]
    command += [f"model.name_or_path={model}", f"output.runs_dir={runs}", f"data.cache_dir={tmp / 'cache-1'}"]
    command += [f"train.per_device_train_batch_size={GLOBAL_BATCH}"]
    [(code, _, err)] = run_all([command])
    assert code == 0, err[-3000:]
    return tmp, model, assert_one_complete_run(runs)


@pytest.fixture(scope="module")
def two_processes(one_process):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: two gloo ranks, half the global batch each, and a
    fresh tokenized-data cache so that the ranks' turns at data preparation show in the logs."""
    tmp, model, _ = one_process
    runs = tmp / "runs-2"
    command = launch_args("--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()))
    command += [*SMALL, f"model.name_or_path={model}", f"output.runs_dir={runs}", f"data.cache_dir={tmp / 'cache-2'}"]
    command += [f"train.per_device_train_batch_size={GLOBAL_BATCH // 2}"]
    [(code, out, err)] = run_all([command])
    assert code == 0, err[-3000:]
    return runs, out, err


@pytest.mark.slow
def test_two_processes_write_one_complete_run_folder_and_say_which_rank_speaks(two_processes):
    runs, _, err = two_processes
    run = assert_one_complete_run(runs)
    assert "[sft] [rank 0] " in err and "[sft] [rank 1] " in err
    assert f"[sft] [rank 0] run folder: {run}" in err
    assert "[sft] [rank 1] run folder" not in err  # only the main process writes
    assert (run / "train_args.json").is_file()
    args = json.loads((run / "train_args.json").read_text())
    assert args["use_cpu"] is True and args["ddp_backend"] == "gloo"


@pytest.mark.slow
def test_two_processes_prepare_the_data_once(two_processes):
    """Rank 0 tokenizes into the cache while rank 1 waits; rank 1 then reads the cache instead of tokenizing."""
    _, _, err = two_processes
    lines = err.splitlines()
    assert any(line.startswith("[sft] [rank 0] tokens computed") for line in lines), err[-3000:]
    assert any(line.startswith("[sft] [rank 1] tokens loaded from the cache") for line in lines), err[-3000:]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(one_process, two_processes):
    """Same seed, data, packing and global batch (1 x 8 vs 2 x 4): the same losses step by step.

    Before `use_cpu` was set for CPU ranks, accelerate ran two ranks WITHOUT a process group for the model (no DDP
    wrapper, no gradient all-reduce, num_items_in_batch counted per rank) while TRL still multiplied the loss by the
    number of processes: a loss and gradient 2x the 1-process ones (train_loss 10.74 vs 5.37). The Trainer's logged
    loss is the mean over ranks of sum(token losses on the rank) / (trained tokens on all ranks) x world size, which is
    the global per-token mean: directly comparable with the 1-process value.
    """
    _, _, single = one_process
    runs, _, _ = two_processes
    one, two = losses(single), losses(runs / "tiny")
    assert len(one) == len(two) == 6
    assert two[0] == pytest.approx(one[0], rel=1e-5)  # the same rows and weights: equal up to float rounding
    assert two == pytest.approx(one, rel=0.02)  # then the same training within fp noise
    assert one[-1] < one[0] - 0.5  # and it is training, not a flat line that any scale would match
    train_one = json.loads((single / "run.json").read_text())["train"]["train_loss"]
    train_two = json.loads((runs / "tiny" / "run.json").read_text())["train"]["train_loss"]
    assert train_two == pytest.approx(train_one, rel=0.02)
    held_out = [json.loads((r / "report/report.json").read_text())["tuned"]["loss"] for r in (single, runs / "tiny")]
    assert held_out[1] == pytest.approx(held_out[0], rel=0.02)  # our own evaluation of the trained adapters


@pytest.mark.slow
def test_two_loopback_machines_of_one_process_each_write_one_complete_run_folder(one_process):
    tmp, model, _ = one_process
    runs, port = tmp / "runs-nodes", free_port()
    options = [*SMALL, f"model.name_or_path={model}", f"output.runs_dir={runs}", f"data.cache_dir={tmp / 'cache-n'}"]
    options += [f"train.per_device_train_batch_size={GLOBAL_BATCH // 2}"]
    machines = [
        launch_args(
            "--multi_gpu",
            "--num_machines",
            "2",
            "--num_processes",
            "2",  # the TOTAL over the machines: 1 per machine here
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
        )  # fmt: skip
        + options
        for rank in (0, 1)
    ]
    results = run_all(machines)
    for rank, (code, _, err) in enumerate(results):
        assert code == 0, f"machine {rank}:\n{err[-3000:]}"
    assert_one_complete_run(runs)
    assert "[sft] [rank 0] run folder" in results[0][2]
    assert "[sft] [rank 1] " in results[1][2] and "run folder" not in results[1][2]
