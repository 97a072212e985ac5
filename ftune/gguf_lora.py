"""GGUF LoRA adapters: a run's peft LoRA adapter as one llama.cpp adapter file, served on top of a base GGUF
(``llama-cli -m base.gguf --lora adapter.gguf``; Ollama's ``ADAPTER`` line), so one base serves many fine-tunes.

The layout is the one llama.cpp's own ``convert_lora_to_gguf.py`` writes and ``llama-adapter.cpp`` reads:
``general.type = adapter``, ``adapter.type = lora``, per adapted weight ``<llama.cpp name>.lora_a`` (r x in) and
``.lora_b`` (out x r), and ``adapter.lora.alpha``, from which llama.cpp scales each update by alpha / r. The
rows of B take the reordering the base weight takes in the base file (rotary q/k layout, BLOOM's fused qkv):
B @ A is a weight whose rows are reordered by reordering B's rows alone. ``adapter_deltas`` reads a file back
into weight updates in Hugging Face's layout, which is how ``ftune.export`` verifies it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ftune.gguf import encode_tensor, gguf_architecture, gguf_name_of, row_reordering, stored_transposed, write_out
from ftune.gguf_tokenizer import UnsupportedExport

PEFT_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "a", ".lora_B.weight": "b"}


def adapter_quant(base_quant: str) -> str:
    """The adapter's own storage: small enough that f16 costs nothing; f32 beside an f32 base so that pair is exact."""
    return "f32" if base_quant == "f32" else "f16"


def check_lora_adapter(adapter_dir: Path, method: str) -> dict:
    """The adapter's peft config, refusing (before any weights load) what llama.cpp's LoRA adapters cannot express."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise UnsupportedExport(f"--format gguf-lora needs a LoRA adapter run; {adapter_dir} holds no adapter_config.json "
                                f"(method {method!r}); export the whole model with --format gguf")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    merged_only = "export the merged model with --format gguf instead"
    if config.get("peft_type") != "LORA":
        raise UnsupportedExport(f"--format gguf-lora writes LoRA adapters; method {method!r} is peft type "
                                f"{config.get('peft_type')!r}, which llama.cpp cannot load as an adapter; {merged_only}")
    for key, why in (("use_dora", "DoRA's magnitude vector"), ("modules_to_save", "fully trained modules"),
                     ("lora_bias", "LoRA biases"), ("trainable_token_indices", "trained token embeddings")):
        if config.get(key):
            raise UnsupportedExport(f"--format gguf-lora: this adapter has {why} ({key}), which llama.cpp's LoRA "
                                    f"adapters cannot hold; {merged_only}")
    return config


def _pattern_value(pattern: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key matching the module name's tail."""
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def lora_pairs(adapter_dir: Path) -> dict[str, tuple[Any, Any, float]]:
    """module name (as in the base model) -> (A, B, peft's scaling of B @ A), float32 numpy arrays."""
    from safetensors.numpy import load_file

    config = check_lora_adapter(adapter_dir, "lora")
    halves: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(Path(adapter_dir) / "adapter_model.safetensors").items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise UnsupportedExport(f"--format gguf-lora: the adapter holds {key!r}, which is not a LoRA A or B matrix; "
                                    "export the merged model with --format gguf instead")
        module = key.removeprefix(PEFT_PREFIX).removesuffix(suffix)
        halves.setdefault(module, {})[_SUFFIXES[suffix]] = tensor.astype("float32")
    pairs = {}
    for module, half in halves.items():
        rank = _pattern_value(config.get("rank_pattern"), module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        pairs[module] = (half["a"], half["b"], scaling)
    return pairs


def write_lora_gguf(adapter_dir: Path, model_config: Any, path: Path, quant: str, *, name: str) -> dict:
    """Write the adapter at ``path`` for a base of ``model_config``; returns what llama.cpp will compute from it."""
    import gguf

    arch_name, arch = gguf_architecture(model_config)
    name_map = gguf.get_tensor_name_map(arch, model_config.num_hidden_layers)
    pairs = lora_pairs(adapter_dir)
    # llama.cpp scales every pair by one alpha / its rank: write peft's alpha where one value reproduces every scaling,
    # else fold each scaling into B and write no alpha (llama.cpp then scales by 1).
    alphas = {round(scaling * a.shape[0], 6) for a, _, scaling in pairs.values()}
    alpha = alphas.pop() if len(alphas) == 1 else 0.0
    writer = gguf.GGUFWriter(path, arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    for module, (a, b, scaling) in sorted(pairs.items()):
        kind, gguf_name = gguf_name_of(name_map, f"{module}.weight", arch_name)
        if kind in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT):
            raise UnsupportedExport(f"--format gguf-lora: the adapter trains {module!r}; llama.cpp applies LoRA to the "
                                    "layers' linear weights only; export the merged model with --format gguf instead")
        if not alpha:
            b = b * scaling
        if (reorder := row_reordering(model_config, kind)) is not None:
            b = reorder(b)
        base_name = gguf_name.removesuffix(".weight") + ".weight"
        for suffix, data in ((".lora_a", a), (".lora_b", b)):
            encoded, stored = encode_tensor(data, qtype)
            writer.add_tensor(base_name + suffix, encoded, raw_dtype=stored)
    write_out(writer)
    return {"alpha": alpha, "modules": len(pairs), "ranks": sorted({a.shape[0] for a, _, _ in pairs.values()})}


def adapter_deltas(path: Path, model: Any) -> dict[str, Any]:
    """Parameter name of ``model`` -> the float32 update (a torch tensor in that parameter's layout) llama.cpp adds
    when it loads the adapter file at ``path`` on top of ``model``'s weights."""
    import gguf
    import numpy as np
    import torch

    config = model.config
    arch_name, arch = gguf_architecture(config)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    reader = gguf.GGUFReader(path)
    alpha = float(reader.get_field(gguf.Keys.Adapter.LORA_ALPHA).contents())
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype("float32") for t in reader.tensors}
    deltas = {}
    for hf_name, parameter in model.named_parameters():
        if not hf_name.endswith(".weight"):
            continue
        kind, gguf_name = gguf_name_of(name_map, hf_name, arch_name)
        a, b = tensors.get(f"{gguf_name}.lora_a"), tensors.get(f"{gguf_name}.lora_b")
        if a is None or b is None:
            continue
        delta = (alpha / b.shape[1] if alpha else 1.0) * (b @ a)
        if (reorder := row_reordering(config, kind)) is not None:
            order = reorder(np.arange(delta.shape[0]).reshape(-1, 1))[:, 0]
            delta = delta[np.argsort(order)]
        if stored_transposed(model, hf_name):
            delta = delta.T
        deltas[hf_name] = torch.from_numpy(np.ascontiguousarray(delta)).reshape(parameter.shape)
    return deltas


def add_deltas(model: Any, deltas: dict[str, Any]) -> Any:
    """``model`` with each update added to its parameter (in place)."""
    import torch

    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            parameters[name].add_(delta.to(parameters[name].dtype))
    return model


def base_gguf_path(adapter_file: Path, quant: str) -> Path:
    """Where the base file of an adapter export lies: beside the adapter, named by its quantization."""
    return adapter_file.with_name(f"base-{quant}.gguf")
