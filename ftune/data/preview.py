"""``ftune data preview``: show examples exactly as training will see them, and the counts that matter.

Trained tokens (in the loss) are highlighted and masked tokens dimmed on a terminal; elsewhere
trained text is wrapped in ``[[ ]]``. Tool schemas, calls and results appear as the chat template renders them. Only the tokenizer is loaded, never the model weights.
"""

from __future__ import annotations

from typing import Callable

from ftune.data.pipeline import DataSplits, Records, load_records, tokenize_splits
from ftune.data.templates import install_chat_template
from ftune.data.tokenize import IGNORE_INDEX, TokenizeStats
from ftune.data.tools import has_tool_turns
from ftune.recipe.grpo import GRPO
from ftune.recipe.kto import KTO

# (trained start, trained end, masked start, masked end) markers per output style.
STYLES = {
    "ansi": ("\x1b[1;32m", "\x1b[0m", "\x1b[2m", "\x1b[0m"),
    "plain": ("[[", "]]", "", ""),
}
LEGENDS = {
    "ansi": "green = trained (in the loss), dim = masked (context only)",
    "plain": "[[text]] = trained (in the loss); text outside brackets is masked (context only)",
}


def render_example(tokenizer, example: dict, *, style: str) -> str:
    """The example's text with trained and masked runs of tokens marked."""
    trained_on, trained_off, masked_on, masked_off = STYLES[style]
    ids, labels = example["input_ids"], example["labels"]
    if isinstance(labels, int):
        return masked_on + tokenizer.decode(ids, skip_special_tokens=False) + masked_off
    pieces, run, flag = [], [], None
    for token, label in zip(ids, labels):
        trained = label != IGNORE_INDEX
        if run and trained != flag:
            pieces.append((flag, run))
            run = []
        run.append(token)
        flag = trained
    if run:
        pieces.append((flag, run))
    out = []
    for trained, run in pieces:
        text = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append(f"{trained_on}{text}{trained_off}" if trained else f"{masked_on}{text}{masked_off}")
    return "".join(out)


def describe_counts(name: str, records: int, stats: TokenizeStats, examples: int, classification: bool) -> str:
    share = "" if classification else f", {100 * stats.trained_tokens / max(stats.tokens, 1):.1f}% of tokens trained"
    rejected = f", {stats.rejected} rejected by the chat template" if stats.rejected else ""
    return (f"{name}: {records:,} rows -> {examples:,} examples, {stats.tokens:,} tokens{share}, "
            f"{stats.truncated} truncated, {stats.dropped_too_long + stats.dropped_no_target} dropped for length{rejected}")


def preview_preference(records: Records, split: str, count: int, echo: Callable[[str], None]) -> None:
    chosen = getattr(records, split)
    for index, record in enumerate(chosen[:count]):
        echo(f"-- {split} example {index + 1} ({record.origin}) --")
        for message in record.value["prompt"]:
            echo(f"{message['role']}: {message['content']}")
        echo(f"chosen: {record.value['chosen']}")
        echo(f"rejected: {record.value['rejected']}")
    echo(f"{split}: {len(chosen):,} valid preference rows (train {len(records.train):,}, eval {len(records.eval):,})")
    echo("note: preference rows train with stage: dpo")


def preview_kto(records: Records, split: str, count: int, stage: str, echo: Callable[[str], None]) -> None:
    rows = getattr(records, split)
    for index, record in enumerate(rows[:count]):
        echo(f"-- {split} example {index + 1} ({record.origin}), {'desirable' if record.value['label'] else 'undesirable'} --")
        for message in record.value["prompt"]:
            echo(f"{message['role']}: {message['content']}")
        echo(f"completion: {record.value['completion']}")
    desirable = sum(r.value["label"] for r in rows)
    echo(f"{split}: {len(rows):,} KTO rows, {desirable:,} desirable / {len(rows) - desirable:,} undesirable "
         f"(train {len(records.train):,}, eval {len(records.eval):,})")
    if stage != KTO:
        echo(f"note: KTO rows (a completion labelled true/false) train with stage: kto; stage: {stage} refuses them, "
             "set stage: kto")


def preview_prompts(records: Records, tokenizer, split: str, count: int, echo: Callable[[str], None]) -> None:
    """stage: grpo trains on no answer: each row gives the prompt the policy continues, its answer is the reference."""
    from ftune.data.templates import render
    from ftune.rewards import prompt_rows

    rows = {name: prompt_rows(getattr(records, name), tokenizer) for name in ("train", "eval")}
    for index, row in enumerate(rows[split][:count]):
        echo(f"-- {split} prompt {index + 1} ({row['origin']}) --")
        echo(row["prompt"] if isinstance(row["prompt"], str) else render(tokenizer, row["prompt"], add_generation_prompt=True))
        echo(f"reference: {row['reference'] or row['reference_calls']}")
    echo(f"{split}: {len(rows[split]):,} prompts (train {len(rows['train']):,}, eval {len(rows['eval']):,}); stage: grpo samples "
         "grpo.num_generations completions for each and scores them with grpo.rewards against the reference")


def run_preview(recipe, *, count: int = 3, split: str = "train", color: bool = False, echo: Callable[[str], None] = print) -> DataSplits | None:
    from ftune.model import load_tokenizer
    from ftune.runtime import quiet_libraries

    quiet_libraries()
    tokenizer = load_tokenizer(recipe.model)
    install_chat_template(tokenizer, recipe.data)
    records = load_records(recipe.data, recipe.task)
    for note in records.notes:
        echo(f"note: {note}")
    if any(r.kind == "preference" for r in records.train + records.eval):
        preview_preference(records, split, count, echo)
        return None
    if any(r.kind == "kto" for r in records.train + records.eval):
        preview_kto(records, split, count, recipe.stage, echo)
        return None
    if recipe.stage == GRPO:
        preview_prompts(records, tokenizer, split, count, echo)
        return None
    splits = tokenize_splits(records, tokenizer, recipe.data, keep_origins=True)
    style = "ansi" if color else "plain"
    examples = splits.train if split == "train" else splits.eval
    for index in range(min(count, len(examples))):
        example = examples[index]
        header = f"-- {split} example {index + 1} ({examples.origins[index]}), {len(example['input_ids'])} tokens"
        if splits.label_names is not None:
            header += f", label {splits.label_names[example['labels']]!r} (id {example['labels']})"
        echo(header + " --")
        echo(render_example(tokenizer, example, style=style))
    echo(f"-- legend: {LEGENDS[style]}" if splits.label_names is None else "--")
    classification = splits.label_names is not None
    echo(describe_counts("train", len(records.train), splits.train_stats, len(splits.train), classification))
    echo(describe_counts("eval", len(records.eval), splits.eval_stats, len(splits.eval), classification))
    if classification:
        echo(f"labels: {', '.join(f'{i}={name}' for i, name in enumerate(splits.label_names))}")
    calling = sum(bool(r.tools) or has_tool_turns(r.value) for r in records.train if r.kind == "chat")
    if calling:
        echo(f"tools: {calling:,} train conversations call tools; the calls are trained, the tool results are context only")
    for note in splits.notes[len(records.notes):]:
        echo(f"note: {note}")
    return splits
