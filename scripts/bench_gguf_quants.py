"""Logit error of every GGUF weight type ftune writes, measured the way ``ftune export`` verifies a file.

For each type: export the model with ``ftune.export.export_gguf``, load the file back through transformers'
GGUF loader and report the largest logit difference as a fraction of the largest |logit| (the figure
``LOGIT_TOLERANCE`` in ftune/export.py bounds), next-token agreement, and the file size. Run on the tests'
tiny Llama (random weights, initializer_range 0.1) and on SmolLM2-135M-Instruct (the built-in model).

Note: the built-in SmolLM2 ships as a Q4_1 GGUF, so its weights already lie on the q4_1 grid and re-encoding
them as q4_1 is nearly lossless; its q4_1 row understates the error a model trained in float would see.

Usage::

    python scripts/bench_gguf_quants.py              # tiny model and SmolLM2 (~3 min on 2 CPU cores)
    python scripts/bench_gguf_quants.py --tiny-only
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def tiny_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(Path(__file__).resolve().parent.parent / "tests" / "assets" / "tiny-tokenizer")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, initializer_range=0.1)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def smollm2() -> Path:
    from ftune.model import resolve_model_source
    from ftune.recipe.schema import ModelConfig

    return Path(resolve_model_source(ModelConfig(name_or_path="smollm2-135m-instruct")).location)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-only", action="store_true")
    args = parser.parse_args()

    from ftune.export import LOGIT_TOLERANCE, export_gguf
    from ftune.gguf import GGUF_QUANTS
    from ftune.runtime import quiet_libraries

    quiet_libraries()
    from transformers.utils import logging

    logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as scratch:
        models = {"tiny llama": tiny_model(Path(scratch) / "tiny")}
        if not args.tiny_only:
            models["SmolLM2-135M"] = smollm2()
        print("| model | quant | size MiB | max abs logit diff / max abs logit | tolerance | next-token agreement "
              "| file vs source rounded as stored |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for label, folder in models.items():
            for quant in GGUF_QUANTS:
                out = Path(scratch) / f"{label.split()[0]}-{quant}.gguf"
                report = export_gguf(folder, out, quant=quant)
                scale = report.tolerance / LOGIT_TOLERANCE[quant]
                print(f"| {label} | {quant} | {report.size_bytes / 2**20:.1f} | {report.max_abs_logit_diff / scale:.2e} | "
                      f"{LOGIT_TOLERANCE[quant]:.0e} | {report.next_token_agreement:.3f} | "
                      f"{report.writer_max_abs_logit_diff / scale:.1e} |", flush=True)
                out.unlink()


if __name__ == "__main__":
    main()
