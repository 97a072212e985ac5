"""Build the tiny byte-level BPE tokenizer committed under tests/assets.

Tests need a real fast tokenizer (offset mappings, special tokens, a chat
template) without downloading anything, and it must be small enough to
commit. This script trains one from scratch on text it generates itself,
plus the quickstart data when present, so the vocabulary covers the kinds of
strings tests feed it: English sentences, digits, dates and JSON.

It mirrors the layout of SmolLM2-Instruct so code paths exercised in tests
match the real model's: byte-level BPE with single-digit splitting, ChatML
markers, and ``<|im_end|>`` as eos. Unlike SmolLM2 it has a dedicated pad
token distinct from eos, and its chat template injects no system prompt.

This is a standalone script; the package never imports it. Output is
deterministic; to reproduce the committed files exactly, generate the
quickstart data first::

    python scripts/make_quickstart_data.py
    python scripts/make_tiny_tokenizer.py --out tests/assets/tiny-tokenizer
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
# Order fixes the ids: 0..3, which tests may rely on.
SPECIAL_TOKENS = [BOS, IM_START, IM_END, PAD]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

WORDS = (
    "the a an of to in on for with by from at and or but not is are was were be "
    "been has have had do does did will would can could should may might must "
    "this that these those it its they them their we our you your he she his her "
    "model data train training eval evaluation loss step steps batch learning rate "
    "token tokens text answer question instruction input output user assistant "
    "system response date year month day time meeting invoice birthday deadline "
    "please write rewrite summarize explain translate list short long first last "
    "good bad new old small large number value result file config run test"
).split()

MONTHS = [
    "January", "February", "March", "April", "May", "June", "July",
    "August", "September", "October", "November", "December",
]


def synthetic_lines(rng: random.Random, n: int) -> list[str]:
    lines = []
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            words = rng.choices(WORDS, k=rng.randint(4, 14))
            words[0] = words[0].capitalize()
            lines.append(" ".join(words) + rng.choice([".", "?", "!", ":"]))
        elif kind == 1:
            y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
            lines.append(
                rng.choice(
                    [
                        f"{y}-{m:02d}-{d:02d}",
                        f"{MONTHS[m - 1]} {d}, {y}",
                        f"{d} {MONTHS[m - 1][:3]} {y}",
                        f"{y}/{m:02d}/{d:02d}",
                    ]
                )
            )
        elif kind == 2:
            keys = rng.sample(WORDS, rng.randint(1, 3))
            obj = {k: rng.choice([rng.randint(0, 999), rng.choice(WORDS), None, True]) for k in keys}
            lines.append(json.dumps(obj))
        elif kind == 3:
            lines.append(" ".join(str(rng.randint(0, 10**rng.randint(1, 6))) for _ in range(4)))
        else:
            a, b = rng.sample(WORDS, 2)
            lines.append(f"{a}\n\t{b}\n\n{a.upper()} {b.title()}")
    return lines


def quickstart_lines(data_dir: Path) -> list[str]:
    lines = []
    for path in sorted(data_dir.glob("*.jsonl")):
        for raw in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(raw)
            lines.extend(str(v) for v in row.values())
    return lines


def build(corpus: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # Single digits, as in SmolLM2, so numbers and dates tokenize the same way
    # regardless of how many merges the tiny vocab happens to learn.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Untrimmed offsets keep spans contiguous, so every character of the
    # input maps to exactly one token.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/assets/tiny-tokenizer"))
    parser.add_argument("--vocab-size", type=int, default=768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quickstart", type=Path, default=Path("data/quickstart"))
    args = parser.parse_args()

    corpus = synthetic_lines(random.Random(args.seed), 4000)
    corpus += quickstart_lines(args.quickstart)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build(corpus, args.vocab_size),
        bos_token=BOS,
        eos_token=IM_END,
        unk_token=BOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    args.out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(args.out)
    print(f"saved tokenizer with {len(fast)} tokens to {args.out}")


if __name__ == "__main__":
    main()
