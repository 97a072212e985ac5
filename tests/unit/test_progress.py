"""Progress output: a redrawn bar on a terminal, plain lines in logs, and every log in metrics.jsonl."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

from ftune.training.progress import MetricsCallback


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def state(step: int, tokens: int = 0):
    return SimpleNamespace(global_step=step, max_steps=4, epoch=step / 4, num_input_tokens_seen=tokens, is_world_process_zero=True)


def test_terminal_gets_a_redrawn_bar_and_metrics_file_gets_every_log(tmp_path):
    stream, echoed = FakeTerminal(), []
    callback = MetricsCallback(tmp_path / "metrics.jsonl", echo=echoed.append, stream=stream)
    callback.on_train_begin(None, state(0), None)
    callback.on_log(None, state(1, 100), None, logs={"loss": 2.5, "learning_rate": 1e-3})
    callback.on_step_end(None, state(1, 100), None)
    callback.on_train_end(None, state(4), None)
    assert "\r[" in stream.getvalue() and "1/4 loss 2.5000" in stream.getvalue() and "tok/s" in stream.getvalue()
    assert echoed == []  # no log lines on a terminal, the bar carries the loss
    [record] = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and record["loss"] == 2.5 and record["tokens_seen"] == 100


def test_non_terminal_gets_plain_lines(tmp_path):
    echoed = []
    callback = MetricsCallback(tmp_path / "metrics.jsonl", echo=echoed.append, stream=io.StringIO())
    callback.on_train_begin(None, state(0), None)
    callback.on_log(None, state(2, 50), None, logs={"loss": 1.25})
    callback.on_step_end(None, state(2, 50), None)
    assert len(echoed) == 1 and echoed[0].startswith("step 2/4 loss=1.25")
