"""Helpers for testing plugins: register a plugin class for the duration of a test, write a tiny
text corpus, run a tiny recipe on CPU in seconds, in this process or in several processes.

    from engine import inline_plugin, launch, run_recipe, tiny_recipe, write_recipe

    def test_my_sink(tmp_path):
        with inline_plugin("sink", "mysink", MySink):
            summary = run_recipe(tiny_recipe(tmp_path, sinks=["mysink"]))

    def test_my_installed_sink_with_two_processes(tmp_path):
        path = write_recipe(tiny_recipe(tmp_path, sinks=["mysink"]), tmp_path / "recipe.toml")
        result = launch(path, processes=2)          # accelerate launch ... -m engine, on CPU
        assert result.returncode == 0, result.stderr

inline_plugin only reaches this process: in `launch` the plugin must be installed (an entry point).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

from engine import manager

WORDS = (
    "the a harbour town boat sea wind morning evening baker fisher bread apples lamp garden school "
    "walked ran sat sang opened carried found gave said looked quiet warm cold old small blue red"
).split()


@contextlib.contextmanager
def inline_plugin(kind: str, name: str, cls: type) -> Iterator[manager.PluginInfo]:
    """Make `cls` selectable as plugin `name` of `kind` inside the with-block, as an installed one would be."""
    info = manager.register_inline(kind, name, cls)
    try:
        yield info
    finally:
        manager.unregister_inline(name)


def write_corpus(path: Path, n_documents: int = 120, seed: int = 0) -> Path:
    """A small text file of paragraphs made of simple words (blank lines between documents)."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n_documents):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "." for _ in range(rng.randint(1, 4))]
        paragraphs.append(" ".join(sentences))
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def tiny_recipe(tmp_path: Path, **top: Any) -> dict[str, Any]:
    """A recipe dict for a 2-layer GPT-2 built from a config: trains in seconds on CPU.

    Keyword arguments set top-level keys (sinks=[...], optimizer=...) or replace whole sections.
    """
    Path(tmp_path).mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(Path(tmp_path) / "corpus.txt")
    recipe: dict[str, Any] = {
        "sinks": ["jsonl"],
        "model": {"config": {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}, "tokenizer_vocab_size": 300},
        "data": {"train": str(corpus), "max_length": 32},
        "train": {"output_dir": str(Path(tmp_path) / "run"), "epochs": 1, "max_steps": 8, "batch_size": 4, "learning_rate": 3e-3, "precision": "fp32", "log_every_steps": 1},
        "lora": {"enabled": False},
    }
    for key, value in top.items():
        if key in recipe and isinstance(recipe[key], dict) and isinstance(value, dict):
            recipe[key].update(value)
        else:
            recipe[key] = value
    return recipe


def run_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """Validate a recipe dict and train it in this process; returns metrics.json's contents."""
    from engine import loop
    from engine import recipe as recipe_mod

    return loop.train(recipe_mod.from_dict(recipe, "(test recipe)"))


def write_recipe(recipe: dict[str, Any], path: Path) -> Path:
    """Write a recipe dict (e.g. from tiny_recipe) as a TOML file, for the command line or `launch`."""
    from engine import tomlfile

    path = Path(path)
    path.write_text(tomlfile.dumps(recipe), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    recipe_path: Path | str, *overrides: str, processes: int = 2, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Train a recipe file with `accelerate launch --multi_gpu --num_processes N -m engine`, on CPU (gloo).

    Returns the finished launcher (text stdout and stderr, every process's output mixed). `env` adds
    variables, e.g. {"PYTHONPATH": folder} for a plugin package installed with pip --target. A run
    that outlives `timeout` seconds (a hang) raises subprocess.TimeoutExpired after the processes
    are killed.
    """
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    command = [*accelerate, "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "engine", str(recipe_path), *overrides]
    from engine.distributed import has_accelerator_device

    # Without a GPU the engine trains on CPU by itself (engine.distributed.accelerator_options).
    cpu = {"ACCELERATE_USE_CPU": "true"} if has_accelerator_device() else {}
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **cpu, **(env or {})}
    with subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the launcher and every process it started
            proc.communicate()
            raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
