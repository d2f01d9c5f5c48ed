"""Word-level augmentations of training documents: swap, dropout, insertion.

Each works on the words of a document (runs of non-space characters) and keeps the spacing and line
breaks between them. They draw only from the `rng` the engine passes in (seeded from train.seed), so
the same seed gives the same augmented data. The engine never calls them for validation documents.
"""

import re
from dataclasses import dataclass

from engine import hookimpl
from engine.schema import opt

_PARTS = re.compile(r"\S+|\s+")


def _split(text: str) -> tuple[list[str], list[int]]:
    """The text in parts (words and the spaces between them), and the indices of the words."""
    parts = _PARTS.findall(text)
    return parts, [i for i, p in enumerate(parts) if not p.isspace()]


def _chosen(rng, n_words: int, probability: float, count: int) -> list[int]:
    """Word positions to change: `count` distinct ones when count > 0, else each with `probability`."""
    if count > 0:
        return sorted(rng.sample(range(n_words), min(count, n_words)))
    return [i for i in range(n_words) if rng.random() < probability]


class WordSwap:
    """Swaps random pairs of words inside a training document."""

    @dataclass
    class Options:
        probability: float = opt(0.1, "chance that each word is swapped with another word of the document", min=0.0, max=1.0)
        swaps: int = opt(0, "number of swaps per document; wins over probability when > 0", min=0)

    def __init__(self, options: Options):
        self.options = options

    @hookimpl
    def augment_document(self, text, rng, vocabulary):
        parts, words = _split(text)
        if len(words) < 2:
            return text
        if self.options.swaps > 0:
            pairs = [tuple(rng.sample(range(len(words)), 2)) for _ in range(self.options.swaps)]
        else:
            pairs = [(i, rng.randrange(len(words))) for i in _chosen(rng, len(words), self.options.probability, 0)]
        for a, b in pairs:
            pa, pb = words[a], words[b]
            parts[pa], parts[pb] = parts[pb], parts[pa]
        return "".join(parts)


class WordDropout:
    """Deletes random words from a training document (never all of them)."""

    @dataclass
    class Options:
        probability: float = opt(0.1, "chance that each word is deleted", min=0.0, max=1.0)
        count: int = opt(0, "number of words to delete per document; wins over probability when > 0", min=0)

    def __init__(self, options: Options):
        self.options = options

    @hookimpl
    def augment_document(self, text, rng, vocabulary):
        parts, words = _split(text)
        drop = _chosen(rng, len(words), self.options.probability, self.options.count)
        if len(drop) >= len(words):
            drop = drop[: len(words) - 1]
        for w in reversed(drop):
            i = words[w]
            # the word goes with the space after it (or before it, for the last word)
            if i + 1 < len(parts) and parts[i + 1].isspace():
                del parts[i : i + 2]
            elif i > 0 and parts[i - 1].isspace():
                del parts[i - 1 : i + 1]
            else:
                del parts[i]
        return "".join(parts)


class WordInsertion:
    """Inserts random words of the training corpus into a training document."""

    @dataclass
    class Options:
        probability: float = opt(0.1, "chance that a corpus word is inserted before each word", min=0.0, max=1.0)
        count: int = opt(0, "number of words to insert per document; wins over probability when > 0", min=0)

    def __init__(self, options: Options):
        self.options = options

    @hookimpl
    def augment_document(self, text, rng, vocabulary):
        parts, words = _split(text)
        if not words or not vocabulary:
            return text
        for w in reversed(_chosen(rng, len(words), self.options.probability, self.options.count)):
            parts.insert(words[w], rng.choice(vocabulary) + " ")
        return "".join(parts)
