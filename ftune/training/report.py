"""What a finished run reports about itself: ``summary.json``, ``manifest.json`` and the loss plot.

The summary holds the run's figures (losses, steps, speed, memory, parameter counts); the manifest how it
was made (versions, data fingerprint, seed, precision and hardware decisions, lineage of chained runs), so
the run directory describes itself on any machine it is copied to.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from ftune import __version__
from ftune.recipe import Recipe
from ftune.run_dir import RunDir, run_lineage
from ftune.training.checkpoints import logged_train_loss


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    from ftune.resources import peak_rss_mib

    return peak_rss_mib()


def build_summary(run: RunDir, eval_metrics: dict, trainer, wall: float, trained_here: int, trainable: int, total: int) -> dict:
    """Final figures; speed and wall time are those of the steps trained by this process."""
    state = trainer.state
    tokens = state.num_input_tokens_seen
    per_step = tokens / max(state.global_step, 1)
    summary = {
        "train_loss": logged_train_loss(run),
        "steps": state.global_step,
        "epochs": state.epoch,
        "tokens_seen": tokens,
        "tokens_per_second": per_step * trained_here / wall if wall and trained_here else 0.0,
        "computed_tokens_per_second": getattr(trainer, "computed_tokens", 0) / wall if wall else 0.0,
        "wall_time_s": wall,
        "peak_memory_mb": peak_memory_mb(),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
    }
    if "eval_loss" in eval_metrics:
        summary["eval_loss"] = eval_metrics["eval_loss"]
    if "eval_rewards/accuracies" in eval_metrics:  # preference stages: share of held-out pairs ranked right
        summary["eval_preference_accuracy"] = eval_metrics["eval_rewards/accuracies"]
    if "eval_kl" in eval_metrics:  # kto: the held-out KL estimate, and the desirable minus undesirable mean reward
        summary["eval_kl"] = eval_metrics["eval_kl"]
        summary["eval_reward_margin"] = eval_metrics.get("eval_rewards/margins")
    if "eval_reward" in eval_metrics:  # grpo: the mean weighted reward of completions sampled for held-out prompts
        summary["eval_reward"] = eval_metrics["eval_reward"]
        if "eval_rewards/margins" not in eval_metrics:
            summary.pop("eval_reward_margin", None)  # grpo's eval_kl is its policy's KL to the reference; it has no margin
    return summary


def build_manifest(recipe: Recipe, started: datetime, *, launch, model=None) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from ftune.data import data_fingerprint
    from ftune.training.base_dtype import describe_base_dtype
    from ftune.model import resolve_model_source

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "ftune": __version__,
        "versions": {name: installed(name) for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")},
        "python": platform.python_version(),
        "model_source": resolve_model_source(recipe.model).location,
        "stage": recipe.stage,
        "lineage": run_lineage(recipe.model.name_or_path),  # earlier runs this one continues from, oldest first
        "data_fingerprint": data_fingerprint(recipe.data),
        "seed": recipe.training.seed,
        "mixed_precision": {
            "requested": recipe.training.mixed_precision,
            "used": launch.precision.mode,
            "reason": launch.precision.reason,
            "warning": launch.precision.warning,
            "frozen_base_dtype": describe_base_dtype(model) if model is not None else None,  # bfloat16: held in bf16 for autocast
        },
        "hardware": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": {"used": launch.threads.count, "reason": launch.threads.reason},
            "attention": getattr(getattr(model, "config", None), "_attn_implementation", None),
            "tf32": launch.tf32,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        },
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "started_at": started.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }


def save_loss_plot(run: RunDir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in run.metrics.read_text().splitlines() if line] if run.metrics.is_file() else []
    figure, axis = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axis.plot(*zip(*points), marker="o" if label == "eval" else None, label=label)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.legend()
    if rewards := [(r["step"], r["reward"]) for r in records if r.get("reward") is not None]:  # GRPO: the mean reward on its own scale
        right = axis.twinx()
        right.plot(*zip(*rewards), color="tab:green", label="reward")
        right.set_ylabel("mean reward")
        right.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(run.loss_plot, dpi=100)
    plt.close(figure)
