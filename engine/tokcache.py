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
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

BIG_INPUT_CHARS = 20_000_000  # show a progress bar from this many characters on
BATCH_DOCS = 1000
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


def _encode(documents: Sequence[str], tokenizer: Any, log: Callable[[str], None]) -> list[list[int]]:
    """Token ids of each document followed by EOS; fast tokenizers encode a batch on all cores."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    eos = tokenizer.eos_token_id
    docs = list(documents)
    stats["tokenized"] += 1
    if sum(len(d) for d in docs) < BIG_INPUT_CHARS:
        return [seq + [eos] for seq in tokenizer(docs, add_special_tokens=False)["input_ids"]]
    from tqdm.auto import tqdm

    out: list[list[int]] = []
    for start in tqdm(range(0, len(docs), BATCH_DOCS), desc="tokenizing", unit="batch"):
        out.extend(seq + [eos] for seq in tokenizer(docs[start : start + BATCH_DOCS], add_special_tokens=False)["input_ids"])
    return out


def tokenize(documents: Sequence[str], tokenizer: Any, root: Path | None, log: Callable[[str], None] = print) -> list[list[int]]:
    """Token ids of each document followed by EOS, from the cache when it holds them."""
    if root is None:
        return _encode(documents, tokenizer, log)
    key = hashlib.sha256((documents_hash(documents) + tokenizer_hash(tokenizer)).encode()).hexdigest()[:32]
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
    sequences = _encode(documents, tokenizer, log)
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
