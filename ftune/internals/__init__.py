"""The library internals ftune relies on, in one table: what each is, where ftune uses it, why, and how to tell it broke.

ftune overrides private Trainer hooks, subclasses TRL trainers to skip their tokenization, reads private attributes
(``config._attn_implementation``), imports private tables (peft's MoE name conversion) and patches instances (a decoder
layer's ``forward``, a LoRA layer's ``__class__``). None of that is a promise the libraries keep across releases, so each
such place has a row in ``INTERNALS``: the library, the internal, how ftune uses it, where (ftune's top-level dotted
names), the locked version the row was written or last re-checked against (bump it when re-verifying on a new lock), why
ftune needs it, and its checks (``ftune.internals.checks``: the library's signatures and source, or a tiny module built
from a config; no training, no network). ``Internal.problem`` turns a failed check into one line naming the row.

tests/unit/test_internals.py runs every row and scans ftune/ for library internals no row lists; scripts/upgrade-lock.sh
runs it on a candidate lock before the rest of the suite. Libraries are imported only when a check runs, so importing
this table stays free of torch and transformers. ``python -m ftune.internals`` prints docs/internals.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from ftune.internals.checks import (
    NoLongerApplies,
    addmm_matches_peft_lora,
    attention_gets_position_ids,
    config_reports_attention,
    dataset_has_fingerprint,
    dpo_collates_tokenized_pairs,
    dynamo_reset_takes_nothing,
    gated_prefixes_start_at_the_base,
    gguf_table_names_regexes,
    instance_forward_runs,
    kto_collates_kl_rows,
    linear4bit_has_repack_switch,
    mkldnn_answers,
    modeling_module_has_causal_mask,
    module_dicts_hold_tensors,
    no_split_names_the_decoder_layer,
    orpo_reads_tokenized_rows,
    peft_has_ia3_defaults,
    peft_maps_moe_names,
    peft_prefix_generation_keeps_the_prompt,
    says,
    sdpa_runs_unpacked_rows,
    takes,
    torch_wrapper_prefixes,
)

ROW_FILE = "ftune/internals/__init__.py"


@dataclass(frozen=True)
class Internal:
    name: str  # the row's id: its test's id, what upgrade-lock.sh reports
    library: str  # the distribution, as requirements/ spells it
    internal: str  # the library's internal, spelled as ftune uses it
    use: str  # override, call, read, write, import, register, patch
    where: tuple[str, ...]  # ftune's top-level dotted names that rely on it
    version: str  # the locked version the row was written or last re-checked against
    why: str
    checks: tuple[Callable[[], None], ...]

    def problem(self) -> str | None:
        """None while the internal behaves as ftune relies on; otherwise one line naming the row and what changed."""
        try:
            with warnings.catch_warnings():  # the checks import trl.experimental, which warns on import
                warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
                for check in self.checks:
                    check()
        except Exception as err:  # the checks are fixed code: any failure is a change in the library
            changed = str(err) if isinstance(err, NoLongerApplies) else f"{type(err).__name__}: {err}"
            return (f"internal {self.name} no longer applies (written against {self.library} {self.version}, installed "
                    f"{installed_version(self.library)}): {changed}; see its row in {ROW_FILE}")
        return None


def installed_version(library: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(library)
    except PackageNotFoundError:
        return "none"


T, ORPO = "transformers.Trainer", "trl.experimental.orpo.ORPOTrainer"
TRAINER, PREFERENCE, PACKED = "ftune.training.trainer", "ftune.training.preference", "ftune.packed_attention"


INTERNALS: tuple[Internal, ...] = (
    Internal(
        "track-num-input-tokens", "transformers", f"{T}._track_num_input_tokens", "override",
        where=(f"{TRAINER}.counting_example_tokens",), version="5.25.0",
        why="tokens_seen counts each example's tokens (computed_tokens the positions run), not a packed row's length",
        checks=(takes(f"{T}._track_num_input_tokens", "self, inputs"),
                says(T, "self._track_num_input_tokens(inputs)", "the training loop no longer calls _track_num_input_tokens(inputs)"),
                says(f"{T}._track_num_input_tokens", "self.state.num_input_tokens_seen",
                     "_track_num_input_tokens no longer adds to state.num_input_tokens_seen"))),
    Internal(
        "create-accelerator", "transformers", f"{T}.create_accelerator_and_postprocess", "override",
        where=(f"{TRAINER}.trainer_class_for",), version="5.25.0",
        why="the hook after which FSDP is turned on for CPU (and is_fsdp_enabled set), before the model is prepared",
        checks=(takes(f"{T}.create_accelerator_and_postprocess", "self"),
                says(f"{T}.__init__", "self.create_accelerator_and_postprocess()", "Trainer.__init__ no longer calls the hook"),
                says(f"{T}.create_accelerator_and_postprocess", "self.is_fsdp_enabled =", "the hook no longer sets is_fsdp_enabled"))),
    Internal(
        "accelerate-fsdp-state", "accelerate", "accelerate.state.AcceleratorState.distributed_type, .fsdp_plugin", "write",
        where=(f"{TRAINER}.trainer_class_for",), version="1.16.0",
        why="accelerate turns FSDP on only for accelerator devices; set on the state, it shards on CPU over gloo",
        checks=(says("accelerate.state.AcceleratorState.__init__", "self.fsdp_plugin = ", "AcceleratorState no longer holds fsdp_plugin"),
                says("accelerate.Accelerator.distributed_type", "self.state.distributed_type",
                     "Accelerator.distributed_type no longer reads the state's field"),
                says("accelerate.Accelerator.prepare_model", "self.state.fsdp_plugin",
                     "Accelerator.prepare_model no longer reads the state's fsdp_plugin"),
                takes("accelerate.utils.FullyShardedDataParallelPlugin.set_mixed_precision", "mixed_precision", exact=False))),
    Internal(
        "load-from-checkpoint", "transformers", f"{T}._load_from_checkpoint", "override, call",
        where=(f"{TRAINER}.trainer_class_for", "ftune.training.checkpoints.train_or_restore"), version="5.25.0",
        why="CPU FSDP: each rank reads pytorch_model_fsdp.bin itself (over gloo accelerate's broadcast hangs); a finished run "
            "is restored without training",
        checks=(takes(f"{T}._load_from_checkpoint", "self, resume_from_checkpoint, model"),
                says(T, "self._load_from_checkpoint(resume_from_checkpoint)", "train() no longer resumes through _load_from_checkpoint"),
                says("accelerate.utils.constants", 'FSDP_MODEL_NAME = "pytorch_model_fsdp"', "accelerate renamed its FSDP weights file"))),
    Internal(
        "save-model", "transformers", f"{T}.save_model(output_dir, _internal_call), {T}._save(output_dir, state_dict)", "override, call",
        where=(f"{TRAINER}.trainer_class_for",), version="5.25.0",
        why="CPU FSDP: accelerate's offloaded gather hands back freed storage; ftune writes its own gathered copy through _save",
        checks=(takes(f"{T}.save_model", "self, output_dir, _internal_call"),
                takes(f"{T}._save", "output_dir, state_dict", exact=False),
                says(T, "_internal_call=True", "checkpoints are no longer saved through save_model"))),
    Internal(
        "attn-implementation", "transformers", "transformers.PreTrainedConfig._attn_implementation", "read",
        where=("ftune.data.collate.packing_blocker", "ftune.data.collate.build_collator", f"{PACKED}.verify",
               "ftune.training.report.build_manifest", "ftune.training.session.build_session",
               "ftune.methods.prefix_start.insert_gates"), version="5.25.0",
        why="the attention a loaded model runs decides packing and packed sdpa, and the run records it; gated prefixes "
            "put it back where their attention cannot take the gates",
        checks=(config_reports_attention,)),
    Internal(
        "no-split-modules", "transformers", "transformers.PreTrainedModel._no_split_modules", "read",
        where=("ftune.training.distributed.decoder_layer_classes",), version="5.25.0",
        why="names the repeated decoder layer: FSDP's wrap unit and what compile compiles", checks=(no_split_names_the_decoder_layer,)),
    Internal(
        "attention-interface", "transformers",
        "transformers.AttentionInterface.register, AttentionMaskInterface.register; position_ids in the attention kwargs", "register",
        where=(f"{PACKED}.register", f"{PACKED}.packed_sdpa_attention"), version="5.25.0",
        why="packed rows dispatch to ftune's per-example sdpa, which reads the layout from position_ids",
        checks=(attention_gets_position_ids,)),
    Internal(
        "sdpa-attention-forward", "transformers",
        "transformers.integrations.sdpa_attention.sdpa_attention_forward, transformers.masking_utils.sdpa_mask", "call",
        where=(f"{PACKED}.packed_sdpa_attention", f"{PACKED}.register"), version="5.25.0",
        why="rows without a packed layout (generation, padding) run transformers' own sdpa and masks unchanged",
        checks=(takes("transformers.integrations.sdpa_attention.sdpa_attention_forward",
                      "module, query, key, value, attention_mask, dropout, scaling, is_causal", exact=False),
                sdpa_runs_unpacked_rows)),
    Internal(
        "create-causal-mask", "transformers", "transformers.masking_utils.create_causal_mask in a model's modeling module", "read",
        where=("ftune.data.collate.packing_blocker",), version="5.25.0",
        why="a model whose module imports it builds its mask from position ids, so packed examples stay apart",
        checks=(modeling_module_has_causal_mask, takes("transformers.masking_utils.create_causal_mask", "position_ids", exact=False))),
    Internal(
        "gguf-pre-tokenizer-splits", "transformers",
        "transformers.integrations.gguf.gguf_tokenizer_mapping.GGUF_PRE_TOKENIZER_SPLITS", "import",
        where=("ftune.gguf_tokenizer._pre_tokenizer_name",), version="5.25.0",
        why="names llama.cpp's pre-tokenizer for a Split regex (if it moves, the round-trip check decides)",
        checks=(gguf_table_names_regexes,)),
    Internal(
        "peft-moe-conversion", "peft",
        "peft.utils.transformers_weight_conversion._MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING", "import",
        where=("ftune.methods.peft_family.moe_expert_targets",), version="0.21.2",
        why="which transformers 4 expert names peft maps onto a transformers 5 model's fused expert weights",
        checks=(peft_maps_moe_names,)),
    Internal(
        "peft-ia3-defaults", "peft", "peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING", "import",
        where=("ftune.methods.peft_family.ia3_config",), version="0.21.2",
        why="refuses (IA)^3 without explicit targets on a model peft has no defaults for", checks=(peft_has_ia3_defaults,)),
    Internal(
        "peft-lora-linear", "peft",
        "peft.tuners.lora.layer.Linear: forward, _cast_input_dtype, lora_variant, scaling; instances' __class__ swapped", "patch",
        where=("ftune.methods.lora_forward.addmm_lora_linear", "ftune.methods.lora_forward.use_addmm_forward"), version="0.21.2",
        why="LoRA's update added inside one addmm instead of two passes over the layer's output",
        checks=(takes("peft.tuners.lora.layer.Linear._cast_input_dtype", "self, x, dtype"), addmm_matches_peft_lora)),
    Internal(
        "peft-prefix-signature", "peft",
        "peft.PeftModelForSequenceClassification._prefix_tuning_forward: past_key_values looked up in the model's forward signature",
        "patch", where=("ftune.methods.prompt.expose_cache_argument",), version="0.21.2",
        why="transformers 5.24 renamed the cache argument; the shimmed forward lets peft find it",
        checks=(says("peft.PeftModelForSequenceClassification._prefix_tuning_forward", '"past_key_values" not in fwd_params',
                     "peft no longer looks for past_key_values in the forward signature (the shim may be unneeded)"),)),
    Internal(
        "peft-prefix-generation-cache", "peft",
        "peft.PeftModelForCausalLM.base_model_prepare_inputs_for_generation: prepare_inputs_for_generation reads its "
        "past_key_values", "patch", where=("ftune.methods.prompt.hand_the_cache_to_peft",), version="0.21.2",
        why="transformers 5.24 hands generation's cache over as `cache`; renamed, peft injects the prefixes once instead "
            "of replacing the prompt's cache with them at every new token, and soft prompts (prompt, ptuning) once instead "
            "of in front of every new token",
        checks=(says("peft.PeftModelForCausalLM.prepare_inputs_for_generation", "self.base_model_prepare_inputs_for_generation(",
                     "peft's generation step no longer starts from base_model_prepare_inputs_for_generation"),
                says("peft.PeftModelForCausalLM.prepare_inputs_for_generation", 'model_kwargs.get("past_key_values", None)',
                     "peft's generation step no longer reads the cache as past_key_values (the rename may be unneeded)"),
                peft_prefix_generation_keeps_the_prompt)),
    Internal(
        "peft-prefix-gates", "peft",
        "peft.PeftModel.get_prompt, called through the instance (its caches are marked); the attention block's cache= "
        "argument (read by a pre-hook)", "patch",
        where=("ftune.methods.prefix_start.mark_prefix_caches", "ftune.methods.prefix_start.insert_gates"), version="0.21.2",
        why="init: gated acts on the prefix columns only, so the gates must know which runs carry peft's prefixes",
        checks=(says("peft.PeftModelForCausalLM.forward", "self.get_prompt(", "peft's forward no longer builds prefixes through get_prompt"),
                says("peft.PeftModelForCausalLM.prepare_inputs_for_generation", "self.get_prompt(",
                     "peft's generation step no longer builds prefixes through get_prompt"),
                gated_prefixes_start_at_the_base)),
    Internal(
        "peft-adalora-allocator", "peft",
        "peft.tuners.adalora.AdaLoraModel.rankallocator.set_total_step, update_and_allocate, AdaLoraLayer.lora_E", "call, read",
        where=("ftune.methods.lora.schedule_adalora", "ftune.methods.lora.adalora_ranks"), version="0.21.2",
        why="spreads AdaLoRA's rank budget over the run's real step count and records the final ranks",
        checks=(says("peft.tuners.adalora.AdaLoraModel.__init__", "self.rankallocator = ", "AdaLoraModel no longer keeps a rankallocator"),
                takes("peft.tuners.adalora.layer.RankAllocator.set_total_step", "self, total_step"),
                takes("peft.tuners.adalora.AdaLoraModel.update_and_allocate", "self, global_step"),
                says("peft.tuners.adalora.layer.AdaLoraLayer", '"lora_E"', "AdaLoRA layers no longer keep singular values as lora_E"))),
    Internal(
        "dpo-prepare-dataset", "trl", "trl.DPOTrainer._prepare_dataset", "override",
        where=(f"{PREFERENCE}.dpo_trainer_class",), version="1.16.0",
        why="ftune hands DPO pairs it already rendered and tokenized; TRL would render them a second time",
        checks=(takes("trl.DPOTrainer._prepare_dataset", "self, dataset, processing_class, args, dataset_name"),
                says("trl.DPOTrainer.__init__", "self._prepare_dataset(", "DPOTrainer no longer prepares its datasets through the hook"),
                says("trl.DPOTrainer.__init__", "DataCollatorForPreference(", "DPOTrainer's default collator changed"),
                dpo_collates_tokenized_pairs)),
    Internal(
        "kto-prepare-dataset", "trl", "trl.KTOTrainer._prepare_dataset, calculate_KL, KL_completion_ids", "override",
        where=("ftune.training.kto.kto_trainer_class",), version="1.16.0",
        why="ftune hands KTO rows it already rendered and tokenized; only KTO's mismatched KL completions are added",
        checks=(takes("trl.KTOTrainer._prepare_dataset", "self, dataset, processing_class, args, dataset_name"),
                says("trl.KTOTrainer.__init__", "self._prepare_dataset(", "KTOTrainer no longer prepares its datasets through the hook"),
                says("trl.KTOTrainer.__init__", "self.calculate_KL = ", "KTOTrainer no longer keeps calculate_KL"),
                says("trl.KTOTrainer.__init__", "DataCollatorForUnpairedPreference(", "KTOTrainer's default collator changed"),
                kto_collates_kl_rows)),
    Internal(
        "ref-adapter", "trl", 'trl.DPOTrainer, trl.KTOTrainer: the "ref" copy of a peft adapter', "write",
        where=(f"{PREFERENCE}.drop_reference_adapter",), version="1.16.0",
        why="a fresh adapter's reference is the base with the adapter off; the copy only costs memory",
        checks=(says("trl.trainer.dpo_trainer", 'add_adapter("ref"', 'DPOTrainer no longer copies the adapter as "ref"'),
                says("trl.trainer.dpo_trainer", '"ref" in', 'DPOTrainer no longer scores with the adapter off when "ref" is gone'),
                says("trl.trainer.kto_trainer", 'add_adapter("ref"', 'KTOTrainer no longer copies the adapter as "ref"'),
                says("trl.trainer.kto_trainer", '"ref" in', 'KTOTrainer no longer scores with the adapter off when "ref" is gone'))),
    Internal(
        "orpo-tokenize-row", "trl", f"{ORPO}.tokenize_row", "override",
        where=(f"{PREFERENCE}.orpo_trainer_class",), version="1.16.0",
        why="ftune's tokenized pairs become ORPO's batch fields as they are (no second BOS or EOS)",
        checks=(takes(f"{ORPO}.tokenize_row", "self, feature, model"),
                says(f"{ORPO}.__init__", "map(self.tokenize_row", "ORPOTrainer no longer tokenizes through tokenize_row"),
                says(f"{ORPO}.__init__", "DPODataCollatorWithPadding(", "ORPOTrainer's default collator changed"),
                orpo_reads_tokenized_rows)),
    Internal(
        "trl-experimental-orpo", "trl", "trl.experimental.orpo (ORPOTrainer, ORPOConfig), TRL_EXPERIMENTAL_SILENCE", "import",
        where=(f"{PREFERENCE}.quiet_experimental", f"{PREFERENCE}.orpo_trainer_class", f"{PREFERENCE}.orpo_spec"), version="1.16.0",
        why="ORPO lives in TRL's unstable namespace, which warns on every import unless silenced",
        checks=(says("trl.experimental", "TRL_EXPERIMENTAL_SILENCE", "trl.experimental no longer reads TRL_EXPERIMENTAL_SILENCE"),
                takes("trl.experimental.orpo.ORPOConfig", "beta, max_length", exact=False))),
    Internal(
        "mkldnn-bf16", "torch", "torch.ops.mkldnn._is_mkldnn_bf16_supported", "call",
        where=("ftune.hardware.cpu_native_bf16",), version="2.13.0",
        why="whether oneDNN runs bf16 natively on this CPU decides the launch's precision", checks=(mkldnn_answers,)),
    Internal(
        "dynamo-reset", "torch", "torch._dynamo.reset", "call",
        where=("ftune.training.compilation.compile_decoder_layers",), version="2.13.0",
        why="an earlier run's graphs of the shared layer function would count against the recompile limit",
        checks=(dynamo_reset_takes_nothing,)),
    Internal(
        "module-parameters-buffers", "torch", "torch.nn.Module._parameters, _buffers", "write",
        where=("ftune.training.distributed.replace_with_whole",), version="2.13.0",
        why="swaps FSDP shards for gathered tensors in place, tied weights kept one tensor", checks=(module_dicts_hold_tensors,)),
    Internal(
        "wrapper-prefixes", "torch", "torch's _fsdp_wrapped_module, _checkpoint_wrapped_module, _orig_mod name parts", "read",
        where=("ftune.training.checkpoints.NAME_NOISE",), version="2.13.0",
        why="a trainable parameter's name as a checkpoint stores it, for the first save's check", checks=(torch_wrapper_prefixes,)),
    Internal(
        "instance-forward", "torch", "torch.nn.Module.__call__ running a forward set on the instance", "patch",
        where=("ftune.training.compilation.compile_decoder_layers", "ftune.training.compilation.compile_blocker"), version="2.13.0",
        why="compiled decoder layers run through a per-instance forward that stays eager outside training",
        checks=(instance_forward_runs,)),
    Internal(
        "dataset-fingerprint", "datasets", "datasets.Dataset._fingerprint", "read",
        where=("ftune.data.sources.source_fingerprint",), version="5.2.0",
        why="a hub dataset's content hash for the data cache key, without reading its rows", checks=(dataset_has_fingerprint,)),
    Internal(
        "bnb-cpu-repack", "bitsandbytes", "bitsandbytes.nn.Linear4bit.support_avx512bf16_for_cpu", "write",
        where=("ftune.model.use_the_trainable_4bit_kernel",), version="0.50.2",
        why="the CPU inference repack has no backward and sticks: training after an eval would get no gradient",
        checks=(linear4bit_has_repack_switch,
                says("bitsandbytes.nn.Linear4bit.forward", "self.support_avx512bf16_for_cpu",
                     "Linear4bit.forward no longer decides the CPU repack by the switch"))),
)


def render_markdown() -> str:
    """docs/internals.md: the table for people (``python -m ftune.internals > docs/internals.md``)."""
    lines = [
        "# Library internals ftune relies on", "",
        f"Generated from `{ROW_FILE}` by `python -m ftune.internals > docs/internals.md`; edit the table there.", "",
        "Each row is a private attribute, an internal hook ftune overrides, or a library behaviour ftune patches around.",
        "`tests/unit/test_internals.py` checks every row against the installed libraries (one test per row, named as the",
        "row) and fails when ftune/ gains such a place without a row; `scripts/upgrade-lock.sh` runs it on a candidate",
        "lock before the rest of the suite. *Version* is the locked version the row was written or last re-checked against.", "",
        "| Row | Library | Internal | Use | Where in ftune | Version | Why |", "|---|---|---|---|---|---|---|",
    ]
    for row in INTERNALS:
        where = "<br>".join(f"`{name}`" for name in row.where)
        lines.append(f"| {row.name} | {row.library} | `{row.internal}` | {row.use} | {where} | {row.version} | {row.why} |")
    return "\n".join(lines) + "\n"
