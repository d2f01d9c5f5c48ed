"""tunesmith: fine-tune causal language models from TOML recipes, with pluggy plugins and Accelerate.

`from engine import hookimpl` is all a plugin needs. The Python API of the original design
(`LanguageModelTrainer`, `TextDataset`, `CONFIG`) is imported lazily so that `python -m engine check`
stays fast.
"""

from engine.hookspecs import hookimpl

__all__ = ["hookimpl", "LanguageModelTrainer", "TextDataset", "CONFIG"]


def __getattr__(name: str):
    if name in ("LanguageModelTrainer", "CONFIG"):
        from engine import api

        return getattr(api, name)
    if name == "TextDataset":
        from engine.data import TextDataset

        return TextDataset
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
