"""After training under FSDP or DeepSpeed ZeRO-3: the trained model made whole on the main process, checked.

Under DDP (or one process) every rank holds the whole model, and the main process evaluates and exports the one it
trained. Under FSDP or ZeRO-3 each rank holds only a slice of every parameter: a forward on the main process alone
waits for the other ranks' slices (a hang, or a crash once they have exited), and saving from it writes an adapter of
partial or zero-size tensors (the known "empty adapter" failure under ZeRO-3). So every rank takes part in gathering
the trainable tensors - the adapter: LoRA matrices, trained token rows, modules_to_save - to the main process, which
loads them into a freshly built, unsharded copy of the model after checking that each tensor is there, has its full
shape and holds exactly what the ranks held. Only the trainable tensors travel (megabytes); the frozen base of the
copy is read from disk again. Like DDP, evaluation and export then need the whole model on the main process's device
(beside its own shard of the trained one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sft.console import log
from sft.errors import SftError

FSDP1 = "FSDP"
FSDP2 = "FSDP2"
ZERO3 = "DeepSpeed ZeRO-3"
# Relative agreement between the gathered tensors and the ranks' own slices (sums of squares in float64): the same
# values summed in another order differ by ~1e-15; a missing or zeroed slice by far more than this.
TOLERANCE = 1e-6


def sharding(accelerator) -> str | None:
    """FSDP1, FSDP2 or ZERO3 when the trained weights are split across the ranks; None when each rank holds them all
    (one process, DDP, DeepSpeed ZeRO-1/2)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return FSDP2 if accelerator.is_fsdp2 else FSDP1
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.deepspeed_plugin
        stage = plugin.deepspeed_config.get("zero_optimization", {}).get("stage", plugin.zero_stage)
        return ZERO3 if str(stage) == "3" else None
    return None


def whole_model(trainer, model, rebuild: Callable[[], Any]):
    """Called on every rank once training ends: the model to evaluate and export.

    Weights not sharded: `model` itself, as trained. Sharded (FSDP, ZeRO-3): every rank joins the gather; the main
    process returns `rebuild()` (the same PeftModel structure, unsharded, on the trainer's device) holding the
    gathered adapter, and the other ranks return None once the gather is done: they have nothing left to do.
    """
    kind = sharding(trainer.accelerator)
    if kind is None:
        trainer.accelerator.wait_for_everyone()  # the last collective: afterwards the main process works alone
        return model
    accelerator = trainer.accelerator
    held = rank_sums_of_squares(trainer)  # collective
    gathered = gather_trainable(trainer, kind, set(held))  # collective
    accelerator.wait_for_everyone()  # the last collective: afterwards the main process works alone
    if not accelerator.is_main_process:
        return None
    work_alone()
    fresh = rebuild()
    load_gathered(fresh, gathered, held, f"{kind} across {accelerator.num_processes} ranks")
    size = sum(t.numel() * t.element_size() for t in gathered.values()) / 1e6
    log(
        f"gathered the adapter from {accelerator.num_processes} ranks ({kind}): {len(gathered)} tensors, "
        f"{size:.1f} MB, equal to the ranks' slices; evaluating and exporting an unsharded copy"
    )
    return fresh.to(accelerator.device)


def leave() -> None:
    """A rank other than the main one, done: it closes its side of the process group before it exits, rather than
    leaving gloo's threads to the interpreter's teardown while the main process still evaluates and exports (seen
    on 2 CPU ranks: `terminate called without an active exception`, exit -6, and the launcher then stops the main
    process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def work_alone() -> None:
    """From here the main process works alone: stop transformers and peft treating it as a ZeRO-3 rank. While a
    ZeRO-3 config is registered they build every new model partitioned (deepspeed.zero.Init) and generate() syncs
    with the other ranks at every token: collectives that ranks which have left never join. (Seen on 2 CPU ranks:
    rebuilding the unsharded copy failed in a ZeRO-3 broadcast once the other rank had exited.)"""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def gather_trainable(trainer, kind: str, names: set[str]) -> dict[str, torch.Tensor]:
    """Collective: full CPU copies of the trainable tensors `names` on the main process ({} elsewhere), named as in
    the unwrapped PeftModel's state_dict."""
    if kind == ZERO3:
        # What transformers' save_model does for PEFT under ZeRO-3; unlike save_model it does not need
        # stage3_gather_16bit_weights_on_model_save. The values are the engine's 16-bit weights when it trains in
        # bf16/fp16 (the fp32 master copy stays in the optimizer).
        state = trainer.model_wrapped._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
        return {name: tensor.detach().cpu() for name, tensor in (state or {}).items() if name in names}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # accelerate's get_state_dict makes the same call for FSDP2, but for the whole model: ignore_frozen_params drops
    # the frozen base before anything is gathered (all but a tied LM head: the second name of the frozen embedding,
    # which torch does not see as a parameter of its own and gathers; dropped here). full_state_dict + cpu_offload:
    # whole tensors, on rank 0 only.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(trainer.model, options=options)
    return {name: tensor.detach().cpu() for name, tensor in state.items() if name in names}


def local_slice(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: a ZeRO-3 partition, a DTensor's local shard (FSDP2), or the tensor itself
    (FSDP1 with use_orig_params: a view of this rank's flat shard)."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    if hasattr(param, "to_local"):
        return param.to_local()
    return param


def _clean(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


@torch.no_grad()
def rank_sums_of_squares(trainer) -> dict[str, float]:
    """Collective: per trainable tensor, the sum of squares of every rank's slice, added over the ranks - what the
    gathered tensor must hold, computed without the gather. (Shard padding is zeros and adds nothing.)"""
    import torch.distributed as dist

    names, sums = [], []
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            names.append(_clean(name))
            sums.append(local_slice(param).detach().double().pow(2).sum().to(trainer.accelerator.device))
    if not sums:
        return {}
    total = torch.stack(sums)
    dist.all_reduce(total)
    return dict(zip(names, total.cpu().tolist(), strict=True))


@torch.no_grad()
def load_gathered(model, gathered: dict[str, torch.Tensor], held: dict[str, float], source: str) -> None:
    """Check the gathered adapter against `model` (an unsharded PeftModel of the same structure) and the ranks' sums
    of squares, then load it. Any tensor missing, of the wrong shape or not what the ranks held is an SftError,
    raised before anything is evaluated or written."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    known = set(model.state_dict())
    problems = [f"{name}: missing" for name in sorted(set(trainable) - set(gathered))]
    problems += [f"{name}: not a tensor of this model" for name in sorted(set(gathered) - known)]
    problems += [f"{name}: trainable on the ranks, not in this model" for name in sorted(set(held) - set(trainable))]
    for name, tensor in gathered.items():
        if name in trainable and tensor.shape != trainable[name].shape:
            problems.append(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(trainable[name].shape)}")
        elif not torch.isfinite(tensor).all():
            problems.append(f"{name}: holds NaN or infinite values")
        elif name in held:
            got, want = tensor.double().pow(2).sum().item(), held[name]
            if abs(got - want) > TOLERANCE * max(abs(want), 1e-30):
                problems.append(f"{name}: sum of squares {got:.6g}, the ranks' slices hold {want:.6g}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise SftError(
            f"the adapter gathered from {source} is incomplete or wrong ({len(problems)} tensor(s)): {shown}. "
            "Nothing was evaluated or exported"
        )
    result = model.load_state_dict(gathered, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # every gathered name was checked to be known
    lora_b = [t for name, t in gathered.items() if "lora_B" in name]
    if lora_b and all(not t.any() for t in lora_b):
        log(
            "warning: every LoRA B matrix is zero after training: the adapter changes nothing "
            "(learning rate 0 at every step?)"
        )
