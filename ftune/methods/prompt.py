"""Prompt-learning methods through peft: virtual tokens learned in front of (or inside) every example.

``prompt`` learns input embeddings, ``ptuning`` produces them with a small MLP/LSTM encoder,
``prefix`` learns key/value prefixes for every attention layer (optionally through an MLP), and
``ptuning_v2`` is prefix tuning without that reparameterisation (P-tuning v2's deep prompts). The
last two hand their prefixes to the model as a key/value cache, so the model must take one; that is
checked by asking the model, not by reading argument names, which transformers renames. Where the
prefixes start (``init``) is ``prefix_start``'s.
"""

from __future__ import annotations

import inspect

from ftune.errors import FtuneError
from ftune.methods.peft_family import PEFT_TASK_TYPES, heads_to_save

ENCODERS = {"mlp": "MLP", "lstm": "LSTM"}


CACHE_ARGUMENTS = ("past_key_values", "cache")  # transformers 5.24 renamed the first to the second


def expose_cache_argument(model):
    """Let peft find the key/value cache argument under the name it looks for, whatever transformers calls it.

    peft's sequence-classification prefix path passes prefixes only to a module whose ``forward``
    names ``past_key_values``; transformers 5.24 renamed that argument ``cache`` (the old name is
    accepted through ``**kwargs`` until 5.40). Each module that takes ``cache`` but not
    ``past_key_values`` gets a forward that accepts the old name and hands it over under the new one.
    Returns ``model``, changed in place.
    """
    for module in (model, getattr(model, "base_model", None), *_backbones(model)):
        if module is None:
            continue
        parameters = inspect.signature(module.forward).parameters
        if "past_key_values" in parameters or "cache" not in parameters:
            continue
        module.forward = _renaming_forward(module.forward)
    return model


def _backbones(model) -> list:
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    return [backbone] if backbone is not None and backbone is not model else []


def _renaming_forward(forward):
    import functools

    @functools.wraps(forward)
    def renamed(*args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return forward(*args, **kwargs)

    signature = inspect.signature(forward)
    renamed.__signature__ = signature.replace(parameters=[
        *[p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD],
        inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None),
        *[p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD],
    ])
    return renamed


def prefix_refusal(model, method: str, reason: str = "") -> str:
    because = f" ({reason})" if reason else ""
    return (
        f"method: {method} feeds learned prefixes to every attention layer as a key/value cache, which "
        f"{type(model).__name__} does not take{because}; use method: prompt, ptuning or lora"
    )


def check_prefix_reaches_attention(peft_model, method: str) -> None:
    """Ask the wrapped model whether its prefixes change anything: one token through it and through its base.

    Checking names in signatures breaks whenever transformers renames an argument; a model that
    cannot take a key/value cache either raises here or computes exactly what the base computes.
    """
    import torch

    base = peft_model.get_base_model()
    device = next(peft_model.parameters()).device
    ones = torch.ones((2, 2), dtype=torch.long, device=device)  # a batch: GPT-NeoX's prefixes break on the batch dimension
    was_training = peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad():
            tuned = peft_model(input_ids=ones, attention_mask=ones).logits
            plain = base(input_ids=ones, attention_mask=ones).logits
    except (TypeError, ValueError, RuntimeError) as err:  # an unexpected keyword, peft's own refusal, mismatched shapes
        raise FtuneError(prefix_refusal(base, method, str(err))) from err
    finally:
        peft_model.train(was_training)
    if torch.equal(tuned, plain):
        raise FtuneError(prefix_refusal(base, method, "its output ignores the prefixes"))


def hand_the_cache_to_peft(peft_model):
    """Let peft's generation step find transformers' key/value cache, so cached decoding keeps the prompt.

    peft's ``prepare_inputs_for_generation`` reads the cache from the base step's inputs under
    ``past_key_values``; transformers 5.24 hands it over as ``cache``. peft then sees no cache at every
    step, injects a fresh prefix-only one, and each new token attends to the prefixes but not to the
    prompt or the tokens before it. Renaming the key in the base step's inputs lets peft inject the
    prefixes once, at prefill, and leave the growing cache alone after; the cache-argument shim
    (``expose_cache_argument``) hands it back to the model under the name its forward takes.
    Returns ``peft_model``, changed in place.
    """
    import functools

    base_prepare = getattr(peft_model, "base_model_prepare_inputs_for_generation", None)
    if base_prepare is None or getattr(base_prepare, "hands_the_cache_to_peft", False):
        return peft_model  # not a generating model, or already done

    @functools.wraps(base_prepare)
    def prepare(*args, **kwargs):
        inputs = base_prepare(*args, **kwargs)
        if "cache" in inputs and "past_key_values" not in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    prepare.hands_the_cache_to_peft = True
    peft_model.base_model_prepare_inputs_for_generation = prepare
    return peft_model


def apply_soft_prompt_method(build):
    """The apply step of prompt and ptuning: peft's virtual tokens, with the cache handed to peft's generation step
    (``hand_the_cache_to_peft``): without it every generated token is fed behind the virtual tokens again, and cached
    decoding answers with fragments of the prompt after the first token."""
    from ftune.methods.peft_family import wrap_with_peft

    def apply(model, config, task: str):
        return hand_the_cache_to_peft(wrap_with_peft(expose_cache_argument(model), build(config, task, model), config.name))

    apply.__name__ = f"apply_{build.__name__.removesuffix('_config')}"
    return apply


def load_soft_prompt(load_base, directory):
    """Reload a prompt or ptuning run, set up for cached generation as ``apply_soft_prompt_method`` sets it up."""
    from ftune.methods.peft_family import load_peft

    return hand_the_cache_to_peft(load_peft(lambda: expose_cache_argument(load_base()), directory))


def load_prefix(load_base, directory):
    """Reload a prefix-tuned run: the base gets the cache-argument shim and the prefix gates it was trained with."""
    from ftune.methods.peft_family import load_peft

    return finish_loaded_prefixes(load_peft(lambda: restore_gates(expose_cache_argument(load_base()), directory), directory))


def restore_gates(base, directory):
    from ftune.methods.prefix_start import restore_gates as restore

    restore(base, directory)
    return base


def finish_loaded_prefixes(peft_model):
    from ftune.methods.prefix_start import mark_prefix_caches

    mark_prefix_caches(peft_model)
    return hand_the_cache_to_peft(peft_model)


def wrap_prefix_model(model, peft_config, config):
    """Wrap ``model`` (cache argument shimmed) in peft's prefixes, started as ``config.init`` says (see prefix_start),
    prove the prefixes reach attention and set generation up to keep them in the cache."""
    from ftune.methods import prefix_start
    from ftune.methods.peft_family import wrap_with_peft

    gates = prefix_start.insert_gates(model) if config.init == "gated" else []
    if config.init == "gated" and not gates:
        prefix_start.warn_fallback(config.name, f"{type(model).__name__}'s attention does not go through transformers' "
                                                "attention interface, so it cannot take the prefix gates; starting as init: tokens")
    peft_config.modules_to_save = [*gates, *(peft_config.modules_to_save or [])] or None
    try:
        wrapped = wrap_with_peft(model, peft_config, config.name)
    except FtuneError as err:  # peft found no attention geometry to shape prefixes for
        raise FtuneError(prefix_refusal(model, config.name, str(err.__cause__ or err))) from err
    prefix_start.mark_prefix_caches(wrapped)
    with prefix_start.gates_open(wrapped):  # shut gates would hide the prefixes from the check
        check_prefix_reaches_attention(wrapped, config.name)
    if config.init != "random" and not prefix_start.start_from_tokens(wrapped):
        prefix_start.warn_fallback(config.name, f"{type(model).__name__}'s own keys/values for real tokens could not be read into "
                                                "peft's prefixes (no key/value cache from the base, or a layout of peft's own); they start random")
    return hand_the_cache_to_peft(wrapped)


def apply_prefix_method(build):
    """The apply step of a prefix method: shim the cache argument, then wrap (``wrap_prefix_model``)."""

    def apply(model, config, task: str):
        model = expose_cache_argument(model)
        return wrap_prefix_model(model, build(config, task, model), config)

    apply.__name__ = f"apply_{build.__name__.removesuffix('_config')}"
    return apply


def prefix_config(config, task: str, model):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        task_type=PEFT_TASK_TYPES[task],
        num_virtual_tokens=config.num_virtual_tokens,
        prefix_projection=config.prefix_projection,
        encoder_hidden_size=config.encoder_hidden_size if config.prefix_projection else None,
        modules_to_save=heads_to_save(model, task),
    )


def ptuning_v2_config(config, task: str, model):
    from peft import PrefixTuningConfig

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
