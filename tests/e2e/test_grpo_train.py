"""stage: grpo on the tiny model: sampled completions scored by the recipe's rewards move the policy (LoRA and full),
the base stays as it was, a failing reward function is one line naming the prompt, a reward run directory scores
completions, and the run directory merges and evaluates base vs tuned on held-out prompts."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ftune.cli import app
from tests.conftest import invoke_ok, recipe_dict, write_jsonl, write_recipe

PROMPTS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)} for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]
LONGER = "def longer(prompts, completions, **columns):\n    return [float(len(c[-1]['content'])) for c in completions]\n"


@pytest.fixture
def grpo_recipe(make_recipe, tmp_path):
    def build(rewards=None, **sections):
        train = write_jsonl(tmp_path / "train.jsonl", PROMPTS[:2])
        held = write_jsonl(tmp_path / "held.jsonl", PROMPTS[2:])
        (tmp_path / "score.py").write_text(LONGER)
        grpo = {"num_generations": 2, "max_new_tokens": 4, "beta": 0.1,
                "rewards": rewards or [{"kind": "function", "function": f"{tmp_path / 'score.py'}:longer"},
                                       {"kind": "numeric_match", "weight": 2.0}]}
        options = dict(stage="grpo", data={"train": str(train), "eval": str(held), "max_length": 64}, grpo=grpo,
                       training={"max_steps": 2, "batch_size": 2, "learning_rate": 5e-2, "save_steps": 50, "logging_steps": 1})
        options.update(sections)
        return make_recipe(**options)

    return build


def safetensors_state(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_grpo_lora_trains_the_adapter_and_leaves_the_base(grpo_recipe, tmp_path, tiny_llama_dir):
    recipe = grpo_recipe()
    result = invoke_ok("train", recipe)
    assert "GRPO: 2 completions per prompt" in result.output and "reference = the base with the adapter switched off" in result.output
    run = tmp_path / "run"
    adapter = safetensors_state(run / "model" / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in adapter.items())  # B starts at zero
    before = safetensors_state(tiny_llama_dir / "model.safetensors")
    from ftune.tuned import load_model
    from ftune.run_dir import load_run

    loaded, _ = load_model(*load_run(run))
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in loaded.state_dict().items() if "lora_" not in k}
    for name, tensor in before.items():
        assert (base[name] == tensor).all(), f"{name} changed"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "reward" in r]
    assert steps and {"reward", "reward_std", "completions/mean_length", "kl"} <= steps[0].keys()
    assert "reward=" in result.output and "kl=" in result.output
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stage"] == "grpo"
    summary = json.loads((run / "summary.json").read_text())
    assert "eval_reward" in summary and "eval_reward_margin" not in summary

    assert (run / "rewards" / "score.py").read_text() == LONGER
    (tmp_path / "score.py").unlink()  # the run directory keeps the reward function eval calls
    report = invoke_ok("eval", run)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"reward", "reward/longer", "reward/numeric_match"} <= metrics["tuned"].keys() and "base" in metrics
    assert "reward" in report.output
    invoke_ok("merge", run)
    assert (run / "merged" / "config.json").is_file()
    invoke_ok("export", run, "--format", "gguf", "--quant", "f16")  # a grpo run's weights deploy like any other's
    assert json.loads((run / "export" / "model-f16.gguf.verify.json").read_text())["passed"]


def test_grpo_chains_from_an_sft_run_and_full_fine_tuning_changes_the_weights(grpo_recipe, tmp_path, tiny_llama_dir, alpaca_files):
    sft_run = tmp_path / "sft"
    sft = recipe_dict(tiny_llama_dir, *alpaca_files, sft_run, method={"name": "full"}, training={"max_steps": 1, "save_steps": 50})
    invoke_ok("train", write_recipe(tmp_path / "sft.yaml", sft))  # full weights: the run directory is the model
    result = invoke_ok("train", grpo_recipe(model={"name_or_path": str(sft_run)}, method={"name": "full"},
                                            training={"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "save_steps": 50}))
    assert "reference = a frozen copy of the base" in result.output
    before, after = safetensors_state(sft_run / "model" / "model.safetensors"), safetensors_state(tmp_path / "run" / "model" / "model.safetensors")
    assert any(not (after[name] == tensor).all() for name, tensor in before.items() if name in after)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [(step["run"], step["stage"]) for step in manifest["lineage"]] == [(str(sft_run), "sft")]


def test_a_failing_reward_function_names_the_prompt(grpo_recipe, tmp_path):
    (tmp_path / "broken.py").write_text("def broken(prompts, completions, **columns):\n    raise KeyError('answer')\n")
    recipe = grpo_recipe(rewards=[{"kind": "function", "function": f"{tmp_path / 'broken.py'}:broken"}])
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2, result.output
    [line] = [l for l in result.output.splitlines() if "raised" in l]
    assert "grpo.rewards.0.function" in line and "KeyError" in line and ("Add 1 and 2." in line or "Add 3 and 4." in line)
    assert "Traceback" not in result.output


def test_a_reward_run_directory_scores_the_completions(grpo_recipe, tmp_path, tiny_llama_dir):
    from tests.e2e.test_preference_train import WORDS, pair_rows

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(WORDS[:6]))
    held_pairs = write_jsonl(tmp_path / "held-pairs.jsonl", pair_rows(WORDS[6:8]))
    reward_run = tmp_path / "reward"
    reward = recipe_dict(tiny_llama_dir, pairs, held_pairs, reward_run, stage="reward", task="classification",
                         training={"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "save_steps": 50})
    invoke_ok("train", write_recipe(tmp_path / "reward.yaml", reward))

    from ftune.data.formats import Record
    from ftune.data.preference import tokenize_pairs
    from ftune.rewards import RewardModel
    from ftune.run_dir import load_run
    from ftune.scoring import reward_scores
    from ftune.tuned import load_model

    # The reward GRPO reads is the score `ftune eval` of the reward run gives the same prompt and answer.
    prompt = [{"role": "user", "content": "Say red."}]
    scorer = RewardModel(str(reward_run), device="cpu")
    [score] = scorer([prompt], [[{"role": "assistant", "content": "red"}]])
    run, recipe = load_run(reward_run)
    model, tokenizer = load_model(run, recipe)
    rows = tokenize_pairs(tokenizer, [Record("preference", {"prompt": prompt, "chosen": "red", "rejected": "blue"}, "t:1", 0)],
                          max_length=64, max_prompt_length=None).rows
    [(chosen, _)] = reward_scores(model, rows, pad_token_id=tokenizer.pad_token_id)
    assert score == pytest.approx(chosen, abs=1e-5)

    recipe = grpo_recipe(rewards=[{"kind": "model", "run": str(reward_run)}])
    result = invoke_ok("train", recipe)
    assert "Rewards: reward_model:reward x1" in result.output
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["rewards/reward_model:reward/mean"] for r in logged if "rewards/reward_model:reward/mean" in r]
    assert rewards and all(r != 0 for r in rewards)  # the head's scores, not a placeholder


def test_grpo_trains_qlora_on_a_4bit_base(grpo_recipe, tmp_path):
    result = invoke_ok("train", grpo_recipe(quantization={"bits": 4}, rewards=[{"kind": "function", "function": f"{tmp_path / 'score.py'}:longer"}]))
    assert "reference = the base with the adapter switched off" in result.output
    adapter = safetensors_state(tmp_path / "run" / "model" / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in adapter.items())


def test_use_vllm_is_refused_on_cpu_before_anything_loads(grpo_recipe, tmp_path):
    recipe = grpo_recipe(grpo={"num_generations": 2, "use_vllm": True, "rewards": [{"kind": "exact_match"}]})
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2
    [line] = [l for l in result.output.splitlines() if "grpo.use_vllm" in l]
    assert "CUDA GPUs only" in line and "set grpo.use_vllm: false" in line
    assert "Method lora" not in result.output  # refused before the model loaded


def test_grpo_trains_on_two_processes(grpo_recipe, tmp_path):
    from tests.e2e.test_distributed import train_on_two_processes

    recipe = grpo_recipe(training={"max_steps": 2, "batch_size": 2, "learning_rate": 5e-2, "save_steps": 50, "logging_steps": 1})
    train_on_two_processes(recipe)  # 4 completions a step over the two ranks: two groups of 2
    run = tmp_path / "run"
    adapter = safetensors_state(run / "model" / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in adapter.items())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "reward" in r] == [1, 2]  # rank 0 alone logs, once a step


def test_an_interrupted_grpo_run_resumes_from_its_checkpoint(grpo_recipe, tmp_path):
    import shutil

    recipe = grpo_recipe(training={"max_steps": 2, "batch_size": 2, "learning_rate": 5e-2, "save_steps": 1, "logging_steps": 1})
    invoke_ok("train", recipe)
    run = tmp_path / "run"
    for finished in ("summary.json", "model", "checkpoints/checkpoint-2"):  # as if stopped after the first checkpoint
        path = run / finished
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = invoke_ok("train", recipe, "--resume")
    assert "checkpoint-1" in resumed.output and (run / "summary.json").is_file()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "reward" in r] == [1, 2]  # step 2 trained again, logged once


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
SEES_TOOLS = """import json
def sees_tools(prompts, completions, **columns):
    # every prompt is the rendered text with this row's schema; the reward model's turns ride along
    assert all(isinstance(p, str) and 'get_weather' in p and 'Current weather in a city.' in p for p in prompts), prompts
    assert all(c[-1]['role'] == 'user' for c in columns['conversation'])
    with open(__file__ + '.seen', 'a') as seen:
        seen.write(json.dumps(prompts) + '\\n')
    return [0.0 for _ in completions]
"""


def test_grpo_prompts_carry_each_rows_tool_schemas_in_training_and_eval(grpo_recipe, tmp_path, tiny_llama_dir):
    """TRL renders conversational prompts with one tool list for the whole trainer: rows with their own schemas reach
    the policy rendered with them, in training and in ``ftune eval`` alike, and the tool-call reward scores the calls."""
    rows = [{"messages": [{"role": "user", "content": f"Weather in {city}?"},
                          {"role": "assistant", "content": None,
                           "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]}],
             "tools": [WEATHER]} for city in ("Paris", "Oslo", "Lima", "Rome")]
    train, held = write_jsonl(tmp_path / "tools.jsonl", rows[:2]), write_jsonl(tmp_path / "tools-held.jsonl", rows[2:])
    (tmp_path / "seen.py").write_text(SEES_TOOLS)
    rewards = [{"kind": "function", "function": f"{tmp_path / 'seen.py'}:sees_tools"}, {"kind": "tool_call_exact"}]
    plain = grpo_recipe(rewards=rewards, data={"train": str(train), "eval": str(held), "max_length": 256})
    refused = CliRunner().invoke(app, ["train", str(plain)])  # the tiny model's ChatML drops tool schemas
    assert refused.exit_code == 2 and "set data.chat_template: chatml-tools" in refused.output and "Traceback" not in refused.output
    recipe = grpo_recipe(rewards=rewards, data={"train": str(train), "eval": str(held), "max_length": 256, "chat_template": "chatml-tools"})
    invoke_ok("train", recipe)
    trained = [json.loads(line) for line in (tmp_path / "seen.py.seen").read_text().splitlines()]
    assert trained and not any(p.startswith("<s><s>") for batch in trained for p in batch)
    invoke_ok("eval", tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert "reward/tool_call_exact" in metrics["tuned"]
    predictions = [json.loads(line) for line in (tmp_path / "run" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert {p["prompt"] for p in predictions if p.get("model") == "tuned"} == {"Weather in Lima?", "Weather in Rome?"}


def test_data_preview_of_a_grpo_recipe_shows_the_prompts_and_references(grpo_recipe):
    result = invoke_ok("data", "preview", grpo_recipe(), "--count", "1")
    assert "-- train prompt 1 (" in result.output and "Add 1 and 2." in result.output and "reference: 3" in result.output
    assert "train: 2 prompts (train 2, eval 2)" in result.output
    assert "[[" not in result.output  # no trained-token view: grpo trains on sampled completions, not on the rows
