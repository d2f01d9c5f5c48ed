"""curves.png is drawn from every optimizer step's loss and learning rate, not only the logged points."""

import json

import pytest
import torch

from engine import plots
from engine.plugins.curves import Curves
from engine.testing import run_recipe, tiny_recipe


def test_every_step_is_drawn_and_the_logged_points_are_their_means(tmp_path, monkeypatch):
    drawn = []
    real = plots.draw_curves
    monkeypatch.setattr(plots, "draw_curves", lambda *a, **k: drawn.append(a) or real(*a, **k))
    recipe = tiny_recipe(tmp_path, sinks=["jsonl", "curves"], scheduler="cosine", cosine={"warmup_steps": 4})
    recipe["train"].update({"max_steps": 12, "log_every_steps": 4})
    run_recipe(recipe)
    steps = drawn[-1][6]
    assert [r["step"] for r in steps] == list(range(1, 13))
    logged = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert [r["step"] for r in logged] == [4, 8, 12]  # three points: the warmup would be invisible in them
    for record in logged:
        window = [r["loss"] for r in steps if record["step"] - 4 < r["step"] <= record["step"]]
        assert record["loss"] == pytest.approx(sum(window) / 4, rel=1e-9)
    lrs = [r["lr"] for r in steps]
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3] and lrs[3] > lrs[-1]  # the warmup, then the decay, step by step
    assert steps[-1]["tokens_seen"] == logged[-1]["tokens_seen"]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000


class _Ctx:
    is_main_process = True

    def __init__(self, out, step):
        self.output_dir = out
        self.state = type("S", (), {"step": step})()

    def run_file(self, name):
        return self.output_dir / name


def test_device_values_are_read_back_only_when_drawing_and_a_resumed_run_keeps_earlier_steps(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "draw_curves", lambda *a, **k: drawn.append(a[6]))
    first = Curves(Curves.Options())
    first.on_train_start(_Ctx(tmp_path, 0))
    for step in (1, 2):
        first.on_step_end(_Ctx(tmp_path, step), {"loss": torch.tensor(3.0 - step), "lr": 0.1 * step, "tokens_seen": 10 * step})
    assert isinstance(first.steps[0][2], torch.Tensor)  # nothing read back per step
    state = first.plugin_state()
    assert state == {"steps": [[1, 10, 2.0, 0.1], [2, 20, 1.0, 0.2]]}
    resumed = Curves(Curves.Options())
    resumed.on_train_start(_Ctx(tmp_path, 2))
    resumed.load_plugin_state(state)
    resumed.on_step_end(_Ctx(tmp_path, 3), {"loss": torch.tensor(0.5), "lr": 0.3, "tokens_seen": 30})
    resumed.log_metrics({"val_loss": 1.0, "tokens_seen": 30}, 3, "eval")
    assert [(r["step"], r["loss"]) for r in drawn[-1]] == [(1, 2.0), (2, 1.0), (3, 0.5)]
