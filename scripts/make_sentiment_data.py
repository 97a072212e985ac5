"""Generate the sentiment dataset: short product reviews labelled positive, negative or neutral.

Rows are ``{"text": ..., "label": ...}`` (ftune's ``classification`` format). Each review joins an
opener naming a product with one or two opinion clauses; the label follows the clauses (two clauses
always agree, or the review is neutral). Negated clauses ("not worth the money") and hedges keep
a bag-of-words shortcut from solving it outright, so a classification head has something to learn.

Output is deterministic for a given ``--seed``; no text appears in both splits.

Usage::

    python scripts/make_sentiment_data.py --seed 0 --out data/sentiment
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PRODUCTS = [
    "headphones", "coffee maker", "phone case", "desk lamp", "backpack", "blender", "keyboard", "water bottle",
    "running shoes", "toaster", "monitor", "office chair", "e-reader", "tent", "vacuum cleaner", "watch",
]
OPENERS = [
    "I bought the {p} last month.", "Got this {p} as a gift.", "The {p} arrived on Tuesday.", "We have used the {p} for a week.",
    "Ordered the {p} on sale.", "My second {p} from this brand.", "Replaced my old {p} with this one.", "",
]
CLAUSES = {
    "positive": [
        "It works perfectly.", "Honestly the best purchase this year.", "Build quality is excellent.", "I love how light it is.",
        "Not a single problem so far.", "Worth every penny.", "Setup took two minutes and it just works.", "Would happily buy it again.",
        "It is not disappointing at all.", "Far better than I expected.",
    ],
    "negative": [
        "It broke after three days.", "Complete waste of money.", "The battery dies within an hour.", "It is not worth the price.",
        "Customer support never answered.", "Stopped working after the first wash.", "Feels cheap and flimsy.", "I returned it the next day.",
        "Far worse than the reviews suggested.", "Would not recommend it to anyone.",
    ],
    "neutral": [
        "It does what the box says.", "Nothing special, nothing wrong.", "It is fine for the price, I suppose.", "Average in every way.",
        "Haven't decided yet whether I like it.", "It is okay.", "Pretty much what I expected.", "Comes in grey and blue.",
        "Neither great nor terrible.", "It arrived in standard packaging.",
    ],
}
LABELS = tuple(CLAUSES)


def review(rng: random.Random, label: str) -> str:
    opener = rng.choice(OPENERS).format(p=rng.choice(PRODUCTS))
    clauses = rng.sample(CLAUSES[label], k=rng.choice((1, 2)))
    return " ".join(part for part in (opener, *clauses) if part)


def generate(rng: random.Random, size: int, seen: set[str]) -> list[dict]:
    rows = []
    while len(rows) < size:
        label = LABELS[len(rows) % len(LABELS)]  # balanced classes
        text = review(rng, label)
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=600)
    parser.add_argument("--eval-size", type=int, default=90)
    parser.add_argument("--out", type=Path, default=Path("data/sentiment"))
    args = parser.parse_args()
    seen: set[str] = set()
    # Eval first, from its own stream: changing --train-size never changes it.
    evaluation = generate(random.Random(f"{args.seed}-eval"), args.eval_size, seen)
    train = generate(random.Random(f"{args.seed}-train"), args.train_size, seen)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", evaluation)
    print(f"wrote {len(train)} train / {len(evaluation)} eval rows to {args.out}")


if __name__ == "__main__":
    main()
