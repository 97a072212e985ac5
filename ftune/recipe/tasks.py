"""The tasks a recipe can train, and every per-task fact the stages look up, in one table.

``TASKS[recipe.task]`` says which transformers class loads a complete model of the task, which peft
task type wraps it, and what the argmax agreement of a parity check counts. Stage-specific
behaviour keyed by task (how eval scores it) stays in the stage, keyed by these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CAUSAL_LM = "causal_lm"
CLASSIFICATION = "classification"
TaskName = Literal["causal_lm", "classification"]


@dataclass(frozen=True)
class TaskSpec:
    auto_class: str  # transformers Auto* class of a complete model folder
    peft_task_type: str  # peft TaskType name
    agreement: str  # what a parity check's argmax agreement counts


TASKS: dict[str, TaskSpec] = {
    CAUSAL_LM: TaskSpec("AutoModelForCausalLM", "CAUSAL_LM", "next-token"),
    CLASSIFICATION: TaskSpec("AutoModelForSequenceClassification", "SEQ_CLS", "predicted-label"),
}
ALL_TASKS = frozenset(TASKS)
