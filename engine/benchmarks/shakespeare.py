"""Benchmark 1: quality per second on CPU against nanoGPT's CPU quickstart.

    python -m engine.benchmarks.shakespeare [--recipe recipes/shakespeare.toml] [--no-trainer] [--repeats N] [--json PATH] [key=value ...]

Trains the recipe (tinyshakespeare's first 90%, ../shared/data/tinyshakespeare-train.txt) as a user
would, `python -m engine RECIPE`, in a fresh process with an empty tokenization cache, and reports
validation nats per character over the whole -val.txt (total nats / characters, comparable across
tokenizers) against the whole process's wall time (imports, reading, tokenizer training,
tokenization, training, evaluation, saving). Then Hugging Face Trainer trains the same model
(same tokenizer training, blocks, config, seed, batch, steps, AdamW, cosine schedule, clipping) in
its own fresh process, evaluated the same way, timed the same way. --repeats N alternates the two
N times and reports medians with the range (this machine's speed drifts by 10-15% within minutes). nanoGPT's numbers were measured
on this 2-core machine and are given, not re-run (nanoGPT is not installed here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NANOGPT = {"nats_per_char": 1.886, "seconds": 105.0}
NANOGPT_TRAINER = {"nats_per_char": 1.880, "seconds": 106.0}


def trainer_process(recipe_path: str, overrides: list[str], out_json: str) -> None:
    """What the Trainer subprocess runs: the recipe's model and data through Hugging Face Trainer."""
    from transformers import Trainer
    from transformers.utils import logging as hf_logging

    from engine import recipe as recipe_mod
    from engine.benchmarks import common

    hf_logging.set_verbosity_error()
    recipe = recipe_mod.load(recipe_path, [*overrides, "data.cache=false"])
    prep = common.prepared(recipe)
    t = recipe.train
    per_epoch = len(prep["train_blocks"]) // (t.batch_size * t.gradient_accumulation_steps)
    steps = t.max_steps if t.max_steps > 0 else per_epoch * t.epochs
    model = common.fresh_model(recipe, prep["tokenizer"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=model, args=common.trainer_arguments(recipe, tmp, steps),
                          train_dataset=common.BlockDataset(prep["train_blocks"], recipe.data.max_length))
        trainer.train()
    npc = common.nats_per_char(model, prep["val_blocks"], prep["val_chars"], t.batch_size, prep["tokenizer"].pad_token_id)
    Path(out_json).write_text(json.dumps({"nats_per_char": npc, "steps": steps}))


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, proc


def engine_run(args: argparse.Namespace, tmp: str, env: dict[str, str], i: int) -> dict | None:
    from engine.benchmarks import common

    out = Path(tmp) / f"run{i}"
    cmd = [sys.executable, "-m", "engine", args.recipe, *args.overrides, f"train.output_dir={out}", f"data.cache_dir={tmp}/cache{i}",
           "train.sample_prompt=\"\""]
    seconds, proc = timed(cmd, env)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
        return None
    metrics = json.loads((out / "metrics.json").read_text())
    return {"nats_per_char": metrics["val_bpc"] * common.LN2, "seconds": seconds, "steps": metrics["steps"],
            "train_seconds": metrics["tokens_seen"] / metrics["tokens_per_second"], "tokens_seen": metrics["tokens_seen"]}


def trainer_run(args: argparse.Namespace, tmp: str, env: dict[str, str], i: int) -> dict | None:
    tjson = Path(tmp) / f"trainer{i}.json"
    seconds, proc = timed([sys.executable, "-m", "engine.benchmarks.shakespeare", "--recipe", args.recipe,
                           "--trainer-process", str(tjson), *args.overrides], env)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
        return None
    return {**json.loads(tjson.read_text()), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.benchmarks.shakespeare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="recipes/shakespeare.toml")
    ap.add_argument("--no-trainer", action="store_true", help="skip the Hugging Face Trainer run")
    ap.add_argument("--repeats", type=int, default=1, help="alternate engine and Trainer runs this many times; report medians")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this path")
    ap.add_argument("--trainer-process", default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides (both runs)")
    args = ap.parse_args(argv)
    if args.trainer_process:
        trainer_process(args.recipe, args.overrides, args.trainer_process)
        return 0
    import statistics

    from engine.benchmarks import common

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs: dict[str, list[dict]] = {"engine": [], "trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(max(1, args.repeats)):
            for name, run in (("engine", engine_run), ("trainer", trainer_run)):
                if name == "trainer" and args.no_trainer:
                    continue
                r = run(args, tmp, env, i)  # each in a fresh process with an empty tokenization cache
                if r is None:
                    return 1
                runs[name].append(r)
                print(f"{name} run {i + 1}: {r['nats_per_char']:.3f} nats/char in {r['seconds']:.1f} s", flush=True)

    def summary(rs: list[dict]) -> dict:
        secs = [r["seconds"] for r in rs]
        return {"nats_per_char": statistics.median(r["nats_per_char"] for r in rs), "seconds": statistics.median(secs),
                "seconds_min": min(secs), "seconds_max": max(secs), "steps": rs[0]["steps"], "runs": rs}

    result = {"machine": common.machine(), "recipe": args.recipe, "overrides": args.overrides, "repeats": args.repeats}
    rows = []
    for name, label in (("engine", "tunesmith engine"), ("trainer", "HF Trainer, same model/data/steps")):
        if runs[name]:
            s = result[name] = summary(runs[name])
            spread = f" ({s['seconds_min']:.1f}-{s['seconds_max']:.1f})" if len(runs[name]) > 1 else ""
            rows.append((label, f"{s['nats_per_char']:.3f}", f"{s['seconds']:.1f}{spread}", s["steps"]))
    rows.append(("nanoGPT CPU quickstart (given)", f"{NANOGPT['nats_per_char']:.3f}", f"{NANOGPT['seconds']:.0f}", 2000))
    rows.append(("HF Trainer, nanoGPT's model (given)", f"{NANOGPT_TRAINER['nats_per_char']:.3f}", f"{NANOGPT_TRAINER['seconds']:.0f}", 2000))
    print(f"\nQuality per second: {args.recipe} {' '.join(args.overrides)}; {common.machine()}"
          + (f"; medians of {args.repeats} alternating runs (range)" if args.repeats > 1 else ""))
    print(common.table(["run", "val nats/char", "wall s", "steps"], rows))
    e = result["engine"]
    print(f"target: <= {NANOGPT['nats_per_char']} nats/char in <= {NANOGPT['seconds'] / 2:.1f} s: "
          f"{'met' if e['nats_per_char'] <= NANOGPT['nats_per_char'] and e['seconds'] <= NANOGPT['seconds'] / 2 else 'NOT met'} "
          f"({e['nats_per_char']:.3f} in {e['seconds']:.1f} s)")
    common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
