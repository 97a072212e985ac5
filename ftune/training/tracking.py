"""Experiment trackers (the recipe's ``tracking`` section): what a run reports to TensorBoard, MLflow, W&B and trackio.

Each tracker gets the same three things: the resolved recipe as parameters when training starts, every logged step's
record as metrics (the line ``metrics.jsonl`` gets, under the same names: loss, learning_rate, tokens_per_second,
eval_*, a stage's reward and preference metrics), and the run's files at the end (summary.json, metrics.jsonl,
loss.png, recipe.yaml, manifest.json). ``TrackingCallback`` starts them on rank 0 only; ``finish_tracking`` hands
them the files once the run directory is complete. Each library is imported only when a recipe names it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from ftune.recipe import Recipe
from ftune.recipe.tracking import TrackingConfig
from ftune.run_dir import RunDir

# The run's files each tracker receives at the end, where it has a place for them.
ARTIFACTS = ("summary", "metrics", "loss_plot", "recipe", "manifest")


@dataclass(frozen=True)
class Start:
    """What a tracker opens its run with."""

    run: RunDir
    config: TrackingConfig
    name: str  # the run's name in the tracker
    first_step: int  # 0, or the checkpoint step a resumed run continues from
    params: dict  # flat_params of the recipe
    recipe_text: str  # the resolved recipe as YAML


def flat_params(recipe: Recipe) -> dict[str, str | int | float | bool]:
    """The resolved recipe as ``section.key`` -> scalar (lists as JSON, null as "null"): what every tracker takes."""
    out: dict = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            key = prefix[:-1]
            out[key] = json.dumps(node) if isinstance(node, list) else "null" if node is None else node

    walk(recipe.model_dump(mode="json"), "")
    return out


class TensorBoard:
    """Event files in RUN/tracking/tensorboard: scalars per step, the recipe as hparams and text, the loss plot as an image."""

    def __init__(self, start: Start) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # A resumed run drops the events logged after its checkpoint, as metrics.jsonl does.
        self.writer = SummaryWriter(log_dir=str(start.run.tracking / "tensorboard"), purge_step=start.first_step + 1 if start.first_step else None)
        for summary in hparams(start.params, {"loss": 0.0, "eval_loss": 0.0}):  # the metrics the HParams view shows
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("recipe", "```yaml\n" + start.recipe_text + "```")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crashed run keeps what it logged

    def files(self, paths: dict[str, Path], summary: dict, step: int) -> None:
        import numpy as np
        from PIL import Image

        self.writer.add_text("summary", "```json\n" + json.dumps(summary, indent=2) + "\n```", step)
        if paths["loss_plot"].is_file():
            with Image.open(paths["loss_plot"]) as image:
                self.writer.add_image("loss_plot", np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class MLflow:
    """An MLflow run in a local store (RUN/tracking/mlflow: an SQLite database beside an artifacts folder; MLflow 3
    refuses a plain file store unless told to) or at ``mlflow_tracking_uri``, through MlflowClient, so nothing of
    mlflow's process-wide active run is touched."""

    def __init__(self, start: Start) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        config, local = start.config, start.run.tracking / "mlflow"
        if config.mlflow_tracking_uri is None:
            local.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=config.mlflow_tracking_uri or f"sqlite:///{local / 'mlflow.db'}")
        experiment = self.client.get_experiment_by_name(config.project)
        # A new local experiment keeps its artifacts in the run directory, not in ./mlartifacts of the working directory.
        artifacts = None if config.mlflow_tracking_uri else (local / "artifacts").as_uri()
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(config.project, artifact_location=artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=start.name, tags={tag: "" for tag in config.tags}).info.run_id
        items = [Param(key, str(value)[:6000]) for key, value in start.params.items()]  # MLflow's longest parameter value
        for first in range(0, len(items), 100):  # and most parameters per call
            self.client.log_batch(self.run_id, params=items[first:first + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    def files(self, paths: dict[str, Path], summary: dict, step: int) -> None:
        for path in paths.values():
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Wandb:
    """A W&B run, offline in RUN/tracking/wandb unless ``wandb_mode: online``; the run's files as one artifact."""

    def __init__(self, start: Start) -> None:
        import wandb

        config, self.name = start.config, start.name
        start.run.tracking.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=config.project, name=start.name, tags=config.tags or None, config=start.params,
                              dir=str(start.run.tracking), mode=config.wandb_mode)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def files(self, paths: dict[str, Path], summary: dict, step: int) -> None:
        import re

        import wandb

        self.run.summary.update({key: value for key, value in summary.items() if isinstance(value, (int, float))})
        artifact = wandb.Artifact(re.sub(r"[^\w.-]", "-", f"{self.name}-run"), type="ftune-run")
        for path in paths.values():
            if path.is_file():
                artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    """A trackio run in trackio's local database (``trackio show`` opens it); trackio keeps no files, so the summary's
    figures are logged as the last step's metrics."""

    def __init__(self, start: Start) -> None:
        import trackio

        self.trackio = trackio
        # No space_id: the run goes to trackio's local database ($TRACKIO_DIR, by default ~/.cache/huggingface/trackio).
        trackio.init(project=start.config.project, name=start.name, config=start.params, embed=False)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def files(self, paths: dict[str, Path], summary: dict, step: int) -> None:
        self.trackio.log({f"summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self.trackio.finish()


TRACKERS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": Wandb, "trackio": Trackio}


class TrackingCallback(TrainerCallback):
    """Starts the recipe's trackers when training starts (rank 0) and hands them each logged record (``log``, which
    the metrics callback calls with the line it writes to metrics.jsonl)."""

    def __init__(self, recipe: Recipe, run: RunDir) -> None:
        self.recipe, self.run = recipe, run
        self.trackers: list | None = None
        self.last_step = 0

    def start(self, first_step: int) -> None:
        from ftune.run_dir import recipe_yaml

        config = self.recipe.tracking
        start = Start(self.run, config, config.run_name or self.run.root.name, first_step, flat_params(self.recipe), recipe_yaml(self.recipe))
        self.trackers = [TRACKERS[tracker](start) for tracker in config.report_to]

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.trackers is None:
            self.start(state.global_step)

    def log(self, record: dict) -> None:
        if self.trackers is None:  # a resume past the last step only evaluates
            self.start(record["step"])
        self.last_step = record["step"]
        metrics = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(metrics, self.last_step)

    def finish(self) -> None:
        """Hand the trackers the finished run's files and close them."""
        if self.trackers is None:
            return
        paths = {name: getattr(self.run, name) for name in ARTIFACTS}
        summary = json.loads(paths["summary"].read_text(encoding="utf-8")) if paths["summary"].is_file() else {}
        for tracker in self.trackers:
            tracker.files(paths, summary, self.last_step)
            tracker.close()
        self.trackers = []


def tracking_callback(recipe: Recipe, run: RunDir) -> TrackingCallback | None:
    return TrackingCallback(recipe, run) if recipe.tracking.report_to else None


def finish_tracking(trainer) -> None:
    """Close the trainer's trackers, once summary.json is written."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TrackingCallback):
            callback.finish()
