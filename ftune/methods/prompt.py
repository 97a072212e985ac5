"""Prompt-learning methods through peft: virtual tokens learned in front of (or inside) every example.

``prompt`` learns input embeddings, ``ptuning`` produces them with a small MLP/LSTM encoder,
``prefix`` learns key/value prefixes for every attention layer (optionally through an MLP), and
``ptuning_v2`` is prefix tuning without that reparameterisation (P-tuning v2's deep prompts). The
last two hand their prefixes to the model as a key/value cache, so the model must accept one.
"""

from __future__ import annotations

import inspect

from ftune.errors import FtuneError
from ftune.methods.peft_family import PEFT_TASK_TYPES, heads_to_save

ENCODERS = {"mlp": "MLP", "lstm": "LSTM"}


def check_accepts_cache(model, method: str) -> None:
    """Prefix methods pass their prefixes as ``past_key_values``; a model without one cannot take them.

    peft tries the task model first, then its backbone (BERT's classifier lacks the argument, BertModel has it).
    """
    candidates = (model, getattr(model, "base_model", model))
    if not any("past_key_values" in inspect.signature(m.forward).parameters for m in candidates):
        raise FtuneError(
            f"method: {method} feeds learned prefixes as past_key_values, which {type(model).__name__} does not accept; "
            "use method: prompt, ptuning or lora"
        )


def prefix_config(config, task: str, model):
    from peft import PrefixTuningConfig

    check_accepts_cache(model, "prefix")
    return PrefixTuningConfig(
        task_type=PEFT_TASK_TYPES[task],
        num_virtual_tokens=config.num_virtual_tokens,
        prefix_projection=config.prefix_projection,
        encoder_hidden_size=config.encoder_hidden_size if config.prefix_projection else None,
        modules_to_save=heads_to_save(model, task),
    )


def ptuning_v2_config(config, task: str, model):
    from peft import PrefixTuningConfig

    check_accepts_cache(model, "ptuning_v2")
    return PrefixTuningConfig(
        task_type=PEFT_TASK_TYPES[task],
        num_virtual_tokens=config.num_virtual_tokens,
        prefix_projection=False,
        modules_to_save=heads_to_save(model, task),
    )


def prompt_config(config, task: str, model):
    from peft import PromptTuningConfig

    from_text = config.init == "text"
    return PromptTuningConfig(
        task_type=PEFT_TASK_TYPES[task],
        num_virtual_tokens=config.num_virtual_tokens,
        prompt_tuning_init="TEXT" if from_text else "RANDOM",
        prompt_tuning_init_text=config.init_text if from_text else None,
        # The base was loaded from a folder that holds its tokenizer too (hub snapshot, local dir or imported GGUF).
        tokenizer_name_or_path=model.name_or_path if from_text else None,
        modules_to_save=heads_to_save(model, task),
    )


def ptuning_config(config, task: str, model):
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(
        task_type=PEFT_TASK_TYPES[task],
        num_virtual_tokens=config.num_virtual_tokens,
        encoder_reparameterization_type=ENCODERS[config.encoder],
        encoder_hidden_size=config.encoder_hidden_size,
        encoder_num_layers=config.encoder_num_layers,
        encoder_dropout=config.encoder_dropout,
        modules_to_save=heads_to_save(model, task),
    )
