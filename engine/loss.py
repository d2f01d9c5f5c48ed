"""Next-token cross-entropy, computed one of three ways (train.chunked_loss chooses; "auto" by default).

- fused: liger-kernel's fused linear cross-entropy (pip install 'tunesmith[gpu]'; CUDA only). The
  output layer and the loss run as one kernel over chunks of tokens: no full logits, at the speed
  of the plain way. It computes the gradients during the forward pass, and reads the device twice
  per call (liger_kernel/ops/fused_linear_cross_entropy.py: the target count by .item(), and
  torch.equal(grad_output, 1) in backward): the one sync the engine's step cannot avoid.
- plain: logits for every position, upcast to fp32, then the cross-entropy. Fastest without a fused
  kernel, and the most memory.
- chunked: the output layer applied to chunks of tokens under checkpointing (below). Least memory
  without a fused kernel; slower (the logits are computed twice).

"auto" takes fused where liger-kernel is installed and the model trains on CUDA; else plain when
the logits of a micro-batch (with their fp32 copy and gradients) take at most a quarter of the
device's memory; else chunked. All three give the same loss and gradients (up to float rounding).

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
import importlib.util
import os
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 24  # logits elements per chunk: 64 MiB in fp32
# config keys of models that change logits after lm_head (transformers' modeling_*.py): softcapping, scaling,
# and cutting the padded vocabulary off (inkling: logits[..., :unpadded_vocab_size])
_POST_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale", "unpadded_vocab_size")


def model_inputs(batch: dict[str, torch.Tensor], model: Any = None) -> dict[str, Any]:
    """Forward arguments: input_ids with position_ids (packed examples kept apart, engine/packing.py) or attention_mask.

    Under sdpa, packed examples also get their block-diagonal causal mask, built here on the device:
    transformers would build the same mask from the position ids, but it reads them back to the host
    first (masking_utils.find_packed_sequence_indices), a sync in every forward pass.
    """
    if "position_ids" in batch:
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        if _attention(model) == "sdpa":
            inputs["attention_mask"] = isolation_mask(batch["position_ids"])
        return inputs
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}


def isolation_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, L, L) booleans, True where a token may attend: an earlier or the same token of its own example.

    An example starts wherever the position ids restart at 0 (engine/packing.py); device ops only, no sync.
    """
    example = (position_ids == 0).cumsum(-1)
    same = example[:, :, None] == example[:, None, :]
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]


def _attention(model: Any) -> str | None:
    """The attention implementation of a (DDP-, compile- or peft-wrapped) transformers model."""
    inner = getattr(model, "module", model)  # DDP
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    config = getattr(inner, "config", None)
    return getattr(config, "_attn_implementation", None)


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
    logits = model(**model_inputs(batch, model)).logits
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)


def chunked_loss_sum(model: Any, batch: dict[str, torch.Tensor], chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    head = output_layer(model)
    targets = batch["labels"][:, 1:]
    n_targets = targets.numel()
    if head is None or n_targets * head.out_features <= chunk_elements:
        return plain_loss_sum(model, batch)
    with _identity(head):
        hidden = model(**model_inputs(batch, model)).logits
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


def fused_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """liger-kernel's fused linear cross-entropy from the final hidden states (summed over targets, fp32)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    head = output_layer(model)
    if head is None:
        return plain_loss_sum(model, batch)
    with _identity(head):
        hidden = model(**model_inputs(batch, model)).logits
    targets = batch["labels"][:, 1:].flatten()
    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    loss = fused(head.weight, hidden[:, :-1].flatten(0, 1), targets, head.bias)
    return (loss[0] if isinstance(loss, tuple) else loss).float()


LOSSES = {"plain": plain_loss_sum, "chunked": chunked_loss_sum, "fused": fused_loss_sum}


LIGER_MIN = (0, 5, 3)  # 0.5.0-0.5.2 fail under bf16/fp16 autocast with fp32 weights (addmm dtype mismatch; liger #501)


def liger_version() -> tuple[int, ...] | None:
    """The installed liger-kernel's version as numbers, or None when it is not installed."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import InvalidVersion, Version

    try:
        return Version(version("liger-kernel")).release
    except (PackageNotFoundError, InvalidVersion):
        return None


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def fused_available(device: torch.device) -> bool:
    found = liger_version()
    return device.type == "cuda" and found is not None and found >= LIGER_MIN


def logits_bytes(micro_batch: int, seq_len: int, vocab: int, half: bool) -> int:
    """Memory of one micro-batch's logits in the plain way: logits, their fp32 copy, and both gradients."""
    per_element = (2 if half else 4) * 2 + 4 * 2
    return micro_batch * seq_len * vocab * per_element


def memory_of(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def choose(requested: str, model: Any, device: torch.device, micro_batch: int, seq_len: int, half: bool) -> tuple[str, str]:
    """(the way to compute the loss, a line saying why) for train.chunked_loss = requested."""
    from engine.errors import UserError

    head = output_layer(model)
    found = liger_version()
    if requested == "fused" and not fused_available(device):
        missing = "; liger-kernel is not installed: pip install 'tunesmith[gpu]'" if found is None else ""
        if found is not None and found < LIGER_MIN:
            missing = (f"; the installed liger-kernel {_dotted(found)} fails under mixed precision, "
                       f"{_dotted(LIGER_MIN)} or later is needed: pip install -U 'tunesmith[gpu]'")
        raise UserError(
            f'train.chunked_loss: "fused" needs liger-kernel and a CUDA GPU (this run is on {device.type}{missing}); '
            f'use "auto", "plain" or "chunked"'
        )
    if requested != "auto":
        return requested, f"{requested} (train.chunked_loss)"
    if head is None:
        return "plain", "plain (auto: the output layer is not a plain Linear, or the model changes logits after it)"
    if fused_available(device):
        return "fused", "fused linear cross-entropy from liger-kernel (auto: installed, on CUDA)"
    too_old = (f"; liger-kernel {_dotted(found)} is installed but too old, {_dotted(LIGER_MIN)} or later "
           f"is needed for its fused loss" if device.type == "cuda" and found is not None else "")
    need, have = logits_bytes(micro_batch, seq_len, head.out_features, half), memory_of(device)
    if need <= have // 4:
        return "plain", f"plain (auto: the logits take {need / 2**30:.2f} GiB, at most a quarter of {have / 2**30:.0f} GiB{too_old})"
    return "chunked", f"chunked (auto: the logits would take {need / 2**30:.2f} GiB, over a quarter of {have / 2**30:.0f} GiB{too_old})"


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor], chunked: bool | str = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over a batch (fp32), and the number of target tokens.

    chunked: "plain", "chunked" or "fused" (True means "chunked", False "plain").
    """
    way = ("chunked" if chunked else "plain") if isinstance(chunked, bool) else chunked
    loss = LOSSES[way](model, batch)
    return loss, (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
