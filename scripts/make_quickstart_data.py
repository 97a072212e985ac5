"""Generate the quickstart dataset: date normalization in alpaca format.

Each example asks the model to rewrite the single date mentioned in a short
sentence as ``YYYY-MM-DD``. The task suits a quickstart because the held-out
metric is objective (exact match on the answer), a small chat model gets it
wrong often out of the box, and a short LoRA run teaches it reliably.

Only unambiguous surface forms are used: month names (full or abbreviated)
in any order, or numeric forms with the year first. Forms such as
``05/03/2024`` are left out because day/month order cannot be inferred.

Output is deterministic for a given ``--seed``. The eval split is drawn from
its own random stream, so changing ``--train-size`` never changes it, and no
calendar date (hence no input) appears in both splits.

Usage::

    python scripts/make_quickstart_data.py --seed 0 --out data/quickstart
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

INSTRUCTION = "Rewrite the date in the text as YYYY-MM-DD. Answer with the date only."

YEAR_MIN, YEAR_MAX = 1990, 2030

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]
# "Sept" is common enough in the wild to be worth teaching alongside "Sep".
MONTH_ABBREVS = [
    ["Jan"], ["Feb"], ["Mar"], ["Apr"], ["May"], ["Jun"],
    ["Jul"], ["Aug"], ["Sep", "Sept"], ["Oct"], ["Nov"], ["Dec"],
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        suffix = "th"
    else:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def abbrev(rng: random.Random, d: dt.date) -> str:
    name = rng.choice(MONTH_ABBREVS[d.month - 1])
    # A trailing period is only natural when the name was actually shortened.
    if name != MONTHS[d.month - 1] and rng.random() < 0.3:
        name += "."
    return name


# Each form maps (rng, date) -> surface string. Weights keep the common
# written forms frequent while still covering the rarer ones.
FORMS = [
    (4, lambda r, d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}"),
    (3, lambda r, d: f"{MONTHS[d.month - 1]} {ordinal(d.day)}, {d.year}"),
    (3, lambda r, d: f"{d.day} {MONTHS[d.month - 1]} {d.year}"),
    (2, lambda r, d: f"{ordinal(d.day)} {MONTHS[d.month - 1]} {d.year}"),
    (3, lambda r, d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}{r.choice(['', ','])} {d.year}"),
    (3, lambda r, d: f"{abbrev(r, d)} {d.day}, {d.year}"),
    (2, lambda r, d: f"{d.day} {abbrev(r, d)} {d.year}"),
    (2, lambda r, d: f"{d.day:02d}-{MONTH_ABBREVS[d.month - 1][0]}-{d.year}"),
    (3, lambda r, d: f"{d.year}/{d.month:02d}/{d.day:02d}"),
    (1, lambda r, d: f"{d.year}/{d.month}/{d.day}"),
    (1, lambda r, d: f"{d.year}.{d.month:02d}.{d.day:02d}"),
    (2, lambda r, d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}"),
    (1, lambda r, d: f"{WEEKDAYS[d.weekday()][:3]} {d.day} {abbrev(r, d)} {d.year}"),
    (1, lambda r, d: f"{MONTHS[d.month - 1]} {d.day} {d.year}"),
]

NAMES = [
    "Alice", "Bob", "Priya", "Chen", "Maria", "Tom", "Fatima", "Lukas",
    "Sofia", "Omar", "Hana", "Diego", "Grace", "Ivan", "Amara", "Noah",
]
CITIES = [
    "Lisbon", "Denver", "Osaka", "Nairobi", "Toronto", "Berlin", "Lima",
    "Dublin", "Seoul", "Austin", "Oslo", "Cairo",
]
TEAMS = ["design", "sales", "finance", "platform", "support", "legal", "research"]
ITEMS = ["laptop", "sofa", "bicycle", "printer", "camera", "desk", "guitar", "kettle"]

# Sentence frames in varied domains; each mentions exactly one date.
TEMPLATES = [
    "The {team} team meeting has been moved to {date}.",
    "Please join us for the quarterly review on {date} in {city}.",
    "Invoice #{num} is due on {date}.",
    "Payment for invoice {num} was received on {date}, thank you.",
    "{name} was born on {date} in {city}.",
    "We are celebrating {name}'s birthday on {date}.",
    "The deadline for submissions is {date}.",
    "All reports must reach the {team} office by {date}.",
    "My flight to {city} leaves on {date}.",
    "{name} flew back from {city} on {date}.",
    "The contract with {name} expires on {date}.",
    "Your {item} was shipped on {date} and should arrive soon.",
    "Order {num} for one {item} was placed on {date}.",
    "Your dental appointment is scheduled for {date}.",
    "{name} started working in {city} on {date}.",
    "The lease on the {city} apartment begins {date}.",
    "Reminder: the {team} workshop takes place on {date}.",
    "The warranty on this {item} ends {date}.",
    "On {date}, {name} signed the agreement.",
    "On {date} the {team} team shipped version {major}.{minor}.",
    "{name} and {name2} got married on {date}.",
    "The library book is due back on {date}.",
    "Registration closes {date}, so sign up early.",
    "We last inspected the {item} on {date}.",
    "The conference in {city} opens on {date}.",
    "According to the log, the server restarted on {date}.",
    "{name} handed in the final thesis on {date}.",
    "Tickets for the {city} concert on {date} are sold out.",
    "The museum will be closed on {date} for maintenance.",
    "Can we move the call with {name} to {date}?",
]


def random_date(rng: random.Random) -> dt.date:
    start = dt.date(YEAR_MIN, 1, 1).toordinal()
    end = dt.date(YEAR_MAX, 12, 31).toordinal()
    return dt.date.fromordinal(rng.randint(start, end))


def render_date(rng: random.Random, d: dt.date) -> str:
    weights = [w for w, _ in FORMS]
    (_, form), = rng.choices(FORMS, weights=weights)
    return form(rng, d)


def make_example(rng: random.Random, d: dt.date) -> dict[str, str]:
    template = rng.choice(TEMPLATES)
    name, name2 = rng.sample(NAMES, 2)
    surface = render_date(rng, d)
    text = template.format(
        date=surface,
        name=name,
        name2=name2,
        city=rng.choice(CITIES),
        team=rng.choice(TEAMS),
        item=rng.choice(ITEMS),
        num=rng.randint(1000, 99999),
        major=rng.randint(1, 9),
        minor=rng.randint(0, 20),
    )
    # Sentences that open with the date read oddly with a lowercase article.
    text = text[0].upper() + text[1:]
    return {"instruction": INSTRUCTION, "input": text, "output": d.isoformat()}


def generate(
    rng: random.Random, size: int, banned_dates: set[dt.date]
) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    used: set[dt.date] = set()
    while len(rows) < size:
        d = random_date(rng)
        # Distinct dates keep inputs unique and stop the eval split from
        # rewarding memorised train answers.
        if d in used or d in banned_dates:
            continue
        used.add(d)
        rows.append(make_example(rng, d))
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=800)
    parser.add_argument("--eval-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("data/quickstart"))
    args = parser.parse_args()

    # String seeds hash deterministically, giving each split its own stream.
    eval_rows = generate(random.Random(f"{args.seed}-eval"), args.eval_size, set())
    eval_dates = {dt.date.fromisoformat(r["output"]) for r in eval_rows}
    train_rows = generate(random.Random(f"{args.seed}-train"), args.train_size, eval_dates)

    overlap = {r["input"] for r in train_rows} & {r["input"] for r in eval_rows}
    assert not overlap, overlap

    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train_rows)
    write_jsonl(args.out / "eval.jsonl", eval_rows)
    print(f"wrote {len(train_rows)} train rows to {args.out / 'train.jsonl'}")
    print(f"wrote {len(eval_rows)} eval rows to {args.out / 'eval.jsonl'}")


if __name__ == "__main__":
    main()
