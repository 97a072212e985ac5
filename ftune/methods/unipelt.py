"""UniPELT (Mao et al. 2022), implemented natively on Llama-family decoder layers.

Every layer gets three parts, each multiplied by its own gate ``sigmoid(W_g h)`` (one scalar per
token): LoRA on the query and value projections, a prefix on attention and a sequential bottleneck
adapter after the feed-forward block. The LoRA and prefix gates read the attention input (the
layer's hidden state after its input norm, which is what q_proj and v_proj read); the adapter gate
reads the feed-forward block's output, which is the adapter's own input. ``gates: false`` drops the
gates (each part enters with factor 1), for ablation.

Why native and not peft: peft's LoRA and prefix tuning have no hook for a gate computed from the
hidden state, and peft's prefixes enter through the key/value cache, where nothing per-token can
scale them. The prefix is therefore added in a wrapper around the attention module, in the
decomposition of He et al. (2022): prefix tuning adds ``lambda(x) * softmax(q P_k^T) P_v`` to the
attention output (and shrinks the rest by ``1 - lambda``); UniPELT's gate takes the place of
``lambda``, so the wrapper adds ``gate * o_proj(softmax(q P_k^T / sqrt(d)) P_v)`` to an attention
output it leaves untouched. The query is the (LoRA-adapted) q_proj output before rotary embedding:
prefix keys have no position, as in peft. Values ``P_v``, LoRA's ``B`` and the adapter's
up-projection start at zero, so a fresh model computes exactly what the base computes.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ftune.errors import FtuneError
from ftune.families import with_capability
from ftune.methods.adapter import BottleneckDelta, WrapsBaseLayer
from ftune.methods.heads import task_head_names
from ftune.methods.peft_family import prepare_quantized

WEIGHTS_NAME = "unipelt_model.safetensors"
CONFIG_NAME = "unipelt_config.json"
# Decoder families whose layers hold self_attn.{q,v,o}_proj and an mlp block taking and returning the hidden state.
FAMILIES = with_capability("unipelt")
PART = re.compile(r"\.(lora_A|lora_B|gate|adapter)\.|\.prefix_(keys|values)$")  # names of UniPELT's own parameters


def _dtype_of(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    weight = next(module.parameters())
    return weight.device, weight.dtype if weight.dtype.is_floating_point else torch.float32  # float32 beside quantized weights


class Gate(nn.Module):
    """``sigmoid(W_g h)``: one factor in (0, 1) per token."""

    def __init__(self, hidden: int, *, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, 1, device=device, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(h.to(self.proj.weight.dtype))).to(h.dtype)


class GatedLoraLinear(WrapsBaseLayer):
    """``base(x) + gate(x) * B(A(x)) * alpha / r``; v_proj borrows q_proj's gate (one LoRA gate per layer)."""

    OWN = ("base_layer", "gate")

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, gate: Gate | None, owns_gate: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        device, dtype = _dtype_of(base_layer)
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default LoRA init
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / r
        if owns_gate:
            self.gate = gate
        else:  # a plain attribute, so the shared gate is saved once, under q_proj
            object.__setattr__(self, "shared_gate", gate)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        delta = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scale
        gate = self._modules.get("gate") or self.__dict__.get("shared_gate")
        if gate is not None:
            delta = delta * gate(x).to(delta.dtype)
        return out + delta.to(out.dtype)


class GatedPrefixAttention(WrapsBaseLayer):
    """The attention block plus ``gate(x) * o_proj(softmax(q P_k^T / sqrt(d)) P_v)`` (see the module docstring)."""

    OWN = ("base_layer", "gate")

    def __init__(self, base_layer: nn.Module, num_virtual_tokens: int, heads: int, head_dim: int, gate: Gate | None) -> None:
        super().__init__()
        self.base_layer = base_layer
        device, dtype = _dtype_of(base_layer)
        self.heads, self.head_dim = heads, head_dim
        self.prefix_keys = nn.Parameter(torch.randn(heads, num_virtual_tokens, head_dim, device=device, dtype=dtype))
        self.prefix_values = nn.Parameter(torch.zeros(heads, num_virtual_tokens, head_dim, device=device, dtype=dtype))
        self.gate = gate

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        out = self.base_layer(*args, **kwargs)
        attention, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        query = self.base_layer.q_proj(x)
        batch, length, _ = query.shape
        query = query.view(batch, length, self.heads, self.head_dim).transpose(1, 2).to(self.prefix_keys.dtype)
        weights = torch.softmax(query @ self.prefix_keys.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        mixed = (weights @ self.prefix_values).transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)
        if self.gate is not None:
            mixed = mixed * self.gate(x).to(mixed.dtype)
        o_proj = self.base_layer.o_proj
        delta = o_proj(mixed.to(x.dtype))
        if getattr(o_proj, "bias", None) is not None:
            delta = delta - o_proj.bias  # the block's own output already carries the bias once
        attention = attention + delta.to(attention.dtype)
        return (attention, *rest) if rest is not None else attention


class GatedAdapterMLP(WrapsBaseLayer):
    """``h + gate(h) * up(act(down(h)))`` with ``h = mlp(x)``: the sequential adapter after the feed-forward block."""

    OWN = ("base_layer", "gate")

    def __init__(self, base_layer: nn.Module, hidden: int, bottleneck: int, non_linearity: str, gate: Gate | None) -> None:
        super().__init__()
        self.base_layer = base_layer
        device, dtype = _dtype_of(base_layer)
        self.adapter = BottleneckDelta(hidden, bottleneck, non_linearity, device=device, dtype=dtype)
        self.gate = gate

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_layer(*args, **kwargs)
        delta = self.adapter(h)
        if self.gate is not None:
            delta = delta * self.gate(h)
        return h + delta


def _layers(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise FtuneError(
            f"method: unipelt needs Llama-family decoder layers (self_attn.q_proj/v_proj/o_proj and an mlp block); "
            f"model_type {model_type!r} is not one of {', '.join(FAMILIES)}. Use method: lora, adapter or prefix instead"
        )
    if any(isinstance(m, (GatedLoraLinear, GatedPrefixAttention, GatedAdapterMLP)) for m in model.modules()):
        raise FtuneError("method: unipelt: the model already carries UniPELT modules")
    layers = [name.removesuffix(".self_attn") for name, _ in model.named_modules() if re.search(r"\.\d+\.self_attn$", name)]
    if not layers:
        raise FtuneError(f"method: unipelt: no numbered layers with a self_attn block in {type(model).__name__}")
    return layers


def apply_unipelt_modules(model: nn.Module, *, r: int, alpha: float, num_virtual_tokens: int, bottleneck: int,
                          non_linearity: str, gates: bool, modules_to_save: list[str]) -> dict:
    """Freeze the base, insert the three (gated) parts into every layer; returns the layout reloading needs."""
    layers = _layers(model)
    config = model.config
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in layers:
        layer = model.get_submodule(name)
        attention = layer.self_attn
        if attention.q_proj.out_features != heads * head_dim:
            raise FtuneError(f"method: unipelt: {name}.self_attn.q_proj is not {heads} heads x {head_dim} wide")
        device, dtype = _dtype_of(attention)

        def gate() -> Gate | None:
            return Gate(hidden, device=device, dtype=dtype) if gates else None

        lora_gate = gate()
        attention.q_proj = GatedLoraLinear(attention.q_proj, r, alpha, lora_gate, owns_gate=True)
        attention.v_proj = GatedLoraLinear(attention.v_proj, r, alpha, lora_gate, owns_gate=False)
        layer.self_attn = GatedPrefixAttention(attention, num_virtual_tokens, heads, head_dim, gate())
        layer.mlp = GatedAdapterMLP(layer.mlp, hidden, bottleneck, non_linearity, gate())
    for name in modules_to_save:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    layout = {
        "r": r, "alpha": alpha, "num_virtual_tokens": num_virtual_tokens, "bottleneck": bottleneck,
        "non_linearity": non_linearity, "gates": gates, "model_type": config.model_type, "layers": layers,
        "modules_to_save": list(modules_to_save),
    }
    model.unipelt_config = layout
    return layout


def unipelt_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    saved = tuple(f"{name}." for name in model.unipelt_config["modules_to_save"])
    return {name: param for name, param in model.named_parameters() if PART.search(name) or name.startswith(saved)}


def apply_unipelt(model: nn.Module, config: Any, task: str) -> nn.Module:
    apply_unipelt_modules(
        prepare_quantized(model), r=config.lora.r, alpha=config.lora.alpha, num_virtual_tokens=config.prefix.num_virtual_tokens,
        bottleneck=config.adapter.bottleneck, non_linearity=config.adapter.non_linearity, gates=config.gates,
        modules_to_save=task_head_names(model, task),
    )
    return model


def save_unipelt(model: nn.Module, directory: pathlib.Path) -> None:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in unipelt_state_dict(model).items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(model.unipelt_config, indent=2) + "\n")


def load_unipelt(load_base: Any, directory: pathlib.Path) -> nn.Module:
    directory = pathlib.Path(directory)
    layout = json.loads((directory / CONFIG_NAME).read_text())
    model = load_base()
    if model.config.model_type != layout["model_type"]:
        raise FtuneError(f"method: unipelt: the run was trained on a {layout['model_type']} model, not {model.config.model_type}")
    options = {k: layout[k] for k in ("r", "alpha", "num_virtual_tokens", "bottleneck", "non_linearity", "gates", "modules_to_save")}
    if apply_unipelt_modules(prepare_quantized(model), **options)["layers"] != layout["layers"]:
        raise FtuneError("method: unipelt: the base model's layers differ from those the run was saved from")
    saved = load_file(str(directory / WEIGHTS_NAME))
    params = unipelt_state_dict(model)
    if saved.keys() != params.keys():
        raise FtuneError(f"method: unipelt: {WEIGHTS_NAME} does not match the model: missing "
                         f"{sorted(params.keys() - saved.keys())}, unexpected {sorted(saved.keys() - params.keys())}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])
    return model
