"""Standard benchmarks through lm-evaluation-harness (an optional extra): ``ftune eval RUN --benchmark TASKS``.

The harness gets the model already loaded the way every other stage loads it (``ftune.tuned``): the adapter on its
base (through peft, or ftune's own module for its own methods), or with ``merged=True`` the complete weights of
``RUN/merged`` (a full fine-tune's ``RUN/model``), so a score is of exactly the model ``ftune eval`` and ``ftune
generate`` use; ``with_base`` scores the untuned base beside it. Tasks are the harness's names: the local tasks shipped
in ``ftune/benchmarks/`` (``ftune_dates``) run offline, the harness's own tasks fetch their data from the Hub, and a
path to a task YAML runs that file. Scores go to ``RUN/eval/benchmark.json`` and print in ``ftune eval``'s table.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ftune.errors import FtuneError
from ftune.evaluate import EvalReport
from ftune.recipe.tasks import CAUSAL_LM
from ftune.run_dir import RunDir, load_run, write_json_atomic

INSTALL_HINT = "pip install 'ftune[benchmark]'"
LOCAL_TASKS = Path(__file__).parent / "benchmarks"  # one folder per task: NAME.yaml, its data and its loader
RESULT_FILE = "benchmark.json"  # under RUN/eval/, beside ftune eval's metrics.json
TASK_FILE_SUFFIXES = (".yaml", ".yml")


def local_task_names() -> list[str]:
    """The tasks shipped with ftune (each YAML is named after its task)."""
    return sorted(path.stem for path in LOCAL_TASKS.glob("*/*.yaml"))


def benchmark_file(run: RunDir) -> Path:
    return run.eval_dir / RESULT_FILE


def parse_tasks(spec: str) -> list[str]:
    tasks = [task.strip() for task in spec.split(",") if task.strip()]
    if not tasks:
        raise FtuneError(f"--benchmark: name at least one task, e.g. --benchmark {local_task_names()[0]}")
    return tasks


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise FtuneError(f"--benchmark needs lm-evaluation-harness, which is not installed; install it with: {INSTALL_HINT}") from None
    return lm_eval


def task_manager(tasks: list[str]):
    """The harness's task index over ftune's local tasks, and over its own only when a task needs them (indexing its
    thousands of task files takes seconds); an unknown task is refused before any model loads."""
    from lm_eval.tasks import TaskManager

    local = set(local_task_names())
    files = [task for task in tasks if task.endswith(TASK_FILE_SUFFIXES)]
    for task in files:
        if not Path(task).is_file():
            raise FtuneError(f"--benchmark {task}: no such task file")
    needs_defaults = any(task not in local and task not in files for task in tasks)
    manager = TaskManager(include_path=[str(LOCAL_TASKS), *{str(Path(f).resolve().parent) for f in files}],
                          include_defaults=needs_defaults)
    for task in tasks:
        if task not in files and task not in manager.all_tasks:
            raise FtuneError(f"--benchmark {task}: lm-evaluation-harness has no such task (local tasks: {', '.join(sorted(local))}; "
                             "the harness's own: lm_eval ls tasks)")
    return manager


def flatten_scores(results: dict) -> dict[str, float | int]:
    """``{"TASK/METRIC": value}`` from the harness's results: each metric, its ``_stderr`` and the sample count; a
    filter other than the default is named in brackets (``exact_match[strict-match]``)."""
    scores: dict[str, float | int] = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, comma, filtered = key.partition(",")
            if not comma or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # "alias" and "sample_len" are no metrics; a metric without a stderr has "N/A"
            scores[f"{task}/{metric}" + (f"[{filtered}]" if filtered not in ("", "none") else "")] = float(value)
        effective = results.get("n-samples", {}).get(task, {}).get("effective")
        if effective is not None:
            scores[f"{task}/samples"] = int(effective)
    return scores


def score_model(model, tokenizer, tasks: list[str], manager, *, batch_size: int, limit: int | None, num_fewshot: int | None) -> dict:
    """One model's scores on ``tasks``: the harness's ``simple_evaluate`` with its defaults (as its command line runs)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False)
    except ConnectionError as err:  # the Hub's offline mode and network failures alike
        raise FtuneError(f"--benchmark {','.join(tasks)}: a task's data could not be fetched ({str(err).splitlines()[0]}); "
                         f"connect to the network, or use a local task ({', '.join(local_task_names())})") from err
    return flatten_scores(results)


def load_scored(run: RunDir, recipe, *, merged: bool, with_base: bool):
    """(label, model, tokenizer) of each model to score, loaded one at a time."""
    from ftune.tuned import load_merged, load_model

    model, tokenizer = load_merged(run, recipe) if merged else load_model(run, recipe, tuned=True)
    yield "tuned", model, tokenizer
    del model
    if with_base:
        yield ("base", *load_model(run, recipe, tuned=False))


def run_benchmark(run_dir, tasks: list[str], *, with_base: bool = False, merged: bool = False, limit: int | None = None,
                  num_fewshot: int | None = None, echo=print) -> EvalReport:
    """Score the run's tuned model (and its base with ``with_base``) on lm-evaluation-harness ``tasks``; writes
    ``RUN/eval/benchmark.json``."""
    from importlib.metadata import version

    from ftune.runtime import quiet_libraries

    require_lm_eval()
    clock = time.perf_counter()
    run, recipe = load_run(run_dir)
    if recipe.task != CAUSAL_LM:
        raise FtuneError(f"--benchmark scores causal language models; {run.root} is a {recipe.task} run (score it with ftune eval)")
    quiet_libraries()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # the harness logs each request-building step at INFO
    manager = task_manager(tasks)
    scored = "merged" if merged else "full" if run.has_complete_weights() else "adapter"
    results = {}
    for label, model, tokenizer in load_scored(run, recipe, merged=merged, with_base=with_base):
        echo(f"Scoring the {scored if label == 'tuned' else 'base'} model on {', '.join(tasks)} with lm-evaluation-harness...")
        results[label] = score_model(model, tokenizer, tasks, manager, batch_size=recipe.evaluation.batch_size, limit=limit, num_fewshot=num_fewshot)
        del model
    wall = time.perf_counter() - clock
    report = {"tasks": tasks, "model": scored, "lm_eval": version("lm_eval"), "limit": limit,
              "num_fewshot": num_fewshot, **results}
    if "base" in results:
        report["delta"] = {k: v - results["base"][k] for k, v in results["tuned"].items()
                           if k in results["base"] and not k.endswith(("_stderr", "/samples"))}
    report["wall_time_s"] = wall
    write_json_atomic(benchmark_file(run), report)
    return EvalReport(results["tuned"], results.get("base"), benchmark_file(run), tuple(results["tuned"]), wall)
