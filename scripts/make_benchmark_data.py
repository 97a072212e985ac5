"""Generate the local multiple-choice benchmark ``ftune_dates`` from the quickstart held-out rows.

Each quickstart eval row (``data/quickstart/eval.jsonl``, never trained on by the quickstart recipe) becomes one
question: the instruction and sentence as the prompt, and four candidate answers: the date in ``YYYY-MM-DD`` (right),
the same form with month and day swapped or the day moved by one, the year moved by one, and the right date written
out in words (the right day, the wrong format). The order of the choices is shuffled with ``--seed``, so the output is
deterministic.

Usage::

    python scripts/make_benchmark_data.py --seed 0 --source data/quickstart/eval.jsonl --out ftune/benchmarks/ftune_dates/ftune_dates.jsonl
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path


def distractors(iso: str) -> list[str]:
    date = dt.date.fromisoformat(iso)
    if date.day <= 12 and date.day != date.month:
        swapped = date.replace(month=date.day, day=date.month)
    else:
        swapped = date + dt.timedelta(days=1)
    other_year = date.replace(year=date.year - 1) if not (date.month == 2 and date.day == 29) else date.replace(year=date.year - 4)
    return [swapped.isoformat(), other_year.isoformat(), f"{date:%B} {date.day}, {date.year}"]


def question(row: dict, rng: random.Random) -> dict:
    choices = [row["output"], *distractors(row["output"])]
    rng.shuffle(choices)
    return {"question": f"{row['instruction']}\n\n{row['input']}", "choices": choices, "answer": choices.index(row["output"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", type=Path, default=Path("data/quickstart/eval.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("ftune/benchmarks/ftune_dates/ftune_dates.jsonl"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = [json.loads(line) for line in args.source.read_text(encoding="utf-8").splitlines() if line.strip()]
    args.out.write_text("".join(json.dumps(question(row, rng), ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} questions to {args.out}")


if __name__ == "__main__":
    main()
