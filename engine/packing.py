"""Examples (token ids and labels) into training blocks of at most data.max_length tokens.

data.packing:
- true or "isolated": examples share a block but each attends only to itself, and its positions
  restart at 0. A block then carries per-example position ids and no attention mask; transformers
  (masking_utils.find_packed_sequence_indices) turns position ids that restart into a
  block-diagonal causal mask under sdpa and eager, and into the variable-length path under flash
  attention. The first token of each example is never a target (nothing before it to predict from).
- "concat": examples follow each other in a block and see the ones before them (the original
  behaviour; plain text is cut into blocks regardless of document ends).
- false: one padded block per example.

Plain text (every token a target) longer than the room left may be split across blocks (each piece
repeats the last token of the one before, so every token but a document's first is predicted exactly
once); an example with a prompt is never split (data.too_long: truncate its prompt from the left,
or drop it).

A block is a 1-D tensor of ids (plain text, labels = ids) or a 3 x L tensor: ids, labels, positions.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any, Callable, Sequence

import torch

from engine.formats import IGNORE_INDEX, Example


class _NoPaddingWarning(logging.Filter):
    """Packed batches carry position ids instead of an attention mask on purpose (see collate)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "passing in an `attention_mask`" not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(_NoPaddingWarning())


def packing_mode(packing: bool | str) -> str:
    """'isolated', 'concat' or 'none' for a data.packing value."""
    if packing is True:
        return "isolated"
    if packing is False:
        return "none"
    return str(packing)


def _block(ids: list[int], labels: list[int], positions: list[int]) -> torch.Tensor:
    return torch.tensor([ids, labels, positions], dtype=torch.long)


def _pieces(example: Example, first_room: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """A plain example cut into pieces: the first fills first_room tokens, the others max_length;
    each piece after the first starts with the last token of the one before (not a target there)."""
    out, start, room = [], 0, first_room
    while True:
        end = min(len(example), start + room)
        ids, labels = example.ids[start:end], list(example.labels[start:end])
        if start > 0:
            labels[0] = IGNORE_INDEX
        out.append((ids, labels))
        if end >= len(example):
            return out
        start, room = end - 1, max_length


def fit_long(examples: Sequence[Example], max_length: int, too_long: str) -> tuple[list[Example], dict[str, int]]:
    """Examples that will not be split, made to fit: truncated from the left of the prompt, or dropped.

    too_long "truncate" keeps the last max_length tokens when every target token is among them (the
    prompt loses its start), else drops the example; "drop" drops every example that is too long.
    Returns (examples, counts of "truncated" and "dropped").
    """
    out, counts = [], {"truncated": 0, "dropped": 0}
    for ex in examples:
        if len(ex) <= max_length:
            out.append(ex)
            continue
        cut = len(ex) - max_length
        first_target = next((i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX), len(ex))
        if too_long == "truncate" and first_target >= cut + 1:  # position 0 of the kept part is never a target
            out.append(Example(ex.ids[cut:], ex.labels[cut:], ex.target_chars, ex.plain))
            counts["truncated"] += 1
        else:
            counts["dropped"] += 1
    return out, counts


def _splits(example: Example, too_long: str) -> bool:
    return too_long == "split" or (too_long == "auto" and example.plain)


def build_blocks(
    examples: Sequence[Example], max_length: int, packing: bool | str, too_long: str = "auto", for_eval: bool = False,
    key: str = "data.train", log: Callable[[str], None] = print,
) -> list[torch.Tensor]:
    """Training (or validation) blocks of the examples; reports examples longer than max_length once."""
    from engine import data as data_mod

    mode = packing_mode(packing)
    long = [ex for ex in examples if len(ex) > max_length]
    split_long = [ex for ex in long if _splits(ex, too_long)]
    if split_long:
        what = "documents" if all(ex.plain for ex in examples) else "examples"
        log(f"{key}: {len(split_long)} of {len(examples)} {what} are longer than data.max_length ({max_length} tokens) and were split across blocks")
    kept, counts = fit_long([ex for ex in examples if not _splits(ex, too_long)], max_length, too_long)
    if counts["truncated"] or counts["dropped"]:
        log(f"warning: {key}: {counts['truncated'] + counts['dropped']} of {len(examples)} examples are longer than data.max_length "
            f"({max_length} tokens): {counts['truncated']} had their prompt truncated from the left, {counts['dropped']} were dropped "
            f"(data.too_long = \"{too_long}\"; raise data.max_length to keep them whole)")
    splittable = [ex for ex in examples if _splits(ex, too_long)]
    if all(ex.plain for ex in examples) and mode != "isolated" and not (counts["truncated"] or counts["dropped"]):
        # plain text, as before formats existed: 1-D blocks whose labels are their ids
        sequences = [ex.ids for ex in examples]
        return data_mod.blocks_of(sequences, max_length, mode == "concat", for_eval)
    if mode == "none":
        blocks = []
        for ex in splittable:
            for ids, labels in _pieces(ex, max_length, max_length):
                if len(ids) >= 2:
                    blocks.append(_block(ids, labels, list(range(len(ids)))))
        blocks += [_block(ex.ids, ex.labels, list(range(len(ex)))) for ex in kept]
        return blocks
    return _pack(splittable, kept, max_length, isolated=mode == "isolated")


def _pack(splittable: Sequence[Example], whole: Sequence[Example], max_length: int, isolated: bool) -> list[torch.Tensor]:
    """Plain examples stream into blocks, cut where a block is full; the others go whole into the
    fullest block with room for them (best fit), or a new one."""
    contents: list[list[tuple[list[int], list[int]]]] = []
    used: list[int] = []
    current = -1
    for ex in splittable:
        if current < 0 or max_length - used[current] < 2:
            contents.append([]), used.append(0)
            current = len(contents) - 1
        for ids, labels in _pieces(ex, max_length - used[current], max_length):
            if used[current] + len(ids) > max_length:
                contents.append([]), used.append(0)
                current = len(contents) - 1
            contents[current].append((ids, labels))
            used[current] += len(ids)
    # best fit: rooms kept sorted as (room, block index)
    rooms = sorted((max_length - u, i) for i, u in enumerate(used))
    for ex in whole:
        at = bisect.bisect_left(rooms, (len(ex), -1))
        if at < len(rooms):
            room, i = rooms.pop(at)
        else:
            contents.append([]), used.append(0)
            room, i = max_length, len(contents) - 1
        contents[i].append((ex.ids, ex.labels))
        used[i] += len(ex)
        bisect.insort(rooms, (room - len(ex), i))
    blocks = []
    for parts in contents:
        ids, labels, positions = [], [], []
        for piece_ids, piece_labels in parts:
            if isolated:
                piece_labels = [IGNORE_INDEX, *piece_labels[1:]]  # nothing before it in its own sequence
                positions.extend(range(len(piece_ids)))
            ids.extend(piece_ids)
            labels.extend(piece_labels)
        if not isolated:
            positions = list(range(len(ids)))
        if any(label != IGNORE_INDEX for label in labels[1:]):
            blocks.append(_block(ids, labels, positions))
    return blocks


def collate(blocks: Sequence[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad 3 x L blocks into input_ids, labels (-100 on padding) and position_ids.

    No attention mask: padding comes after every real token, so causal attention never reaches it,
    and the position ids (restarting at 0 for each example and for the padding) tell the model
    which tokens belong together.
    """
    width = max(b.shape[1] for b in blocks)
    input_ids = torch.full((len(blocks), width), pad_id, dtype=torch.long)
    labels = torch.full((len(blocks), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(width, dtype=torch.long).repeat(len(blocks), 1)
    for i, b in enumerate(blocks):
        n = b.shape[1]
        input_ids[i, :n], labels[i, :n], positions[i, :n] = b[0], b[1], b[2]
        positions[i, n:] = torch.arange(width - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}



def run_blocks(recipe: Any, plugins: Any, rows: Any, tokenizer: Any, cache: Any, log: Callable[[str], None]) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """A run's training and validation blocks, and the characters the validation targets stand for."""
    from engine import formats

    d = recipe.data
    train = formats.examples_of(rows.train, "data.train", plugins, d, tokenizer, cache, log)
    val = formats.examples_of(rows.val, "data.val" if d.val else "data.train (validation part)", plugins, d, tokenizer, cache, log)
    if not train:
        from engine.errors import UserError

        raise UserError(f"data.train: '{d.train}' holds no text (every document is empty); point it at a file with text")
    train_blocks = build_blocks(train, d.max_length, d.packing, d.too_long, key="data.train", log=log)
    val_blocks = build_blocks(val, d.max_length, d.packing, d.too_long, for_eval=True, key="data.val", log=lambda line: None)
    return train_blocks, val_blocks, sum(ex.target_chars for ex in val)
