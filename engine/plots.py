"""Pictures of runs with matplotlib's object API (no pyplot state, Agg canvas): safe in any process.

draw_curves: one run's training and validation loss and learning rate, against steps and tokens.
draw_comparison: the validation loss of several runs in one picture.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence


def _figure(width: int, height: int) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width / 100, height / 100), dpi=100, layout="constrained")


def _save(fig: Any, path: Path) -> None:
    """Write the PNG beside the target and rename it, so a viewer never reads half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def _tokens_axis(ax: Any) -> None:
    from matplotlib.ticker import EngFormatter

    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel("tokens seen")


def draw_curves(
    train: Sequence[dict], evals: Sequence[dict], path: Path, width: int, height: int, title: str = "", steps: Sequence[dict] = (),
) -> None:
    """train: the logged records (step, tokens_seen, loss averaged since the last log, lr); evals: records with
    step, tokens_seen, val_loss; steps: every optimizer step's step, tokens_seen, loss and lr, when kept.

    With steps, the training loss of every step is drawn (thin) under the logged means, and the learning
    rate of every step, so a short run's warmup shows."""
    fig = _figure(width, height)
    axes = fig.subplots(2, 2, sharex="col")
    for col, x in enumerate(("step", "tokens_seen")):
        loss_ax, lr_ax = axes[0][col], axes[1][col]
        tr = [r for r in train if x in r and "loss" in r]
        ev = [r for r in evals if x in r and "val_loss" in r]
        each = [r for r in steps if r.get(x) is not None and r.get("loss") is not None]
        if each:
            loss_ax.plot([r[x] for r in each], [r["loss"] for r in each], label="train loss, every step", color="tab:blue", alpha=0.35, linewidth=0.8)
        if tr:
            loss_ax.plot([r[x] for r in tr], [r["loss"] for r in tr], label="train loss" + (", logged mean" if each else ""), color="tab:blue")
        if ev:
            loss_ax.plot([r[x] for r in ev], [r["val_loss"] for r in ev], "o-", label="validation loss", color="tab:orange")
        loss_ax.set_ylabel("loss (nats per token)")
        loss_ax.grid(alpha=0.3)
        loss_ax.legend(loc="upper right")
        lr = [r for r in each if r.get("lr") is not None] or [r for r in tr if "lr" in r]
        if lr:
            lr_ax.plot([r[x] for r in lr], [r["lr"] for r in lr], color="tab:green")
        lr_ax.set_ylabel("learning rate")
        lr_ax.grid(alpha=0.3)
        if x == "step":
            lr_ax.set_xlabel("optimizer step")
        else:
            _tokens_axis(lr_ax)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def draw_comparison(runs: Sequence[tuple[str, Sequence[dict]]], path: Path, width: int = 1000, height: int = 600) -> None:
    """runs: (label, evaluation records with step, tokens_seen and val_loss) for each run."""
    fig = _figure(width, height)
    by_step, by_tokens = fig.subplots(1, 2, sharey=True)
    for label, evals in runs:
        ev = [r for r in evals if "val_loss" in r]
        line = by_step.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", label=label)[0]
        with_tokens = [r for r in ev if "tokens_seen" in r]
        if with_tokens:
            by_tokens.plot([r["tokens_seen"] for r in with_tokens], [r["val_loss"] for r in with_tokens], "o-", color=line.get_color(), label=label)
    by_step.set_xlabel("optimizer step")
    by_step.set_ylabel("validation loss (nats per token)")
    _tokens_axis(by_tokens)
    for ax in (by_step, by_tokens):
        ax.grid(alpha=0.3)
    by_step.legend(loc="upper right")
    fig.suptitle("validation loss")
    _save(fig, path)
