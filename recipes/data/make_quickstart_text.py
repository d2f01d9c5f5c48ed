"""Writes quickstart.txt: plain English paragraphs about a small harbour town, made by this script.

The text is the project's own (composed from the word lists below with a seeded generator), so the
quickstart needs no download. Run `python recipes/data/make_quickstart_text.py` to rebuild it.
"""

import random
from pathlib import Path

PEOPLE = [
    ("Anna", "she", "her"), ("Tom", "he", "his"), ("Mira", "she", "her"), ("Leo", "he", "his"),
    ("Clara", "she", "her"), ("Sam", "he", "his"), ("Nora", "she", "her"), ("Ben", "he", "his"),
    ("Ella", "she", "her"), ("Max", "he", "his"), ("Rosa", "she", "her"), ("Jack", "he", "his"),
]
JOBS = ["baker", "fisher", "teacher", "doctor", "painter", "carpenter", "sailor", "gardener", "librarian", "farmer"]
PLACES = ["the harbour", "the market", "the old bridge", "the library", "the bakery", "the school", "the hill", "the beach", "the garden", "the station"]
TIMES = ["In the morning", "At noon", "In the evening", "Before sunrise", "After lunch", "Late at night", "On Sunday", "Every Friday"]
WEATHER = ["the sky was clear", "a cold wind came from the sea", "it rained for hours", "the sun was warm", "fog covered the town", "snow fell softly", "the air smelled of salt"]
THINGS = ["a basket of bread", "a blue boat", "an old map", "a letter", "a box of apples", "a red kite", "a warm coat", "a small lamp", "a book of songs", "a jar of honey"]
FEELINGS = ["happy", "tired", "curious", "calm", "worried", "proud", "hungry", "surprised"]
ACTIONS = ["walked to", "ran to", "waited at", "looked for a friend at", "sat quietly at", "cleaned the windows at", "sang a song at"]


def sentence(rng: random.Random) -> str:
    name, he, his = rng.choice(PEOPLE)
    other = rng.choice([p for p in PEOPLE if p[0] != name])[0]
    job, place, thing = rng.choice(JOBS), rng.choice(PLACES), rng.choice(THINGS)
    forms = [
        f"{rng.choice(TIMES)}, {name} {rng.choice(ACTIONS)} {place}.",
        f"{name} was a {job} who lived near {place}.",
        f"{he.capitalize()} carried {thing} to {place} and gave it to {other}.",
        f"{other} smiled and said that {he} looked {rng.choice(FEELINGS)}.",
        f"That day {rng.choice(WEATHER)}, so {name} stayed at {place}.",
        f"{name} and {other} talked about {thing} for a long time.",
        f"When {rng.choice(WEATHER)}, {name} felt {rng.choice(FEELINGS)} and went home.",
        f"{his.capitalize()} friend {other} worked as a {job} at {place}.",
        f"{name} found {thing} at {place} and wondered who had left it there.",
        f"{rng.choice(TIMES)}, {rng.choice(WEATHER)} and {name} opened {his} door.",
    ]
    return rng.choice(forms)


def paragraph(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(3, 6)))


def main(n_paragraphs: int = 1200, seed: int = 7) -> None:
    rng = random.Random(seed)
    text = "\n\n".join(paragraph(rng) for _ in range(n_paragraphs)) + "\n"
    Path(__file__).with_name("quickstart.txt").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
