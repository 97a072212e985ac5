"""The checks of ftune.internals' rows: each raises ``NoLongerApplies`` saying what changed when a library no longer
behaves as a row says.

``takes`` and ``says`` build the common ones from a dotted path (a signature; a text in the library's own source); the
functions below run tiny modules built from a config for the behaviour ftune relies on. Nothing trains and nothing
reaches the network; libraries are imported when a check runs.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable


class NoLongerApplies(Exception):
    """What changed in the library, in one line."""


def require(condition: bool, what_changed: str) -> None:
    if not condition:
        raise NoLongerApplies(what_changed)


def resolve(path: str):
    """What a dotted path names: its longest importable module, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for index in range(cut, len(parts)):
            require(hasattr(found, parts[index]), f"{'.'.join(parts[:index])} has no {parts[index]} any more")
            found = getattr(found, parts[index])
        return found
    raise NoLongerApplies(f"{path} cannot be imported")


def takes(path: str, parameters: str, *, exact: bool = True) -> Callable[[], None]:
    """``path`` has these named parameters: exactly, where ftune overrides it (the override must accept what the library
    passes); at least, where ftune calls it with them."""

    def check() -> None:
        signature = inspect.signature(resolve(path))
        found = [p.name for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        expected = parameters.split(", ")
        require(found == expected if exact else set(expected) <= set(found),
                f"{path} takes ({', '.join(found)}); ftune's {'override has' if exact else 'call passes'} ({parameters})")
    return check


def says(path: str, text: str, changed: str) -> Callable[[], None]:
    """The source of ``path`` (a module, class, function or property) still contains ``text``."""

    def check() -> None:
        found = resolve(path)
        require(text in inspect.getsource(found.fget if isinstance(found, property) else found), changed)
    return check


def tiny_causal_lm():
    """A one-layer Llama from its config, with grouped-query attention (two query heads per key/value head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


def attention_gets_position_ids() -> None:
    import torch
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    seen: dict = {}

    def probe(module, query, key, value, attention_mask, **kwargs):
        seen.update(kwargs, groups=getattr(module, "num_key_value_groups", None), query=tuple(query.shape))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("ftune_internals_probe", probe)
    AttentionMaskInterface.register("ftune_internals_probe", sdpa_mask)
    model = tiny_causal_lm()
    model.set_attn_implementation("ftune_internals_probe")
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]), position_ids=torch.tensor([[0, 1, 2, 0, 1]]), use_cache=False)
    require("position_ids" in seen, "a registered attention function no longer receives position_ids (packed sdpa's layout)")
    require(seen["query"] == (1, 2, 5, 8),
            f"queries reach the attention function as {seen['query']}, not (batch, heads, positions, head dim)")
    require(seen["groups"] == 2, "attention modules no longer carry num_key_value_groups")


def sdpa_runs_unpacked_rows() -> None:
    import torch
    from transformers import AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    query = torch.zeros(1, 2, 3, 4)
    output, _ = sdpa_attention_forward(torch.nn.Module(), query, query, query, None, dropout=0.0, scaling=None, is_causal=True)
    require(tuple(output.shape) == (1, 3, 2, 4),
            f"sdpa_attention_forward returns {tuple(output.shape)}, not (batch, positions, heads, head dim)")
    require(AttentionMaskInterface()["sdpa"] is sdpa_mask, "masking_utils.sdpa_mask is no longer sdpa's mask function")


def config_reports_attention() -> None:
    from transformers import LlamaConfig

    require(LlamaConfig(attn_implementation="eager")._attn_implementation == "eager",
            "a config built with attn_implementation='eager' no longer reports it as _attn_implementation")


def no_split_names_the_decoder_layer() -> None:
    model = tiny_causal_lm()
    names = model._no_split_modules
    counts = {name: sum(type(module).__name__ == name for module in model.modules()) for name in names or ()}
    require(model.config.num_hidden_layers in counts.values(),
            f"_no_split_modules ({names!r}) no longer names the repeated decoder layer")


def modeling_module_has_causal_mask() -> None:
    import sys

    from transformers import LlamaModel
    from transformers.masking_utils import create_causal_mask

    require(getattr(sys.modules[LlamaModel.__module__], "create_causal_mask", None) is create_causal_mask,
            "a model that masks from position ids no longer imports masking_utils.create_causal_mask into its module")


def peft_maps_moe_names() -> None:
    from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING

    require(set(_MOE_TARGET_MODULE_MAPPING) <= {*_MODEL_TO_CONVERSION_PATTERN, *_MODEL_TO_CONVERSION_PATTERN.values()}
            and any("gate_up_proj" in names.values() for names in _MOE_TARGET_MODULE_MAPPING.values()),
            "peft's tables no longer map a model type's transformers 4 expert names onto fused weights (gate_up_proj)")


def peft_has_ia3_defaults() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as DEFAULTS
    from transformers import LlamaConfig

    require(isinstance(DEFAULTS.get(LlamaConfig.model_type), list),
            "peft's (IA)^3 defaults no longer list target modules per model type")


def addmm_matches_peft_lora() -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from ftune.methods.lora_forward import use_addmm_forward

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    layer, x = model.base_model.model[0], torch.randn(3, 8)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    with torch.no_grad():
        peft_output = layer(x)
        require(use_addmm_forward(model) == 1, f"a plain LoRA on nn.Linear is now {type(layer).__qualname__}, not lora.Linear")
        require(torch.allclose(layer(x), peft_output, atol=1e-5),
                "peft's lora.Linear no longer computes base(x) + lora_B(lora_A(dropout(x))) * scaling")


def peft_prefix_generation_keeps_the_prompt() -> None:
    """Cached greedy decoding of a prefix-tuned tiny model, with ftune's shims, equals a loop of full forwards."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model

    from ftune.methods.prompt import expose_cache_argument, hand_the_cache_to_peft

    torch.manual_seed(0)
    model = get_peft_model(expose_cache_argument(tiny_causal_lm()), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    model = hand_the_cache_to_peft(model).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0, 4)
        ids = torch.tensor([[3, 7, 11, 5]])
        cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
        for _ in range(6):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    require(cached.tolist() == ids.tolist(), "peft's cached generation with prefixes no longer matches full forwards")


def gated_prefixes_start_at_the_base() -> None:
    """A fresh prefix-tuned tiny model with closed gates computes what its base computes, and opening them changes that."""
    import torch

    from ftune.methods import apply_method
    from ftune.methods.prefix_start import gates_open
    from ftune.recipe.methods import method_class

    torch.manual_seed(0)
    base, ids = tiny_causal_lm(), torch.tensor([[3, 7, 11, 5]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        model = apply_method(base, method_class("prefix").model_validate({"name": "prefix", "num_virtual_tokens": 2}), "causal_lm")
        closed = model(input_ids=ids).logits
        with gates_open(model):
            opened = model(input_ids=ids).logits
    require(torch.allclose(closed, plain, atol=1e-5), "closed prefix gates no longer leave the base's output unchanged")
    require(not torch.allclose(opened, plain, atol=1e-3), "opened prefix gates no longer let the prefixes in")


def dpo_collates_tokenized_pairs() -> None:
    import sys

    from trl import DPOTrainer

    batch = sys.modules[DPOTrainer.__module__].DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}])
    require(batch["input_ids"].tolist() == [[1, 2, 3, 0], [1, 2, 4, 5]],
            "DPO's collator no longer joins prompt_ids with chosen_ids / rejected_ids, the rows ftune hands it")


def kto_collates_kl_rows() -> None:
    import sys

    from trl import KTOTrainer

    collator = sys.modules[KTOTrainer.__module__].DataCollatorForUnpairedPreference(pad_token_id=0)
    batch = collator([{"prompt_ids": [1, 2], "completion_ids": [3], "KL_completion_ids": [4, 5], "label": True}])
    require(batch["input_ids"].tolist() == [[1, 2, 3]] and batch["KL_input_ids"].tolist() == [[1, 2, 4, 5]],
            "KTO's collator no longer joins prompt_ids with completion_ids and KL_completion_ids, the rows ftune hands it")


def orpo_reads_tokenized_rows() -> None:
    import sys

    from trl.experimental.orpo import ORPOTrainer

    # The fields ftune's PairORPOTrainer.tokenize_row writes (training.preference, a floor above this one, so spelled
    # out here) for a prompt [1, 2] with answers [3] and [4, 5].
    row = {"prompt_input_ids": [1, 2], "prompt_attention_mask": [1, 1],
           "chosen_input_ids": [1, 2, 3], "chosen_attention_mask": [1] * 3, "chosen_labels": [-100, -100, 3],
           "rejected_input_ids": [1, 2, 4, 5], "rejected_attention_mask": [1] * 4, "rejected_labels": [-100, -100, 4, 5]}
    collator = sys.modules[ORPOTrainer.__module__].DPODataCollatorWithPadding(pad_token_id=0)
    joined = ORPOTrainer.concatenated_inputs(collator([row]))
    require(joined["concatenated_input_ids"].tolist() == [[1, 2, 3, 0], [1, 2, 4, 5]]
            and joined["concatenated_labels"].tolist() == [[-100, -100, 3, -100], [-100, -100, 4, 5]],
            "ORPO's collator and concatenated_inputs no longer read chosen_/rejected_ input_ids, attention_mask and labels")


def gguf_table_names_regexes() -> None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    require(bool(GGUF_PRE_TOKENIZER_SPLITS) and all(isinstance(regex, str) for regex in GGUF_PRE_TOKENIZER_SPLITS.values()),
            "GGUF_PRE_TOKENIZER_SPLITS no longer maps llama.cpp's pre-tokenizer names to split regexes")


def dynamo_reset_takes_nothing() -> None:
    import torch._dynamo

    require(not inspect.signature(torch._dynamo.reset).parameters, "torch._dynamo.reset now takes arguments")


def mkldnn_answers() -> None:
    import torch

    require(isinstance(torch.ops.mkldnn._is_mkldnn_bf16_supported(), bool),
            "torch.ops.mkldnn._is_mkldnn_bf16_supported no longer answers a bool")


def module_dicts_hold_tensors() -> None:
    import torch

    module, weight, mean = torch.nn.BatchNorm1d(2), torch.nn.Parameter(torch.ones(2)), torch.zeros(2)
    module._parameters["weight"], module._buffers["running_mean"] = weight, mean
    require(dict(module.named_parameters())["weight"] is weight and dict(module.named_buffers())["running_mean"] is mean,
            "a tensor put in Module._parameters / _buffers is no longer the module's parameter / buffer")


def torch_wrapper_prefixes() -> None:
    import torch
    from torch.distributed.algorithms._checkpoint import checkpoint_wrapper
    from torch.distributed.fsdp import _common_utils

    found = {_common_utils.FSDP_WRAPPED_MODULE, checkpoint_wrapper._CHECKPOINT_WRAPPED_MODULE}
    found |= {key.split(".")[0] for key in torch.compile(torch.nn.Linear(2, 2)).state_dict()}
    require(found == {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"},
            f"torch's wrapper names are now {sorted(found)}; checkpoints.NAME_NOISE strips the old ones")


def instance_forward_runs() -> None:
    import torch

    module, marker = torch.nn.Linear(2, 2), torch.zeros(1)
    module.forward = lambda *args, **kwargs: marker
    require("forward" in vars(module) and module(torch.zeros(2)) is marker,
            "Module.__call__ no longer runs a forward set on the instance")


def dataset_has_fingerprint() -> None:
    from datasets import Dataset

    require(isinstance(getattr(Dataset.from_list([{"text": "a"}]), "_fingerprint", None), str),
            "a Dataset no longer carries _fingerprint")


def linear4bit_has_repack_switch() -> None:
    from bitsandbytes.nn import Linear4bit

    require(hasattr(Linear4bit(8, 8), "support_avx512bf16_for_cpu"), "Linear4bit no longer has support_avx512bf16_for_cpu")
