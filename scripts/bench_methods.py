"""Compare fine-tuning methods: trainable share on the tiny test Llama and on SmolLM2-135M, and
seconds per optimizer step on SmolLM2-135M (fp32, batch 4 x 128 tokens, AdamW, mean of the steps
after one warm-up step). Prints a Markdown table; run it on an otherwise idle machine.

Usage::

    python scripts/bench_methods.py                      # every method (~10 min on 2 CPU cores)
    python scripts/bench_methods.py --only lora,prefix   # a subset
    python scripts/bench_methods.py --tiny-only          # trainable shares on the tiny model (seconds)
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

# (row label, method section, quantization bits): each method with the knobs its row reports.
CASES = [
    ("full", {"name": "full"}, None),
    ("freeze (top 1 layer)", {"name": "freeze", "trainable_layers": 1}, None),
    ("bitfit", {"name": "bitfit"}, None),
    ("lora r16 all-linear", {"name": "lora", "r": 16}, None),
    ("lora r16 + dora", {"name": "lora", "r": 16, "use_dora": True}, None),
    ("lora r16 pissa", {"name": "lora", "r": 16, "init": "pissa"}, None),
    ("qlora r16 (4-bit nf4)", {"name": "lora", "r": 16}, 4),
    ("adalora 12->8", {"name": "adalora"}, None),
    ("ia3", {"name": "ia3"}, None),
    ("loha r8", {"name": "loha"}, None),
    ("lokr r8", {"name": "lokr"}, None),
    ("oft block 32", {"name": "oft"}, None),
    ("boft block 4", {"name": "boft"}, None),
    ("vera r256", {"name": "vera"}, None),
    ("prefix 20 tokens", {"name": "prefix"}, None),
    ("prompt 20 tokens", {"name": "prompt"}, None),
    ("ptuning 20 tokens (mlp)", {"name": "ptuning"}, None),
    ("ptuning_v2 20 tokens", {"name": "ptuning_v2"}, None),
    ("adapter rf16", {"name": "adapter"}, None),
]
BATCH, SEQ = 4, 128


def build_tiny():
    """The tests' tiny Llama (hidden 64, 2 layers, vocab 768, tied embeddings), in memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=768, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def load_smollm2(bits=None):
    from ftune.model import load_base_model
    from ftune.recipe.schema import ModelConfig, QuantizationConfig

    return load_base_model(ModelConfig(dtype="float32"), QuantizationConfig(bits=bits))


def prepare(base, section: dict):
    """(model, Trainer-style callbacks) or the reason the method does not apply to this model."""
    from ftune.errors import FtuneError
    from ftune.methods import apply_method, method_callbacks
    from ftune.recipe.methods import method_class

    config = method_class(section["name"]).model_validate(section)
    try:
        model = apply_method(base, config, "causal_lm")
    except FtuneError as exc:
        return None, [], str(exc).removeprefix("method: ").split(";")[0].split(" (")[0]
    from ftune.run_dir import RunDir

    return model, method_callbacks(model, config, RunDir(Path(tempfile.mkdtemp(prefix="ftune-bench-")))), None


def share(model) -> float:
    from ftune.methods import count_parameters

    trainable, total = count_parameters(model)
    return 100 * trainable / total


def seconds_per_step(model, callbacks, steps: int) -> float:
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (BATCH, SEQ), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    state = SimpleNamespace(max_steps=1000, global_step=0)
    for callback in callbacks:
        callback.on_train_begin(None, state, None)
    model.train()
    times = []
    for step in range(steps + 1):  # step 0 warms up (allocations, lazy init)
        state.global_step = step
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        for callback in callbacks:
            callback.on_optimizer_step(None, state, None)
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated method names (e.g. lora,prefix)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    parser.add_argument("--tiny-only", action="store_true", help="skip SmolLM2 (shares on the tiny model only)")
    args = parser.parse_args()

    import torch

    from ftune.recipe.methods import method_class
    from ftune.runtime import quiet_libraries

    quiet_libraries()
    wanted = set(filter(None, args.only.split(",")))
    cases = [c for c in CASES if not wanted or c[1]["name"] in wanted]
    print(f"torch threads: {torch.get_num_threads()}, load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    # The load column is the 1-minute load average after the row: timings taken beside other jobs
    # on a 2-core machine inflate several-fold, so only rows measured at a load near 1 compare.
    print("| method | tiny Llama trainable % | SmolLM2-135M trainable % | s/step SmolLM2 (fp32, 4x128) | mergeable | load |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for label, section, bits in cases:
        # The tiny model is built in memory, unquantized: 4-bit weights count unpacked, so the share is the same.
        tiny_model, _, tiny_skip = prepare(build_tiny(), section)
        tiny = f"n/a: {tiny_skip}" if tiny_skip else f"{share(tiny_model):.4f}"
        small = speed = "-"
        if not args.tiny_only:
            model, callbacks, skip = prepare(load_smollm2(bits), section)
            if skip:
                small = speed = f"n/a: {skip}"
            else:
                small = f"{share(model):.4f}"
                speed = f"{seconds_per_step(model, callbacks, args.steps):.2f}"
            del model, callbacks
            gc.collect()
        mergeable = "yes" if method_class(section["name"]).mergeable else "no"
        print(f"| {label} | {tiny} | {small} | {speed} | {mergeable} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
