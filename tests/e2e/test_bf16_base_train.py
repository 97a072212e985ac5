"""ftune train in bf16 with LoRA holds the frozen base in bf16: the header and manifest say so, the saved adapter is
the float32 file a float32 run writes (same tensors, names and dtypes), and the run reloads for eval."""

from __future__ import annotations

import json

from safetensors.torch import load_file
from typer.testing import CliRunner

from ftune.cli import app
from ftune.run_dir import RunDir

runner = CliRunner()


def train(make_recipe, tmp_path, precision: str) -> tuple[RunDir, str]:
    run = RunDir(tmp_path / precision)
    recipe = make_recipe(training={"max_steps": 2, "save_steps": 2, "mixed_precision": precision})  # bf16 forced: auto is float32 on AVX2
    result = runner.invoke(app, ["train", str(recipe), "--set", f"output_dir={run.root}"])
    assert result.exit_code == 0, result.output
    return run, result.output


def test_bf16_run_holds_the_base_in_bf16_and_saves_the_same_float32_adapter(make_recipe, tmp_path):
    held, output = train(make_recipe, tmp_path, "bf16")
    plain, plain_output = train(make_recipe, tmp_path, "no")
    assert "frozen base dtype: bfloat16" in output and "frozen base dtype" not in plain_output
    assert json.loads(held.manifest.read_text())["mixed_precision"]["frozen_base_dtype"] == "bfloat16"
    assert json.loads(plain.manifest.read_text())["mixed_precision"]["frozen_base_dtype"] == "float32"
    adapter, reference = (load_file(run.model / "adapter_model.safetensors") for run in (held, plain))
    assert {k: (v.dtype, v.shape) for k, v in adapter.items()} == {k: (v.dtype, v.shape) for k, v in reference.items()}
    assert adapter and all(str(v.dtype) == "torch.float32" for v in adapter.values())
    assert (held.model / "adapter_config.json").read_text() == (plain.model / "adapter_config.json").read_text()
    result = runner.invoke(app, ["eval", str(held.root)])
    assert result.exit_code == 0, result.output


def test_rows_past_the_loss_chunk_train_on_a_bf16_base(make_recipe, tmp_path, monkeypatch):
    # The chunked loss runs the head after the forward, outside autocast, where a bf16 head met float32 hidden states.
    from ftune.training import chunked_loss

    monkeypatch.setattr(chunked_loss, "LOSS_CHUNK", 4)  # the tiny rows are shorter than the real chunk
    run, output = train(make_recipe, tmp_path, "bf16")
    assert "frozen base dtype: bfloat16" in output and "4 positions at a time" in output
    losses = [json.loads(line)["loss"] for line in run.metrics.read_text().splitlines() if '"loss"' in line]
    assert losses and all(0 < loss < 20 for loss in losses)
