"""`python -m engine bench RECIPE [key=value ...] [--steps N]`: tokens/s and peak memory of a recipe.

Runs N optimizer steps of the recipe exactly as training would (same data, model, batch, precision
and speed settings) but writes no run folder, never evaluates and selects no sinks. The first step
(warm-up: allocation, compilation) is timed apart from the rest. Peak memory is the GPU's peak
allocation on CUDA; on CPU it is the process's peak resident size (model, data and Python included).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from typing import Any

from engine import report
from engine.testing import inline_plugin
from engine.hookspecs import hookimpl


class _StepTimer:
    """An inline callback plugin: the time and tokens seen after every optimizer step.

    On CUDA the step returns before the GPU has run it (engine/step.py), so the marks that bound the timed
    window (after the first step, after the last) wait for the GPU first; the steps between are not waited for.
    """

    marks: list[tuple[float, int]] = []
    step_metrics_on_device = True  # it reads no metric: the GPU waits for it only at the two window bounds

    @dataclasses.dataclass
    class Options:
        pass

    def __init__(self, options: Any = None):
        _StepTimer.marks = []

    @hookimpl
    def on_train_start(self, context):
        _StepTimer.marks.append((time.perf_counter(), 0))

    @hookimpl
    def on_step_end(self, context, metrics):
        if len(_StepTimer.marks) == 1 or context.state.step >= context.total_steps:
            synchronize()  # else the window would start while the first step's work is still queued on the GPU
        _StepTimer.marks.append((time.perf_counter(), context.state.tokens_seen))


def synchronize() -> None:
    """Wait for the GPU's queued work (nothing to wait for on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_bytes() -> tuple[int, str]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "GPU peak allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "process peak RSS"


def run(path: str, overrides: list[str], steps: int) -> dict[str, Any]:
    from engine import loop
    from engine import recipe as recipe_mod

    recipe = recipe_mod.load(path, [*overrides, f"train.max_steps={steps}", 'train.sample_prompt=""'])
    data = recipe.resolved()
    for slot in ("sinks", "early_stopping"):  # nothing is written, nothing is evaluated
        for name in data[slot] if isinstance(data[slot], list) else [data[slot]]:
            data.pop(name, None)
    data.update(sinks=[], early_stopping="", callbacks=[*data["callbacks"], "_bench_timer"])
    with inline_plugin("callback", "_bench_timer", _StepTimer):
        recipe = recipe_mod.from_dict(data, recipe.path, base_dir=recipe.base_dir)
        t0 = time.perf_counter()
        summary = loop.train(recipe, write_run=False)
        wall = time.perf_counter() - t0
    marks = _StepTimer.marks
    first = marks[1][0] - marks[0][0] if len(marks) > 1 else float("nan")
    steady_t = marks[-1][0] - marks[1][0] if len(marks) > 2 else float("nan")
    steady_tok = marks[-1][1] - marks[1][1] if len(marks) > 2 else 0
    peak, peak_kind = peak_memory_bytes()
    return {
        "recipe": path,
        "overrides": overrides,
        "steps": summary["steps"],
        "micro_batch": summary["batch_size"],
        "accumulation": summary["gradient_accumulation_steps"],
        "tokens_per_step": summary["tokens_seen"] / max(1, summary["steps"]),
        "first_step_seconds": first,
        "tokens_per_second": steady_tok / steady_t if steady_tok else summary["tokens_seen"] / max(1e-9, summary["train_seconds"]),
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "train_loss": summary["train_loss"],
        "device": summary["device"],
        "precision": summary["precision"],
        "wall_seconds": wall,
    }


def print_report(r: dict[str, Any]) -> None:
    rows = [
        ("device / precision", f"{r['device']} / {r['precision']}"),
        ("steps", f"{r['steps']} (first step {r['first_step_seconds']:.2f} s, not in tokens/s)"),
        ("micro-batch x accumulation", f"{r['micro_batch']} x {r['accumulation']}"),
        ("tokens per step", f"{r['tokens_per_step']:,.0f}"),
        ("tokens/s", f"{r['tokens_per_second']:,.0f}"),
        (r["peak_memory_kind"], f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB"),
        ("last train loss", f"{r['train_loss']:.4f}"),
    ]
    print("\n".join(report.label_lines(rows)))


def main(path: str, overrides: list[str], steps: int, json_path: str | None = None) -> int:
    result = run(path, overrides, steps)
    print_report(result)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0
