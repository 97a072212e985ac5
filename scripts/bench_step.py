"""Training step time with and without one of ftune's step optimisations, side by side.

Same process, same model, same batches, alternating the two variants step by step so drift in the machine's speed
hits both: by default the quickstart recipe (SmolLM2-135M-Instruct, LoRA r16 all-linear, batch 8, its packing and
mixed precision). Prints mean seconds per step and tokens/s of each, and their ratio. Run it on an idle machine.

``--compare``:

- ``labelled-positions``: the LM head at every position (the model's own loss) vs at the labelled positions only.
- ``addmm-lora``: peft's LoRA forward vs ``ftune.methods.lora_forward`` (the update added inside addmm); both with
  the labelled-positions loss, as ftune trains.
- ``fused-adamw``: AdamW tensor by tensor (``training.optimizer: adamw_torch``) vs one fused kernel
  (``adamw_torch_fused``, the default); each variant keeps its own optimizer state over the same parameters.
- ``packed-sdpa``: transformers' sdpa on the batches ``packing: auto`` chose for it (each padded or packed, whichever
  costs less under its masked attention) vs ``ftune.packed_attention``'s sdpa on one packed row per batch, a prompt
  prefix all of the batch's examples open with held once (what ftune trains an sdpa model with).

Every comparison also prints each variant's optimizer step alone (ms/step); all but ``fused-adamw`` step with fused AdamW.

Usage::

    python scripts/bench_step.py [--compare labelled-positions|addmm-lora|fused-adamw|packed-sdpa] [--steps 10]
                                 [--recipe recipes/smollm2-135m/lora-quickstart.yaml]
"""

from __future__ import annotations

import argparse
import time


# The two variants of each comparison, baseline first.
COMPARISONS = {
    "labelled-positions": ("LM head at every position", "LM head at labelled positions"),
    "addmm-lora": ("peft's LoRA forward", "LoRA update inside addmm"),
    "fused-adamw": ("AdamW tensor by tensor", "AdamW fused"),
    "packed-sdpa": ("sdpa, padded or masked packed", "packed sdpa, shared prefix"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/smollm2-135m/lora-quickstart.yaml")
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="labelled-positions")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each variant (after one warm-up each)")
    args = parser.parse_args()

    import torch

    from ftune.data import build_collator, build_datasets
    from ftune.data.collate import AutoCollator, linear_cost_in_tokens
    from ftune.hardware import resolve_precision
    from ftune.training.label_positions import keeps_labelled_positions, loss_at_labelled_positions
    from ftune.methods import apply_method
    from ftune.methods.lora_forward import addmm_lora_linear
    from ftune.model import load_base_model, load_tokenizer
    from ftune.packed_attention import set_attention
    from ftune.recipe import load_recipe
    from ftune.runtime import quiet_libraries

    quiet_libraries()
    recipe = load_recipe(args.recipe, [])
    tokenizer = load_tokenizer(recipe.model)
    splits = build_datasets(recipe.data, tokenizer, recipe.task)
    torch.manual_seed(0)
    model = apply_method(load_base_model(recipe.model, recipe.quantization, task=recipe.task), recipe.method, recipe.task).train()
    precision = resolve_precision(recipe.training.mixed_precision)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.mode == "bf16")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention = base.config._attn_implementation
    collate = keeps_labelled_positions(build_collator(model, tokenizer, task=recipe.task, packing=recipe.data.packing).collator)
    collates = {False: collate, True: collate}
    implementations = dict.fromkeys((False, True), base.config._attn_implementation)
    if args.compare == "packed-sdpa":
        if base.config._attn_implementation == attention:
            raise SystemExit(f"{args.recipe}: the model's {attention} attention does not take ftune's packed sdpa")
        implementations[False] = attention
        collates[False] = keeps_labelled_positions(AutoCollator(tokenizer.pad_token_id, linear_cost_in_tokens(base.config), False))
    labelled_loss = loss_at_labelled_positions()
    trained = [p for p in model.parameters() if p.requires_grad]
    fused = torch.optim.AdamW(trained, lr=1e-4, fused=True)
    optimizers = {True: fused, False: torch.optim.AdamW(trained, lr=1e-4, foreach=False) if args.compare == "fused-adamw" else fused}
    size = recipe.training.batch_size
    rows = [splits.train[i] for i in range(len(splits.train))]
    swapped = []
    if args.compare == "addmm-lora":  # apply_lora has swapped the plain LoRA linears already
        swapped = [module for module in model.modules() if type(module) is addmm_lora_linear()]
        if not swapped:
            raise SystemExit(f"{args.recipe}: no plain LoRA linear to compare")

    def step(batch, variant: bool) -> tuple[float, float]:
        """Seconds of the whole step, and of its optimizer step alone."""
        labelled = variant or args.compare != "labelled-positions"
        set_attention(model, implementations[variant])
        for module in swapped:
            module.__class__ = addmm_lora_linear() if variant else addmm_lora_linear().__base__
        inputs = dict(batch)
        labels = inputs.pop("labels") if labelled else inputs["labels"]
        if not labelled:
            inputs.pop("logits_to_keep")
        start = time.perf_counter()
        with autocast:
            outputs = model(**inputs)
            loss = labelled_loss(outputs, labels) if labelled else outputs.loss
        loss.backward()
        stepping = time.perf_counter()
        optimizers[variant].step()
        optimizers[variant].zero_grad()
        end = time.perf_counter()
        return end - start, end - stepping

    times = {False: [], True: []}
    optimizer_times = {False: [], True: []}
    tokens = 0
    for index in range(args.steps + 1):
        features = rows[index * size : (index + 1) * size]
        batches = {variant: collates[variant](features) for variant in (False, True)}
        for variant in ((False, True) if index % 2 else (True, False)):  # each goes first every other step
            seconds, optimizer_seconds = step(batches[variant], variant)
            if index:  # the first step of each warms up
                times[variant].append(seconds)
                optimizer_times[variant].append(optimizer_seconds)
        if index:
            tokens += sum(len(feature["input_ids"]) for feature in features)  # the examples' tokens, whatever the layout
    print(f"{args.recipe}: {args.steps} steps of batch {size}, precision {precision.mode}, torch threads {torch.get_num_threads()}")
    for variant, label in enumerate(COMPARISONS[args.compare]):
        mean = sum(times[variant]) / len(times[variant])
        optimizer_ms = 1000 * sum(optimizer_times[variant]) / len(optimizer_times[variant])
        print(f"  {label:<32} {mean:.3f} s/step  {tokens / sum(times[variant]):.0f} tokens/s  optimizer {optimizer_ms:.1f} ms/step")
    print(f"  speed-up: {sum(times[False]) / sum(times[True]):.2f}x")


if __name__ == "__main__":
    main()
