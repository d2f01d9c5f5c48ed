"""Batches ready before the device needs them: the training loop's input.

Which blocks form each optimizer step is decided by data.step_batches, exactly as before (the same
order, and a resumed run continues with the very next batch). A background thread prepares the next
steps on the host while the device trains: it collates each micro-batch, counts its target tokens
(on the host, so the step never reads a count back from the device), leaves out an attention mask
that masks nothing (transformers would read it back to decide it can use the causal fast path), and
pins the memory on CUDA so the copy to the device is asynchronous (non_blocking=True).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from engine import data as data_mod


@dataclass
class HostStep:
    """One optimizer step's micro-batches for this process, on the host."""

    epoch: int
    step_in_epoch: int
    batches: list[dict[str, torch.Tensor]]
    tokens: int  # target tokens of the whole step: every micro-batch of every process


def host_batch(blocks: Sequence[torch.Tensor], pad_id: int, pin: bool = False, fixed_width: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Collate blocks; returns the batch and its target count.

    fixed_width (train.compile): every batch is padded to this width and has no attention mask, so
    every step has the same shapes and inputs and the compiled step never recompiles. Leaving the
    mask out is exact here: padding only ever follows a block's last token, and in a causal model
    no real token attends to positions after it, while padded positions are never targets.
    """
    batch = data_mod.collate(blocks, pad_id)
    extra = (fixed_width or 0) - batch["input_ids"].shape[1]
    if extra > 0:
        fill = {"input_ids": pad_id, "attention_mask": 0, "labels": data_mod.IGNORE_INDEX, "position_ids": 0}
        batch = {k: F.pad(v, (0, extra), value=fill[k]) for k, v in batch.items()}
    targets = int((batch["labels"][:, 1:] != data_mod.IGNORE_INDEX).sum())
    if "attention_mask" in batch and (fixed_width is not None or bool(batch["attention_mask"].all())):  # packed examples: position ids instead
        del batch["attention_mask"]  # nothing (or only what follows the last token) to mask
    if pin:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch, targets


def to_device(batches: Sequence[dict[str, torch.Tensor]], device: Any) -> list[dict[str, torch.Tensor]]:
    return [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in batches]


class Feeder:
    """feeder.get(epoch, step_in_epoch) -> HostStep, prepared ahead by a background thread.

    The thread walks the same positions the loop will ask for (epoch by epoch, per_epoch steps each,
    up to total_steps); a position asked for out of turn is prepared at once instead.
    """

    def __init__(self, blocks: Sequence[torch.Tensor], seed: int, per_epoch: int, total_steps: int, batch_size: int,
                 accumulation: int, rank: int, world: int, pad_id: int, pin: bool = False, fixed_width: int | None = None, ahead: int = 2):
        self.blocks, self.seed, self.per_epoch, self.total_steps = blocks, seed, per_epoch, total_steps
        self.batch_size, self.accumulation, self.rank, self.world = batch_size, accumulation, rank, world
        self.pad_id, self.pin, self.fixed_width, self.ahead = pad_id, pin, fixed_width, ahead
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def prepare(self, epoch: int, step_in_epoch: int) -> HostStep:
        """This process's micro-batches; the step's target tokens are counted for every process here, on the
        host (each holds all blocks and the same order), so no count is ever exchanged between processes."""
        mine, tokens = [], 0
        for rank in range(self.world):
            micro = data_mod.step_batches(len(self.blocks), self.seed, epoch, step_in_epoch, self.batch_size,
                                          self.accumulation, rank, self.world)
            for ids in micro:
                blocks = [self.blocks[i] for i in ids]
                if rank == self.rank:
                    batch, n = host_batch(blocks, self.pad_id, self.pin, self.fixed_width)
                    mine.append(batch)
                else:
                    n = int((data_mod.collate(blocks, self.pad_id)["labels"][:, 1:] != data_mod.IGNORE_INDEX).sum())
                tokens += n
        return HostStep(epoch, step_in_epoch, mine, tokens)

    def start(self, step: int, epoch: int, step_in_epoch: int) -> None:
        """Start preparing from the loop's current position (step: optimizer steps already taken)."""
        self.close()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.ahead)
        self._thread = threading.Thread(target=self._work, args=(step, epoch, step_in_epoch, self._stop, self._queue),
                                        name="tunesmith-feeder", daemon=True)
        self._thread.start()

    def _work(self, step: int, epoch: int, step_in_epoch: int, stop: threading.Event, out: queue.Queue) -> None:
        try:
            while step < self.total_steps and not stop.is_set():
                if step_in_epoch >= self.per_epoch:
                    epoch, step_in_epoch = epoch + 1, 0
                item: Any = self.prepare(epoch, step_in_epoch)
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                step, step_in_epoch = step + 1, step_in_epoch + 1
        except BaseException as exc:  # handed to the loop, raised there
            out.put(exc)

    def get(self, epoch: int, step_in_epoch: int) -> HostStep:
        while self._thread is not None:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._thread.is_alive():
                    continue
                break
            if isinstance(item, BaseException):
                raise item
            if (item.epoch, item.step_in_epoch) == (epoch, step_in_epoch):
                return item
            break  # asked out of turn: prepare it here
        return self.prepare(epoch, step_in_epoch)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Feeder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
