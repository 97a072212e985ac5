"""Rewards of ``stage: grpo``: the recipe's ``grpo.rewards`` list as callables, and the prompts they score.

Training (TRL's GRPOTrainer) and ``ftune eval`` call the same callables, each ``f(prompts, completions, **columns)
-> list[float]``. The built-ins are ``ftune.metrics``' implementations applied to the reply text against the
``reference`` column (the row's last assistant reply); a ``function`` reward is the user's own function; a
``model`` reward is a ``stage: reward`` run's sequence classifier scoring prompt + completion as it was trained to.
The weights are applied by the caller (GRPOTrainer's ``reward_weights``, or ``weighted_total`` here).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable

from ftune.errors import FtuneError
from ftune.metrics import exact_match, numeric_match, regex_match, tool_call_exact, valid_json


def prompt_rows(records: list, tokenizer=None) -> list[dict]:
    """One row per chat record that has an assistant turn: the conversation before its last assistant turn
    (``prompt``), that turn's text (``reference``) and its tool calls as JSON (``reference_calls``).

    Where any row carries tool schemas or tool turns before its answer and a ``tokenizer`` is given, every ``prompt``
    is that conversation rendered by the chat template with the row's own tools and calls, and
    ``conversation`` keeps its role/content turns: TRL renders conversational prompts with one tool list for the whole
    trainer, and the rows become an Arrow table, which wants one shape for every message (no tool_calls fields)."""
    from ftune.data.tools import reference_calls

    rows, full = [], []
    for record in records:
        if record.kind != "chat" or not any(m["role"] == "assistant" for m in record.value):
            continue
        last = max(i for i, m in enumerate(record.value) if m["role"] == "assistant")
        prompt = [{"role": m["role"], "content": m.get("content") or ""} for m in record.value[:last]]
        answer = record.value[last]
        rows.append({"prompt": prompt, "reference": answer.get("content") or "",
                     "reference_calls": json.dumps(reference_calls(answer), ensure_ascii=False), "origin": record.origin})
        full.append((record.value[:last], record.tools))
    if tokenizer is not None and any(tools or any(m.get("tool_calls") or m["role"] == "tool" for m in turns) for turns, tools in full):
        from ftune.data.templates import check_tool_template, render

        check_tool_template(tokenizer)  # a template that drops the schemas is refused, as for SFT
        for row, (turns, tools) in zip(rows, full):
            row["conversation"], row["prompt"] = row["prompt"], render(tokenizer, turns, add_generation_prompt=True, tools=tools)
    return rows


def reply_text(completion) -> str:
    """The reply of a completion: a string, or (conversational prompts) a list of messages ending on it."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def _text_reward(name: str, score: Callable[[str, dict], float]):
    def reward(prompts, completions, **columns) -> list[float]:
        rows = [{key: values[i] for key, values in columns.items() if isinstance(values, list)} for i in range(len(completions))]
        return [score(reply_text(c), row) for c, row in zip(completions, rows)]

    reward.__name__ = name
    return reward


def _calls_exact(text: str, row: dict) -> float:
    from ftune.data.tools import parse_reply_calls

    return tool_call_exact(parse_reply_calls(text), json.loads(row["reference_calls"]))


def _function_reward(spec, key: str, copies: Path | None = None):
    path, _, name = spec.function.rpartition(":")
    file = Path(path)
    if not file.is_file() and copies is not None and (copies / file.name).is_file():
        file = copies / file.name
    if not file.is_file():
        raise FtuneError(f"{key}.function: file '{path}' does not exist; fix the path")
    module_spec = importlib.util.spec_from_file_location(f"ftune_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise FtuneError(f"{key}.function: importing {path} failed: {type(exc).__name__}: {exc}; fix the file") from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise FtuneError(f"{key}.function: {path} defines no function '{name}'; fix the name")

    def failure(prompts, completions, columns, exc) -> FtuneError:
        # The batch failed: find the row it failed on by calling row by row (the first one that fails, else the first).
        index = 0
        for i in range(len(prompts)):
            try:
                function([prompts[i]], [completions[i]], **{k: ([v[i]] if isinstance(v, list) else v) for k, v in columns.items()})
            except Exception as row_exc:  # noqa: BLE001 - any error in user code is reported, not handled
                index, exc = i, row_exc
                break
        prompt = prompts[index]
        shown = prompt[-1]["content"] if isinstance(prompt, list) and prompt else prompt
        origin = columns.get("origin", [None] * len(prompts))[index]
        return FtuneError(f"{key}.function: {spec.function} raised {type(exc).__name__}: {exc} on prompt {shown!r}"
                          f"{f' ({origin})' if origin else ''}; fix the function (it returns one float per completion)")

    def per_completion(prompts, completions, **columns) -> list[float]:
        try:
            scores = [float(s) for s in function(prompts, completions, **columns)]
        except Exception as exc:  # noqa: BLE001
            raise failure(prompts, completions, columns, exc) from exc
        if len(scores) != len(completions):
            raise FtuneError(f"{key}.function: {spec.function} returned {len(scores)} scores for {len(completions)} completions; "
                             "return one float per completion")
        return scores

    per_completion.__name__ = name
    return per_completion


class RewardModel:
    """A ``stage: reward`` run's scoring head, loaded once with ftune's own loader, scoring prompt + reply."""

    def __init__(self, run_dir: str, *, device: str, key: str = "grpo.rewards") -> None:
        from ftune.run_dir import load_run
        from ftune.tuned import load_model

        if not (Path(run_dir).expanduser() / "summary.json").is_file():
            raise FtuneError(f"{key}.run: {run_dir} holds no finished reward model; train it first (ftune train RECIPE with "
                             "stage: reward and this output_dir), or fix the path")
        run, self.recipe = load_run(run_dir)
        self.model, self.tokenizer = load_model(run, self.recipe)
        self.model.to(device)
        self.__name__ = f"reward_model:{Path(run_dir).name}"

    def __call__(self, prompts, completions, **columns) -> list[float]:
        from types import SimpleNamespace

        from ftune.data.preference import render_pair
        from ftune.scoring import sequence_scores

        sequences = []
        # rendered text prompts (rows with tools) come with their turns in the ``conversation`` column
        prompts = [c if isinstance(p, str) else p for p, c in zip(prompts, columns.get("conversation") or prompts)]
        for prompt, completion in zip(prompts, completions):
            reply = reply_text(completion)
            # scored as reward training scored a chosen answer: prompt and answer rendered by the template once
            prompt_text, answer, _ = render_pair(self.tokenizer, SimpleNamespace(value={"prompt": prompt, "chosen": reply, "rejected": reply}))
            sequences.append(self.tokenizer(prompt_text + answer, add_special_tokens=False)["input_ids"][: self.recipe.data.max_length])
        return sequence_scores(self.model, sequences, pad_token_id=self.tokenizer.pad_token_id, batch_size=self.recipe.evaluation.batch_size)


def build_rewards(rewards: list, *, device: str = "cpu", copies: Path | None = None) -> list[Callable]:
    """The recipe's ``grpo.rewards`` as callables, in order (their weights are ``[r.weight for r in rewards]``); a function
    file that is gone from where the recipe names it is read from ``copies`` (a run's copies) when it is there."""
    built = []
    for index, spec in enumerate(rewards):
        key = f"grpo.rewards.{index}"
        if spec.kind == "exact_match":
            built.append(_text_reward("exact_match", lambda text, row: exact_match(text, row["reference"])))
        elif spec.kind == "numeric_match":
            built.append(_text_reward("numeric_match", lambda text, row: numeric_match(text, row["reference"])))
        elif spec.kind == "regex":
            built.append(_text_reward("regex", lambda text, row, pattern=spec.pattern: regex_match(text, pattern)))
        elif spec.kind == "valid_json":
            built.append(_text_reward("valid_json", lambda text, row: valid_json(text)))
        elif spec.kind == "tool_call_exact":
            built.append(_text_reward("tool_call_exact", _calls_exact))
        elif spec.kind == "function":
            built.append(_function_reward(spec, key, copies))
        else:
            built.append(RewardModel(spec.run, device=device, key=key))
    names = [f.__name__ for f in built]
    for index, function in enumerate(built):
        if names.count(function.__name__) > 1:  # each reward its own metrics: two regex checks log as regex_0, regex_1
            function.__name__ = f"{names[index]}_{index}"
    return built


def weighted_total(scores: list[list[float]], weights: list[float]) -> list[float]:
    """Each completion's reward: the weighted sum over the rewards (``scores[r][i]``: reward r of completion i)."""
    return [sum(w * s[i] for w, s in zip(weights, scores)) for i in range(len(scores[0]))] if scores else []


def score_replies(rewards: list, built: list[Callable], rows: list[dict], replies: list[str]) -> tuple[dict, list[list[float]]]:
    """Mean of each reward and of the weighted total over ``replies`` to ``rows`` (eval's numbers), and the scores."""
    prompts = [row["prompt"] for row in rows]
    completions = [[{"role": "assistant", "content": reply}] for reply in replies]
    columns = {key: [row[key] for row in rows] for key in ("reference", "reference_calls", "origin", "conversation") if key in rows[0]}
    scores = [list(function(prompts, completions, **columns)) for function in built]
    total = weighted_total(scores, [r.weight for r in rewards])
    n = max(len(replies), 1)
    metrics = {"reward": sum(total) / n}
    for function, values in zip(built, scores):
        metrics[f"reward/{function.__name__}"] = sum(values) / n
    return metrics, scores


def score_rewards(model, tokenizer, records: list, recipe, *, built: list[Callable] | None = None) -> tuple[dict, list[dict]]:
    """``ftune eval`` of a grpo run: greedy replies to the held-out prompts, scored by the recipe's rewards."""
    import time

    from ftune.generation import generate_replies

    clock = time.perf_counter()
    rows = prompt_rows(records, tokenizer)
    if not rows:
        raise FtuneError("the held-out split has no chat or instruction rows with an answer to take prompts from")
    replies = generate_replies(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens=recipe.evaluation.max_new_tokens,
                               batch_size=recipe.evaluation.batch_size)
    built = built if built is not None else build_rewards(recipe.grpo.rewards, device=str(next(model.parameters()).device))
    metrics, scores = score_replies(recipe.grpo.rewards, built, rows, [reply.text for reply in replies])
    turns = [row.get("conversation", row["prompt"]) for row in rows]
    predictions = [{"prompt": turns[i][-1]["content"] if turns[i] else "", "reference": row["reference"], "prediction": reply.text,
                    "stopped": reply.stopped, **{f"reward/{f.__name__}": s[i] for f, s in zip(built, scores)}}
                   for i, (row, reply) in enumerate(zip(rows, replies))]
    metrics.update(stopped_rate=sum(r.stopped for r in replies) / len(replies), samples=len(rows), wall_time_s=time.perf_counter() - clock)
    return metrics, predictions


def reward_scorer(recipe, run) -> tuple[Callable, tuple[str, ...]]:
    """How ``ftune eval`` scores a grpo run: (score function as its task scorers take one, metric names to print), the
    rewards built once for the tuned and the base model; function files missing where the recipe names them are read
    from the run's copies."""
    built = build_rewards(recipe.grpo.rewards, copies=run.reward_functions)
    return (lambda model, tokenizer, records, recipe, _labels: score_rewards(model, tokenizer, records, recipe, built=built),
            ("reward", *(f"reward/{f.__name__}" for f in built), "stopped_rate", "samples", "wall_time_s"))
