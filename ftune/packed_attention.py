"""sdpa over packed rows, example by example, with a batch's common prompt prefix computed once.

transformers runs sdpa on a packed row of N tokens as one N x N attention with a block-diagonal
mask: ~N^2 work where the examples need only the sum of their own squares, and no causal skipping.
``PACKED_SDPA`` is sdpa called once per example instead (causal, no mask), registered with
transformers' attention interface, so packing costs no more attention than padding does.

It also reads one layout transformers has no name for: a shared prefix. When every example of a
batch opens with the same tokens (a system prompt, a fixed instruction) up to before its first
label, the row holds the first example whole and then only the remainder of each other one, whose
position ids carry on from the prefix's length instead of restarting at 0::

    position ids  0 1 2 3 4 5 6 | 4 5 6 7 | 4 5
                  example 1       ex. 2     ex. 3    (prefix: 4 tokens)

Each remainder attends to the first example's prefix and causally to itself. A causal model's hidden states over
the prefix are the same in every example, so the logits at every remainder position, the loss and
the gradients are those of the examples trained apart (the prefix's gradient sums theirs), while the
prefix's tokens are computed once instead of once per example. On the quickstart data (49 shared
tokens of ~86 per row, batch 8) that halves the tokens the model runs.

Everything about the layout is in the position ids, so ``segments`` recovers it in each layer; rows
without packed position ids (generation, single examples) go to transformers' sdpa unchanged.
``verify`` checks once per model, before training, that the model's attention really receives the
position ids and that the layout reproduces the examples' logits; where it does not, ftune keeps
transformers' sdpa and does not share prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PACKED_SDPA = "ftune_packed_sdpa"
# Devices whose sdpa keeps a fused kernel for grouped-query attention with a mask (CPU's flash kernel does). On CUDA
# only the math kernel takes both, so the key/value heads are repeated for the masked calls there instead.
MASKED_GQA_DEVICES = {"cpu"}


@dataclass(frozen=True)
class Segment:
    """Row positions [start, end); ``prefix`` tokens of the row from ``prefix_start`` come before it (0: none)."""

    start: int
    end: int
    prefix_start: int = 0
    prefix: int = 0


def segments(position_ids: list[int]) -> list[Segment]:
    """The examples of a packed row from its position ids: a run restarting at 0 is an example; a run starting at
    p > 0 is the remainder of an example whose first p tokens are those of the last run that restarted at 0."""
    found: list[Segment] = []
    root: Segment | None = None
    start = 0
    for index in range(1, len(position_ids) + 1):
        if index < len(position_ids) and position_ids[index] == position_ids[index - 1] + 1:
            continue
        offset = position_ids[start]
        if offset == 0:
            root = Segment(start, index)
            found.append(root)
        elif root is not None and root.end - root.start >= offset:
            found.append(Segment(start, index, root.start, offset))
        else:
            raise ValueError(f"packed position ids: the run at row position {start} starts at {offset}, "
                             "past the end of the example it would continue")
        start = index
    return found


def example_tokens(position_ids: list[int]) -> int:
    """Tokens of the examples a packed row holds, a shared prefix counted once per example that reads it."""
    return sum(segment.end - segment.start + segment.prefix for segment in segments(position_ids))


class _LayoutCache:
    """The segments of the last position-ids tensor seen: every layer of a forward pass gets the same tensor."""

    tensor: Any = None
    found: list[Segment] | None = None

    def of(self, position_ids) -> list[Segment]:
        if position_ids is not self.tensor:
            self.found = segments(position_ids[0].tolist())
            self.tensor = position_ids  # held, so the identity check cannot match a new tensor at a reused address
        return self.found


_layouts = _LayoutCache()


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature; (batch, heads, positions, head dim) in, (batch, positions, heads,
    head dim) out."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    found = None
    if position_ids is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2] == position_ids.shape[-1] > 1:
        found = _layouts.of(position_ids)
    if not found or len(found) == 1 and not found[0].prefix:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    window = kwargs.get("sliding_window")
    groups = getattr(module, "num_key_value_groups", 1)
    outputs = []
    for segment in found:
        length = segment.end - segment.start
        keys, values = key[:, :, segment.start:segment.end], value[:, :, segment.start:segment.end]
        if segment.prefix:
            shared = slice(segment.prefix_start, segment.prefix_start + segment.prefix)
            keys, values = torch.cat([key[:, :, shared], keys], dim=2), torch.cat([value[:, :, shared], values], dim=2)
        mask = None
        if segment.prefix or (window and length > window):
            query_at = torch.arange(segment.prefix, segment.prefix + length, device=query.device)[:, None]
            key_at = torch.arange(segment.prefix + length, device=query.device)[None, :]
            mask = key_at <= query_at
            if window:
                mask &= query_at - key_at < window
        grouped = groups > 1
        if grouped and mask is not None and query.device.type not in MASKED_GQA_DEVICES:
            keys, values, grouped = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1), False
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, segment.start:segment.end], keys, values, attn_mask=mask, dropout_p=dropout, scale=scaling,
            is_causal=mask is None, enable_gqa=grouped))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``PACKED_SDPA`` an attention implementation transformers can dispatch to (idempotent)."""
    import torch
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    # Compiled decoder layers call it eagerly: its per-example loop depends on the batch's layout.
    AttentionInterface.register(PACKED_SDPA, torch.compiler.disable(packed_sdpa_attention))
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # padded rows keep sdpa's own masks


def set_attention(model, implementation: str) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(implementation)


def verify(model) -> str | None:
    """Switch ``model`` (sdpa) to ``PACKED_SDPA`` when it reproduces the examples' logits on a shared-prefix probe
    row; returns why not, or None. The model keeps sdpa when it returns a reason."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation != "sdpa":
        return f"attention is {base.config._attn_implementation}, not sdpa"
    register()
    vocab = base.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    prefix, tails = torch.randint(3, vocab, (5,), generator=generator), [torch.randint(3, vocab, (n,), generator=generator) for n in (3, 4)]
    device = next(model.parameters()).device
    row = torch.cat([prefix, *tails])[None].to(device)
    positions = torch.tensor([*range(5), *range(5, 8), *range(5, 9)], device=device)[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            apart = [model(input_ids=torch.cat([prefix, tail])[None].to(device)).logits[0, 5:].float() for tail in tails]
            set_attention(model, PACKED_SDPA)
            shared = model(input_ids=row, position_ids=positions, use_cache=False).logits[0].float()
    finally:
        model.train(was_training)
    expected = torch.cat(apart)  # the tails' logits, in row order after the prefix
    tolerance = 1e-4 if next(base.parameters()).dtype == torch.float32 else 3e-2
    if (shared[5:] - expected).abs().max() > tolerance * expected.abs().max().clamp(min=1.0):
        set_attention(model, "sdpa")
        return f"{type(base).__name__}'s attention does not see packed position ids"
    return None
