"""Several processes (and machines) through Accelerate: what the loop needs beyond one process.

The loop itself shards data per optimizer step, reduces token counts and losses across processes
and evaluates each validation block once. This module holds the rest:

- `accelerator_options`: processes started by `accelerate launch --multi_gpu` or torchrun on a
  machine without a GPU train together on CPU (gloo) instead of each running alone.
- `check_device_map`: `model.device_map = "auto"` is one process spreading a model over the GPUs it
  sees; it cannot be combined with several processes.
- `StepAgreement`: a stop asked for on any process (a plugin, early stopping) or a signal received
  by any process stops every process after the same step, and every process learns why; agreed on
  the host (a gloo group), so the step never waits for the GPU to agree.
- `full_state_dict` / `can_generate_alone`: under FSDP each process holds a shard, so saving gathers
  the whole model on every process, and the main process cannot generate alone.
"""

from __future__ import annotations

import os
from typing import Any

from engine.errors import UserError

# Set by torchrun (accelerate launch --multi_gpu, --use_fsdp, --num_machines) and by MPI launchers.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> int:
    """How many processes the launcher started, read from its environment (1 without a launcher)."""
    for name in WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            return int(value)
    return 1


def has_accelerator_device() -> bool:
    import torch

    probe = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    if probe is not None:
        return bool(probe.is_available())
    return torch.cuda.is_available()


def accelerator_options() -> dict[str, Any]:
    """Keyword arguments for Accelerator(): cpu=True when several processes run on a GPU-less machine.

    Accelerate only forms a CPU (gloo) process group when told it runs on CPU; without this, N
    processes launched with torchrun on a CPU machine would each train alone on the same folder.
    """
    if launched_processes() > 1 and not has_accelerator_device():
        return {"cpu": True}
    return {}


def check_before_start(model_cfg: Any) -> None:
    """Problems visible in the launcher's environment, before any process group forms."""
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cpu and os.environ.get("MASTER_ADDR") and launched_processes() == 1 and "LOCAL_RANK" not in os.environ:
        # accelerate launch --cpu --num_processes N sets MASTER_ADDR for N > 1, yet starts one process
        # unless it is given an MPI hostfile
        raise UserError(
            "accelerate launch --cpu --num_processes N started one process, not N (without --mpirun_hostfile it "
            "runs a single one); use accelerate launch --multi_gpu --num_processes N -m engine RECIPE, which trains "
            "on CPU when the machine has no GPU (on a GPU machine, put ACCELERATE_USE_CPU=true in front)"
        )
    check_device_map(model_cfg, launched_processes())


def check_started(model_cfg: Any, accelerator: Any) -> None:
    """Problems visible once Accelerate has started: device_map with several processes, FSDP on CPU."""
    check_device_map(model_cfg, accelerator.num_processes)
    check_fsdp(accelerator)


def check_device_map(model_cfg: Any, processes: int) -> None:
    """model.device_map = "auto" needs a model from model.base and exactly one process."""
    if not model_cfg.device_map:
        return
    if model_cfg.config:
        raise UserError(
            f'model.device_map: "{model_cfg.device_map}" places the layers of a model loaded with from_pretrained '
            f"(model.base); a model built from model.config is small enough for one device: leave model.device_map empty"
        )
    if processes > 1:
        raise UserError(
            f'model.device_map: "{model_cfg.device_map}" spreads one process\'s model over the GPUs it sees and cannot be '
            f"combined with {processes} processes; run one process (python -m engine RECIPE), or leave "
            f"model.device_map empty to train with several (a full copy each, or sharded with FSDP: recipes/fsdp.toml)"
        )


class StepAgreement:
    """agree(context, received) -> (stop, signal): what every process does after this step.

    Called at the same point of every step on every process. stop: any process asked to stop
    (context.stop_reason; each process then holds a reason, naming the process that asked);
    signal: the strongest signal any process received (SIGTERM wins over SIGINT), or 0.
    With several processes this is one all-reduce of two host integers over a gloo group made for
    it, even where training runs on NCCL: nothing is read back from the GPU, so the step stays
    free of host-device syncs. With one process nothing is communicated.
    """

    def __init__(self, accelerator: Any):
        self.world = accelerator.num_processes
        self.group = None
        if self.world > 1:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")  # collective: every process makes it, once

    def agree(self, context: Any, received: int) -> tuple[bool, int]:
        if self.world == 1:
            return bool(context.stop_reason), received
        import torch
        import torch.distributed as dist

        flags = torch.tensor([1 if context.stop_reason else 0, received], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        stop, signum = (int(v) for v in flags.tolist())  # a CPU tensor: no device involved
        if stop:
            reasons: list[Any] = [None] * self.world
            dist.all_gather_object(reasons, context.stop_reason, group=self.group)
            asked = [(rank, reason) for rank, reason in enumerate(reasons) if reason]
            if asked and not context.stop_reason:  # a process that asked itself keeps its own reason
                rank, reason = asked[0]
                context.stop_reason = f"{reason} (on process {rank})"
            context.request_stop("stop requested")
        return bool(stop), signum


def is_fsdp(accelerator: Any) -> bool:
    return str(accelerator.distributed_type).endswith("FSDP")


def check_fsdp(accelerator: Any) -> None:
    """Refuse an FSDP launch that Accelerate would quietly run as plain data parallelism (on CPU).

    Accelerate (1.15) turns FSDP on only for GPUs and other accelerator devices; on CPU processes it
    keeps a full model copy on each, which is not what an FSDP config asked for.
    """
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and not is_fsdp(accelerator):
        raise UserError(
            f"the Accelerate config asks for FSDP, but Accelerate shards only over GPUs (or other accelerator "
            f"devices) and this run is on {accelerator.device}; launch it on a GPU machine, or leave out the "
            f"FSDP config (--config_file recipes/accelerate_fsdp.yaml, --use_fsdp) to train with a full copy per process"
        )


def full_state_dict(accelerator: Any, model: Any) -> dict[str, Any] | None:
    """The whole model's weights for save_pretrained, gathered under FSDP; None where the model has them.

    Every process must call this (under FSDP gathering is collective); only the main one saves.
    """
    if not is_fsdp(accelerator):
        return None
    return accelerator.get_state_dict(model)


def can_generate_alone(accelerator: Any) -> bool:
    """Whether the main process can run generate() by itself (not when the weights are sharded)."""
    return not is_fsdp(accelerator)
