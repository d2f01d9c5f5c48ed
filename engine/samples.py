"""Sample generations at each evaluation (train.sample_prompts): appended to samples.jsonl in the run
folder, one JSON object per prompt, and sent to the sinks through the log_samples hook.

Sampling uses a forked random generator seeded by train.seed and the step, so samples are reproducible and
turning them on does not change the training (dropout, data order) of the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from engine.generate import generate_answer


def generate_samples(
    model: Any, tokenizer: Any, plugins: Any, prompts: list[str], max_new_tokens: int, seed: int, step: int,
    autocast: Callable[[], Any], data_cfg: Any = None,
) -> list[dict[str, Any]]:
    """One {"step", "prompt", "text"} per prompt; text is the continuation without the prompt.

    data_cfg: the run's data section: each prompt is formatted as data.format did in training.
    """
    device = next(model.parameters()).device
    records = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed * 1_000_003 + step)
        with autocast():
            for prompt in prompts:
                text = generate_answer(model, tokenizer, plugins, data_cfg, prompt, max_new_tokens=max_new_tokens)
                records.append({"step": step, "prompt": prompt, "text": text})
    return records


def write_samples(records: list[dict[str, Any]], out: Path) -> None:
    with (Path(out) / "samples.jsonl").open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def sample_at_evaluation(context: Any, plugins: Any) -> None:
    """Generate from train.sample_prompts, write samples.jsonl, call log_samples. Main process only."""
    cfg = context.recipe.train
    model = context.accelerator.unwrap_model(context.model)
    records = generate_samples(
        model, context.tokenizer, plugins, list(cfg.sample_prompts), cfg.sample_max_new_tokens, cfg.seed,
        context.state.step, context.accelerator.autocast, context.recipe.data,
    )
    write_samples(records, context.output_dir)
    plugins.hook.log_samples(samples=records, step=context.state.step)
