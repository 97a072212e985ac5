"""A model's parameter layout from its ``config.json``, and the tensors each method trains on it, for ``ftune plan``.

The layout lists the linears of one layer (name, in, out, bias) and counts everything else, for
Llama-style decoders and BERT-style encoders (``families`` says which model types have which); the
method's ``plan_rule`` (a class attribute of its recipe section) picks how its trained tensors are sized.
Nothing here imports torch or transformers: hub models are read as their config file alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ftune.errors import FtuneError
from ftune.families import BERT_LAYOUT, DISTILBERT_LAYOUT, FAMILIES
from ftune.recipe import Recipe, method_class


@dataclass(frozen=True)
class Layout:
    """Parameter layout read from a model config: per-layer linears (name, in, out, bias) and the rest."""

    kind: str  # "decoder" | "encoder"
    hidden: int
    intermediate: int
    kv_width: int
    layers: int
    vocab: int
    linears: tuple[tuple[str, int, int, bool], ...]
    layer_norm_params: int  # per layer
    other_params: int  # embeddings, final norm, untied head, pooler
    other_biases: int  # bias vectors outside the layer linears (LayerNorm and pooler biases), for BitFit
    heads: int = 0  # attention (query) heads per layer: the gated prefix start trains one gate per head and layer

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o + (o if b else 0) for _, i, o, b in self.linears)

    @property
    def layer_params(self) -> int:
        return self.linear_params // self.layers + self.layer_norm_params

    @property
    def total_params(self) -> int:
        return self.linear_params + self.layers * self.layer_norm_params + self.other_params


def read_model_config(recipe: Recipe) -> dict:
    """The model's config.json as a dict, without importing transformers (hub ids fetch just that file)."""
    from ftune.model import resolve_model_source

    source = resolve_model_source(recipe.model)
    path = Path(source.location)
    if path.is_dir():
        config = path / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            config = Path(hf_hub_download(source.location, "config.json", revision=recipe.model.revision))
        except Exception as exc:  # offline, gated, or missing: all say the same to the user
            raise FtuneError(f"model.name_or_path: cannot read the config of '{source.location}': {exc.__class__.__name__}") from None
    if not config.is_file():
        raise FtuneError(f"model.name_or_path: {config} not found; ftune plan reads the model's config.json")
    return json.loads(config.read_text())


def build_layout(config: dict) -> Layout:
    model_type = config.get("model_type")
    if model_type in DISTILBERT_LAYOUT:  # BERT's sizes under its own names, and no token types
        renamed = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "hidden_dim": "intermediate_size", "n_heads": "num_attention_heads"}
        config = {**config, **{bert: config[own] for own, bert in renamed.items() if own in config}, "type_vocab_size": 0}
    needed = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")
    if any(key not in config for key in needed):
        raise FtuneError(f"ftune plan: cannot lay out model_type '{model_type}'; it knows Llama-style decoders and BERT-style encoders")
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    intermediate, vocab = config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    if model_type in BERT_LAYOUT or model_type in DISTILBERT_LAYOUT:
        if model_type in DISTILBERT_LAYOUT:
            q, k, v, o, up, down = "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2"
        else:
            q, k, v, o, up, down = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                                    "intermediate.dense", "output.dense")
        linears = (
            (q, hidden, hidden, True), (k, hidden, hidden, True), (v, hidden, hidden, True), (o, hidden, hidden, True),
            (up, hidden, intermediate, True), (down, intermediate, hidden, True),
        )
        width = config.get("embedding_size") or hidden  # ELECTRA's embeddings can be narrower, projected up to the layers
        projection = width * hidden + hidden if width != hidden else 0
        embeddings = (vocab + config.get("max_position_embeddings", 512) + config.get("type_vocab_size", 2)) * width + 2 * width
        # The hidden x hidden dense under the classifier: BERT's pooler, RoBERTa's and ELECTRA's head, DistilBERT's pre_classifier.
        other = embeddings + projection + hidden * hidden + hidden
        biases = layers * 2 * hidden + width + (hidden if projection else 0) + hidden  # LayerNorms, projection, dense
        return Layout("encoder", hidden, intermediate, hidden, layers, vocab, linears, 4 * hidden, other, biases, heads)
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    family = FAMILIES.get(model_type)
    attn_bias = bool(config.get("attention_bias", family is not None and family.qkv_bias))
    mlp_bias = bool(config.get("mlp_bias", False))
    linears = (
        ("self_attn.q_proj", hidden, heads * head_dim, attn_bias), ("self_attn.k_proj", hidden, kv * head_dim, attn_bias),
        ("self_attn.v_proj", hidden, kv * head_dim, attn_bias), ("self_attn.o_proj", heads * head_dim, hidden, False),
        ("mlp.gate_proj", hidden, intermediate, mlp_bias), ("mlp.up_proj", hidden, intermediate, mlp_bias),
        ("mlp.down_proj", intermediate, hidden, mlp_bias),
    )
    tied = config.get("tie_word_embeddings", True)
    other = vocab * hidden * (1 if tied else 2) + hidden  # embeddings (+ untied head), final RMSNorm
    return Layout("decoder", hidden, intermediate, kv * head_dim, layers, vocab, linears, 2 * hidden, other, 0, heads)


def targeted(layout: Layout, targets) -> list[tuple[str, int, int, bool]]:
    """The per-layer linears a target_modules setting adapts (peft matches names by suffix)."""
    if targets in (None, "all-linear"):
        return list(layout.linears)
    return [lin for lin in layout.linears if any(lin[0] == t or lin[0].endswith("." + t) for t in targets)]


def trainable_shapes(recipe: Recipe, layout: Layout) -> tuple[list[tuple[int, int]], bool]:
    """Shapes of the trained tensors (a vector is (n, 1)), and whether they only approximate the method."""
    cls = method_class(recipe.method.name)
    shapes, exact = TRAINABLE_SHAPES[cls.plan_rule](recipe.method, layout)
    return shapes, not (cls.plan_exact and exact)


def _layer_shapes(layout: Layout) -> list[tuple[int, int]]:
    return [(o, i) for _, i, o, _ in layout.linears] + [(o, 1) for _, _, o, bias in layout.linears if bias] + [(layout.layer_norm_params, 1)]


def _top_layers(method, layout: Layout):
    count = method.trainable_layers if isinstance(method.trainable_layers, int) else len(method.trainable_layers)
    return _layer_shapes(layout) * count, not method.extra_modules  # extra modules are named, not sized, in the config


def _low_rank(method, layout: Layout, *, factors: int = 1):
    rank, lins = _rank(method), targeted(layout, getattr(method, "target_modules", "all-linear"))
    shapes = [s for _, i, o, _ in lins for s in ((rank, i), (o, rank))] * (layout.layers * factors)
    if getattr(method, "use_dora", False):
        shapes += [(o, 1) for _, _, o, _ in lins] * layout.layers
    return shapes, True


def _rank(method) -> int:
    return getattr(method, "r", None) or getattr(method, "init_r", None) or 8


def _prefixes(method, layout: Layout):
    # peft sizes each layer's key and value prefix by the key/value width (grouped-query models: kv heads x head_dim).
    width, cache = layout.kv_width, 2 * layout.layers * layout.kv_width
    shapes = [(method.num_virtual_tokens, width if getattr(method, "prefix_projection", False) else cache)]
    if getattr(method, "prefix_projection", False):  # peft's MLP: Linear(width, hidden) -> tanh -> Linear(hidden, cache)
        hidden = method.encoder_hidden_size
        shapes += [(hidden, width), (hidden, 1), (cache, hidden), (cache, 1)]
    # ftune.methods.prefix_start's gated start: one gate per attention head and layer (decoders and BERT-style encoders
    # alike; the architectures whose attention cannot take them, BLOOM, have no layout here).
    if getattr(method, "init", None) == "gated":
        shapes.append((layout.layers * layout.heads, 1))
    return shapes, True


def _vera(method, layout: Layout):
    lins = targeted(layout, getattr(method, "target_modules", "all-linear"))
    return [(o + _rank(method), 1) for _, _, o, _ in lins] * layout.layers, True


# ``MethodBase.plan_rule`` -> (method section, layout) -> (shapes, exact as far as the rule goes).
TRAINABLE_SHAPES = {
    "all": lambda method, layout: (_layer_shapes(layout) * layout.layers + [(layout.other_params, 1)], True),
    "top_layers": _top_layers,
    "biases": lambda method, layout: ([(o, 1) for _, _, o, bias in layout.linears if bias] * layout.layers
                                      + [(layout.other_biases, 1)], True),
    "virtual_tokens": lambda method, layout: ([(method.num_virtual_tokens, layout.hidden)], True),
    "prefixes": _prefixes,
    "scaling_vectors": lambda method, layout: ([(o, 1) for _, _, o, _ in targeted(layout, getattr(method, "target_modules", "all-linear"))]
                                               * layout.layers, True),
    "vera": _vera,
    "low_rank": _low_rank,
    "low_rank_pair": lambda method, layout: _low_rank(method, layout, factors=2),
}
