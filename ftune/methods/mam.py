"""The mix-and-match adapter (MAM, He et al. 2022): peft's prefix tuning on attention plus a native
parallel adapter beside every feed-forward block, ``mlp(x) + scaling * up(relu(down(x)))``.

peft owns the prefixes and wraps the model in a ``PeftModel``; the parallel adapters are inserted
into the base first and handed to peft as ``modules_to_save``. peft then trains them, writes them
into its own adapter file and restores them on load and on a Trainer resume (``load_adapter``), so
the whole method lives in one peft adapter folder. The only file beside peft's is the adapter
layout (``parallel_adapter_config.json``), which reloading needs to rebuild the modules peft fills.
The parallel adapters start at zero and the prefixes start as ``init`` says (``prefix_start``), as with
``method: prefix``: behind closed gates by default, so the untrained model computes what the base computes.
"""

from __future__ import annotations

import json
from pathlib import Path

from ftune.errors import FtuneError
from ftune.methods.adapter import apply_bottleneck_adapters
from ftune.methods.peft_family import PEFT_TASK_TYPES, heads_to_save, save_peft
from ftune.methods.prompt import expose_cache_argument, finish_loaded_prefixes, restore_gates, wrap_prefix_model

LAYOUT_NAME = "parallel_adapter_config.json"


def insert_parallel_adapters(model, *, bottleneck: int, scaling: float, non_linearity: str) -> list[str]:
    """Put a parallel adapter beside every feed-forward block; returns the adapters' module names (for peft)."""
    try:
        wrapped = apply_bottleneck_adapters(
            model, placement="feed_forward", style="parallel", bottleneck=bottleneck, scaling=scaling, non_linearity=non_linearity
        )
    except ValueError as exc:
        raise FtuneError(f"method: mam: {exc}") from None
    return [f"{name}.adapter" for name in wrapped]


def apply_mam(model, config, task: str):
    from peft import PrefixTuningConfig

    model = expose_cache_argument(model)
    adapters = insert_parallel_adapters(model, bottleneck=config.bottleneck, scaling=config.scaling, non_linearity=config.non_linearity)
    peft_config = PrefixTuningConfig(
        task_type=PEFT_TASK_TYPES[task],
        num_virtual_tokens=config.num_virtual_tokens,
        prefix_projection=config.prefix_projection,
        encoder_hidden_size=config.encoder_hidden_size if config.prefix_projection else None,
        modules_to_save=[*adapters, *(heads_to_save(model, task) or [])],
    )
    return wrap_prefix_model(model, peft_config, config)


def save_mam(model, directory: Path) -> None:
    save_peft(model, directory)
    layout = model.get_base_model().bottleneck_adapter_config
    (Path(directory) / LAYOUT_NAME).write_text(json.dumps(layout, indent=2) + "\n")


def load_mam(load_base, directory: Path):
    from peft import PeftModel

    directory = Path(directory)
    layout = json.loads((directory / LAYOUT_NAME).read_text())
    base = expose_cache_argument(load_base())
    if base.config.model_type != layout["model_type"]:
        raise FtuneError(f"method: mam: the adapters were trained on a {layout['model_type']} model, not {base.config.model_type}")
    adapters = insert_parallel_adapters(
        base, bottleneck=layout["bottleneck"], scaling=layout["scaling"], non_linearity=layout["non_linearity"]
    )
    if [name.removesuffix(".adapter") for name in adapters] != layout["wrapped_modules"]:
        raise FtuneError("method: mam: the base model's layers differ from those the adapters were saved from")
    return finish_loaded_prefixes(PeftModel.from_pretrained(restore_gates(base, directory), directory))
