"""Tokenize once: a disk cache of tokenized documents and of tokenizers trained on the data.

Entries are keyed by a SHA-256 of the documents' text (after reading, splitting into documents and
augmenting: exactly what gets tokenized) and of the tokenizer (its full serialized form, special
tokens included), so a changed file, a changed data.txt_documents or a different tokenizer never
reuses a stale entry. What is stored is the token ids of every document (EOS appended) as one flat
int32 array plus document lengths; packing into data.max_length blocks happens after loading, so
changing data.max_length or data.packing reuses the entry.

Where: data.cache_dir, else $TUNESMITH_CACHE, else ~/.cache/tunesmith (tokens/ and tokenizers/
inside). Delete the folder to clear it; data.cache = false turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

BIG_INPUT_CHARS = 20_000_000  # show a progress bar from this many characters on
BATCH_DOCS = 1000
PIECE_CHARS = 1 << 16  # documents longer than this are encoded in pieces, on all cores (byte-level BPE)
stats = {"tokenized": 0, "reused": 0, "tokenizers_trained": 0, "tokenizers_reused": 0}


def cache_root(data_cfg: Any) -> Path | None:
    if not data_cfg.cache:
        return None
    folder = data_cfg.cache_dir or os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith"
    return Path(folder)


def documents_hash(documents: Sequence[str]) -> str:
    h = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.eos_token_id, sorted(map(str, tokenizer.all_special_tokens)))).encode())
    return h.hexdigest()


# A line break between two non-space characters ("...d\nT..."): no pre-token of a byte-level BPE
# (GPT-2's or Llama-3's split pattern) spans it, and the text on each side splits the same alone.
_CLEAN_BREAK = re.compile(r"(?<=\S\n)(?=\S)")


def splits_exactly(tokenizer: Any) -> bool:
    """Whether cutting documents at clean line breaks leaves this tokenizer's ids unchanged.

    True for byte-level BPE without a normalizer or an added prefix space (GPT-2, Llama 3, Qwen and
    the tokenizers this engine trains): merges never cross a pre-token boundary, and a clean line
    break is one. False otherwise (e.g. SentencePiece-style tokenizers that mark each start).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None or backend.pre_tokenizer is None:
        return False
    state = json.loads(backend.pre_tokenizer.__getstate__())
    parts = state.get("pretokenizers", [state]) if state.get("type") == "Sequence" else [state]
    return (any(p.get("type") == "ByteLevel" for p in parts)
            and all(p.get("type") in ("ByteLevel", "Split") and not p.get("add_prefix_space", False) for p in parts))


def pieces(document: str, size: int = PIECE_CHARS) -> list[str]:
    """The document cut at the first clean line break after every `size` characters."""
    bounds, start = [0], 0
    while len(document) - start > size:
        found = _CLEAN_BREAK.search(document, start + size)
        if found is None:
            break
        start = found.start()
        bounds.append(start)
    bounds.append(len(document))
    return [document[a:b] for a, b in zip(bounds, bounds[1:])]


def _encode(documents: Sequence[str], tokenizer: Any, log: Callable[[str], None], append_eos: bool = True) -> list[list[int]]:
    """Token ids of each document followed by EOS.

    Fast tokenizers encode a batch of texts on all cores; a long document (one file read whole) is
    encoded as pieces cut at clean line breaks when that gives the same ids (splits_exactly).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    eos = tokenizer.eos_token_id
    docs = list(documents)
    stats["tokenized"] += 1
    owner: list[int] = []
    texts: list[str] = []
    split = splits_exactly(tokenizer) and any(len(d) > PIECE_CHARS for d in docs)
    for i, doc in enumerate(docs):
        parts = pieces(doc) if split else [doc]
        texts.extend(parts)
        owner.extend([i] * len(parts))
    batches = range(0, len(texts), BATCH_DOCS)
    if sum(len(d) for d in docs) >= BIG_INPUT_CHARS:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="tokenizing", unit="batch")
    out: list[list[int]] = [[] for _ in docs]
    for start in batches:
        for i, ids in zip(owner[start : start + BATCH_DOCS], tokenizer(texts[start : start + BATCH_DOCS], add_special_tokens=False)["input_ids"]):
            out[i].extend(ids)
    if append_eos:
        for ids in out:
            ids.append(eos)
    return out


def tokenize(documents: Sequence[str], tokenizer: Any, root: Path | None, log: Callable[[str], None] = print,
             append_eos: bool = True) -> list[list[int]]:
    """Token ids of each document followed by EOS (append_eos=False: without), from the cache when it holds them."""
    if root is None:
        return _encode(documents, tokenizer, log, append_eos)
    key = hashlib.sha256((documents_hash(documents) + tokenizer_hash(tokenizer) + ("" if append_eos else "|no-eos")).encode()).hexdigest()[:32]
    path = root / "tokens" / f"{key}.npz"
    if path.exists():
        try:
            with np.load(path) as entry:
                flat, lengths = entry["ids"], entry["lengths"]
            stats["reused"] += 1
            log(f"tokens: reused {len(flat):,} cached tokens of {len(lengths):,} documents ({path})")
            return [a.tolist() for a in np.split(flat.astype(np.int64), np.cumsum(lengths)[:-1])]
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry: tokenize again and replace it
    sequences = _encode(documents, tokenizer, log, append_eos)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, ids=np.fromiter((t for s in sequences for t in s), dtype=np.int32), lengths=np.array([len(s) for s in sequences], dtype=np.int64))
    os.replace(tmp, path)
    log(f"tokens: tokenized {len(sequences):,} documents, cached in {path}")
    return sequences


def trained_tokenizer(documents: Sequence[str], vocab_size: int, root: Path | None, train: Callable[[Sequence[str], int], Any]) -> Any:
    """A tokenizer trained on the documents (by `train`), reused from the cache when the same text and size were seen."""
    if root is None:
        return train(documents, vocab_size)
    from transformers import PreTrainedTokenizerFast

    import tokenizers

    key = hashlib.sha256(f"{documents_hash(documents)}|{vocab_size}|{tokenizers.__version__}".encode()).hexdigest()[:32]
    folder = root / "tokenizers" / key
    if (folder / "tokenizer.json").exists():
        stats["tokenizers_reused"] += 1
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    tokenizer = train(documents, vocab_size)
    stats["tokenizers_trained"] += 1
    tmp = folder.with_name(f"{key}.{os.getpid()}.tmp")
    tokenizer.save_pretrained(str(tmp))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process stored it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
