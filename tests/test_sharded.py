"""Sharded training (FSDP, DeepSpeed ZeRO-3): the main process evaluates and exports an unsharded copy holding the
adapter gathered from every rank, checked against the ranks' own slices; under DDP nothing changes.

accelerate runs FSDP only on accelerator devices (on a CPU-only machine `--use_fsdp` silently gives DDP or no
process group at all), so the end-to-end test launches through a small shim that lets two gloo CPU ranks be an FSDP2
job. DeepSpeed ZeRO-3 needs no shim (DeepSpeed's own CPU accelerator and gloo): its test runs where deepspeed is
installed and is skipped otherwise (the project does not depend on it; the first run compiles a DeepSpeed op, ~2 min).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType

from sft.config import AdapterConfig
from sft.errors import SftError
from sft.model import apply_lora
from sft.train.distributed import FSDP1, FSDP2, ZERO3, load_gathered, sharding, whole_model
from tests.test_launch import ROOT, SMALL, assert_one_complete_run, free_port, launch_args, run_all

# --- which runs are sharded -------------------------------------------------------------------------------------------


def accelerator(kind: DistributedType, fsdp2: bool = False, stage: int | None = None, config_stage: int | None = None):
    zero = {"zero_optimization": {"stage": config_stage}} if config_stage is not None else {}
    plugin = SimpleNamespace(zero_stage=stage, deepspeed_config=zero) if stage or config_stage else None
    return SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2, deepspeed_plugin=plugin)


@pytest.mark.parametrize(
    ("acc", "expected"),
    [
        (accelerator(DistributedType.NO), None),
        (accelerator(DistributedType.MULTI_CPU), None),
        (accelerator(DistributedType.MULTI_GPU), None),
        (accelerator(DistributedType.FSDP, fsdp2=True), FSDP2),
        (accelerator(DistributedType.FSDP, fsdp2=False), FSDP1),
        (accelerator(DistributedType.DEEPSPEED, stage=2, config_stage=2), None),
        (accelerator(DistributedType.DEEPSPEED, stage=3, config_stage=3), ZERO3),
        (accelerator(DistributedType.DEEPSPEED, stage=2, config_stage=3), ZERO3),  # a DeepSpeed JSON file decides
        (accelerator(DistributedType.DEEPSPEED, stage=3), ZERO3),
    ],
    ids=["single", "ddp-cpu", "ddp-gpu", "fsdp2", "fsdp1", "zero2", "zero3", "zero3-json", "zero3-plugin"],
)
def test_only_fsdp_and_zero3_count_as_sharded(acc, expected):
    assert sharding(acc) == expected


def test_this_machines_own_accelerator_is_not_sharded():
    from accelerate import Accelerator

    assert sharding(Accelerator(cpu=True)) is None


def test_unsharded_runs_evaluate_the_model_they_trained():
    """DDP / one process: the very same object comes back, and no second copy is built."""
    model = object()
    barriers = []
    trainer = SimpleNamespace(accelerator=accelerator(DistributedType.MULTI_CPU))
    trainer.accelerator.wait_for_everyone = lambda: barriers.append(1)  # every rank leaves training together

    def rebuild():
        raise AssertionError("rebuilt without sharding")

    assert whole_model(trainer, model, rebuild) is model
    assert barriers == [1]


# --- checking a gathered adapter ------------------------------------------------------------------------------------

NEW_TOKENS = [62, 63]  # trained embedding rows (trainable_token_indices), as a named chat template adds them


def peft_model(lora_seed: int):
    """A tiny tied-head Llama (always the same base) with LoRA, two trained token rows and a module trained in full
    (modules_to_save)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    base = LlamaForCausalLM(config)
    torch.manual_seed(lora_seed)
    return apply_lora(base, AdapterConfig(r=4, alpha=8, modules_to_save=["norm"]), NEW_TOKENS)


@pytest.fixture
def trained():
    """A model whose every trainable tensor moved (as after training), and what its ranks would report."""
    model = peft_model(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    gathered = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    held = {n: t.double().pow(2).sum().item() for n, t in gathered.items()}
    return model, gathered, held


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.arange(64).reshape(2, 32)).logits


def test_a_complete_adapter_loads_into_a_fresh_copy(trained):
    model, gathered, held = trained
    kinds = {"lora_A", "lora_B", "trainable_tokens_delta", "modules_to_save"}
    assert all(any(k in name for name in gathered) for k in kinds)  # every kind of adapter tensor is exercised
    fresh = peft_model(1)
    assert not torch.allclose(logits(fresh), logits(model))
    load_gathered(fresh, gathered, held, "FSDP2 across 2 ranks")
    for name, param in fresh.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, gathered[name]), name
    assert torch.equal(logits(fresh), logits(model))


def one_rank_slice(t: torch.Tensor) -> torch.Tensor:
    return t[: (t.shape[0] + 1) // 2]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda g, n: g.pop(n), "missing"),
        (lambda g, n: g.__setitem__(n, torch.empty(0)), r"shape \(0,\)"),  # ZeRO-3's empty adapter
        (lambda g, n: g.__setitem__(n, one_rank_slice(g[n])), "shape"),  # rank 0's shard saved alone
        (lambda g, n: g.__setitem__(n, torch.zeros_like(g[n])), "sum of squares"),  # right shape, values lost
        (lambda g, n: g.__setitem__(n, g[n] * (1 + 1e-3)), "sum of squares"),
        (lambda g, n: g.__setitem__(n, g[n] * float("nan")), "NaN"),
        (lambda g, n: g.__setitem__(n + ".extra", g[n]), "not a tensor of this model"),
    ],
    ids=["missing", "zero-size", "one-shard", "zeroed", "off-by-1e-3", "nan", "unknown"],
)
@pytest.mark.parametrize("kind", ["lora_B", "trainable_tokens_delta", "modules_to_save"])
def test_an_incomplete_or_wrong_adapter_is_refused_before_anything_is_loaded(trained, damage, message, kind):
    _, gathered, held = trained
    name = next(n for n in gathered if kind in n)
    damage(gathered, name)
    fresh = peft_model(1)
    before = {n: p.clone() for n, p in fresh.named_parameters()}
    with pytest.raises(SftError, match=message) as err:
        load_gathered(fresh, gathered, held, "FSDP2 across 2 ranks")
    assert name in str(err.value) and "Nothing was evaluated or exported" in str(err.value)
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())  # nothing half-loaded


def test_a_tensor_the_ranks_trained_but_this_model_lacks_is_refused(trained):
    _, gathered, held = trained
    with pytest.raises(SftError, match="trainable on the ranks, not in this model"):
        load_gathered(peft_model(1), gathered, {**held, "base_model.model.extra.weight": 1.0}, "FSDP2")


def test_an_adapter_left_at_zero_loads_with_a_warning(capsys):
    """LoRA B starts at zero: with a learning rate of 0 at every step it stays there. Not a gathering failure (the
    ranks hold zeros too), but worth saying."""
    model = peft_model(0)
    gathered = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    held = {n: t.double().pow(2).sum().item() for n, t in gathered.items()}
    assert all(not t.any() for n, t in gathered.items() if "lora_B" in n)
    load_gathered(peft_model(1), gathered, held, "FSDP2")
    assert "every LoRA B matrix is zero" in capsys.readouterr().err


# --- FSDP2 end to end on two CPU ranks --------------------------------------------------------------------------------

SHIM = '''"""Test launcher: two gloo CPU ranks as an FSDP job, each saving its slices of the trained tensors."""
import os, runpy, sys

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType

import sft.train.distributed

prepare_backend = PartialState._prepare_backend


def fsdp_on_cpu(self, cpu=False, sagemaker_dp=False, backend=None):
    # accelerate makes FSDP of MULTI_GPU-like jobs only; ACCELERATE_TORCH_DEVICE keeps the device on the CPU
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "gloo", DistributedType.MULTI_GPU
    return prepare_backend(self, cpu, sagemaker_dp, backend)


whole_model = sft.train.distributed.whole_model


def record_slices(trainer, *args, **kwargs):
    slices = {}
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            local = param.to_local() if hasattr(param, "to_local") else None
            placements = [repr(p) for p in getattr(param, "placements", ())]
            slices[name] = {"local": None if local is None else local.detach().clone(), "placements": placements}
    torch.save(slices, os.path.join(SLICES, f"rank{os.environ['RANK']}.pt"))
    return whole_model(trainer, *args, **kwargs)


PartialState._prepare_backend = fsdp_on_cpu
sft.train.distributed.whole_model = record_slices
os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
sys.argv[0] = "sft"
runpy.run_module("sft", run_name="__main__", alter_sys=True)
'''


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    """configs/accelerate/fsdp2.yaml on 2 CPU ranks (fp32: no bf16 autocast on this CPU), with modules_to_save so
    that whole modules are sharded and gathered too."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    launcher = yaml.safe_load((ROOT / "configs/accelerate/fsdp2.yaml").read_text())
    launcher.update(num_processes=2, mixed_precision="no", main_process_port=free_port())
    (tmp / "fsdp2-cpu.yaml").write_text(yaml.safe_dump(launcher))
    (tmp / "shim.py").write_text(SHIM.replace("SLICES", repr(str(tmp / "slices"))))
    (tmp / "slices").mkdir()
    model, runs = tmp / "tiny-llama", tmp / "runs"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp / "fsdp2-cpu.yaml")]
    command += [str(tmp / "shim.py"), "train", "configs/tiny.yaml", *SMALL, "export.verify=true"]
    command += [f"model.name_or_path={model}", f"output.runs_dir={runs}", f"data.cache_dir={tmp / 'cache'}"]
    command += ["train.per_device_train_batch_size=4", 'adapter.modules_to_save=["norm"]']
    command += ["train.use_cpu=false"]  # use_cpu would make the ranks plain DDP (MULTI_CPU) before the shim can act
    [(code, _, err)] = run_all([command])
    assert code == 0, err[-4000:]
    return tmp, model, assert_one_complete_run(runs), err


@pytest.mark.slow
def test_fsdp2_trains_sharded_and_the_main_process_evaluates_a_gathered_copy(fsdp2_run):
    _, _, run, err = fsdp2_run
    assert "[sft] [rank 0] gathered the adapter from 2 ranks (FSDP2)" in err, err[-3000:]
    assert "[sft] [rank 1] gathered" not in err and "[sft] [rank 1] evaluating" not in err
    report = json.loads((run / "run.json").read_text())
    # The evaluated model is the trained one: a fresh copy without the gathered adapter equals the base exactly.
    assert report["tuned"]["loss"] < report["base"]["loss"] - 0.3, report
    # Written, reloaded in a fresh process and compared with the evaluated copy: same logits, same generations.
    assert report["export"]["adapter_reload_max_abs_diff"] <= 1e-5
    assert report["export"]["adapter_generations_equal"] is True


@pytest.mark.slow
def test_fsdp2_exported_adapter_equals_the_ranks_slices_put_together(fsdp2_run):
    tmp, _, run, _ = fsdp2_run
    ranks = [torch.load(tmp / "slices" / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(ranks[0][n]["placements"] == ["Shard(dim=0)"] for n in ranks[0]), "not sharded by FSDP2"
    full = {n: torch.cat([ranks[0][n]["local"], ranks[1][n]["local"]]) for n in ranks[0]}
    split = [n for n in full if 0 < ranks[0][n]["local"].shape[0] < full[n].shape[0]]
    assert len(split) == len(full), "every trained tensor was split between the two ranks"

    exported = assert_trained_adapter(run)
    assert {n for n in exported if "lora_" in n or "modules_to_save" in n} == set(full)
    for name, tensor in full.items():
        assert torch.equal(exported[name], tensor), name


def assert_trained_adapter(run: Path) -> dict[str, torch.Tensor]:
    """The exported adapter loads on its base (full shapes: peft refuses others), was trained (LoRA B moved from its
    zero init, modules_to_save moved from the base) and generates. Returns the loaded model's parameters."""
    from sft.generate import answer, load_for_inference

    model, tokenizer, stop = load_for_inference(run / "adapter")
    params = dict(model.named_parameters())
    assert sum("lora_" in n for n in params) == 2 * 7 * 4  # A and B of the 7 linear layers of the 4 decoder layers
    assert any(p.any() for n, p in params.items() if "lora_B" in n)
    saved = [n for n in params if "modules_to_save" in n]
    assert len(saved) == 9  # "norm" names the 2 norms of each decoder layer and the final one
    base = {n: params[n.replace("modules_to_save.default", "original_module")] for n in saved}
    assert any(not torch.equal(params[n], base[n]) for n in saved)
    assert isinstance(answer(model, tokenizer, stop, [{"role": "user", "content": "reverse: red blue"}], 8), str)
    return params


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    """configs/accelerate/deepspeed_zero3.yaml on 2 CPU ranks: DeepSpeed's CPU accelerator, gloo, fp32."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    tmp = tmp_path_factory.mktemp("zero3")
    launcher = yaml.safe_load((ROOT / "configs/accelerate/deepspeed_zero3.yaml").read_text())
    launcher.update(num_processes=2, mixed_precision="no")
    (tmp / "zero3-cpu.yaml").write_text(yaml.safe_dump(launcher))
    command = launch_args("--config_file", str(tmp / "zero3-cpu.yaml"), "--main_process_port", str(free_port()))
    command += [*SMALL, "export.verify=true", f"model.name_or_path={tmp / 'tiny-llama'}"]
    command += [f"output.runs_dir={tmp / 'runs'}", f"data.cache_dir={tmp / 'cache'}"]
    command += ["train.per_device_train_batch_size=4", 'adapter.modules_to_save=["norm"]', "train.use_cpu=false"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DS_ACCELERATOR", "cpu")  # DeepSpeed on this CPU; accelerate then keeps the device on the CPU
        env.setenv("ACCELERATE_TORCH_DEVICE", "cpu")
        [(code, _, err)] = run_all([command])
    assert code == 0, err[-4000:]
    return assert_one_complete_run(tmp / "runs"), err


@pytest.mark.slow
def test_zero3_gathers_a_complete_adapter_evaluates_and_exports_it(zero3_run):
    run, err = zero3_run
    assert "[sft] [rank 0] gathered the adapter from 2 ranks (DeepSpeed ZeRO-3)" in err, err[-3000:]
    assert "[sft] [rank 1] evaluating" not in err
    report = json.loads((run / "run.json").read_text())
    assert report["tuned"]["loss"] < report["base"]["loss"] - 0.3, report
    assert report["export"]["adapter_reload_max_abs_diff"] <= 1e-5
    assert report["export"]["adapter_generations_equal"] is True
    assert_trained_adapter(run)
