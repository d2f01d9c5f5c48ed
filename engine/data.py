"""From the recipe's data keys to token blocks: find files, load documents, split, augment, pack.

Files are read with the datasets library. What one document is:
- .txt: a paragraph (text between blank lines) by default; data.txt_documents = "line" or "file"
  changes that;
- .jsonl/.json/.csv/.parquet and datasets: one row, its data.text_field column.
Documents that are empty after stripping whitespace are dropped.
"""

from __future__ import annotations

import glob
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from engine.errors import UserError

FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE_INDEX = -100


# ------------------------------------------------------------------ finding and reading files
def resolve_source(spec: str, key: str) -> tuple[str, list[str]]:
    """Return ("files", paths) or ("dataset", [name]) for a data.train / data.val value."""
    if any(ch in spec for ch in "*?["):
        paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not paths:
            raise UserError(f"{key}: no files match '{spec}' (relative to the folder you ran from: {os.getcwd()})")
        return "files", paths
    path = Path(spec)
    if path.is_dir():
        paths = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
        if not paths:
            raise UserError(f"{key}: folder '{spec}' holds no {', '.join(sorted(FORMATS))} files")
        return "files", paths
    if path.is_file():
        return "files", [spec]
    looks_like_path = os.sep in spec or path.suffix.lower() in FORMATS or spec.startswith(".")
    if looks_like_path:
        raise UserError(f"{key}: file '{spec}' not found (relative to the folder you ran from: {os.getcwd()})")
    return "dataset", [spec]


def check_utf8(path: str, key: str) -> None:
    """Fail with the file and line of the first byte that is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{key}: {path}: line {line} is not UTF-8 ({exc.reason}); convert the file to UTF-8, "
            f"or set data.encoding_errors = \"replace\" to replace bad bytes"
        ) from None


def open_dataset(name: str, spec: str, key: str) -> Any:
    """The train split of a datasets name (recipe key `key` gave `spec`); one clear error when it cannot be loaded."""
    import datasets

    try:
        return datasets.load_dataset(name, split="train")
    except Exception as exc:
        raise UserError(
            f"{key}: '{spec}' is not a file, glob or folder, and loading it as a dataset failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def load_documents(spec: str, key: str, data_cfg: Any) -> tuple[list[str], list[str]]:
    """Read every document of a data source. Returns (documents, files read)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    kind, items = resolve_source(spec, key)
    if kind == "dataset":
        return _column(open_dataset(items[0], spec, key), data_cfg.text_field, key, spec), []
    docs: list[str] = []
    for path in items:
        fmt = FORMATS.get(Path(path).suffix.lower(), "text")
        if fmt == "text":
            if data_cfg.encoding_errors == "strict":
                check_utf8(path, key)
            if os.path.getsize(path) == 0:
                continue
            try:
                ds = datasets.load_dataset(
                    "text", data_files=[path], split="train", sample_by=_SAMPLE_BY[data_cfg.txt_documents],
                    encoding_errors=data_cfg.encoding_errors,
                )
            except ValueError as exc:
                if "corresponds to no data" in str(exc):
                    continue  # only blank lines: no document (the caller reports an empty source)
                raise UserError(f"{key}: {path}: could not be read as text ({exc})") from None
            docs.extend(ds["text"])
        else:
            try:
                ds = datasets.load_dataset(fmt, data_files=[path], split="train")
            except Exception as exc:
                raise UserError(f"{key}: {path}: could not be read as {fmt} ({type(exc).__name__}: {exc})") from None
            docs.extend(_column(ds, data_cfg.text_field, key, path))
    return [d for d in docs if d and d.strip()], items


_SAMPLE_BY = {"paragraph": "paragraph", "line": "line", "file": "document"}


def _column(ds: Any, field: str, key: str, where: str) -> list[str]:
    if field not in ds.column_names:
        raise UserError(
            f"{key}: {where} has no column '{field}' (columns: {', '.join(ds.column_names)}); "
            f"set data.text_field to the one holding the text"
        )
    return [str(x) for x in ds[field] if x is not None]


# ------------------------------------------------------------------ train/val documents
@dataclass
class Documents:
    train: list[str]
    val: list[str]
    train_files: list[str]


def split_documents(recipe: Any) -> Documents:
    """Training and validation documents, checked before any model loads."""
    d = recipe.data
    train, files = load_documents(d.train, "data.train", d)
    if not train:
        raise UserError(f"data.train: '{d.train}' holds no text (every document is empty); point it at a file with text")
    if d.val:
        val, _ = load_documents(d.val, "data.val", d)
        if not val:
            raise UserError(f"data.val: '{d.val}' holds no text; point it at a file with text or leave data.val empty")
        return Documents(train, val, files)
    from engine.formats import held_out

    val_ids = held_out(len(train), recipe.train.seed, d.val_split)
    return Documents([t for i, t in enumerate(train) if i not in val_ids], [train[i] for i in sorted(val_ids)], files)


def corpus_vocabulary(documents: Sequence[str]) -> list[str]:
    return sorted({w for doc in documents for w in doc.split()})


def augment(documents: list[str], copies: int, augment_one: Any, seed: int) -> list[str]:
    """Originals followed by `copies` augmented copies of each, made with a generator seeded by `seed`."""
    rng = random.Random(seed)
    extra = [augment_one(doc, rng) for _ in range(copies) for doc in documents]
    return documents + extra


# ------------------------------------------------------------------ token blocks
def tokenize(documents: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of each document followed by EOS."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    return [seq + [eos] for seq in ids]


def pack(sequences: list[list[int]], max_length: int, stride: int | None = None) -> list[torch.Tensor]:
    """Concatenate and cut into max_length blocks; the last block may be shorter.

    stride < max_length makes blocks overlap so that every token but the first is a target exactly
    once (used for validation: stride = max_length - 1).
    """
    flat = torch.tensor([t for seq in sequences for t in seq], dtype=torch.long) if sequences else torch.zeros(0, dtype=torch.long)
    stride = stride or max_length
    blocks = []
    for start in range(0, max(1, len(flat) - (max_length - stride)), stride):
        block = flat[start : start + max_length]
        if len(block) >= 2:
            blocks.append(block)
    return blocks


def split_each(sequences: list[list[int]], max_length: int) -> list[torch.Tensor]:
    """One block per document; a document longer than max_length becomes several blocks."""
    blocks = []
    for seq in sequences:
        for start in range(0, len(seq), max_length):
            piece = seq[start : start + max_length]
            if len(piece) >= 2:
                blocks.append(torch.tensor(piece, dtype=torch.long))
    return blocks


def tokenize_cached(documents: Sequence[str], tokenizer: Any, cache: Path | None = None) -> list[list[int]]:
    """tokenize(); with a cache folder (engine/tokcache.py) documents are tokenized once and reused."""
    if cache is None:
        return tokenize(documents, tokenizer)
    from engine import tokcache

    return tokcache.tokenize(documents, tokenizer, cache)


def build_blocks(
    documents: Sequence[str], tokenizer: Any, max_length: int, packing: bool, for_eval: bool = False, cache: Path | None = None
) -> list[torch.Tensor]:
    return blocks_of(tokenize_cached(documents, tokenizer, cache), max_length, packing, for_eval)


def blocks_of(sequences: list[list[int]], max_length: int, packing: bool, for_eval: bool = False) -> list[torch.Tensor]:
    if packing:
        return pack(sequences, max_length, stride=max_length - 1 if for_eval else None)
    return split_each(sequences, max_length)


def count_long_documents(sequences: Sequence[Sequence[int]], max_length: int) -> int:
    """Documents (token ids with EOS) that do not fit in one block and are split across several."""
    return sum(1 for seq in sequences if len(seq) > max_length)


def collate(blocks: Sequence[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad blocks into input_ids, attention_mask and labels (-100 on padding).

    Blocks of ids, labels and positions (engine/packing.py) collate into input_ids, labels and position_ids.
    """
    if blocks[0].dim() == 2:
        from engine import packing

        return packing.collate(blocks, pad_id)
    width = max(len(b) for b in blocks)
    input_ids = torch.full((len(blocks), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(blocks), width), dtype=torch.long)
    for i, b in enumerate(blocks):
        input_ids[i, : len(b)] = b
        attention[i, : len(b)] = 1
    labels = input_ids.masked_fill(attention == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# ------------------------------------------------------------------ order and sharding
def steps_per_epoch(n_blocks: int, global_batch: int) -> int:
    return n_blocks // global_batch


def step_batches(
    n_blocks: int, seed: int, epoch: int, step_in_epoch: int, batch_size: int, accumulation: int, rank: int, world: int
) -> list[list[int]]:
    """Block ids of this process's micro-batches for one optimizer step.

    The order of an epoch is a permutation seeded by (seed, epoch). Optimizer step s takes the
    next world * batch_size * accumulation ids; micro-batch m of process r is the slice
    [(m * world + r) * batch_size, ...). So 1 process x batch 8 and 2 processes x batch 4 see the
    same samples in every optimizer step, and no two processes share one.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_blocks, generator=g)
    global_batch = world * batch_size * accumulation
    chunk = order[step_in_epoch * global_batch : (step_in_epoch + 1) * global_batch]
    return [
        chunk[(m * world + rank) * batch_size : (m * world + rank + 1) * batch_size].tolist() for m in range(accumulation)
    ]


def characters(documents: Sequence[str]) -> int:
    """Characters the validation targets stand for: the text plus one separator per document (EOS)."""
    return sum(len(d) for d in documents) + len(documents)


def bits_per_character(total_nats: float, n_chars: int) -> float:
    return total_nats / max(1, n_chars) / math.log(2)


# ------------------------------------------------------------------ the original design's TextDataset
class TextDataset(torch.utils.data.Dataset):
    """Token blocks of max_length from one text file, as in the original design.

    Each item is a dict with input_ids, attention_mask and labels (1-D tensors). Paragraphs are
    documents; they are packed with EOS between them.
    """

    def __init__(self, path: str, tokenizer: Any, max_length: int = 512):
        from engine.recipe import DataSection

        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 1 < limit < 1_000_000 and max_length > limit:  # tokenizers without a limit say 1e30
            raise UserError(
                f"TextDataset: max_length {max_length} is longer than the model's context ({limit}, the tokenizer's "
                f"model_max_length); give max_length {limit} or less"
            )
        cfg = DataSection(train=str(path))
        docs, _ = load_documents(str(path), "path", cfg)
        if not docs:
            raise UserError(f"{path}: holds no text")
        self.tokenizer = tokenizer
        self.blocks = build_blocks(docs, tokenizer, max_length, packing=True)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        b = self.blocks[i]
        return {"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()}
