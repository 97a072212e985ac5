"""Training progress: a one-line bar with loss and tokens/s on a terminal, plain log lines otherwise,
and every logged step appended to the run's metrics.jsonl."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from transformers import TrainerCallback


# Logged values a progress line shows; GRPO logs its mean reward, the spread within groups, completion length and KL.
SHOWN = ("loss", "eval_loss", "train_loss", "learning_rate", "reward", "reward_std", "completions/mean_length", "kl", "tokens_per_second")


class MetricsCallback(TrainerCallback):
    def __init__(self, metrics_file: Path, *, echo=print, stream=None, sinks: tuple = ()) -> None:
        self.metrics_file = metrics_file
        self.sinks = sinks  # called with each record written (the experiment trackers)
        self.echo = echo
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty()
        self.clock = time.perf_counter()
        self.tokens_at_start = 0
        self.last_loss: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.clock = time.perf_counter()
        self.tokens_at_start = state.num_input_tokens_seen

    def _tokens_per_second(self, state) -> float:
        elapsed = time.perf_counter() - self.clock
        return (state.num_input_tokens_seen - self.tokens_at_start) / elapsed if elapsed > 0 else 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs,
                  "tokens_seen": state.num_input_tokens_seen, "tokens_per_second": round(self._tokens_per_second(state), 1)}
        record.pop("num_input_tokens_seen", None)
        with self.metrics_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink(record)
        if "loss" in logs:
            self.last_loss = logs["loss"]
        if not self.interactive:
            shown = {k: v for k, v in record.items() if k in SHOWN}
            self.echo(f"step {state.global_step}/{state.max_steps} " + " ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))

    def on_step_end(self, args, state, control, **kwargs):
        if self.interactive and state.is_world_process_zero:
            width = 30
            done = int(width * state.global_step / max(state.max_steps, 1))
            loss = f"{self.last_loss:.4f}" if self.last_loss is not None else "-"
            self.stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {state.global_step}/{state.max_steps} "
                              f"loss {loss} {self._tokens_per_second(state):.0f} tok/s")
            self.stream.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.interactive:
            self.stream.write("\n")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
