"""Data formats: from rows of data to token ids and labels, through the selected format plugin.

A format plugin (kind `format`, recipe key `data.format`) turns one example, a row of the data as
a dict, into segments of text, each marked as a target or not (hook `format_example`). The engine
reads the rows (.txt documents, .jsonl/.json/.csv/.parquet rows, dataset rows), splits off the
validation rows, tokenizes every segment separately, and labels the tokens of non-target segments
-100 so the loss covers the answers only (data.train_on_prompt: every token). Packing the
examples into blocks is engine/packing.py's job.

    from engine import hookimpl
    from engine.formats import FormatError, Segment

    class Alpaca:
        '''instruction / input / output rows.'''

        @hookimpl
        def format_example(self, example, data, tokenizer):
            if not example.get("output"):
                raise FormatError("output", "is missing or empty")
            prompt = f"### Instruction:\\n{example['instruction']}\\n\\n### Response:\\n"
            return [Segment(prompt, target=False), Segment(example["output"] + tokenizer.eos_token, target=True)]
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from engine.errors import UserError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Segment:
    """A piece of an example's text; target: whether its tokens are trained on (carry the loss)."""

    text: str
    target: bool


class FormatError(ValueError):
    """Bad data in one example: raised by a format plugin, reported by the engine with file and line."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"field '{field_name}' {problem}" if field_name else problem)
        self.field = field_name
        self.problem = problem


@dataclass
class Rows:
    """Examples as read: each a dict, with where it came from ("file.jsonl: line 3")."""

    items: list[dict[str, Any]] = field(default_factory=list)
    where: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, ids: Sequence[int]) -> "Rows":
        return Rows([self.items[i] for i in ids], [self.where[i] for i in ids])

    def extend(self, other: "Rows") -> None:
        self.items.extend(other.items)
        self.where.extend(other.where)


@dataclass
class Example:
    """One example as token ids; labels are the ids where they are targets and -100 elsewhere."""

    ids: list[int]
    labels: list[int]
    target_chars: int = 0  # characters the target tokens stand for (bits per character)
    plain: bool = True  # every segment is a target (plain text): may be split across blocks

    def __len__(self) -> int:
        return len(self.ids)


# ------------------------------------------------------------------ reading rows
_LINE = {"json": "line", "csv": "line", "parquet": "row"}


def _is_empty(row: dict[str, Any]) -> bool:
    return all(v is None or (isinstance(v, str) and not v.strip()) for v in row.values())


def load_rows(spec: str, key: str, data_cfg: Any) -> tuple[Rows, list[str]]:
    """Every example of a data source (empty rows dropped). Returns (rows, files read)."""
    import datasets

    from engine import data as data_mod

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    kind, items = data_mod.resolve_source(spec, key)
    rows = Rows()
    if kind == "dataset":
        for i, row in enumerate(data_mod.open_dataset(items[0], spec, key)):
            if not _is_empty(row):
                rows.items.append(dict(row))
                rows.where.append(f"{spec}: row {i + 1}")
        return rows, []
    for path in items:
        fmt = data_mod.FORMATS.get(Path(path).suffix.lower(), "text")
        if fmt == "text":
            docs, _ = data_mod.load_documents(path, key, data_cfg)
            for i, doc in enumerate(docs):
                rows.items.append({data_cfg.text_field: doc})
                rows.where.append(f"{path}: document {i + 1}")
            continue
        if fmt == "csv":  # cells stay text as written ("5" is not the number 5.0, an empty cell is ""), with their line
            _read_csv(path, key, rows)
            continue
        try:
            ds = datasets.load_dataset(fmt, data_files=[path], split="train")
        except Exception as exc:
            raise UserError(f"{key}: {path}: could not be read as {fmt} ({type(exc).__name__}: {exc})") from None
        first = 1
        unit = "record" if path.lower().endswith(".json") and not _json_lines(path) else _LINE[fmt]
        for i, row in enumerate(ds):
            if not _is_empty(row):
                rows.items.append(dict(row))
                rows.where.append(f"{path}: {unit} {i + first}")
    return rows, items


def _read_csv(path: str, key: str, rows: Rows) -> None:
    import csv

    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                if not _is_empty(row):
                    rows.items.append(dict(row))
                    rows.where.append(f"{path}: line {reader.line_num}")
    except (csv.Error, UnicodeDecodeError) as exc:
        raise UserError(f"{key}: {path}: could not be read as csv ({type(exc).__name__}: {exc})") from None


def _json_lines(path: str) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(1).strip() or f.read(64).lstrip()[:1]
    return head != "["


@dataclass
class SplitRows:
    train: Rows
    val: Rows
    train_files: list[str]



def held_out(n: int, seed: int, val_split: float) -> set[int]:
    """Which of n training documents (or rows) are held out for validation: a data.val_split share, seeded."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = int(round(n * val_split))
    if n_val < 1 or n_val >= n:
        raise UserError(
            f"data.val_split: {val_split} of {n} documents leaves an empty "
            f"{'validation' if n_val < 1 else 'training'} set; add documents, change data.val_split, or set data.val"
        )
    return set(order[:n_val])

def split_rows(recipe: Any) -> SplitRows:
    """Training and validation rows (data.val, else data.val_split of data.train), checked before any model loads.

    The split is the same as engine.data.split_documents makes of plain documents.
    """
    d = recipe.data
    train, files = load_rows(d.train, "data.train", d)
    if not len(train):
        raise UserError(f"data.train: '{d.train}' holds no text (every document is empty); point it at a file with text")
    if d.val:
        val, _ = load_rows(d.val, "data.val", d)
        if not len(val):
            raise UserError(f"data.val: '{d.val}' holds no text; point it at a file with text or leave data.val empty")
        return SplitRows(train, val, files)
    val_ids = held_out(len(train), recipe.train.seed, d.val_split)
    return SplitRows(train.subset([i for i in range(len(train)) if i not in val_ids]), train.subset(sorted(val_ids)), files)


def augment_rows(rows: Rows, data_cfg: Any, plugins: Any, seed: int) -> Rows:
    """data.augment_copies augmented copies of every row's data.text_field (augmentations change plain text)."""
    from engine import data as data_mod

    field_name = data_cfg.text_field
    missing = [w for row, w in zip(rows.items, rows.where) if not isinstance(row.get(field_name), str)]
    if missing:
        raise UserError(
            f"augmentations: they change the text in data.text_field ('{field_name}'), but {missing[0]} has none; "
            f"augment plain text only, or remove the augmentations"
        )
    texts = [row[field_name] for row in rows.items]
    vocabulary = data_mod.corpus_vocabulary(texts)
    augmented = data_mod.augment(texts, data_cfg.augment_copies, lambda text, rng: plugins.augment(text, rng, vocabulary), seed)
    out = Rows(list(rows.items), list(rows.where))
    for n, text in enumerate(augmented[len(texts):]):
        i = n % len(texts)
        out.items.append({**rows.items[i], field_name: text})
        out.where.append(f"{rows.where[i]} (augmented copy)")
    return out


def row_texts(rows: Rows) -> list[str]:
    """Every string in the rows (nested lists and dicts too): what a tokenizer for model.config is trained on."""
    out: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            if value.strip():
                out.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    for row in rows.items:
        walk(row)
    return out


# ------------------------------------------------------------------ formatting and tokenizing
def format_rows(rows: Rows, key: str, format_one: Callable[[dict[str, Any]], Any]) -> list[list[Segment]]:
    """Segments of every row; a bad row stops with its file, line and field."""
    out = []
    for row, where in zip(rows.items, rows.where):
        try:
            segments = format_one(row)
        except FormatError as exc:
            raise UserError(f"{key}: {where}: {exc}") from None
        except (KeyError, ValueError, TypeError) as exc:  # somebody else's plugin tripping over a row
            raise UserError(f"{key}: {where}: the format plugin failed on this example ({type(exc).__name__}: {exc})") from None
        if segments is None or not isinstance(segments, list) or not all(isinstance(s, Segment) for s in segments):
            raise UserError(f"{key}: {where}: the format plugin returned {type(segments).__name__}, not a list of engine.formats.Segment")
        if not segments:
            continue  # the format skips this example (an empty document)
        if not any(s.target and s.text for s in segments):
            raise UserError(f"{key}: {where}: nothing to train on in this example (no target text)")
        out.append(segments)
    return out


def tokenize_segments(
    examples: list[list[Segment]], tokenizer: Any, cache: Path | None = None, log: Callable[[str], None] = print,
    train_on_prompt: bool = False,
) -> list[Example]:
    """Token ids and labels of every example: each segment tokenized on its own, in one batch (cached).

    train_on_prompt: every token is a target; the example still counts as one with a prompt (never split).
    """
    from engine import tokcache

    texts = [s.text for segments in examples for s in segments]
    ids = tokcache.tokenize(texts, tokenizer, cache, log, append_eos=False)
    special = set(map(str, tokenizer.all_special_tokens))
    out, k = [], 0
    for segments in examples:
        example = Example([], [], 0, plain=all(s.target for s in segments))
        for s in segments:
            piece = ids[k]
            k += 1
            example.ids.extend(piece)
            example.labels.extend(piece if s.target or train_on_prompt else [IGNORE_INDEX] * len(piece))
            if s.target or train_on_prompt:
                example.target_chars += 1 if s.text in special else len(s.text)
        out.append(example)
    return out


def examples_of(rows: Rows, key: str, plugins: Any, data_cfg: Any, tokenizer: Any, cache: Path | None = None,
                log: Callable[[str], None] = print) -> list[Example]:
    """Rows -> segments (the format plugin) -> token ids and labels."""
    hook = plugins.hook.format_example

    def format_one(row: dict[str, Any]) -> Any:
        return hook(example=row, data=data_cfg, tokenizer=tokenizer)

    segments = format_rows(rows, key, format_one)
    return tokenize_segments(segments, tokenizer, cache, log, data_cfg.train_on_prompt)


def prepare_tokenizer(plugins: Any, tokenizer: Any, data_cfg: Any) -> list[str]:
    """The format plugin's prepare_tokenizer (e.g. a chat template and its special tokens); tokens added."""
    return list(plugins.hook.prepare_tokenizer(tokenizer=tokenizer, data=data_cfg) or [])


def prompt_text(plugins: Any, messages: list[dict[str, str]], data_cfg: Any, tokenizer: Any) -> str | None:
    """The text to continue for an answer to the conversation, as in training; None when the format has no prompt."""
    return plugins.hook.format_prompt(messages=messages, data=data_cfg, tokenizer=tokenizer)


def run_rows(recipe: Any, plugins: Any) -> SplitRows:
    """The run's rows: split into training and validation, then the training ones augmented
    (data.augment_copies copies by the selected augmentation plugins, seeded by train.seed)."""
    rows = split_rows(recipe)
    if plugins.of_kind("augmentation") and recipe.data.augment_copies:
        rows.train = augment_rows(rows.train, recipe.data, plugins, recipe.train.seed)
    return rows
