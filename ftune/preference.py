"""Preference pairs for the dpo stage: rendered once through the chat template, checked, and scored by log-probs.

A pair is tokenized as prompt ids (the template's generation prompt) plus the chosen and rejected
completion ids (the rest of the rendered conversation), each piece tokenized without special tokens,
so a template's BOS/EOS appear exactly once. Pairs that cannot teach anything (both sides the same
after truncation, an empty side, a prompt that leaves no room for the answer) are damaged: listed with
file:line and left out; more than ``preference.max_damaged_share`` of them refuses the run.
Scoring sums a completion's token log-probs; the implicit reward of DPO is beta times the policy's
log-prob minus the reference's.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

from ftune.errors import MAX_LISTED_PROBLEMS, FtuneError


@dataclass
class Pairs:
    rows: list[dict]  # {"prompt_ids", "chosen_ids", "rejected_ids"}
    damaged: list[str] = field(default_factory=list)  # "file:line: why"


def render_pair(tokenizer, record) -> tuple[str, str, str]:
    """(prompt text, chosen completion text, rejected completion text), each rendered once by the template."""
    prompt = record.value["prompt"]
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    completions = []
    for side in ("chosen", "rejected"):
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": record.value[side]}], tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError("the chat template renders the prompt differently once the answer follows; check data.chat_template")
        completions.append(full[len(prompt_text):])
    return prompt_text, *completions


def tokenize_pairs(tokenizer, records, *, max_length: int, max_prompt_length: int | None) -> Pairs:
    pairs = Pairs([])
    for record in records:
        try:
            prompt_text, chosen, rejected = render_pair(tokenizer, record)
        except ValueError as exc:
            pairs.damaged.append(f"{record.origin}: {exc}")
            continue
        prompt_ids, chosen_ids, rejected_ids = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prompt_text, chosen, rejected))
        if max_prompt_length is not None:
            prompt_ids = prompt_ids[-max_prompt_length:]  # the end of the prompt is what the answer follows
        room = max_length - len(prompt_ids)
        why = None
        if not record.value["chosen"].strip() or not record.value["rejected"].strip():
            why = "an empty chosen or rejected answer"
        elif room <= 0:
            why = f"the prompt alone is {len(prompt_ids)} tokens, data.max_length {max_length} cuts away the whole answer"
        elif chosen_ids[:room] == rejected_ids[:room]:
            why = f"chosen and rejected are identical within data.max_length {max_length}"
        if why:
            pairs.damaged.append(f"{record.origin}: {why}")
        else:
            pairs.rows.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
    return pairs


def check_damage(pairs: Pairs, total: int, max_share: float, split: str) -> str | None:
    """Refuse above ``max_share`` damaged pairs; else a note naming the first ones (None when none)."""
    if not pairs.damaged:
        return None
    share = len(pairs.damaged) / max(total, 1)
    listed = pairs.damaged[:MAX_LISTED_PROBLEMS]
    if share > max_share or not pairs.rows:
        raise FtuneError(
            *listed, f"{split}: {len(pairs.damaged)} of {total} preference pairs are damaged ({100 * share:.1f}%), above "
            f"preference.max_damaged_share {max_share}; fix these rows, raise data.max_length, or raise preference.max_damaged_share",
        )
    return f"{split}: left out {len(pairs.damaged)} damaged preference pairs, first: {listed[0]}"


def completion_logps(model, rows: list[dict], *, batch_size: int = 8, max_length: int | None = None) -> list[tuple[float, float]]:
    """(chosen, rejected) summed completion log-probs of each pair under ``model``, truncated like training."""
    import torch

    device = next(model.parameters()).device
    results = []
    sequences = []
    for row in rows:
        for side in ("chosen_ids", "rejected_ids"):
            ids = row["prompt_ids"] + row[side]
            mask = [0] * len(row["prompt_ids"]) + [1] * len(row[side])
            if max_length is not None:
                ids, mask = ids[:max_length], mask[:max_length]
            sequences.append((ids, mask))
    scores = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
            attention = torch.zeros(len(chunk), width, dtype=torch.long)
            scored = torch.zeros(len(chunk), width, dtype=torch.bool)
            for i, (ids, mask) in enumerate(chunk):
                input_ids[i, :len(ids)] = torch.tensor(ids)
                attention[i, :len(ids)] = 1
                scored[i, :len(ids)] = torch.tensor(mask, dtype=torch.bool)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
            logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            scores += (logps * scored[:, 1:].to(device)).sum(dim=1).tolist()
    for i in range(0, len(scores), 2):
        results.append((scores[i], scores[i + 1]))
    return results


def adapter_switched_off(model):
    """Context in which ``model`` computes as its base: peft adapters disabled; a plain model is its own base."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) and hasattr(model, "peft_config") else nullcontext()


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


def reward_scores(model, rows: list[dict], *, pad_token_id: int, batch_size: int = 8,
                  max_length: int | None = None) -> list[tuple[float, float]]:
    """(chosen, rejected) scores of each pair under a one-output sequence classifier (a reward model)."""
    import torch

    device = next(model.parameters()).device
    sequences = [(r["prompt_ids"] + r[side])[:max_length] for r in rows for side in ("chosen_ids", "rejected_ids")]
    scores = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            attention = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, ids in enumerate(chunk):
                input_ids[i, :len(ids)] = torch.tensor(ids)
                attention[i, :len(ids)] = 1
            scores += model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits[:, 0].float().tolist()
    return [(scores[i], scores[i + 1]) for i in range(0, len(scores), 2)]


def reward_metrics(scores: list[tuple[float, float]]) -> dict:
    n = max(len(scores), 1)
    return {"pairwise_accuracy": sum(c > r for c, r in scores) / n, "reward_margin": sum(c - r for c, r in scores) / n,
            "samples": len(scores)}
