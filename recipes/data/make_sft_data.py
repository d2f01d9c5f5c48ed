"""Writes sft_train.jsonl and sft_val.jsonl: chats in which the assistant reverses a list of words.

A task whose answers can be checked exactly (python -m engine eval RUN --data recipes/data/sft_val.jsonl
--generate 200), made by this script with a seeded generator, so recipes/sft.toml needs no download.
Every validation list is one the training chats never show. Some chats have a system turn, some two
rounds of user and assistant turns. Run `python recipes/data/make_sft_data.py` to rebuild the files.
"""

import json
import random
from pathlib import Path

WORDS = "apple boat bread cat door egg fish hat jar kite lamp map owl rope sea tree".split()
SYSTEM = "You reverse lists of words."
HERE = Path(__file__).resolve().parent


def word_list(rng: random.Random) -> tuple[str, ...]:
    return tuple(rng.sample(WORDS, rng.randint(2, 4)))


def turns(words: tuple[str, ...]) -> list[dict[str, str]]:
    return [{"role": "user", "content": "Reverse: " + " ".join(words)},
            {"role": "assistant", "content": " ".join(reversed(words))}]


def chats(rng: random.Random, n: int, avoid: set, seen: set) -> list[dict]:
    out = []
    while len(out) < n:
        words = word_list(rng)
        if words in avoid:
            continue
        seen.add(words)
        messages = turns(words)
        if rng.random() < 0.3:
            messages = [{"role": "system", "content": SYSTEM}, *messages]
        if rng.random() < 0.2:
            more = word_list(rng)
            if more in avoid:
                continue
            seen.add(more)
            messages += turns(more)
        out.append({"messages": messages})
    return out


def main() -> None:
    rng = random.Random(1234)
    val_lists: set = set()
    val = chats(rng, 200, set(), val_lists)
    train = chats(rng, 3000, val_lists, set())
    for name, rows in (("sft_train.jsonl", train), ("sft_val.jsonl", val)):
        with (HERE / name).open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, separators=(",", ":")) + "\n")
    print(f"wrote {len(train)} training and {len(val)} validation chats to {HERE}")


if __name__ == "__main__":
    main()
