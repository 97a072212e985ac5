"""Where peft's prefixes start (``init`` of prefix, ptuning_v2 and mam): a fresh model that is the base, or close to it.

peft's prefixes join the attention softmax as extra key/value pairs; they start as random vectors, so a fresh model
attends to noise in every layer (SmolLM2's first loss ~12 where the base has ~0.8). No finite prefix leaves that
softmax unchanged, so ``init: gated`` (the default) puts a gate on it, in the decomposition of He et al. (2022):

    attention = (sum_real e^s v + g * sum_prefix e^s v) / (sum_real e^s + g * sum_prefix e^s)

with one gate ``g >= 0`` per layer and head, starting at 0: the fresh model computes exactly what the base computes,
and ``g``'s gradient at 0 (the prefixes' mean value minus the attention output) is not zero, so training opens the
gates where prefixes help (clamped at 0 from below: a gate pushed below it stays shut). The gates are small modules
beside each attention block, trained and saved by peft as ``modules_to_save``; an attention implementation registered
with transformers (``GATED_PREFIX``, eager arithmetic) reads them. Models whose attention does not go through
transformers' attention interface (BLOOM) cannot take the gates: ``init: gated`` falls back to ``tokens`` there.

``init: tokens`` (and the gated start) sets the prefixes to the base model's own keys and values for real tokens
(drawn from the vocabulary), so prefixes start at the scale real keys and values have; ungated, a fresh model is the
base reading those tokens first. ``init: random`` keeps peft's start.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any

import torch
from torch import nn

GATED_PREFIX = "ftune_gated_prefix"
GATE_NAME = "prefix_gate"
# Set on the key/value cache peft builds its prefixes into, and copied onto each attention block as a layer starts:
# how many leading key columns of this run are prefixes (0 for a run without them, such as the base's own).
PREFIX_MARK = "ftune_prefix_length"


class PrefixGate(nn.Module):
    """Per-head gates on the prefix columns' attention weights; they start closed (0)."""

    def __init__(self, heads: int, *, device: torch.device) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(heads, device=device))

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        """The prefix columns of unnormalised attention weights ``(batch, heads, queries, prefix)``, gated."""
        return weights * self.gate.clamp(min=0).to(weights.dtype).view(1, -1, 1, 1)


def gated_prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           softcap: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (transformers' arithmetic) with the prefix columns' weights multiplied by the layer's gate."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    scores = scores.float()
    gate = getattr(module, GATE_NAME, None)
    prefix = getattr(module, PREFIX_MARK, 0) if gate is not None else 0
    if prefix <= 0:
        weights = torch.softmax(scores, dim=-1)
    else:
        module.ftune_gate_reached = True
        # exp's shift: the largest score of the row, prefixes included (a shut prefix's weight stays a finite 0)
        shift = torch.nan_to_num(scores.detach().amax(-1, keepdim=True), neginf=0.0)
        exp = torch.exp(scores - shift)
        exp = torch.cat([gate(exp[..., :prefix]), exp[..., prefix:]], dim=-1)
        total = exp.sum(-1, keepdim=True)
        # A padding query sees no real key: with its gates shut it sums to 0, and weights 0 (not 0/0, nor a huge gradient).
        weights = exp / torch.where(total > 0, total, torch.ones_like(total))
    weights = nn.functional.dropout(weights.to(query.dtype), p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def register() -> None:
    """Make ``GATED_PREFIX`` an attention implementation transformers can dispatch to (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(GATED_PREFIX, gated_prefix_attention)
    AttentionMaskInterface.register(GATED_PREFIX, eager_mask)  # an additive float mask, as eager attention takes


def attention_blocks(model: nn.Module) -> list[str]:
    """Names of the modules that call transformers' attention interface: ``*Attention`` modules with a layer index."""
    return [name for name, module in model.named_modules()
            if type(module).__name__.endswith("Attention") and isinstance(getattr(module, "layer_idx", None), int)]


def _read_the_mark(module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    setattr(module, PREFIX_MARK, getattr(cache, PREFIX_MARK, 0))


def mark_prefix_caches(peft_model) -> None:
    """peft's prefix caches carry their length (``PREFIX_MARK``), so the gates act on prefix columns only."""
    get_prompt = peft_model.get_prompt
    if getattr(get_prompt, PREFIX_MARK, False):
        return

    def marked(*args, **kwargs):
        cache = get_prompt(*args, **kwargs)
        setattr(cache, PREFIX_MARK, peft_model.active_peft_config.num_virtual_tokens)
        return cache

    setattr(marked, PREFIX_MARK, True)
    peft_model.get_prompt = marked


def insert_gates(model: nn.Module) -> list[str]:
    """Give every attention block a closed gate and switch the model to ``GATED_PREFIX``; returns the gates' names
    (for peft's ``modules_to_save``), or [] with the model unchanged where its attention does not read them."""
    blocks = attention_blocks(model)
    config = model.config.get_text_config()
    if not blocks or len(blocks) != getattr(config, "num_hidden_layers", -1):
        return []
    device = next(model.parameters()).device
    heads = int(config.num_attention_heads)
    hooks = []
    for name in blocks:
        block = model.get_submodule(name)
        block.add_module(GATE_NAME, PrefixGate(heads, device=device))
        hooks.append(block.register_forward_pre_hook(_read_the_mark, with_kwargs=True))
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(GATED_PREFIX)
    if _gates_hold(model, blocks, config, device):
        return [f"{name}.{GATE_NAME}" for name in blocks]
    model.set_attn_implementation(previous)
    for name, hook in zip(blocks, hooks):
        hook.remove()
        delattr(model.get_submodule(name), GATE_NAME)
    return []


def _gates_hold(model: nn.Module, blocks: list[str], config, device: torch.device) -> bool:
    """Probe: with the gates closed, every gate is read and two different random prefixes give the same output
    (BLOOM's attention, for one, bypasses transformers' interface and with it the gates)."""
    from transformers import DynamicCache

    ids = torch.tensor([[1, 2, 3]], device=device)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    dtype = next(model.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    outputs = []
    try:
        with torch.no_grad():
            for _ in range(2):
                cache = DynamicCache(config=model.config)
                for layer in range(config.num_hidden_layers):
                    cache.update(torch.randn(1, kv_heads, 2, head_dim, device=device, dtype=dtype),
                                 torch.randn(1, kv_heads, 2, head_dim, device=device, dtype=dtype), layer)
                setattr(cache, PREFIX_MARK, 2)
                for block in blocks:
                    model.get_submodule(block).ftune_gate_reached = False
                mask = torch.ones((1, 5), dtype=torch.long, device=device)
                outputs.append(model(input_ids=ids, attention_mask=mask, **{name: cache}).logits.float())
                if not all(model.get_submodule(block).ftune_gate_reached for block in blocks):
                    return False
    except (TypeError, ValueError, RuntimeError, AttributeError):
        return False
    return torch.allclose(outputs[0], outputs[1], atol=1e-5 * max(1.0, outputs[0].abs().max().item()), rtol=0)


def saved_gates(peft_config) -> list[str]:
    """The gates a saved prefix adapter was trained with (its ``modules_to_save``)."""
    return [name for name in peft_config.modules_to_save or [] if name.endswith(f".{GATE_NAME}")]


def restore_gates(model: nn.Module, directory) -> None:
    """Before peft loads a saved prefix adapter: put back the gates it holds, with the attention that reads them."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(directory))
    names = saved_gates(config)
    if names and insert_gates(model) != names:
        from ftune.errors import FtuneError

        raise FtuneError(f"method: the prefix gates saved in {directory} do not fit this base model's attention blocks")


@contextlib.contextmanager
def gates_open(model: nn.Module):
    """Every gate at 1 for the duration (the check that prefixes reach attention), then back where it was."""
    gates = [module.gate for module in model.modules() if isinstance(module, PrefixGate)]
    saved = [gate.detach().clone() for gate in gates]
    with torch.no_grad():
        for gate in gates:
            gate.fill_(1.0)
    try:
        yield
    finally:
        with torch.no_grad():
            for gate, value in zip(gates, saved):
                gate.copy_(value)


def start_from_tokens(peft_model, ids: torch.Tensor | None = None) -> bool:
    """Set the prefixes to the base's keys and values for ``ids`` (``num_virtual_tokens`` vocabulary tokens drawn at
    random unless given); False (prefixes left as peft made them) where the base returns no key/value cache or peft's
    prefixes do not read back as those keys and values (a layout of its own)."""
    config = peft_model.active_peft_config
    encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    base = peft_model.get_base_model()
    weight = encoder.embedding.weight
    if ids is None:
        ids = torch.randint(0, base.config.get_text_config().vocab_size, (1, config.num_virtual_tokens), device=weight.device)
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    backbone = getattr(base, base.base_model_prefix, base)  # a classifier's own output holds no cache
    with torch.no_grad():
        try:
            cache = backbone(input_ids=ids, use_cache=True).cache  # no prefix mark: the gates leave this run alone
            expected = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
            # (layers, key/value, heads, tokens, head_dim) -> peft's (tokens, layers * 2 * heads * head_dim)
            target = expected.permute(3, 0, 1, 2, 4).reshape(config.num_virtual_tokens, -1).to(weight.dtype)
            if config.prefix_projection:  # the MLP's last layer solved so that it maps the token embeddings onto the target
                hidden = encoder.transform[:-1](weight)
                ones = torch.ones_like(hidden[:, :1])
                solution = torch.linalg.lstsq(torch.cat([hidden, ones], 1).float(), target.float()).solution
                encoder.transform[-1].weight.copy_(solution[:-1].T)
                encoder.transform[-1].bias.copy_(solution[-1])
            else:
                weight.copy_(target)
            prompt = peft_model.get_prompt(1)
            got = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in prompt.layers])
            matches = torch.allclose(got.float(), expected.float(), atol=1e-3, rtol=1e-3)
        except (RuntimeError, AttributeError, ValueError):  # shapes that differ, a cache without layers
            matches = False
        if not matches:
            for name, p in encoder.named_parameters():
                p.copy_(before[name])
    return matches


def warn_fallback(method: str, what: str) -> None:
    warnings.warn(f"method: {method}: {what}", stacklevel=3)
