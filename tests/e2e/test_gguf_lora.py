"""``ftune export --format gguf-lora``: a LoRA run's adapter as a llama.cpp adapter file beside its base GGUF.

The export checks itself by adding the updates it reads back from the file to the base weights and comparing logits
with the merged model; these tests also read the file's metadata as llama.cpp does, break the rotary row order to
show the check fails, and (with the llamacpp extra) run base + adapter in llama.cpp against the merged model.
"""

from __future__ import annotations

import json

import pytest

from ftune.families import FAMILIES
from tests.e2e.test_lifecycle import build_run, fake_run, invoke
from tests.unit.test_families import save_family_model

LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "init": "gaussian"}


def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: reader.get_field(name).contents() for name in reader.fields if not name.startswith("GGUF.")}
    return fields, {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama_dir, alpaca_files):
    return build_run(tmp_path_factory.mktemp("gguf-lora") / "run", tiny_llama_dir, alpaca_files, method=LORA)


def test_adapter_file_base_file_and_modelfile(lora_run):
    result = invoke("export", lora_run, "--format", "gguf-lora", "--quant", "f32", "--verify", "llama.cpp", "--prompts", "4")
    assert result.exit_code == 0, result.output
    export = lora_run / "export"
    adapter, base = export / "adapter-f32.gguf", export / "base-f32.gguf"
    assert f"Exported: {adapter} (adapter; base {base})" in result.output
    report = json.loads((export / "adapter-f32.gguf.verify.json").read_text())
    assert report["passed"] and report["max_abs_logit_diff"] <= report["tolerance"] and report["next_token_agreement"] == 1.0
    assert report["base_gguf"] == str(base) and json.loads((export / "base-f32.gguf.verify.json").read_text())["passed"]

    fields, tensors = read_gguf(adapter)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == pytest.approx(8.0)
    # 2 layers x 7 all-linear projections, each an A (r x in) and a B (out x r); GGUF lists shapes innermost first.
    assert len(tensors) == 28 and tensors["blk.0.attn_q.weight.lora_a"] == (64, 4) and tensors["blk.0.ffn_down.weight.lora_b"] == (4, 64)
    modelfile = (export / "adapter-f32.Modelfile").read_text()
    assert "FROM ./base-f32.gguf\nADAPTER ./adapter-f32.gguf\n" in modelfile and "TEMPLATE" in modelfile

    from ftune.llamacpp import llama_cpp_available

    if llama_cpp_available():  # base + adapter in llama.cpp must answer as the merged model does in transformers
        checked = report["llama_cpp"]
        assert checked["prompts"] == 4 and checked["same_text"] == 1.0 and checked["same_tokens"] == 1.0, checked
    else:
        assert "llama.cpp check skipped" in result.output


def test_a_wrong_row_order_fails_the_check(lora_run, monkeypatch, tmp_path):
    """Written without the rotary q/k row order (and read back with it), the file computes another model: exit 1."""
    import ftune.gguf_lora as gguf_lora

    write, reorder = gguf_lora.write_lora_gguf, gguf_lora.row_reordering

    def write_unordered(*args, **kwargs):
        monkeypatch.setattr(gguf_lora, "row_reordering", lambda config, kind: None)
        try:
            return write(*args, **kwargs)
        finally:
            monkeypatch.setattr(gguf_lora, "row_reordering", reorder)

    monkeypatch.setattr(gguf_lora, "write_lora_gguf", write_unordered)
    result = invoke("export", lora_run, "--format", "gguf-lora", "--quant", "f32", "--out", tmp_path / "adapter.gguf")
    assert result.exit_code == 1 and "does not reproduce the model" in result.output


@pytest.mark.parametrize("method, sections", [
    ({**LORA, "use_rslora": True, "alpha": 4}, {}),  # scaling 4 / sqrt(4) = 2, as the others: the merge's parity tolerance assumes it
    ({**LORA, "target_modules": ["q_proj", "v_proj"], "r": 2}, {}),
    ({**LORA, "init": "pissa"}, {}),  # saved relative to the original base, at twice the rank
    (LORA, {"quantization": {"bits": 4}}),  # QLoRA: the adapter applies to the float32 base, as the merge does
])
def test_lora_variants_export_exactly(method, sections, tmp_path, tiny_llama_dir, alpaca_files):
    run = build_run(tmp_path / "run", tiny_llama_dir, alpaca_files, method=method, **sections)
    result = invoke("export", run, "--format", "gguf-lora", "--quant", "f16")
    assert result.exit_code == 0, result.output
    report = json.loads((run / "export" / "adapter-f16.gguf.verify.json").read_text())
    assert report["passed"] and report["quant"] == "f16", report  # f16 rounding may flip a near-tie: the logit tolerance decides
    fields, _ = read_gguf(run / "export" / "adapter-f16.gguf")
    if method.get("init") == "pissa":
        return  # peft doubles rank and alpha in the converted adapter
    rank = method["r"]
    scaling = method["alpha"] / rank ** 0.5 if method.get("use_rslora") else method["alpha"] / rank
    assert fields["adapter.lora.alpha"] == pytest.approx(scaling * rank)  # llama.cpp scales by alpha / r


@pytest.mark.parametrize("model_type", ["gpt2", "bloom", "qwen2"])
def test_other_families(model_type, tmp_path, alpaca_files):
    """GPT-2's Conv1D weights (stored transposed), BLOOM's fused qkv (rows regrouped), Qwen2's biased projections."""
    folder = save_family_model(model_type, tmp_path / "base")
    data = {"chat_template": "chatml"} if FAMILIES[model_type].chat_template is None else {}
    run = build_run(tmp_path / "run", folder, alpaca_files, method=LORA, data=data)
    result = invoke("export", run, "--format", "gguf-lora", "--quant", "f32")
    assert result.exit_code == 0, result.output
    report = json.loads((run / "export" / "adapter-f32.gguf.verify.json").read_text())
    assert report["passed"] and report["next_token_agreement"] == 1.0, report


@pytest.mark.parametrize("config, expected", [
    ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True}, "DoRA's magnitude vector (use_dora)"),
    ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]}, "fully trained modules (modules_to_save)"),
    ({"peft_type": "PREFIX_TUNING"}, "peft type 'PREFIX_TUNING'"),
])
def test_adapters_llama_cpp_cannot_hold_are_refused(config, expected, tmp_path, tiny_llama_dir, alpaca_files):
    run = fake_run(tmp_path / "run", tiny_llama_dir, alpaca_files, {"name": "lora"}, {"adapter_config.json": json.dumps(config)})
    result = invoke("export", run, "--format", "gguf-lora")
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert expected in line and "--format gguf" in line
    assert not (run / "export").exists() or not any((run / "export").iterdir())
