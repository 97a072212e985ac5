"""Bottleneck adapters, implemented natively: sequential (Houlsby et al., 2019) or parallel (He et al., 2022).

A sequential adapter is a residual bottleneck ``h + up(act(down(h)))`` placed right after
the attention output projection and/or the feed-forward output projection of every
transformer layer, i.e. before the layer's own residual add. A parallel adapter wraps the whole
attention and/or feed-forward block instead: its bottleneck reads the block's *input* ``x`` and
``scaling * up(act(down(x)))`` is added to the block's output, so the adapter and the block see the
same hidden state side by side. Either way the up-projection starts at zero, so a freshly adapted
model computes exactly what the base model computes.
``apply_adapter``/``save_adapter``/``load_adapter`` at the end are the ``method: adapter`` steps.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ftune.errors import FtuneError
from ftune.families import FAMILIES
from ftune.methods.heads import task_head_names
from ftune.methods.peft_family import prepare_quantized

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"

# The modules whose output a sequential adapter transforms, and the blocks a parallel adapter sits beside (their
# first input is the hidden state the block reads, their first output what it adds to the residual stream), relative
# to one transformer layer; from ftune.families. Post-norm encoders (BERT) normalise inside their attention/output
# modules, so they have no block to wrap in parallel.
SUBLAYER_OUTPUTS: dict[str, dict[str, str]] = {
    model_type: {"attention": family.attention_output, "feed_forward": family.feed_forward_output}
    for model_type, family in FAMILIES.items() if family.attention_output and family.feed_forward_output
}
SUBLAYER_BLOCKS: dict[str, dict[str, str]] = {
    model_type: {"attention": family.attention_block, "feed_forward": family.feed_forward_block}
    for model_type, family in FAMILIES.items() if family.attention_block and family.feed_forward_block
}

STYLES = ("sequential", "parallel")

PLACEMENTS: dict[str, tuple[str, ...]] = {
    "both": ("attention", "feed_forward"),
    "attention": ("attention",),
    "feed_forward": ("feed_forward",),
}

NON_LINEARITIES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class BottleneckDelta(nn.Module):
    """``up(act(down(h)))``, with ``up`` zero-initialised so it starts as exactly zero."""

    def __init__(self, hidden: int, bottleneck: int, non_linearity: str, *, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, device=device, dtype=dtype)
        self.act = NON_LINEARITIES[non_linearity]()
        self.up = nn.Linear(bottleneck, hidden, device=device, dtype=dtype)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # The adapter may run in float32 beside a low-precision or quantized base.
        return self.up(self.act(self.down(h.to(self.up.weight.dtype)))).to(h.dtype)


class Bottleneck(BottleneckDelta):
    """``h + up(act(down(h)))``: starts as the identity."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + super().forward(h)


class WrapsBaseLayer(nn.Module):
    """A module standing in for ``self.base_layer``: attributes it lacks are the wrapped layer's, because
    model code sometimes reads ``o_proj.weight`` or ``c_proj.nf`` through the wrapper."""

    OWN = ("base_layer",)  # names that must never fall through to the wrapped layer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in type(self).OWN:
                raise
            return getattr(self.base_layer, name)


class BottleneckAdapterLayer(WrapsBaseLayer):
    """Holds the original module as ``base_layer`` so state-dict names stay predictable."""

    def __init__(self, base_layer: nn.Module, reduction_factor: int, non_linearity: str, bottleneck: int | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        hidden = _output_features(base_layer)
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.adapter = Bottleneck(
            hidden, bottleneck or max(1, hidden // reduction_factor), non_linearity, device=weight.device, dtype=dtype
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.adapter(self.base_layer(x, *args, **kwargs))


class ParallelAdapterLayer(WrapsBaseLayer):
    """A block with a bottleneck beside it: ``block(x) + scaling * up(act(down(x)))``.

    The bottleneck is called as a module (never through a method of it), so a wrapper that peft puts
    around it to train and save it (``modules_to_save``) is the one that runs.
    """

    def __init__(self, base_layer: nn.Module, hidden: int, bottleneck: int, non_linearity: str, scaling: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        weight = next(base_layer.parameters())
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.adapter = BottleneckDelta(hidden, bottleneck, non_linearity, device=weight.device, dtype=dtype)
        self.scaling = float(scaling)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Llama-family decoder layers pass the attention input as hidden_states=, the MLP input positionally.
        x = args[0] if args else kwargs["hidden_states"]
        out = self.base_layer(*args, **kwargs)
        if isinstance(out, tuple):  # attention blocks return (output, attention weights)
            return (out[0] + self.scaling * self.adapter(x).to(out[0].dtype), *out[1:])
        return out + self.scaling * self.adapter(x).to(out.dtype)


ADAPTER_LAYERS = (BottleneckAdapterLayer, ParallelAdapterLayer)


def _output_features(module: nn.Module) -> int:
    if hasattr(module, "out_features"):  # nn.Linear and its quantized subclasses
        return int(module.out_features)
    if hasattr(module, "nf"):  # transformers' Conv1D stores its weight transposed
        return int(module.nf)
    raise ValueError(f"cannot infer the output size of {type(module).__name__}")


def _sublayers(model: nn.Module, placement: str, style: str = "sequential") -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if style not in STYLES:
        raise ValueError(f"unknown adapter style {style!r}; expected one of {list(STYLES)}")
    table = SUBLAYER_OUTPUTS if style == "sequential" else SUBLAYER_BLOCKS
    if model_type not in table:
        raise ValueError(
            f"{style} bottleneck adapters do not support model_type {model_type!r}; supported architectures: "
            f"{', '.join(sorted(table))}. Use `method: lora` instead."
        )
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown adapter placement {placement!r}; expected one of {sorted(PLACEMENTS)}")
    return [table[model_type][part] for part in PLACEMENTS[placement]]


def apply_bottleneck_adapters(
    model: nn.Module,
    *,
    reduction_factor: int = 16,
    placement: str = "both",
    non_linearity: str = "gelu",
    modules_to_save: Sequence[str] = (),
    style: str = "sequential",
    scaling: float = 1.0,
    bottleneck: int | None = None,
) -> list[str]:
    """Freeze every base parameter, insert adapters, return the qualified names of the wrapped modules.

    ``modules_to_save`` names modules (e.g. a fresh classification head) that train in full and are
    saved with the adapters. ``style: parallel`` wraps whole blocks and scales the bottleneck's output
    by ``scaling``; ``bottleneck`` (a width) replaces ``hidden // reduction_factor`` when given.
    """
    suffixes = _sublayers(model, placement, style)
    if style == "sequential" and scaling != 1.0:
        raise ValueError("scaling applies to parallel adapters only; set style: parallel or remove scaling")
    if bottleneck is not None and (isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1):
        raise ValueError(f"bottleneck must be a positive integer width, got {bottleneck!r}")
    if non_linearity not in NON_LINEARITIES:
        raise ValueError(f"unknown adapter non_linearity {non_linearity!r}; expected one of {sorted(NON_LINEARITIES)}")
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, int) or reduction_factor < 1:
        raise ValueError(f"reduction_factor must be a positive integer, got {reduction_factor!r}")
    if any(isinstance(m, ADAPTER_LAYERS) for m in model.modules()):
        raise ValueError("model already has bottleneck adapters")
    module_names = dict(model.named_modules())
    unknown = [name for name in modules_to_save if name not in module_names]
    if unknown:
        raise ValueError(f"modules_to_save {unknown} are not modules of {type(model).__name__}")
    # Anchoring on the layer index keeps "output.dense" from also matching "attention.output.dense".
    pattern = re.compile(r"\.\d+\.(?:" + "|".join(re.escape(s) for s in suffixes) + r")$")
    targets = [name for name, _ in model.named_modules() if pattern.search(name)]
    if not targets:
        raise ValueError(f"no {' / '.join(suffixes)} modules found inside numbered layers of {type(model).__name__}")

    for param in model.parameters():
        param.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if style == "parallel":
            hidden = int(model.config.hidden_size)
            width = bottleneck or max(1, hidden // reduction_factor)
            layer = ParallelAdapterLayer(getattr(parent, child), hidden, width, non_linearity, scaling)
        else:
            layer = BottleneckAdapterLayer(getattr(parent, child), reduction_factor, non_linearity, bottleneck)
        setattr(parent, child, layer)
    for name in modules_to_save:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    model.bottleneck_adapter_config = {
        "reduction_factor": reduction_factor,
        "placement": placement,
        "non_linearity": non_linearity,
        "wrapped_modules": targets,
        "model_type": model.config.model_type,
        **({"modules_to_save": list(modules_to_save)} if modules_to_save else {}),
        # Written only when they differ from the sequential default, so older artifacts read the same.
        **({"style": style, "scaling": scaling} if style != "sequential" else {}),
        **({"bottleneck": bottleneck} if bottleneck is not None else {}),
    }
    return targets


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors (and those of ``modules_to_save``), keyed by their qualified parameter names in ``model``."""
    config = getattr(model, "bottleneck_adapter_config", None) or {}
    saved = tuple(f"{name}." for name in config.get("modules_to_save", ()))
    return {name: param for name, param in model.named_parameters() if ".adapter." in name or name.startswith(saved)}


def save_bottleneck_adapters(model: nn.Module, directory: pathlib.Path) -> None:
    """Write adapter weights only (adapter_model.safetensors) + adapter_config.json."""
    config = getattr(model, "bottleneck_adapter_config", None)
    if config is None:
        raise ValueError("model has no bottleneck adapters; call apply_bottleneck_adapters first")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in adapter_state_dict(model).items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def load_bottleneck_adapters(base_model: nn.Module, directory: pathlib.Path) -> nn.Module:
    """Re-insert adapters into a fresh base model from a directory written by save_bottleneck_adapters."""
    directory = pathlib.Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    model_type = getattr(getattr(base_model, "config", None), "model_type", None)
    if model_type != config["model_type"]:
        raise ValueError(f"adapters were trained on model_type {config['model_type']!r}, got {model_type!r}")
    wrapped = apply_bottleneck_adapters(
        base_model,
        reduction_factor=config["reduction_factor"],
        placement=config["placement"],
        non_linearity=config["non_linearity"],
        modules_to_save=config.get("modules_to_save", ()),
        style=config.get("style", "sequential"),
        scaling=config.get("scaling", 1.0),
        bottleneck=config.get("bottleneck"),
    )
    if wrapped != config["wrapped_modules"]:
        raise ValueError("base model layout differs from the one the adapters were saved from")
    saved = load_file(str(directory / WEIGHTS_NAME))
    params = adapter_state_dict(base_model)
    if saved.keys() != params.keys():
        missing, unexpected = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
        raise ValueError(f"adapter weights do not match the model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])
    return base_model


def apply_adapter(model: nn.Module, config: Any, task: str) -> nn.Module:
    try:
        apply_bottleneck_adapters(
            prepare_quantized(model),
            reduction_factor=config.reduction_factor,
            placement=config.placement,
            non_linearity=config.non_linearity,
            modules_to_save=task_head_names(model, task),
            style=config.style,
            scaling=config.scaling,
        )
    except ValueError as exc:
        raise FtuneError(f"method: adapter: {exc}") from exc
    return model


def save_adapter(model: nn.Module, directory: pathlib.Path) -> None:
    save_bottleneck_adapters(model, directory)


def load_adapter(load_base: Any, directory: pathlib.Path) -> nn.Module:
    return load_bottleneck_adapters(load_base(), directory)
