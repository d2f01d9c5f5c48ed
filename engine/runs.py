"""`python -m engine runs DIR... [--plot FILE.png]`: finished runs side by side.

The table holds the key numbers of each run's metrics.json and every recipe key (from recipe.toml)
whose value is not the same in all of them, "-" where a key did not apply to a run (model.base of a
model built from model.config, lora.* of a full fine-tune, ...: `not_applying`); --plot draws their validation curves (metrics.jsonl).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from engine import runfolder
from engine.errors import UserError
from engine.report import duration, value_text

IGNORED_KEYS = ("train.output_dir", "train.overwrite")


def _flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):  # an empty table adds no key
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _metric_rows(summaries: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    def fmt(key: str, spec: str) -> list[str]:
        return [format(s[key], spec) if isinstance(s.get(key), (int, float)) else "-" for s in summaries]

    return [
        ("val loss", fmt("val_loss", ".4f")),
        ("best val loss", [f"{s['best_val_loss']:.4f} @ {s.get('best_step')}" if s.get("best_val_loss") is not None else "-" for s in summaries]),
        ("perplexity", fmt("perplexity", ".3f")),
        ("bits/char", fmt("val_bpc", ".4f")),
        ("train loss", fmt("train_loss", ".4f")),
        ("steps", fmt("steps", "d")),
        ("epochs", fmt("epochs", "g")),
        ("tokens seen", fmt("tokens_seen", ",d")),
        ("tokens/s", fmt("tokens_per_second", ",.0f")),
        ("wall time", [duration(s["wall_seconds"]) if "wall_seconds" in s else "-" for s in summaries]),
        ("trainable params", fmt("trainable_params", ",d")),
        ("stopped early", [str(s.get("stop_reason") or "no") if "stopped_early" in s else "-" for s in summaries]),
    ]


def not_applying(recipe: dict[str, Any]) -> list[str]:
    """Keys (a name ending in "." covers a section's keys) that a run's recipe.toml holds but that did not act in it."""
    model, data, train, lora = (recipe.get(k, {}) for k in ("model", "data", "train", "lora"))
    keys = []
    if model.get("config"):  # built from a config: no base model
        keys += ["model.base", "model.device_map"]
    else:  # a pretrained base: its own tokenizer and vocabulary
        keys += ["model.tokenizer_vocab_size", "model.pad_vocab_multiple"]
    if lora.get("enabled") is False:
        keys += [f"lora.{k}" for k in lora if k != "enabled"]
    if data.get("val"):
        keys.append("data.val_split")
    if not recipe.get("augmentations"):
        keys.append("data.augment_copies")
    if train.get("max_steps", 0) > 0:
        keys.append("train.epochs")
    return keys


def _applying(recipe: dict[str, Any]) -> dict[str, Any]:
    skip = not_applying(recipe)
    return {k: v for k, v in _flat(recipe).items() if not any(k == s or k.startswith(s + ".") for s in skip)}


def differing_keys(recipes: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """Recipe keys whose values differ between runs; "-" where a run has no such key or the key did not apply to it."""
    flats = [_applying(r) for r in recipes]
    keys = sorted({k for f in flats for k in f} - set(IGNORED_KEYS))
    rows = []
    for key in keys:
        values = [value_text(f[key]) if key in f else "-" for f in flats]
        if len(set(values)) > 1:
            rows.append((key, values))
    return rows


def compare(run_dirs: Sequence[str]) -> str:
    runs = [Path(d) for d in run_dirs]
    summaries = [runfolder.read_summary(r) for r in runs]
    recipes = [runfolder.read_recipe(r) if (r / "recipe.toml").exists() else {} for r in runs]
    header = ("", [str(r) for r in runs])
    metric_rows = _metric_rows(summaries)
    key_rows = differing_keys(recipes) if len(runs) > 1 else []
    rows = [header, *metric_rows]
    if key_rows:
        rows += [("", [""] * len(runs)), ("recipe keys that differ", [""] * len(runs)), *key_rows]
    elif len(runs) > 1:
        rows += [("", [""] * len(runs)), ("recipe keys that differ: none (besides train.output_dir)", [""] * len(runs))]
    label_width = max(len(name) for name, values in rows if any(values))  # heading lines stand alone
    col_widths = [max(len(values[i]) for _, values in rows) for i in range(len(runs))]
    lines = []
    for name, values in rows:
        if name and not any(values):
            lines.append(name)
            continue
        cells = "  ".join(f"{v:>{w}}" for v, w in zip(values, col_widths))
        lines.append(f"{name:<{label_width}}  {cells}".rstrip())
    return "\n".join(lines)


def plot(run_dirs: Sequence[str], path: str) -> None:
    from engine.plots import draw_comparison

    runs = [Path(d) for d in run_dirs]
    for run in runs:
        runfolder.read_summary(run)
    target = Path(path)
    if target.is_dir():
        raise UserError(f"--plot: '{path}' is a folder; give a file name such as {target / 'curves.png'}")
    runfolder.check_writable(target.parent if str(target.parent) else Path("."), "--plot", "folder for the picture")
    names = [r.name for r in runs]
    labels = names if len(set(names)) == len(names) else [str(r) for r in runs]
    series = [(label, [rec for rec in runfolder.read_history(r) if rec.get("phase") == "eval"]) for label, r in zip(labels, runs)]
    try:
        draw_comparison(series, target)
    except OSError as exc:
        raise UserError(f"--plot: could not write '{path}': {exc.strerror or exc}") from None
