"""The ``grpo:`` section: online RL by group relative policy optimisation (``stage: grpo``), and its rewards.

Each prompt gets ``num_generations`` sampled completions; each completion is scored by the weighted sum of
the ``rewards`` list, and the policy is pushed towards the completions that score above their group's mean,
held near the reference (the base with the adapter switched off, or a frozen copy for full fine-tuning) by
``beta`` times the KL divergence. Prompts are the chat/alpaca/messages rows ftune reads, cut before their last
assistant turn; that last reply is the reference answer the built-in rewards compare against (``reference``
column for reward functions; ``reference_calls`` holds its tool calls as JSON).

A reward function named as ``path/to/file.py:function`` is called as
``function(prompts, completions, **columns) -> list[float]`` (one float per completion; ``completions`` are
lists of messages, the reply in ``completion[-1]["content"]``; columns include ``reference``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import Field, ValidationInfo, field_validator

from ftune.recipe.method_base import Strict
from ftune.recipe.paths import checks_paths
from ftune.recipe.tasks import CAUSAL_LM

GRPO = "grpo"


class _Reward(Strict):
    weight: float = Field(1.0, description="Weight of this reward in the sum each completion is scored by.")


class ExactMatchReward(_Reward):
    kind: Literal["exact_match"] = Field(description="1 when the reply equals the reference answer (whitespace normalised), else 0.")


class NumericMatchReward(_Reward):
    kind: Literal["numeric_match"] = Field(description="1 when the last number in the reply equals the reference's last number.")


class RegexReward(_Reward):
    kind: Literal["regex"] = Field(description="1 when the whole reply matches `pattern` (a format check), else 0.")
    pattern: str = Field(description="Python regular expression the whole reply (stripped) must match.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc}); fix the pattern") from exc
        return value


class JsonReward(_Reward):
    kind: Literal["valid_json"] = Field(description="1 when the reply parses as JSON, else 0.")


class ToolCallReward(_Reward):
    kind: Literal["tool_call_exact"] = Field(
        description="1 when the reply makes exactly the reference turn's tool calls (names and arguments as parsed JSON).")


class FunctionReward(_Reward):
    kind: Literal["function"] = Field(description="Your Python function scores each completion.")
    function: str = Field(description="path/to/file.py:function, called as function(prompts, completions, **columns) -> "
                          "list[float]; relative paths are read from the current directory.")

    @field_validator("function")
    @classmethod
    def _defined(cls, value: str, info: ValidationInfo) -> str:
        path, sep, name = value.rpartition(":")
        if not sep or not path.endswith(".py") or not name.isidentifier():
            raise ValueError(f"'{value}' is not path/to/file.py:function; name the file and the function in it")
        if not checks_paths(info):
            return value
        file = Path(path).expanduser()
        if not file.is_file():
            raise ValueError(f"file '{path}' does not exist (relative paths are read from the current directory)")
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except SyntaxError as exc:
            raise ValueError(f"{path} does not parse (line {exc.lineno}: {exc.msg}); fix the file") from exc
        defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        defined |= {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
        if name not in defined:
            raise ValueError(f"{path} defines no function '{name}'; defined: {', '.join(sorted(defined)) or 'none'}")
        return f"{file.resolve()}:{name}"


class ModelReward(_Reward):
    kind: Literal["model"] = Field(description="A learned reward model (a `stage: reward` run directory) scores prompt + completion.")
    run: str = Field(description="Run directory of a finished `ftune train` with stage: reward; one that does not exist yet "
                     "validates (an earlier command of the chain trains it) and is checked again when training starts.")

    @field_validator("run")
    @classmethod
    def _reward_run(cls, value: str, info: ValidationInfo) -> str:
        root = Path(value).expanduser()
        if not checks_paths(info):
            return value
        if not root.exists():
            return str(root.resolve())
        recipe = root / "recipe.yaml"
        if not recipe.is_file():
            raise ValueError(f"'{value}' is not an ftune run directory (no recipe.yaml); train a reward model with stage: reward")
        stage = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("stage", "sft")
        if stage != "reward":
            raise ValueError(f"'{value}' is a stage: {stage} run, not a reward model; give a stage: reward run directory")
        if not (root / "summary.json").is_file():
            raise ValueError(f"run '{value}' did not finish training; finish it (ftune train --resume) or use another run")
        return str(root.resolve())


REWARD_KINDS = ("exact_match", "numeric_match", "regex", "valid_json", "tool_call_exact", "function", "model")
Reward = Annotated[Union[ExactMatchReward, NumericMatchReward, RegexReward, JsonReward, ToolCallReward, FunctionReward, ModelReward],
                   Field(discriminator="kind")]


class GrpoConfig(Strict):
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (a group); rewards are compared within it. "
                                 "training.batch_size x gradient_accumulation_steps counts completions and must be a multiple of it.")
    max_new_tokens: int = Field(32, gt=0, description="Cap on tokens per sampled completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; the group needs varied completions to learn from.")
    beta: float = Field(0.04, ge=0, description="Weight of the KL penalty to the reference policy; 0 = no reference, no penalty.")
    use_vllm: bool = Field(False, description="Generate with vLLM (a CUDA GPU and the vllm package); false = transformers' generate.")
    rewards: list[Reward] = Field(default_factory=list, description="What a completion is scored by: the weighted sum of these "
                                  "(kind: exact_match, numeric_match, regex, valid_json, tool_call_exact, function, model).")


def grpo_problems(recipe, *, reference_kind) -> list[str]:
    """Why a ``stage: grpo`` recipe cannot run (one fix per line), or []; ``reference_kind`` is the method's reference."""
    grpo, data, train, problems = recipe.grpo, recipe.data, recipe.training, []
    if recipe.task != CAUSAL_LM:
        problems.append("stage: grpo samples completions from a causal LM; set task: causal_lm")
    if not grpo.rewards:
        problems.append("grpo.rewards: stage: grpo needs at least one reward, e.g. - {kind: exact_match}")
    completions = train.batch_size * train.gradient_accumulation_steps
    if completions % grpo.num_generations:
        problems.append(f"grpo.num_generations: {grpo.num_generations} groups do not fit the {completions} completions per step "
                        f"(training.batch_size x gradient_accumulation_steps); make that a multiple of grpo.num_generations")
    if grpo.beta > 0 and reference_kind is None:
        problems.append(f"grpo.beta: method '{recipe.method.name}' cannot be switched off to give the reference policy; "
                        "set grpo.beta: 0 or use another method")
    if data.packing is True:
        problems.append("data.packing: true does not apply to stage: grpo (completions are generated per prompt); remove it")
    if data.train_on_prompt:
        problems.append("data.train_on_prompt: stage: grpo trains on its own completions only; remove it")
    if grpo.max_new_tokens >= data.max_length:
        problems.append(f"grpo.max_new_tokens: {grpo.max_new_tokens} leaves no room for the prompt within data.max_length "
                        f"{data.max_length}; lower it or raise data.max_length")
    return problems
