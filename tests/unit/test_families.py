"""Every claim of ftune.families.FAMILIES, checked on a tiny model of each decoder family built from its config.

A cell the table claims must work (loss falls, exactly the method's parameters train, save -> reload gives the
same logits, merge reproduces the adapter); a cell it does not claim must be refused with the reason, naming
what is supported. ``ftune models`` prints the same table, so it cannot claim what this file does not check.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ftune.errors import FtuneError
from ftune.data.templates import read_chat_template
from ftune.families import BERT_LAYOUT, CHAT_LAYOUTS, DISTILBERT_LAYOUT, FAMILIES, Family
from ftune.methods import apply_method, load_trained, save_method_artifact
from tests.conftest import TOKENIZER_DIR
from tests.tolerances import assert_close, forward_steps
from tests.unit.test_methods import loader, logits_of, make_batch, method, run_steps

DECODERS = sorted(model_type for model_type, family in FAMILIES.items() if family.decoder)
HIDDEN = 64


def sizes(model_type: str) -> dict:
    if model_type == "gpt2":
        return dict(n_embd=HIDDEN, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # a loss that can only fall
    if model_type == "bloom":
        return dict(hidden_size=HIDDEN, n_layer=2, n_head=4)
    common = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=HIDDEN // 4)
    if model_type == "qwen3":
        common.update(head_dim=128)  # as every released Qwen3; GGUF export refuses others (tested in test_export)
    if model_type == "gemma2":
        common.update(head_dim=256, query_pre_attn_scalar=256)  # as Gemma-2-2B/9B; GGUF export refuses other scales
    if model_type == "mixtral":
        common.update(num_local_experts=4, num_experts_per_tok=2)
    if model_type == "qwen3_moe":
        common.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    return common


def family_tokenizer(model_type: str):
    """The tiny tokenizer as a model of ``model_type`` ships it: the family's chat template, its layout markers as
    special tokens, or no template at all for base-model families (GPT-2, BLOOM, GPT-NeoX)."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    name = FAMILIES[model_type].chat_template
    tokenizer.chat_template = read_chat_template(name) if name else None
    if name:
        missing = [marker for marker in CHAT_LAYOUTS[name].markers if marker not in tokenizer.get_vocab()]
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return tokenizer


def save_family_model(model_type: str, folder):
    """A tiny model of ``model_type`` from its config, with its family's tokenizer, saved to ``folder``."""
    tokenizer = family_tokenizer(model_type)
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **sizes(model_type))
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms start at exactly 1 and 0: an export that drops or swaps one would go unseen
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict:
    return {model_type: save_family_model(model_type, tmp_path_factory.mktemp(model_type)) for model_type in DECODERS}


def trains(model, steps: int = 4, lr: float = 1e-2) -> bool:
    losses = run_steps(model, make_batch(model, "causal_lm"), steps=steps, lr=lr)
    return losses[-1] < losses[0]


@pytest.mark.parametrize("model_type", DECODERS)
@pytest.mark.parametrize("bits", [None, 4], ids=["lora", "qlora"])
def test_lora_trains_reloads_and_merges(family_dirs, model_type, bits, tmp_path):
    load = loader(family_dirs[model_type], "causal_lm", bits=bits)
    model = apply_method(load(), method("lora", r=4, alpha=8, dropout=0.0), "causal_lm")
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
    assert trains(model)
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    batch = make_batch(model, "causal_lm")
    expected = logits_of(model, batch)
    save_method_artifact(model, "lora", tmp_path)
    assert_close(logits_of(load_trained("lora", load, tmp_path), batch), expected, steps=forward_steps(2))
    if bits is None:
        merged = model.merge_and_unload()
        assert_close(logits_of(merged, batch), expected, steps=forward_steps(2) + 1)  # + W + BA rounded once


@pytest.mark.parametrize("model_type", DECODERS)
def test_all_linear_adapts_what_the_table_says(family_dirs, model_type):
    base = loader(family_dirs[model_type], "causal_lm")()
    if FAMILIES[model_type].moe:  # peft's LoRA on fused experts has no dropout, and the default has some
        with pytest.raises(FtuneError, match="set method.dropout: 0"):
            apply_method(base, method("lora", r=4), "causal_lm")
    model = apply_method(base, method("lora", r=4, dropout=0.0), "causal_lm")
    # Leaf names of the adapted modules (a fused-experts wrapper nests its second weight under .base_layer).
    adapted = {name.split(".lora_A")[0].removesuffix(".base_layer").rsplit(".", 1)[-1]
               for name, _ in model.named_parameters() if ".lora_A" in name}
    assert adapted == set(FAMILIES[model_type].linear_targets)


@pytest.mark.parametrize("name", ["full", "freeze"])
@pytest.mark.parametrize("model_type", DECODERS)
def test_full_and_freeze_train(family_dirs, model_type, name):
    knobs = {"trainable_layers": 1} if name == "freeze" else {}
    model = apply_method(loader(family_dirs[model_type], "causal_lm")(), method(name, **knobs), "causal_lm")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trains(model)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert (name == "full") == (not frozen)  # freeze keeps everything below the top layer as it was


CLAIMS = {  # capability -> (what the table says, the method that exercises it)
    "adapter": (lambda family: bool(family.attention_output and family.feed_forward_output), method("adapter")),
    "parallel adapter": (lambda family: bool(family.attention_block and family.feed_forward_block),
                         method("adapter", style="parallel", scaling=4.0)),
    "unipelt": (lambda family: family.unipelt, method("unipelt", lora={"r": 4}, prefix={"num_virtual_tokens": 4}, adapter={"bottleneck": 16})),
    "prefix": (lambda family: family.prefix, method("prefix", num_virtual_tokens=4)),
}


ABSOLUTE_POSITIONS = {"GPT2LMHeadModel"}


def gated_prefixes(model) -> bool:
    from ftune.methods.prefix_start import PrefixGate

    return any(isinstance(module, PrefixGate) for module in model.modules())


@pytest.mark.parametrize("capability", sorted(CLAIMS))
@pytest.mark.parametrize("model_type", DECODERS)
def test_each_claimed_method_works_and_each_other_is_refused(family_dirs, model_type, capability):
    claimed, config = CLAIMS[capability]
    family: Family = FAMILIES[model_type]
    base = loader(family_dirs[model_type], "causal_lm")()
    if claimed(family):
        expected = logits_of(base, make_batch(base, "causal_lm"))
        model = apply_method(base, config, "causal_lm")
        # Adapters and UniPELT start as the base, and so do gated prefixes on rotary-position models; where the gates
        # cannot reach attention (BLOOM) or positions are absolute (GPT-2: peft's prefixes shift them) they cannot.
        if capability != "prefix" or (gated_prefixes(model) and type(base).__name__ not in ABSOLUTE_POSITIONS):
            assert_close(logits_of(model, make_batch(model, "causal_lm")), expected, steps=forward_steps(2))
        assert trains(model)  # the prefix default trains through its MLP, at an adapter's rate
    else:
        with pytest.raises(FtuneError) as refused:
            apply_method(base, config, "causal_lm")
        assert model_type in str(refused.value) or type(base).__name__ in str(refused.value)
        assert "use method:" in str(refused.value).lower() or "supported" in str(refused.value)


@pytest.mark.parametrize("model_type", DECODERS)
def test_gguf_exports_where_the_table_says_and_refuses_elsewhere(family_dirs, model_type, tmp_path):
    from ftune.export import export_gguf
    from ftune.gguf import SUPPORTED_GGUF_ARCHITECTURES, UnsupportedExport

    out = tmp_path / "model.gguf"
    if FAMILIES[model_type].gguf:
        report = export_gguf(family_dirs[model_type], out, quant="f16")
        assert report.passed, report.to_dict()
        # Block quantization runs along the file's rows (transposed for GPT-2, regrouped for BLOOM): the reload must
        # still match the source rounded exactly as stored.
        report = export_gguf(family_dirs[model_type], tmp_path / "q4.gguf", quant="q4_0")
        assert report.writer_max_abs_logit_diff <= report.writer_tolerance, report.to_dict()
    else:
        with pytest.raises(UnsupportedExport) as refused:
            export_gguf(family_dirs[model_type], out, quant="f16")
        assert all(arch in str(refused.value) for arch in SUPPORTED_GGUF_ARCHITECTURES)
        assert not out.exists()


def test_the_table_covers_the_families_users_start_from():
    for model_type in ("llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "bloom", "gpt2", "gpt_neox", "mixtral", "qwen3_moe"):
        assert model_type in DECODERS
    assert {t for t, f in FAMILIES.items() if f.moe} == {"mixtral", "qwen3_moe"}


def test_ftune_models_prints_the_table_and_validate_warns_outside_it(tmp_path, tiny_llama_dir, alpaca_files):
    import json
    import shutil

    from typer.testing import CliRunner

    from ftune.cli import app
    from ftune.families import matrix_rows
    from tests.conftest import recipe_dict, write_recipe

    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    for row in matrix_rows():
        assert any(line.split()[: len(row) - 1] == list(row[:-1]) and line.endswith(row[-1]) for line in lines), row

    train, eval_file = alpaca_files
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_dict(tiny_llama_dir, train, eval_file, tmp_path / "run"))
    assert "warning: model" not in CliRunner().invoke(app, ["validate", str(recipe)]).output
    odd = shutil.copytree(tiny_llama_dir, tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    recipe = write_recipe(tmp_path / "odd.yaml", recipe_dict(odd, train, eval_file, tmp_path / "run"))
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0 and "warning: model: model_type 'falcon' is not in ftune's tested families" in result.output


def test_the_docs_show_the_same_matrix():
    from ftune.families import MATRIX_COLUMNS, matrix_rows
    from tests.conftest import REPO

    readme = (REPO / "docs" / "methods.md").read_text(encoding="utf-8")
    for row in [MATRIX_COLUMNS, *matrix_rows()]:
        assert "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" in readme, row  # Markdown escapes


NUM_LABELS = 3  # no other dimension of the tiny models below is 3, so the logit projection is the only tensor with it


def encoder_config(model_type: str):
    """A tiny sequence-classification config of an encoder (DistilBERT names its sizes its own way)."""
    sizes = (dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4) if model_type in DISTILBERT_LAYOUT
             else dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    return AutoConfig.for_model(model_type, vocab_size=300, num_labels=NUM_LABELS, **sizes)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_classification_heads_are_named_as_the_table_says(model_type):
    from transformers import AutoModelForSequenceClassification

    from ftune.methods.heads import task_head_names

    config = (AutoConfig.for_model(model_type, vocab_size=300, num_labels=NUM_LABELS, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=2, **sizes(model_type))
              if FAMILIES[model_type].decoder else encoder_config(model_type))
    model = AutoModelForSequenceClassification.from_config(config)
    assert sorted(task_head_names(model, "classification")) == sorted(FAMILIES[model_type].classification_head)


@pytest.mark.parametrize("model_type", sorted(BERT_LAYOUT | DISTILBERT_LAYOUT))
def test_plan_lays_out_every_encoder_the_layout_sets_name(model_type):
    from transformers import AutoModelForSequenceClassification

    from ftune.training.layout import build_layout

    config = encoder_config(model_type)
    model = AutoModelForSequenceClassification.from_config(config)
    layout = build_layout(config.to_dict())
    layer = {name.split(".layer.0.", 1)[1] for name, module in model.named_modules()
             if ".layer.0." in name and isinstance(module, torch.nn.Linear)}
    assert {name for name, *_ in layout.linears} == layer
    # The plan counts the encoder and the dense under the classifier, not the projection to the labels.
    counted = {name: p.numel() for name, p in model.named_parameters() if p.shape[0] != NUM_LABELS}
    assert layout.total_params == sum(counted.values())
    biases = layout.layers * sum(out for _, _, out, bias in layout.linears if bias) + layout.other_biases
    assert biases == sum(n for name, n in counted.items() if name.endswith(".bias"))


# Spellings of a model type that name something else: llama.cpp calls the byte-level BPE tokenizer model "gpt2".
NOT_A_MODEL_TYPE = {("gguf_tokenizer.py", "add_tokenizer_model")}  # (file under ftune/, the call whose arguments may spell one)


def model_types_spelled_in(package) -> list[str]:
    """Every string constant in ``package``'s modules (families.py aside) equal to a model type, as file:line: string."""
    import ast

    from ftune.families import MODEL_TYPES

    found = []
    for path in sorted(package.rglob("*.py")):
        module = path.relative_to(package).as_posix()
        if module == "families.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        allowed = {id(argument) for node in ast.walk(tree)
                   if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                   and (module, node.func.attr) in NOT_A_MODEL_TYPE for argument in node.args}
        found += [f"ftune/{module}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in MODEL_TYPES
                  and id(node) not in allowed]
    return found


def test_no_module_but_families_names_a_model_type():
    """A model type spelled elsewhere is a family fact stated outside the table (or a check the table cannot see)."""
    from tests.conftest import REPO

    spelled = model_types_spelled_in(REPO / "ftune")
    assert not spelled, "model types named outside ftune/families.py (state the fact there and read it): " + "; ".join(spelled)
