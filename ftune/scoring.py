"""Batched scoring of held-out examples: response loss, class logits, completion log-probs, reward scores (of pairs and of
single sequences, which GRPO's learned reward reads).

Every loop here batches its sequences the same way, through ``padded_batches`` (right padding by the data
pipeline's ``PadCollator``, so scoring sees exactly the layout training saw), and runs the model without
gradients. ``ftune eval`` reads its numbers from these functions; the metrics built on them are here too
where they are about scores (preference accuracy and margins), and in ``metrics`` where they compare text.
The implicit reward of DPO and KTO is beta times the policy's summed completion log-prob minus the reference's; KTO's
KL estimate is the same difference on mismatched rows (a prompt with another row's completion).
"""

from __future__ import annotations

from collections.abc import Iterator

from ftune.data.collate import PadCollator
from ftune.data.tokenize import IGNORE_INDEX


def padded_batches(model, features: list[dict], *, pad_token_id: int, batch_size: int) -> Iterator[dict]:
    """``features`` (input_ids, labels: token labels or a class index) as right-padded batches on the model's device."""
    from ftune.generation import model_device

    collate, device = PadCollator(pad_token_id), model_device(model)
    for start in range(0, len(features), batch_size):
        yield {k: v.to(device) for k, v in collate(features[start:start + batch_size]).items()}


def response_loss(model, tokenizer, examples: list[dict], batch_size: int) -> float:
    """Mean cross-entropy over response tokens, weighted by token count (not by batch)."""
    import torch

    from ftune.parity import reply_logits

    total_loss, total_tokens = 0.0, 0
    for batch in padded_batches(model, examples, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = reply_logits(logits, batch["input_ids"].shape[1]).float()
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total_loss += losses.item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    return total_loss / max(total_tokens, 1)


def class_logits(model, examples: list[dict], *, pad_token_id: int, batch_size: int) -> tuple[float, list[int]]:
    """Summed cross-entropy of a sequence classifier over ``examples`` (integer labels) and its predicted classes."""
    import torch

    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id  # sequence classifiers find the last token by it
    total_loss, predicted = 0.0, []
    features = [{"input_ids": e["input_ids"], "labels": int(e["labels"])} for e in examples]
    for batch in padded_batches(model, features, pad_token_id=pad_token_id, batch_size=batch_size):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        total_loss += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        predicted.extend(logits.argmax(-1).tolist())
    return total_loss, predicted


def pair_sequences(rows: list[dict], max_length: int | None, *, label_answers: bool) -> list[dict]:
    """Each pair's two sides as whole sequences (prompt + answer), truncated like training, chosen before rejected;
    with ``label_answers`` the answer tokens are the labels (what a log-prob sums over), else the label is 0."""
    features = []
    for row in rows:
        for side in ("chosen_ids", "rejected_ids"):
            ids = (row["prompt_ids"] + row[side])[:max_length]
            labels = ([IGNORE_INDEX] * len(row["prompt_ids"]) + row[side])[:max_length] if label_answers else 0
            features.append({"input_ids": ids, "labels": labels})
    return features


def as_pairs(scores: list[float]) -> list[tuple[float, float]]:
    return [(scores[i], scores[i + 1]) for i in range(0, len(scores), 2)]


def completion_logps(model, rows: list[dict], *, batch_size: int = 8, max_length: int | None = None) -> list[tuple[float, float]]:
    """(chosen, rejected) summed completion log-probs of each pair under ``model``, truncated like training."""
    return as_pairs(summed_logps(model, pair_sequences(rows, max_length, label_answers=True), batch_size))


def summed_logps(model, features: list[dict], batch_size: int) -> list[float]:
    """The summed log-prob of each feature's labelled tokens (its answer) under ``model``."""
    import torch

    model.eval()
    scores = []
    for batch in padded_batches(model, features, pad_token_id=0, batch_size=batch_size):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        scored = targets != IGNORE_INDEX
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
        scores += (logps * scored).sum(dim=1).tolist()
    return scores


def reward_scores(model, rows: list[dict], *, pad_token_id: int, batch_size: int = 8,
                  max_length: int | None = None) -> list[tuple[float, float]]:
    """(chosen, rejected) scores of each pair under a one-output sequence classifier (a reward model)."""
    features = pair_sequences(rows, max_length, label_answers=False)
    return as_pairs(sequence_scores(model, [f["input_ids"] for f in features], pad_token_id=pad_token_id, batch_size=batch_size))


def sequence_scores(model, sequences: list[list[int]], *, pad_token_id: int, batch_size: int = 8) -> list[float]:
    """The score of each token sequence under a one-output sequence classifier (a reward model)."""
    import torch

    model.eval()
    scores = []
    features = [{"input_ids": ids, "labels": 0} for ids in sequences]
    for batch in padded_batches(model, features, pad_token_id=pad_token_id, batch_size=batch_size):
        with torch.no_grad():
            scores += model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float().tolist()
    return scores


def preference_metrics(policy: list[tuple[float, float]], reference: list[tuple[float, float]], beta: float) -> dict:
    """Held-out preference accuracy (implicit reward chosen > rejected), mean margin and log-prob means."""
    n = max(len(policy), 1)
    margins = [beta * ((pc - rc) - (pr - rr)) for (pc, pr), (rc, rr) in zip(policy, reference)]
    return {
        "preference_accuracy": sum(m > 0 for m in margins) / n,
        "reward_margin": sum(margins) / n,
        "logprob_accuracy": sum(c > r for c, r in policy) / n,
        "chosen_logp": sum(c for c, _ in policy) / n,
        "rejected_logp": sum(r for _, r in policy) / n,
        "samples": len(policy),
    }


def reward_metrics(scores: list[tuple[float, float]]) -> dict:
    n = max(len(scores), 1)
    return {"pairwise_accuracy": sum(c > r for c, r in scores) / n, "reward_margin": sum(c - r for c, r in scores) / n,
            "samples": len(scores)}


KTO_TABLE = ("kl", "desirable_reward", "undesirable_reward", "reward_margin", "label_accuracy", "desirable_logp",
             "undesirable_logp", "samples")


def kto_logps(model, rows: list[dict], *, batch_size: int = 8, max_length: int | None = None) -> tuple[list[float], list[float]]:
    """Each KTO row's summed completion log-prob, and that of its KL row: its prompt with the completion of the row
    before it (the first takes the last), the mismatched pairs KTO estimates its KL term from."""
    def sequence(prompt: list[int], answer: list[int]) -> dict:
        return {"input_ids": (prompt + answer)[:max_length], "labels": ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]}

    shifted = rows[-1:] + rows[:-1]
    features = [sequence(r["prompt_ids"], r["completion_ids"]) for r in rows]
    features += [sequence(r["prompt_ids"], other["completion_ids"]) for r, other in zip(rows, shifted)]
    scores = summed_logps(model, features, batch_size)
    return scores[:len(rows)], scores[len(rows):]


def kto_metrics(policy: tuple[list[float], list[float]], reference: tuple[list[float], list[float]], labels: list[bool],
                beta: float) -> dict:
    """KTO on held-out rows: the KL estimate (nats, clamped at 0 as KTO's loss uses it), the mean implicit reward
    (beta x log-prob over the reference) of desirable and of undesirable completions, their margin, and the share of
    rows whose reward has its label's sign."""
    (logps, kl_logps), (ref_logps, ref_kl_logps) = policy, reference
    rewards = [beta * (p - r) for p, r in zip(logps, ref_logps)]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    good = [i for i, label in enumerate(labels) if label]
    bad = [i for i, label in enumerate(labels) if not label]
    desirable, undesirable = mean([rewards[i] for i in good]), mean([rewards[i] for i in bad])
    return {
        "kl": max(mean([p - r for p, r in zip(kl_logps, ref_kl_logps)]), 0.0),
        "desirable_reward": desirable,
        "undesirable_reward": undesirable,
        "reward_margin": desirable - undesirable,
        "label_accuracy": mean([float(rewards[i] > 0) for i in good] + [float(rewards[i] < 0) for i in bad]),
        "desirable_logp": mean([logps[i] for i in good]),
        "undesirable_logp": mean([logps[i] for i in bad]),
        "samples": len(labels),
    }


def score_kto(load, records: list, recipe, *, with_base: bool, echo=print) -> dict:
    """Eval of a kto run: ``load(tuned)`` gives (model, tokenizer); the base is always scored, as every reward is measured
    against it. Returns {"tuned": (metrics, predictions)} and, with ``with_base``, the base's own ("base": zero rewards)."""
    from ftune.data.preference import tokenize_completions, unpaired
    from ftune.errors import FtuneError

    kept = [r for r in unpaired(records) if r.kind == "kto"]  # held-out pairs score as training read them
    if not kept:
        raise FtuneError("--split: no KTO rows (a completion labelled true/false) to score a kto run on")
    scored, rows = {}, []
    for label, tuned in (("base", False), ("tuned", True)):
        model, tokenizer = load(tuned)
        tokenized = tokenize_completions(tokenizer, kept, max_length=recipe.data.max_length,
                                         max_prompt_length=recipe.preference.max_prompt_length)
        rows, damaged = tokenized.rows, {problem.split(": ", 1)[0] for problem in tokenized.damaged}
        echo(f"Scoring the {label} model on {len(rows)} KTO rows...")
        scored[label] = kto_logps(model, rows, batch_size=recipe.evaluation.batch_size, max_length=recipe.data.max_length)
        del model
    labels, kept = [r["label"] for r in rows], [r for r in kept if r.origin not in damaged]
    results = {}
    for label in ("tuned", "base")[: 2 if with_base else 1]:
        predictions = [{"prompt": r.value["prompt"][-1]["content"], "completion": r.value["completion"], "label": r.value["label"],
                        "logp": logp} for r, logp in zip(kept, scored[label][0])]
        results[label] = (kto_metrics(scored[label], scored["base"], labels, recipe.preference.beta), predictions)
    return results
