"""tunesmith: fine-tune causal language models from TOML recipes, with pluggy plugins and Accelerate.

This module is the public API, and the only supported one: everything a plugin, a plugin's tests or
a Python script may use is importable from `engine` and listed in `__all__` below. Every other module
(`engine.loop`, `engine.manager`, `engine.schema`, ...) is internal and may change without notice.

    from engine import hookimpl, opt, TrainContext, UserError      # writing a plugin
    from engine import inline_plugin, run_recipe, tiny_recipe     # testing one
    from engine import LanguageModelTrainer, CONFIG               # the original design's Python API

Names whose modules import torch or transformers are loaded on first use, so `import engine` (and
`python -m engine check`) stays fast.
"""

from engine.context import EarlyStopDecision, TrainContext, TrainState
from engine.errors import Interrupted, RunFailed, UserError
from engine.hookspecs import hookimpl
from engine.schema import opt

__all__ = [
    # writing a plugin
    "hookimpl",
    "opt",
    "UserError",
    "RunFailed",
    "Interrupted",
    "TrainContext",
    "TrainState",
    "EarlyStopDecision",
    "inside_run_folder",
    # testing a plugin (engine.testing)
    "inline_plugin",
    "run_recipe",
    "tiny_recipe",
    "write_recipe",
    "write_corpus",
    "launch",
    # the original design's Python API
    "LanguageModelTrainer",
    "TextDataset",
    "CONFIG",
]

_LAZY = {
    "inside_run_folder": ("engine.runfolder", "inside"),
    "inline_plugin": ("engine.testing", "inline_plugin"),
    "run_recipe": ("engine.testing", "run_recipe"),
    "tiny_recipe": ("engine.testing", "tiny_recipe"),
    "write_recipe": ("engine.testing", "write_recipe"),
    "write_corpus": ("engine.testing", "write_corpus"),
    "launch": ("engine.testing", "launch"),
    "LanguageModelTrainer": ("engine.api", "LanguageModelTrainer"),
    "CONFIG": ("engine.api", "CONFIG"),
    "TextDataset": ("engine.data", "TextDataset"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
