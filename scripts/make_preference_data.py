"""Generate the preference dataset: concise ISO dates preferred over verbose or misformatted answers.

Built from the quickstart rows (``data/quickstart``): each quickstart example becomes one
prompt/chosen/rejected pair whose chosen answer is the bare ``YYYY-MM-DD`` date and whose rejected
answer is what a chatty model tends to say instead (the date wrapped in a sentence, or the date in
another format). The held-out pairs come from the quickstart eval rows, so no date is in both
splits. A pretraining corpus of the same sentences as raw text (``text`` rows) is written too, for
the pretrain recipe, and the pairs unpaired for KTO (``kto-train.jsonl``, ``kto-eval.jsonl``): each prompt
once, with either its chosen answer (``label: true``) or its rejected one (``label: false``), in
LLaMA-Factory's KTO layout (a ``messages`` list and a boolean ``label``).

Output is deterministic for a given ``--seed``.

Usage::

    python scripts/make_preference_data.py --seed 0 --source data/quickstart --out data/preference
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

VERBOSE = [
    "Sure! The date in the text is {iso}.",
    "The date mentioned is {iso}, written in the YYYY-MM-DD format.",
    "Here is the date rewritten as requested: {iso}. Let me know if you need anything else!",
    "Of course. In YYYY-MM-DD form, that date is {iso}.",
]
MISFORMATTED = ["{d:%d/%m/%Y}", "{d:%B} {d.day}, {d.year}", "{d:%Y/%m/%d}", "{d.day} {d:%b} {d.year}"]


def rejected_answer(rng: random.Random, iso: str) -> str:
    if rng.random() < 0.6:
        return rng.choice(VERBOSE).format(iso=iso)
    return rng.choice(MISFORMATTED).format(d=dt.date.fromisoformat(iso))


def pairs(rows: list[dict], rng: random.Random) -> list[dict]:
    return [{"prompt": f"{row['instruction']}\n\n{row['input']}", "chosen": row["output"], "rejected": rejected_answer(rng, row["output"])}
            for row in rows]


def kto_rows(pairs: list[dict], rng: random.Random) -> list[dict]:
    """Each pair's prompt once, answered by its chosen or its rejected answer (half each, seeded), labelled."""
    rows = []
    for pair in pairs:
        desirable = rng.random() < 0.5
        answer = pair["chosen"] if desirable else pair["rejected"]
        rows.append({"messages": [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": answer}],
                     "label": desirable})
    return rows


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", type=Path, default=Path("data/quickstart"))
    parser.add_argument("--out", type=Path, default=Path("data/preference"))
    parser.add_argument("--train-size", type=int, default=240)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    train = read_jsonl(args.source / "train.jsonl")[: args.train_size]
    held = read_jsonl(args.source / "eval.jsonl")
    args.out.mkdir(parents=True, exist_ok=True)
    train_pairs, held_pairs = pairs(train, rng), pairs(held, random.Random(args.seed + 1))
    write_jsonl(args.out / "train.jsonl", train_pairs)
    write_jsonl(args.out / "eval.jsonl", held_pairs)
    write_jsonl(args.out / "kto-train.jsonl", kto_rows(train_pairs, random.Random(args.seed + 2)))
    write_jsonl(args.out / "kto-eval.jsonl", kto_rows(held_pairs, random.Random(args.seed + 3)))
    # Raw text for the pretrain stage: the quickstart sentences, one document each, answer appended.
    write_jsonl(args.out / "corpus.jsonl", [{"text": f"{row['input']} In ISO form: {row['output']}."} for row in train])
    print(f"wrote {len(train)} train / {len(held)} eval pairs, as many KTO rows and {len(train)} documents to {args.out}")


if __name__ == "__main__":
    main()
