"""Next-token cross-entropy without full fp32 logits (train.chunked_loss).

The plain way computes logits for every position (batch x seq x vocab), upcasts them to fp32 and
takes the cross-entropy: at seq 512 x vocab 50257 the logits, their fp32 copy and their gradient
dominate memory. The chunked way runs the model with its output layer (lm_head) made the identity
for one call, so the model returns the final hidden states through any wrapper (peft, DDP,
torch.compile), then applies lm_head to chunks of tokens under torch.utils.checkpoint: only one
chunk's logits exist at a time, and they are recomputed in backward instead of saved.

Models whose logits are changed after lm_head (softcapping, scaling) or whose lm_head is not a
plain Linear (e.g. LoRA on lm_head) use the plain computation; so does a batch small enough that
its logits fit the chunk budget anyway.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 24  # logits elements per chunk: 64 MiB in fp32
_POST_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Forward arguments: input_ids with position_ids (packed examples kept apart, engine/packing.py) or attention_mask."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def output_layer(model: Any) -> torch.nn.Linear | None:
    """The model's lm_head when chunking is exact for it, else None."""
    inner = getattr(model, "module", model)  # DDP
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    try:
        head = inner.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if type(head) is not torch.nn.Linear:
        return None
    config = getattr(inner, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _POST_HEAD):
        return None
    return head


@contextlib.contextmanager
def _identity(head: torch.nn.Module) -> Iterator[None]:
    head.forward = lambda hidden: hidden  # instance attribute wins over the class's forward
    try:
        yield
    finally:
        del head.forward


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=IGNORE_INDEX)


def plain_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(**model_inputs(batch)).logits
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)


def chunked_loss_sum(model: Any, batch: dict[str, torch.Tensor], chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    head = output_layer(model)
    targets = batch["labels"][:, 1:]
    n_targets = targets.numel()
    if head is None or n_targets * head.out_features <= chunk_elements:
        return plain_loss_sum(model, batch)
    with _identity(head):
        hidden = model(**model_inputs(batch)).logits
    hidden = hidden[:, :-1].flatten(0, 1)
    targets = targets.flatten()
    step = max(1, chunk_elements // head.out_features)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n_targets, step):
        h, t = hidden[start : start + step], targets[start : start + step]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h, head.weight, head.bias, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, head.weight, head.bias, t)
    return total


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor], chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over a batch (fp32), and the number of target tokens."""
    loss = chunked_loss_sum(model, batch) if chunked else plain_loss_sum(model, batch)
    return loss, (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
