"""Example tunesmith plugins: an augmentation, a metrics sink and a decoding strategy."""

import csv
from dataclasses import dataclass

from engine import hookimpl, opt


class MaskWords:
    """Replaces a share of the words of a training document with a mask word."""

    @dataclass
    class Options:
        rate: float = opt(0.15, "share of words replaced", min=0.0, max=1.0)
        mask: str = opt("MASK", "the word put in their place")

    def __init__(self, options):
        self.options = options

    @hookimpl
    def augment_document(self, text, rng, vocabulary):
        o = self.options
        return " ".join(o.mask if rng.random() < o.rate else word for word in text.split(" "))


class CsvMetrics:
    """Writes training logs and evaluations to a CSV file in the run folder; a resumed run appends to it."""

    @dataclass
    class Options:
        filename: str = opt("metrics.csv", "file name inside the run folder", run_file=True)
        columns: list[str] = opt(["loss", "lr", "val_loss"], "metrics to write, one column each")

    def __init__(self, options):
        self.options = options
        self.path = None

    @hookimpl
    def on_train_start(self, context):
        if context.is_main_process:  # sinks are called on the main process only; only it writes
            self.path = context.run_file(self.options.filename)  # inside the run folder, or a UserError
            if context.resumed and self.path.exists():
                return  # keep the rows so far (the engine cut the file back to the checkpoint's step)
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(["phase", "step", *self.options.columns])

    @hookimpl
    def log_metrics(self, metrics, step, phase):
        if self.path is not None and phase in ("train", "eval"):
            with self.path.open("a", newline="") as f:
                csv.writer(f).writerow([phase, step, *(metrics.get(c, "") for c in self.options.columns)])


class GreedyBan:
    """Greedy (or beam) decoding that never generates the banned words."""

    @dataclass
    class Options:
        num_beams: int = opt(1, "beams to search (1: greedy)", min=1)
        max_new_tokens: int = opt(40, "tokens to generate", min=1)
        banned_words: list[str] = opt([], "words never generated (with and without a leading space)")

    def __init__(self, options):
        self.options = options

    @hookimpl
    def generation_kwargs(self, tokenizer):
        o = self.options
        return {"do_sample": False, "num_beams": o.num_beams, "max_new_tokens": o.max_new_tokens}

    @hookimpl
    def logits_processors(self, tokenizer):
        from transformers import NoBadWordsLogitsProcessor

        words = [w for word in self.options.banned_words for w in (word, " " + word)]
        if not words:
            return []
        ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
        return [NoBadWordsLogitsProcessor(ids, eos_token_id=tokenizer.eos_token_id)]
