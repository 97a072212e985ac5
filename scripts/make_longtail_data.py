"""Generate the long-tailed benchmark dataset: small deterministic tasks whose prompts share only the system prompt.

Each row is a ``messages`` conversation (system, user, assistant). The user turn opens with the task's data (random
words, names or numbers) and ends with the question, so no two prompts share a prefix beyond the system prompt and
the chat template's header: a benchmark row for the case the quickstart set (one instruction for every row) flatters.
Every answer follows from the prompt by a fixed rule (sort words, reverse a list, count a word, find the largest
number, look up a field in records, count the items), so held-out loss measures what the model learned.

Lengths are long-tailed: the number of items per row is drawn from a Pareto distribution, so most rows are under
~150 tokens and a tail reaches ~1000 tokens with the SmolLM2 chat template (every row fits ``max_length: 1024``).

Output is deterministic for a given ``--seed``. The eval split is drawn from its own random stream, so changing
``--train-size`` never changes it, and no user turn appears in both splits.

Usage::

    python scripts/make_longtail_data.py --seed 0 --train-size 384 --eval-size 64 --out data/longtail
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from ftune.run_dir import write_jsonl_atomic

SYSTEM = "You are a careful assistant. Follow the request exactly and answer with the result only."

WORDS = """
amber anchor apple arrow autumn badge bamboo banner barrel basket beacon bell berry blanket bolt bottle bramble breeze
brick bridge bronze bubble bucket button cabin cactus camel candle canyon carpet castle cedar chalk cherry chimney cider
clover cobalt comet copper coral cotton crane crater crystal dagger daisy delta desert dolphin dragon drum eagle echo
ember engine falcon feather fern fiddle flint forest fossil fountain garnet glacier goblet granite gravel harbor hazel
helmet heron hollow honey horizon iris island ivory jacket jasper jelly jungle kettle kiwi lantern lemon lily linen
lizard maple marble meadow melon meteor mirror moss needle nickel oasis ocean olive onyx orchid otter paddle panther
parrot pebble pepper pillow pine planet plum pocket quartz quill rabbit radish raven reef ribbon river rocket saddle
salmon sapphire scarf shadow shell silver spruce squid stone summit swan thistle thunder timber tulip tunnel umbrella
valley velvet violet walnut willow window winter wizard yarrow zephyr
""".split()
FIRST = ["Ada", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kemal", "Lena", "Mateo",
         "Nadia", "Oskar", "Paula", "Quentin", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Yusuf", "Zoe"]
LAST = ["Abbott", "Brandt", "Castro", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad", "Ito", "Jansen", "Kowalski",
        "Laurent", "Moreau", "Novak", "Okafor", "Petrov", "Quinn", "Rossi", "Sato", "Tanaka", "Ueda", "Varga", "Weber"]
CITIES = ["Lyon", "Porto", "Kyoto", "Accra", "Quito", "Bergen", "Tartu", "Cusco", "Perth", "Lagos", "Split", "Graz",
          "Leeds", "Hanoi", "Sucre", "Turku"]
TEAMS = ["red", "blue", "green", "gold", "gray", "teal", "black", "white"]


def items(rng: random.Random, scale: float, cap: int) -> int:
    """Items in one row: Pareto-tailed (shape 1.1), so most rows are short and a few reach ``cap``."""
    return min(cap, max(3, int(scale * rng.paretovariate(1.1))))


def sort_words(rng: random.Random) -> tuple[str, str]:
    words = rng.choices(WORDS, k=items(rng, 5, 300))
    question = rng.choice(["Sort the words above alphabetically, separated by spaces.",
                           "Put these words in alphabetical order; keep repeats and separate them with spaces."])
    return f"{' '.join(words)}\n\n{question}", " ".join(sorted(words))


def reverse_list(rng: random.Random) -> tuple[str, str]:
    words = rng.choices(WORDS, k=items(rng, 5, 180))
    question = rng.choice(["List the items above in reverse order, comma-separated.",
                           "Write the same list backwards, last item first, separated by commas."])
    return f"{', '.join(words)}\n\n{question}", ", ".join(reversed(words))


def count_word(rng: random.Random) -> tuple[str, str]:
    words = rng.choices(WORDS[:40], k=items(rng, 10, 800))
    target = rng.choice(words)
    question = rng.choice([f'How many times does the word "{target}" appear above? Answer with a number.',
                           f'Count the occurrences of "{target}" in the text above. Give the number only.'])
    return f"{' '.join(words)}\n\n{question}", str(words.count(target))


def largest_number(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randint(1, 9999) for _ in range(items(rng, 6, 180))]
    pick, name = rng.choice([(max, "largest"), (min, "smallest")])
    question = rng.choice([f"Which number above is the {name}? Answer with the number.",
                           f"Give the {name} of the numbers listed above."])
    return f"{' '.join(map(str, numbers))}\n\n{question}", str(pick(numbers))


def lookup_field(rng: random.Random) -> tuple[str, str]:
    count = min(len(FIRST), items(rng, 3, 25))
    people = [f"{first} {rng.choice(LAST)}" for first in rng.sample(FIRST, count)]
    records = [(person, rng.choice(CITIES), rng.randint(19, 70), rng.choice(TEAMS)) for person in people]
    lines = [f"{person} lives in {city}, is {age} years old and plays on the {team} team." for person, city, age, team in records]
    person, city, age, team = rng.choice(records)
    field, answer = rng.choice([("city does {} live in", city), ("age is {}", str(age)), ("team does {} play on", team)])
    return f"{chr(10).join(lines)}\n\nWhat {field.format(person)}? Answer with one word.", answer


def count_items(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, min(len(WORDS), items(rng, 4, 150)))
    return f"{'; '.join(words)}\n\nHow many items does the list above have? Answer with a number.", str(len(words))


TASKS = [sort_words, reverse_list, count_word, largest_number, lookup_field, count_items]


def generate(rng: random.Random, size: int, banned: set[str]) -> list[dict]:
    rows: list[dict] = []
    used: set[str] = set()
    while len(rows) < size:
        user, answer = rng.choice(TASKS)(rng)
        if user in used or user in banned:
            continue  # distinct prompts, and none shared between the splits
        used.add(user)
        rows.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                                  {"role": "assistant", "content": answer}]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=384)
    parser.add_argument("--eval-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("data/longtail"))
    args = parser.parse_args()

    # String seeds hash deterministically, giving each split its own stream.
    eval_rows = generate(random.Random(f"{args.seed}-eval"), args.eval_size, set())
    train_rows = generate(random.Random(f"{args.seed}-train"), args.train_size, {row["messages"][1]["content"] for row in eval_rows})

    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(args.out / "train.jsonl", train_rows)
    write_jsonl_atomic(args.out / "eval.jsonl", eval_rows)
    print(f"wrote {len(train_rows)} train rows to {args.out / 'train.jsonl'}")
    print(f"wrote {len(eval_rows)} eval rows to {args.out / 'eval.jsonl'}")


if __name__ == "__main__":
    main()
