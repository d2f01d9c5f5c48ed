"""Benchmark 2: engine overhead on CPU.

    python -m engine.benchmarks.overhead [--recipe recipes/shakespeare.toml] [--steps 50] [--rounds 5] [--json PATH] [key=value ...]

The same model (built from the recipe's config, same seed), the same token blocks, batch, optimizer
(AdamW with the engine's weight-decay groups), cosine schedule, clipping and steps go through
(a) the engine's training loop (engine.loop.train, writing no run); (b) a bare PyTorch loop doing
the same math with the same kernels as the engine (the fused GELU of model.fused_activations and
torch's fused AdamW): the engine's overhead is (a) against (b); (c) the same bare loop on the model
as transformers builds it, with torch.optim.AdamW's defaults (what a hand-written loop gets); and
(d) Hugging Face Trainer with its defaults, in one process, alternating a, b, c, d for --rounds
rounds. The first step of every run is warm-up and is not timed; tokens/s is the median over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch

from engine.benchmarks import common


def run_engine(recipe_path: str, overrides: list[str], steps: int) -> float:
    """Seconds per step after the first, through the engine's loop."""
    from engine import bench

    result = bench.run(recipe_path, overrides, steps)
    return result["tokens_per_step"] / result["tokens_per_second"]


def run_bare(recipe: Any, prep: dict[str, Any], steps: int, engine_kernels: bool) -> float:
    import torch.nn.functional as F

    from engine import data as data_mod, model as model_mod
    from engine.plugins.cosine import cosine_factor, schedule, warmup_steps_for

    t = recipe.train
    sched = next(s for s in recipe.plugins if s.kind == "scheduler").options
    model = common.fresh_model(recipe, prep["tokenizer"])
    model.train()
    if engine_kernels:
        model_mod.use_fused_activations(model)
    opt = torch.optim.AdamW(model_mod.param_groups(model, t.weight_decay), lr=t.learning_rate, fused=engine_kernels or None)
    lr = schedule(opt, cosine_factor, warmup=warmup_steps_for(steps, sched.warmup_ratio, sched.warmup_steps), total=steps,
                  min_lr_ratio=sched.min_lr_ratio)
    blocks, pad = prep["train_blocks"], prep["tokenizer"].pad_token_id
    per_epoch = len(blocks) // (t.batch_size * t.gradient_accumulation_steps)
    marks = []
    for step in range(steps):
        micro = data_mod.step_batches(len(blocks), t.seed, step // per_epoch, step % per_epoch, t.batch_size, t.gradient_accumulation_steps, 0, 1)
        n_tokens = sum(len(i) for i in micro) * (recipe.data.max_length - 1)
        for ids in micro:
            b = data_mod.collate([blocks[i] for i in ids], pad)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(), reduction="sum")
            (loss / n_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        opt.step()
        lr.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
    return (marks[-1] - marks[0]) / (steps - 1)


def run_trainer(recipe: Any, prep: dict[str, Any], steps: int) -> float:
    from transformers import Trainer, TrainerCallback

    marks: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    model = common.fresh_model(recipe, prep["tokenizer"])
    with tempfile.TemporaryDirectory() as tmp:
        args = common.trainer_arguments(recipe, tmp, steps)
        trainer = Trainer(model=model, args=args, train_dataset=common.BlockDataset(prep["train_blocks"], recipe.data.max_length),
                          callbacks=[Timer()])
        trainer.train()
    return (marks[-1] - marks[0]) / (len(marks) - 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.benchmarks.overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="recipes/shakespeare.toml")
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps per run (the first is warm-up)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of engine, bare loops, Trainer")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this path")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    args = ap.parse_args(argv)
    if args.steps < 3:
        ap.error("--steps must be at least 3")
    from transformers.utils import logging as hf_logging

    from engine import recipe as recipe_mod

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    recipe = recipe_mod.load(args.recipe, args.overrides)
    prep = common.prepared(recipe)
    tokens_per_step = recipe.train.batch_size * recipe.train.gradient_accumulation_steps * (recipe.data.max_length - 1)
    bare, stock = "bare loop, engine's kernels", "bare loop, stock model + AdamW"
    per_step: dict[str, list[float]] = {"engine": [], bare: [], stock: [], "HF Trainer": []}
    for r in range(args.rounds):
        per_step["engine"].append(run_engine(args.recipe, args.overrides, args.steps))
        per_step[bare].append(run_bare(recipe, prep, args.steps, engine_kernels=True))
        per_step[stock].append(run_bare(recipe, prep, args.steps, engine_kernels=False))
        per_step["HF Trainer"].append(run_trainer(recipe, prep, args.steps))
        print(f"round {r + 1}: " + ", ".join(f"{k} {tokens_per_step / v[-1]:,.0f} tok/s" for k, v in per_step.items()), flush=True)
    tps = {k: tokens_per_step / statistics.median(v) for k, v in per_step.items()}
    rows = [(k, f"{v:,.0f}", f"{v / tps[bare]:.3f}", f"{v / tps['HF Trainer']:.3f}") for k, v in tps.items()]
    print(f"\nEngine overhead: {args.recipe} {' '.join(args.overrides)}, {args.steps} steps x {args.rounds} rounds, "
          f"{tokens_per_step:,} target tokens/step, {common.machine()}")
    print(common.table(["loop", "tokens/s (median)", "x bare (engine's kernels)", "x Trainer"], rows))
    print(f"targets: engine >= 0.95x the bare loop with its kernels (measured {tps['engine'] / tps[bare]:.3f}x), "
          f">= 1.3x Trainer (measured {tps['engine'] / tps['HF Trainer']:.3f}x)")
    common.write_json(args.json, {"settings": vars(args), "machine": common.machine(), "tokens_per_step": tokens_per_step,
                                  "seconds_per_step": per_step, "tokens_per_second": tps,
                                  "engine_vs_bare": tps["engine"] / tps[bare], "engine_vs_trainer": tps["engine"] / tps["HF Trainer"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
