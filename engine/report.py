"""What a run prints before it starts and after it ends, in lines that read well in a log file.

start_lines: the recipe (its path and the keys set differently from the defaults; recipe.toml in the
run folder holds every key), the plugins with their packages and versions, device and precision,
parameter counts, effective batch size in tokens and the number of steps.
summary_table: best and final validation numbers, speed, wall time and where the files are.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from engine import schema, tomlfile
from engine.manager import KINDS

PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 autocast (fp32 weights)", "fp16": "fp16 autocast (fp32 weights)", "fp8": "fp8"}


def flatten(resolved: dict[str, Any]) -> dict[str, Any]:
    """A resolved recipe as dotted keys: sections and plugin tables one level down, other values as they are.

    A table inside a section (model.config) stays one value.
    """
    flat: dict[str, Any] = {}
    for key, value in resolved.items():
        if isinstance(value, dict):
            for sub, inner in value.items():
                flat[f"{key}.{sub}"] = inner
        else:
            flat[key] = value
    return flat


def defaults(recipe: Any) -> dict[str, Any]:
    """The default of every key the recipe has, as dotted keys (plugin options from their Options)."""
    from engine.recipe import SECTIONS

    out: dict[str, Any] = {kind.slot: kind.default for kind in KINDS.values()}
    for name, section in SECTIONS.items():
        out.update({f"{name}.{k}": v for k, v in schema.defaults_table(section).items()})
    for sel in recipe.plugins:
        if sel.info.options_schema is not None:
            out.update({f"{sel.name}.{k}": v for k, v in schema.defaults_table(sel.info.options_schema).items()})
    return out


def changed_keys(recipe: Any) -> dict[str, Any]:
    """Keys of the resolved recipe whose value is not the default (data.train has none, so it is always here)."""
    base = defaults(recipe)
    return {k: v for k, v in flatten(recipe.resolved()).items() if k not in base or base[k] != v}


def value_text(value: Any) -> str:
    """A value as it would be written in a recipe."""
    try:
        return tomlfile._value(value)
    except TypeError:
        return str(value)


def start_lines(
    recipe: Any, accelerator: Any, trainable: int, total: int, n_train: int, n_val: int, total_steps: int, out: Path
) -> list[str]:
    cfg = recipe.train
    world = accelerator.num_processes
    blocks = world * cfg.batch_size * cfg.gradient_accumulation_steps
    lines = [f"recipe: {recipe.path} (every key: {out / 'recipe.toml'}); set differently from the defaults:"]
    lines += [f"  {key} = {value_text(value)}" for key, value in changed_keys(recipe).items()]
    lines.append("plugins:")
    width = max((len(s.name) for s in recipe.plugins), default=0)
    for sel in recipe.plugins:
        lines.append(f"  {KINDS[sel.kind].slot:<15} {sel.name:<{width}}  {sel.info.package} {sel.info.version}".rstrip())
    precision = PRECISION_NAMES.get(str(accelerator.mixed_precision), str(accelerator.mixed_precision))
    lines.append(f"device: {accelerator.device} x {world} process{'es' if world > 1 else ''}, precision {precision}")
    lines.append(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(1, total):.2f}%)")
    lines.append(f"data: {n_train:,} training blocks, {n_val:,} validation blocks, of up to {recipe.data.max_length} tokens")
    lines.append(
        f"steps: {total_steps:,}, each of {blocks} blocks ({world} process{'es' if world > 1 else ''} x batch {cfg.batch_size} "
        f"x accumulation {cfg.gradient_accumulation_steps}) = up to {blocks * recipe.data.max_length:,} tokens"
    )
    return lines


def label_lines(rows: list[tuple[str, Any]]) -> list[str]:
    """Label / value pairs as lines, values aligned after the longest label."""
    width = max(len(label) for label, _ in rows)
    return [f"{label:<{width}}  {value}" for label, value in rows]


def duration(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)


def summary_table(summary: dict[str, Any], out: Path, final_dir: str = "final") -> str:
    """The end-of-run table: final and best validation numbers, speed, time, files."""
    final, best = summary.get("val_loss"), summary.get("best_val_loss")
    bpc = summary.get("val_bpc")
    # every evaluation uses the same validation tokens and characters, so bits/char scale with the loss
    best_bpc = bpc * best / final if bpc is not None and best is not None and final else None
    best_head = f"best (step {summary.get('best_step')})"
    rows = [
        ("", "final", best_head),
        ("val loss", _num(final, ".4f"), _num(best, ".4f")),
        ("perplexity", _num(summary.get("perplexity"), ".3f"), _num(math.exp(min(best, 700)) if best is not None else None, ".3f")),
        ("bits/char", _num(bpc, ".4f"), _num(best_bpc, ".4f")),
    ]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:>{w1}}  {c:>{len(best_head)}}".rstrip() for a, b, c in rows]
    stop = f", stopped early: {summary['stop_reason']}" if summary.get("stopped_early") else ""
    lines += [
        f"{'train loss':<{w0}}  {_num(summary.get('train_loss'), '.4f'):>{w1}}",
        "",
        f"steps {summary.get('steps')}, epochs {summary.get('epochs')}, {summary.get('tokens_seen', 0):,} tokens, "
        f"{_num(summary.get('tokens_per_second'), ',.0f')} tokens/s, wall time {duration(summary.get('wall_seconds', 0.0))}{stop}",
        "",
    ]
    files = [("run folder", out), ("model", out / final_dir)]
    if (out / "best").exists():
        files.append(("best model", out / "best"))
    files += [("metrics", out / "metrics.json"), ("curves", out / "curves.png"), ("samples", out / "samples.jsonl")]
    files = [(name, path) for name, path in files if path.exists() or name in ("run folder", "model", "metrics")]
    lines += label_lines(files)
    return "\n".join(lines)
