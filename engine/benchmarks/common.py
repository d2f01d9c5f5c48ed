"""Pieces the benchmarks share: a recipe's data and model built the engine's way, Trainer settings, tables."""

from __future__ import annotations

import json
import math
import time
from typing import Any, Sequence

import torch


def prepared(recipe: Any) -> dict[str, Any]:
    """Documents, tokenizer, train and val blocks and a fresh model (seeded) for a recipe, via the engine's modules."""
    from engine import data as data_mod, model as model_mod, tokcache

    docs = data_mod.split_documents(recipe)
    cache = tokcache.cache_root(recipe.data)
    tokenizer = model_mod.load_tokenizer(recipe.model, docs.train, cache)
    train_blocks = data_mod.build_blocks(docs.train, tokenizer, recipe.data.max_length, recipe.data.packing, cache=cache)
    val_blocks = data_mod.build_blocks(docs.val, tokenizer, recipe.data.max_length, recipe.data.packing, for_eval=True, cache=cache)
    return {"docs": docs, "tokenizer": tokenizer, "train_blocks": train_blocks, "val_blocks": val_blocks,
            "val_chars": data_mod.characters(docs.val)}


def fresh_model(recipe: Any, tokenizer: Any) -> Any:
    from transformers import set_seed

    from engine import model as model_mod

    set_seed(recipe.train.seed)
    model = model_mod.load_model(recipe.model, tokenizer)
    if recipe.train.gradient_checkpointing:
        model_mod.enable_gradient_checkpointing(model)
    return model


def trainer_arguments(recipe: Any, output_dir: str, steps: int, **extra: Any) -> Any:
    """TrainingArguments matching the recipe: batch, accumulation, lr, AdamW, cosine with warmup and floor, clipping."""
    from transformers import TrainingArguments

    from engine.plugins.cosine import warmup_steps_for

    t = recipe.train
    cosine = next((s for s in recipe.plugins if s.kind == "scheduler"), None)
    opts = cosine.options if cosine is not None else None
    warmup = warmup_steps_for(steps, getattr(opts, "warmup_ratio", 0.0), getattr(opts, "warmup_steps", 0))
    adam = next((s for s in recipe.plugins if s.kind == "optimizer"), None)
    a = adam.options if adam is not None else None
    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
        adam_beta1=getattr(a, "beta1", 0.9), adam_beta2=getattr(a, "beta2", 0.999), adam_epsilon=getattr(a, "eps", 1e-8),
        max_grad_norm=t.max_grad_norm, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": getattr(opts, "min_lr_ratio", 0.0)}, warmup_steps=warmup,
        logging_steps=10**9, save_strategy="no", eval_strategy="no", report_to=[], seed=t.seed, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True, **extra,
    )


class BlockDataset(torch.utils.data.Dataset):
    """Full-length token blocks as Trainer rows (labels = input_ids; the model shifts them).

    The one shorter block packing may leave at the end is dropped: Trainer's default collator stacks rows.
    """

    def __init__(self, blocks: Sequence[torch.Tensor], length: int):
        self.blocks = [b for b in blocks if len(b) == length]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        b = self.blocks[i]
        return {"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()}


@torch.no_grad()
def nats_per_char(model: Any, blocks: Sequence[torch.Tensor], n_chars: int, batch_size: int, pad_id: int) -> float:
    """Total validation nats over characters (the same computation as the engine's val_bpc, in nats)."""
    from engine import data as data_mod, loss as loss_mod

    model.eval()
    total = 0.0
    for start in range(0, len(blocks), batch_size):
        batch = data_mod.collate(blocks[start : start + batch_size], pad_id)
        total += float(loss_mod.token_loss_sum(model, batch)[0])
    model.train()
    return total / n_chars


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, default=str)


def machine() -> str:
    import os
    import platform

    return f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"


LN2 = math.log(2)
