"""Helpers for testing plugins: register a plugin class for the duration of a test, write a tiny
text corpus and run a tiny recipe on CPU in seconds.

    from engine.testing import inline_plugin, tiny_recipe, run_recipe

    def test_my_sink(tmp_path):
        with inline_plugin("sink", "mysink", MySink):
            summary = run_recipe(tiny_recipe(tmp_path, sinks=["mysink"]))
"""

from __future__ import annotations

import contextlib
import random
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
