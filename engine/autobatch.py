"""Automatic micro-batch sizing (train.auto_batch_size).

The recipe's global batch (batch_size x gradient_accumulation_steps per process) is kept: the
micro-batch is the largest divisor of it whose forward and backward at full data.max_length fit in
GPU memory, probed from the largest down; accumulation becomes global / micro. On CPU memory is
not probed (running out there means swapping, not an error), so the recipe's batch is kept.

The optimizer's state (AdamW: two fp32 copies of every trainable weight) is made lazily by its first
step, after the probes. For torch's fused Adam and AdamW it is made before probing instead, by a step
the fused kernel skips (found_inf = 1): the state it leaves (zero moments, step 0) is the one the first
real step would create, so training is unchanged, and the probes see the memory the run will hold.
Other optimizers' state is not counted: leave room, or set the batch by hand.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def largest_fitting(per_process_batch: int, fits: Callable[[int], bool]) -> int:
    """The largest divisor of per_process_batch for which fits(size) is True (1 if none is)."""
    for size in divisors_descending(per_process_batch):
        if fits(size):
            return size
    return 1


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def probe(model: Any, loss_fn: Callable[[Any, dict], Any], accelerator: Any, size: int, max_length: int, vocab: int) -> bool:
    """One forward and backward of `size` full blocks; False when it runs out of memory."""
    ids = torch.randint(0, vocab, (size, max_length), device=accelerator.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss = None
    try:
        with accelerator.autocast():
            loss, _ = loss_fn(model, batch)
        accelerator.backward(loss / ids.numel())
        return True
    except RuntimeError as exc:
        if not is_oom(exc):
            raise
        return False
    finally:
        model.zero_grad(set_to_none=True)
        del ids, batch, loss  # with an out-of-memory error in backward, the loss still holds the activations
        torch.cuda.empty_cache()


def reserve_optimizer_state(optimizer: Any) -> bool:
    """Create the state of a fused torch Adam/AdamW now, with a step its kernel skips; False for other optimizers."""
    from engine.step import inner_optimizer, takes_found_inf

    inner = inner_optimizer(optimizer)
    if not (isinstance(inner, torch.optim.Adam) and takes_found_inf(inner)):
        return False  # e.g. fused SGD: a skipped first step leaves an uninitialised momentum buffer
    params = [p for group in inner.param_groups for p in group["params"] if p.requires_grad and p.grad is None]
    if not params:
        return False
    for p in params:
        p.grad = torch.zeros_like(p)
    inner.found_inf = torch.ones((), dtype=torch.float32, device=params[0].device)
    try:
        inner.step()
    finally:
        del inner.found_inf
        for p in params:
            p.grad = None
    return True


def probes_memory(device: torch.device) -> bool:
    """Whether running out of memory on this device is an error to catch (CUDA), rather than swapping."""
    return device.type == "cuda"


def choose(model: Any, loss_fn: Callable, accelerator: Any, batch_size: int, accumulation: int, max_length: int, vocab: int,
           log: Callable[[str], None] = print, optimizer: Any = None) -> tuple[int, int]:
    """(micro-batch, accumulation) keeping batch_size x accumulation; reports the choice.

    optimizer: its state is made before probing where that leaves training unchanged (reserve_optimizer_state).
    """
    per_process = batch_size * accumulation
    if not probes_memory(accelerator.device):
        log(f"auto batch size: on {accelerator.device.type} the recipe's batch is kept ({batch_size} x accumulation {accumulation})")
        return batch_size, accumulation
    # the probes' random ids and dropout must not move the random state: a run with auto batch size
    # trains exactly as one with the chosen micro-batch set by hand
    cuda_devices = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []
    if optimizer is not None and not reserve_optimizer_state(optimizer):
        log("auto batch size: this optimizer makes its state at the first step, after the probes; if that step runs "
            "out of memory, lower train.batch_size by hand")
    with torch.random.fork_rng(devices=cuda_devices):
        micro = largest_fitting(per_process, lambda n: probe(model, loss_fn, accelerator, n, max_length, vocab))
    log(f"auto batch size: micro-batch {micro} x accumulation {per_process // micro} "
        f"(recipe: {batch_size} x {accumulation}; largest of the divisors of {per_process} that fits at {max_length} tokens)")
    return micro, per_process // micro
