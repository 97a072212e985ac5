"""Recipe schema of the ``tracking`` section: the experiment trackers a run reports to, and where they write.

Every tracker is local first: TensorBoard event files and an MLflow store under the run directory, W&B in
offline mode, trackio's local database; only ``mlflow_tracking_uri`` or ``wandb_mode: online`` send anything over
the network. Each tracker is an optional extra: a recipe that names one that is not installed is refused with the
pip command, decided with ``importlib.util.find_spec`` so validating a recipe never imports the tracker.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ftune.recipe.method_base import Strict
from ftune.recipe.paths import checks_paths

# report_to name -> the module it imports; the optional extra of pyproject.toml and the pip package share the name.
TRACKER_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}
TrackerName = Literal["tensorboard", "mlflow", "wandb", "trackio"]


def tracker_installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKER_MODULES[name]) is not None


class TrackingConfig(Strict):
    report_to: list[TrackerName] = Field(
        default_factory=list,
        description="Experiment trackers the run reports to, any of tensorboard, mlflow, wandb, trackio (each an optional "
        "extra: pip install 'ftune[NAME]'); [] = none. They get every logged step's metrics (as metrics.jsonl), the "
        "resolved recipe as parameters, and summary.json, metrics.jsonl and loss.png as artifacts at the end.",
    )
    run_name: str | None = Field(None, description="The run's name in the trackers; null = the run directory's name.")
    tags: list[str] = Field(default_factory=list, description="Tags the trackers file the run under.")
    project: str = Field("ftune", min_length=1, description="W&B and trackio project, MLflow experiment.")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking server or store URI; null = a local SQLite store with its artifacts in RUN/tracking/mlflow."
    )
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="offline: W&B writes its run into RUN/tracking/wandb (wandb sync uploads it later); online: streams to W&B."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_none(cls, value: object) -> object:
        # report_to: tensorboard and report_to: none read as transformers' own TrainingArguments.report_to do.
        if value is None or value == "none":
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _installed(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if len(set(value)) < len(value):
            raise ValueError("names a tracker twice; list each once")
        # A finished run's recipe is reread by eval/merge/export, which report to no tracker.
        missing = [name for name in value if checks_paths(info) and not tracker_installed(name)]
        if missing:
            one = len(missing) == 1
            raise ValueError(f"{', '.join(missing)} {'is' if one else 'are'} not installed; install with: pip install 'ftune[{','.join(missing)}]' "
                             f"(or pip install {' '.join(missing)}), or remove {'it' if one else 'them'} from tracking.report_to")
        return value

    @model_validator(mode="after")
    def _settings_match_trackers(self) -> TrackingConfig:
        unused = [(key, tracker) for key, tracker, is_set in (
            ("mlflow_tracking_uri", "mlflow", self.mlflow_tracking_uri is not None),
            ("wandb_mode", "wandb", self.wandb_mode != "offline"),
        ) if is_set and tracker not in self.report_to]
        if unused:
            key, tracker = unused[0]
            raise ValueError(f"{key} is set but report_to does not list {tracker}; add {tracker} to tracking.report_to or remove {key}")
        return self
