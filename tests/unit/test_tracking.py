"""The recipe's tracking section: trackers refused at validate when not installed, and what a tiny run reports to each.

TensorBoard is in the lock, so its event files are always read back with TensorBoard's own reader; MLflow, W&B and
trackio are optional extras the lock leaves out, and their tests run where they are installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import yaml

from ftune.recipe import load_recipe, validate_recipe
from ftune.run_dir import RunDir
from tests.conftest import REPO, invoke_ok, recipe_problems


def records(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in run.metrics.read_text().splitlines()]


def hide(monkeypatch, *names: str) -> None:
    """Make ``names`` look uninstalled to the recipe's check."""
    real = importlib.util.find_spec
    monkeypatch.setattr("ftune.recipe.tracking.importlib.util.find_spec", lambda name, *a: None if name in names else real(name, *a))


def test_a_tracker_that_is_not_installed_is_refused_with_the_pip_command(make_recipe, monkeypatch):
    hide(monkeypatch, "wandb", "mlflow")
    problems = recipe_problems(make_recipe(tracking={"report_to": ["tensorboard", "wandb", "mlflow"]}))
    assert "tracking.report_to" in problems and "wandb, mlflow are not installed" in problems
    assert "pip install 'ftune[wandb,mlflow]'" in problems and "tensorboard" not in problems.split("installed")[0]


def test_validate_prints_the_refusal_as_one_line_and_exits_2(make_recipe, monkeypatch):
    from typer.testing import CliRunner

    from ftune.cli import app

    hide(monkeypatch, "trackio")
    result = CliRunner().invoke(app, ["validate", str(make_recipe(tracking={"report_to": "trackio"}))])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "tracking.report_to" in lines[0] and "pip install 'ftune[trackio]'" in lines[0]


def test_a_finished_runs_recipe_loads_where_its_tracker_is_missing(make_recipe, monkeypatch):
    hide(monkeypatch, "wandb")
    raw = yaml.safe_load(make_recipe().read_text())
    raw["tracking"] = {"report_to": ["wandb"]}
    assert validate_recipe(raw, finished_run=True).tracking.report_to == ["wandb"]  # ftune eval on another machine


def test_validating_names_the_tracker_without_importing_it(make_recipe):
    path = make_recipe(tracking={"report_to": ["tensorboard"]})
    code = ("import sys; from ftune.recipe import load_recipe; r = load_recipe(sys.argv[1]); "
            "assert r.tracking.report_to == ['tensorboard']; print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("written, read", [("tensorboard", ["tensorboard"]), ("none", []), (None, [])])
def test_report_to_takes_one_name_or_none_as_transformers_does(make_recipe, written, read):
    assert load_recipe(make_recipe(tracking={"report_to": written})).tracking.report_to == read


@pytest.mark.parametrize("settings, named", [
    ({"mlflow_tracking_uri": "http://localhost:5000"}, "mlflow_tracking_uri is set but report_to does not list mlflow"),
    ({"wandb_mode": "online"}, "wandb_mode is set but report_to does not list wandb"),
    ({"report_to": ["tensorboard", "tensorboard"]}, "names a tracker twice"),
    ({"report_to": ["tensorbord"]}, "Did you mean 'tensorboard'?"),
])
def test_settings_without_their_tracker_are_refused(make_recipe, settings, named):
    assert named in recipe_problems(make_recipe(tracking=settings))


def test_flat_params_spell_out_every_key_of_the_resolved_recipe(make_recipe):
    from ftune.training.tracking import flat_params

    recipe = load_recipe(make_recipe(tracking={"report_to": ["tensorboard"], "tags": ["x"]}))
    params = flat_params(recipe)
    assert params["training.learning_rate"] == 5e-3 and params["method.name"] == "lora" and params["method.r"] == 4
    assert params["tracking.tags"] == '["x"]' and params["training.eval_steps"] == "null"
    assert all(isinstance(v, (str, int, float, bool)) for v in params.values())
    assert len(params) > 60  # every section, nested keys included


def test_tensorboard_event_files_hold_every_logged_step_the_recipe_and_the_run_files(make_recipe, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    invoke_ok("train", make_recipe(training={"eval_steps": 2}, tracking={"report_to": ["tensorboard"], "run_name": "tiny"}))
    run = RunDir(tmp_path / "run")
    events = EventAccumulator(str(run.tracking / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()

    logged = records(run)
    for key in ("loss", "eval_loss", "learning_rate", "tokens_per_second", "grad_norm"):
        expected = {r["step"]: r[key] for r in logged if key in r}
        got = {e.step: e.value for e in events.Scalars(key)}
        assert expected and got == pytest.approx(expected, rel=1e-6), key  # float32 in the event file
    assert sorted(e.step for e in events.Scalars("loss")) == [1, 2, 3, 4]

    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["training.learning_rate"].number_value == pytest.approx(5e-3)
    assert start.hparams["method.name"].string_value == "lora" and start.hparams["tracking.run_name"].string_value == "tiny"
    texts = {tag for tag in events.Tags()["tensors"]}
    assert {"recipe/text_summary", "summary/text_summary"} <= texts
    summary_text = events.Tensors("summary/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert json.loads(summary_text.strip("`").removeprefix("json\n")) == json.loads(run.summary.read_text())
    assert events.Tags()["images"] == ["loss_plot"]


def test_a_resumed_run_replaces_the_tensorboard_steps_logged_after_its_checkpoint(make_recipe, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import TrainerCallback

    from ftune.training.run import run_training

    class CrashAtLog(TrainerCallback):
        def on_log(self, args, state, control, **kwargs):
            if state.global_step == 3:  # logged, but after the last checkpoint (step 2)
                raise RuntimeError("simulated crash")

    recipe = load_recipe(make_recipe(training={"save_steps": 2}, tracking={"report_to": ["tensorboard"]}))
    with monkeypatch.context() as patch:
        patch.setattr("ftune.training.trainer.method_callbacks", lambda *args: [CrashAtLog()])
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_training(recipe, echo=lambda *_: None)
    run = run_training(recipe, resume=True, echo=lambda *_: None)
    events = EventAccumulator(str(run.tracking / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss")]
    assert sorted(steps) == [1, 2, 3, 4]  # step 3 once: the crashed run's copy is purged
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx({r["step"]: r["loss"] for r in records(run) if "loss" in r})


def test_preference_and_reward_metrics_reach_the_trackers_as_the_metrics_file_gets_them(make_recipe, tmp_path):
    """Whatever a stage logs (dpo's rewards/*, grpo's reward and kl) is in the record the trackers are handed."""
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ftune.training.progress import MetricsCallback
    from ftune.training.tracking import TrackingCallback, finish_tracking

    recipe = load_recipe(make_recipe(tracking={"report_to": ["tensorboard"]}))
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    tracking = TrackingCallback(recipe, run)
    metrics = MetricsCallback(run.metrics, echo=lambda *_: None, sinks=(tracking.log,))
    state = SimpleNamespace(global_step=0, max_steps=2, epoch=0, num_input_tokens_seen=0, is_world_process_zero=True)
    for callback in (metrics, tracking):
        callback.on_train_begin(None, state, None)
    state.global_step, state.num_input_tokens_seen = 2, 64
    logs = {"loss": 0.69, "rewards/accuracies": 0.75, "rewards/margins": 0.125, "reward": 1.5, "kl": 0.01, "logps/chosen": -12.0}
    metrics.on_log(None, state, None, logs=dict(logs))
    finish_tracking(SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[metrics, tracking])))
    events = EventAccumulator(str(run.tracking / "tensorboard"))
    events.Reload()
    [record] = records(run)
    for key in (*logs, "tokens_per_second", "tokens_seen"):
        [event] = events.Scalars(key)
        assert event.step == 2 and event.value == pytest.approx(record[key], rel=1e-6), key


def test_mlflow_local_store_holds_params_metrics_and_files(make_recipe, tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow import MlflowClient

    invoke_ok("train", make_recipe(tracking={"report_to": ["mlflow"], "project": "tiny", "tags": ["smoke"]}))
    run = RunDir(tmp_path / "run")
    client = MlflowClient(tracking_uri=f"sqlite:///{run.tracking / 'mlflow' / 'mlflow.db'}")
    [found] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert found.data.params["method.name"] == "lora" and float(found.data.params["training.learning_rate"]) == 5e-3
    assert "smoke" in found.data.tags and found.info.run_name == "run" and found.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "loss")}
    assert history == pytest.approx({r["step"]: r["loss"] for r in records(run) if "loss" in r})
    files = {f.path for f in client.list_artifacts(found.info.run_id)}
    assert {"summary.json", "metrics.jsonl", "loss.png", "recipe.yaml", "manifest.json"} <= files
    stored = run.tracking / "mlflow" / "artifacts" / found.info.run_id / "artifacts" / "summary.json"
    assert stored.read_text() == run.summary.read_text()  # in the run directory, not the working directory


def test_wandb_offline_writes_its_run_folder_in_the_run_directory(make_recipe, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    invoke_ok("train", make_recipe(tracking={"report_to": ["wandb"], "project": "tiny"}))
    folders = list((RunDir(tmp_path / "run").tracking / "wandb").glob("offline-run-*"))
    [log] = folders[0].glob("run-*.wandb") if len(folders) == 1 else []
    data = log.read_bytes()  # what wandb sync uploads: the config, each step's metrics, the run's files
    assert all(name.encode() in data for name in ("method.name", "tokens_per_second", "eval_loss", "summary.json", "loss.png"))


def test_trackio_logs_every_step_and_the_recipe_locally(make_recipe, tmp_path):
    pytest.importorskip("trackio", reason="the trackio extra is not installed")
    # trackio fixes its folder when first imported (TRL imports it where installed), so the run is a process of its own.
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    subprocess.run([sys.executable, "-m", "ftune", "train", str(make_recipe(tracking={"report_to": ["trackio"], "project": "tiny"}))],
                   env=env, cwd=REPO, check=True, capture_output=True)
    read = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps([S.get_runs('tiny'), S.get_logs('tiny', 'run'), S.get_run_config('tiny', 'run')]))")
    runs, logs, config = json.loads(subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, check=True).stdout)
    assert runs == ["run"] and config["method.name"] == "lora"
    assert {r["step"]: r["loss"] for r in logs if "loss" in r} == pytest.approx(
        {r["step"]: r["loss"] for r in records(RunDir(tmp_path / "run")) if "loss" in r})
