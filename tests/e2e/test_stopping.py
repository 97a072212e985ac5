""""Does it stop": eval's stopped_rate tells a model that learned to end its turn from one that never saw the EOS.

The same tiny Llama is trained twice on the same short answers: once with ChatML, whose assistant turns end with
<|im_end|> (the tokenizer's EOS, so it is trained), once with a template whose turns end with a bare newline.
"""

from __future__ import annotations

import json

from tests.conftest import invoke_ok, recipe_dict, write_jsonl, write_recipe

NO_EOS_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]


def test_eval_reports_whether_replies_stop_and_warns_when_they_do_not(tmp_path, tiny_llama_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"Greet the {w} {n}.", "output": "ok"} for w in WORDS for n in range(4)])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": f"Greet the {w} 9.", "output": "ok"} for w in WORDS])
    rates, outputs = {}, {}
    for label, template in (("eos", "chatml"), ("no_eos", NO_EOS_TEMPLATE)):
        recipe = recipe_dict(tiny_llama_dir, train, held_out, tmp_path / label,
                             data={"chat_template": template}, method={"name": "full"},
                             training={"max_steps": 30, "learning_rate": 3e-3, "save_steps": 30, "logging_steps": 10},
                             evaluation={"max_new_tokens": 8})
        run = tmp_path / label
        outputs[label] = invoke_ok("train", write_recipe(tmp_path / f"{label}.yaml", recipe)).output
        outputs[label] += invoke_ok("eval", run).output
        rates[label] = json.loads((run / "eval" / "metrics.json").read_text())["tuned"]["stopped_rate"]
    assert rates["eos"] == 1.0, outputs["eos"]
    assert rates["no_eos"] == 0.0, outputs["no_eos"]
    assert "stopped_rate" in outputs["eos"] and "warning: only" not in outputs["eos"]
    assert "warning: only 0% of the tuned model's replies ended with its end-of-turn token" in outputs["no_eos"]
    assert "never train the EOS or end-of-turn token" in outputs["no_eos"]  # training said so first


def test_a_family_layout_whose_turns_end_on_a_marker_other_than_eos_stops_there(tmp_path):
    from tests.unit.test_families import save_family_model

    base = save_family_model("gemma", tmp_path / "gemma")  # Gemma's layout: replies end with <end_of_turn>, EOS is another token
    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"Greet the {w} {n}.", "output": "ok"} for w in WORDS for n in range(4)])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": f"Greet the {w} 9.", "output": "ok"} for w in WORDS])
    recipe = recipe_dict(base, train, held_out, tmp_path / "run", method={"name": "full"},
                         training={"max_steps": 30, "learning_rate": 3e-3, "save_steps": 30, "logging_steps": 10},
                         evaluation={"max_new_tokens": 8})
    output = invoke_ok("train", write_recipe(tmp_path / "gemma.yaml", recipe)).output
    output += invoke_ok("eval", tmp_path / "run").output
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["tuned"]
    assert metrics["stopped_rate"] == 1.0, output
    assert "never train the EOS or end-of-turn token" not in output
