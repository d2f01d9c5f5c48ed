"""Writes sft_train.jsonl and sft_val.jsonl: chats in which the assistant reverses a list of three words.

A task whose answers can be checked exactly (python -m engine eval RUN --data recipes/data/sft_val.jsonl
--generate 200), made by this script with a seeded generator, so recipes/sft.toml needs no download.
Every validation list is one the training chats never show. Run `python recipes/data/make_sft_data.py` to rebuild the files.
"""

import json
import random
from pathlib import Path

WORDS = "apple boat bread cat door egg fish hat jar kite lamp map owl rope sea tree".split()
HERE = Path(__file__).resolve().parent


def word_list(rng: random.Random) -> tuple[str, ...]:
    return tuple(rng.sample(WORDS, 3))


def turns(words: tuple[str, ...]) -> list[dict[str, str]]:
    return [{"role": "user", "content": "Reverse: " + " ".join(words)},
            {"role": "assistant", "content": " ".join(reversed(words))}]


def chats(rng: random.Random, n: int, avoid: set, seen: set) -> list[dict]:
    out = []
    while len(out) < n:
        words = word_list(rng)
        if words in avoid or words in seen:
            continue
        seen.add(words)
        out.append({"messages": turns(words)})
    return out


def main() -> None:
    rng = random.Random(1234)
    val_lists: set = set()
    val = chats(rng, 200, set(), val_lists)
    train = chats(rng, 2400, val_lists, set())
    for name, rows in (("sft_train.jsonl", train), ("sft_val.jsonl", val)):
        with (HERE / name).open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, separators=(",", ":")) + "\n")
    print(f"wrote {len(train)} training and {len(val)} validation chats to {HERE}")


if __name__ == "__main__":
    main()
