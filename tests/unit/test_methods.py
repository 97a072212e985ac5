"""Every fine-tuning method on tiny models: it trains exactly the parameters it should, its saved
artifact reloads to the same logits, its trainable count matches the formula, and its rules hold."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ftune.errors import FtuneError
from ftune.run_dir import RunDir
from ftune.model import use_the_trainable_4bit_kernel
from ftune.methods import METHODS, apply_method, count_parameters, method_callbacks
from ftune.recipe.methods import METHOD_CLASSES, method_class, method_names
from tests.tolerances import assert_close, forward_steps

NUM_LABELS = 3
HEAD = r"modules_to_save|^score\.|^classifier\."  # a classification head, inside or outside a peft wrapper
PREFIX = r"prompt_encoder|\.prefix_gate\."  # peft's prefixes and the gates of init: gated (saved by peft)
MAM = rf"{PREFIX}|\.adapter\.modules_to_save\."  # ... and the parallel adapters peft saves
UNIPELT = r"\.(lora_A|lora_B|gate|adapter)\.|\.prefix_(keys|values)$"


@pytest.fixture(scope="module")
def bases(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Folders of tiny bases: the shared Llama, a Llama with bias terms, and a BERT encoder without a head."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("method-bases")
    config = LlamaConfig.from_pretrained(tiny_llama_dir)
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "llama-bias")
    bert = BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(bert).save_pretrained(root / "bert")
    return {"llama": tiny_llama_dir, "llama-bias": root / "llama-bias", "bert": root / "bert"}


def loader(path: Path, task: str, bits: int | None = None, seed: int = 1):
    """A ``load_base`` as ftune passes to methods; each call seeds differently-initialised heads by ``seed``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    quant = {4: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32), 8: BitsAndBytesConfig(load_in_8bit=True)}

    def load(location: str | None = None):
        torch.manual_seed(seed)  # a fresh classification head is random: a reload must restore the trained one
        kwargs = dict(dtype=torch.float32, quantization_config=quant.get(bits))
        if task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(location or path, num_labels=NUM_LABELS, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(location or path, **kwargs)
        use_the_trainable_4bit_kernel(model)  # as load_base_model does
        return model

    return load


def make_batch(model, task: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    vocab = model.config.vocab_size
    input_ids = torch.randint(3, vocab, (4, 12), generator=generator)
    labels = torch.tensor([0, 1, 2, 1]) if task == "classification" else input_ids.clone()
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def logits_of(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def run_steps(model, batch, callbacks=(), steps: int = 6, lr: float = 1e-2) -> list[float]:
    """A hand-written loop that drives the method's Trainer callbacks at the hooks the Trainer uses."""
    state = SimpleNamespace(max_steps=steps, global_step=0)
    for callback in callbacks:
        callback.on_train_begin(None, state, None)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        state.global_step = step
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        for callback in callbacks:
            callback.on_optimizer_step(None, state, None)
        optimizer.zero_grad()
        losses.append(loss.item())
    for callback in callbacks:
        callback.on_train_end(None, state, None)
    return losses


def method(name: str, **knobs):
    return method_class(name).model_validate({"name": name, **knobs})


# (id, base, task, bits, method, regex every trainable parameter name matches)
CASES = [
    ("full", "llama", "causal_lm", None, method("full"), r"."),
    ("freeze-top1", "llama", "causal_lm", None, method("freeze", trainable_layers=1), r"layers\.1\."),
    ("freeze-list-norm", "llama", "causal_lm", None, method("freeze", trainable_layers=[0], extra_modules=["norm"]), r"layers\.0\.|^model\.norm\."),
    ("bitfit", "llama-bias", "causal_lm", None, method("bitfit"), r"\.bias$"),
    ("lora", "llama", "causal_lm", None, method("lora", r=4, dropout=0.0), r"lora_"),
    ("lora-rslora-gaussian", "llama", "causal_lm", None, method("lora", r=4, dropout=0.0, use_rslora=True, init="gaussian"), r"lora_"),
    ("dora", "llama", "causal_lm", None, method("lora", r=4, dropout=0.0, use_dora=True), r"lora_"),
    ("pissa", "llama", "causal_lm", None, method("lora", r=4, dropout=0.0, init="pissa"), r"lora_"),
    ("olora", "llama", "causal_lm", None, method("lora", r=4, dropout=0.0, init="olora"), r"lora_"),
    ("adalora", "llama", "causal_lm", None, method("adalora", init_r=6, target_r=2, dropout=0.0, tfinal=1), r"lora_"),
    ("ia3", "llama", "causal_lm", None, method("ia3"), r"ia3_l"),
    ("loha", "llama", "causal_lm", None, method("loha", r=4), r"hada_"),
    ("lokr", "llama", "causal_lm", None, method("lokr", r=4), r"lokr_"),
    ("oft", "llama", "causal_lm", None, method("oft", block_size=16), r"oft_"),
    ("boft", "llama", "causal_lm", None, method("boft", block_size=8), r"boft_"),
    ("vera", "llama", "causal_lm", None, method("vera", r=16), r"vera_lambda"),
    ("prefix", "llama", "causal_lm", None, method("prefix", num_virtual_tokens=4), PREFIX),
    ("prefix-projection", "llama", "causal_lm", None, method("prefix", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=32), PREFIX),
    ("prefix-tokens", "llama", "causal_lm", None, method("prefix", num_virtual_tokens=4, init="tokens"), r"prompt_encoder"),
    ("prefix-random", "llama", "causal_lm", None, method("prefix", num_virtual_tokens=4, init="random"), r"prompt_encoder"),
    ("prompt-text", "llama", "causal_lm", None, method("prompt", num_virtual_tokens=4, init="text", init_text="repeat the word"), r"prompt_encoder"),
    ("ptuning-lstm", "llama", "causal_lm", None, method("ptuning", num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=32), r"prompt_encoder"),
    ("ptuning_v2", "llama", "causal_lm", None, method("ptuning_v2", num_virtual_tokens=4), PREFIX),
    ("adapter", "llama", "causal_lm", None, method("adapter", reduction_factor=4), r"\.adapter\."),
    ("adapter-parallel", "llama", "causal_lm", None, method("adapter", reduction_factor=4, style="parallel", scaling=4.0), r"\.adapter\."),
    ("adapter-parallel-ffn", "llama", "causal_lm", None, method("adapter", reduction_factor=4, style="parallel", placement="feed_forward"), r"mlp\.adapter\."),
    ("mam", "llama", "causal_lm", None, method("mam", num_virtual_tokens=4, bottleneck=16), MAM),
    ("mam-projection", "llama", "causal_lm", None, method("mam", num_virtual_tokens=4, bottleneck=16, prefix_projection=True, encoder_hidden_size=32), MAM),
    ("unipelt", "llama", "causal_lm", None, method("unipelt", lora={"r": 4}, prefix={"num_virtual_tokens": 4}, adapter={"bottleneck": 16}), UNIPELT),
    ("unipelt-no-gates", "llama", "causal_lm", None, method("unipelt", lora={"r": 4}, adapter={"bottleneck": 16}, gates=False), UNIPELT),
    ("unipelt-bias", "llama-bias", "causal_lm", None, method("unipelt", lora={"r": 4}, adapter={"bottleneck": 16}), UNIPELT),
    # Quantized bases: every method that can train on them (loha/lokr: 8-bit only).
    ("lora-4bit", "llama", "causal_lm", 4, method("lora", r=4, dropout=0.0), r"lora_"),
    ("dora-4bit", "llama", "causal_lm", 4, method("lora", r=4, dropout=0.0, use_dora=True), r"lora_"),
    ("adalora-4bit", "llama", "causal_lm", 4, method("adalora", init_r=6, target_r=2, dropout=0.0), r"lora_"),
    ("ia3-4bit", "llama", "causal_lm", 4, method("ia3"), r"ia3_l"),
    ("oft-4bit", "llama", "causal_lm", 4, method("oft", block_size=16), r"oft_"),
    ("vera-4bit", "llama", "causal_lm", 4, method("vera", r=16), r"vera_lambda"),
    ("prompt-4bit", "llama", "causal_lm", 4, method("prompt", num_virtual_tokens=4), r"prompt_encoder"),
    ("adapter-4bit", "llama", "causal_lm", 4, method("adapter", reduction_factor=4), r"\.adapter\."),
    ("adapter-parallel-4bit", "llama", "causal_lm", 4, method("adapter", reduction_factor=4, style="parallel"), r"\.adapter\."),
    ("mam-4bit", "llama", "causal_lm", 4, method("mam", num_virtual_tokens=4, bottleneck=16), MAM),
    ("unipelt-4bit", "llama", "causal_lm", 4, method("unipelt", lora={"r": 4}, adapter={"bottleneck": 16}), UNIPELT),
    ("mam-8bit", "llama", "causal_lm", 8, method("mam", num_virtual_tokens=4, bottleneck=16), MAM),
    ("unipelt-8bit", "llama", "causal_lm", 8, method("unipelt", lora={"r": 4}, adapter={"bottleneck": 16}), UNIPELT),
    ("loha-8bit", "llama", "causal_lm", 8, method("loha", r=4), r"hada_"),
    ("lokr-8bit", "llama", "causal_lm", 8, method("lokr", r=4), r"lokr_"),
    # Classification: the fresh head trains with every method and travels with the artifact.
    ("cls-llama-lora", "llama", "classification", None, method("lora", r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]), rf"lora_|{HEAD}"),
    ("cls-llama-freeze", "llama", "classification", None, method("freeze", trainable_layers=1), rf"layers\.1\.|{HEAD}"),
    ("cls-llama-adapter", "llama", "classification", None, method("adapter", reduction_factor=4), rf"\.adapter\.|{HEAD}"),
    ("cls-llama-prefix", "llama", "classification", None, method("prefix", num_virtual_tokens=4), rf"prompt_encoder|{HEAD}"),
    ("cls-llama-adapter-parallel", "llama", "classification", None, method("adapter", reduction_factor=4, style="parallel"), rf"\.adapter\.|{HEAD}"),
    ("cls-llama-mam", "llama", "classification", None, method("mam", num_virtual_tokens=4, bottleneck=16), rf"{MAM}|{HEAD}"),
    ("cls-llama-unipelt", "llama", "classification", None, method("unipelt", lora={"r": 4}, adapter={"bottleneck": 16}), rf"{UNIPELT}|{HEAD}"),
    ("cls-bert-full", "bert", "classification", None, method("full"), r"."),
    ("cls-bert-bitfit", "bert", "classification", None, method("bitfit"), rf"\.bias$|{HEAD}"),
    ("cls-bert-adalora", "bert", "classification", None, method("adalora", init_r=6, target_r=2, dropout=0.0, tfinal=1), rf"lora_|{HEAD}"),
    ("cls-bert-ia3", "bert", "classification", None, method("ia3"), rf"ia3_l|{HEAD}"),
    ("cls-bert-ptuning_v2", "bert", "classification", None, method("ptuning_v2", num_virtual_tokens=4), rf"prompt_encoder|{HEAD}"),
    ("cls-bert-ptuning", "bert", "classification", None, method("ptuning", num_virtual_tokens=4, encoder_hidden_size=32), rf"prompt_encoder|{HEAD}"),
    ("cls-bert-adapter", "bert", "classification", None, method("adapter", reduction_factor=4), rf"\.adapter\.|{HEAD}"),
]


def test_every_method_is_covered():
    assert {case[4].name for case in CASES} == set(method_names()) == set(METHODS)


@pytest.mark.parametrize(("base", "task", "bits", "config", "trainable_pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_method_trains_exactly_its_parameters_and_reloads(bases, tmp_path, base, task, bits, config, trainable_pattern):
    load = loader(bases[base], task, bits)
    model = apply_method(load(), config, task)
    callbacks = method_callbacks(model, config, RunDir(tmp_path))
    batch = make_batch(model, task)

    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable, "nothing trains"
    pattern = re.compile(trainable_pattern)
    assert all(pattern.search(n) for n in trainable), sorted(n for n in trainable if not pattern.search(n))
    frozen_but_matching = [n for n in named if n not in trainable and pattern.search(n) and "original_module" not in n]
    assert not frozen_but_matching, frozen_but_matching
    if task == "classification":
        assert any(re.search(HEAD, n) for n in trainable), "the classification head must train"

    # Snapshot after apply: PiSSA/OLoRA legitimately rewrite base weights when they initialise.
    before = {n: p.detach().clone() for n, p in named.items()}
    losses = run_steps(model, batch, callbacks)
    assert losses[-1] < losses[0], losses
    params = dict(model.named_parameters())
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed <= trainable, sorted(changed - trainable)
    # AdaLoRA zeroes the singular values of the ranks it prunes (all of a layer's, on these tiny budgets).
    unchanged = {n for n in trainable - changed if not ("lora_E" in n and not params[n].any())}
    assert not unchanged, sorted(unchanged)

    trained_logits = logits_of(model, batch)
    METHODS[config.name].save(model, tmp_path / "artifact")
    reloaded = METHODS[config.name].load(loader(bases[base], task, bits, seed=2), tmp_path / "artifact")
    assert_close(logits_of(reloaded, batch), trained_logits, steps=forward_steps(2))


def linear_shapes(model, names: tuple[str, ...]) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names and hasattr(m, "in_features")]


def test_lora_trainable_count_is_r_times_in_plus_out(bases):
    base = loader(bases["llama"], "causal_lm")()
    shapes = linear_shapes(base, ("q_proj", "v_proj", "down_proj"))
    model = apply_method(base, method("lora", r=8, target_modules=["q_proj", "v_proj", "down_proj"]), "causal_lm")
    assert count_parameters(model)[0] == sum(8 * (i + o) for i, o in shapes)


def test_freeze_trainable_count_is_the_top_layers(bases):
    base = loader(bases["llama"], "causal_lm")()
    top = sum(p.numel() for p in base.model.layers[-1].parameters())
    norm = base.model.norm.weight.numel()
    model = apply_method(base, method("freeze", trainable_layers=1, extra_modules=["norm"]), "causal_lm")
    assert count_parameters(model)[0] == top + norm


def test_bitfit_trainable_count_is_the_bias_sizes(bases):
    base = loader(bases["llama-bias"], "causal_lm")()
    biases = sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias"))
    trainable, total = count_parameters(apply_method(base, method("bitfit"), "causal_lm"))
    assert trainable == biases and total == sum(p.numel() for p in base.parameters())


def test_four_bit_parameters_count_unpacked(bases):
    full_precision = count_parameters(loader(bases["llama"], "causal_lm")())[1]
    assert count_parameters(loader(bases["llama"], "causal_lm", bits=4)())[1] == full_precision


@pytest.mark.numerical
def test_an_evaluation_between_steps_leaves_4bit_layers_differentiable(bases):
    # An eval-mode no-grad forward (Trainer evaluation, a prefix check) must not cut the gradient of
    # later steps: bitsandbytes would repack the weights for CPU inference, which has no backward.
    def first_layer_grad(evaluate_first: bool) -> torch.Tensor:
        model = apply_method(loader(bases["llama"], "causal_lm", bits=4)(), method("lora", r=4, dropout=0.0), "causal_lm")
        batch = make_batch(model, "causal_lm")
        if evaluate_first:
            logits_of(model, batch)
        model.train()
        model(**batch).loss.backward()
        return next(p.grad for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n)  # lora_A starts with no gradient: B is zero

    assert_close(first_layer_grad(evaluate_first=True), first_layer_grad(evaluate_first=False), steps=forward_steps(2, backward=True))


@pytest.mark.numerical
def test_pissa_is_saved_as_a_plain_lora_for_the_original_base(bases, tmp_path):
    load = loader(bases["llama"], "causal_lm")
    model = apply_method(load(), method("lora", r=4, dropout=0.0, init="pissa", target_modules=["q_proj", "v_proj"]), "causal_lm")
    batch = make_batch(model, "causal_lm")
    run_steps(model, batch, steps=3)
    METHODS["lora"].save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # converted: rank 2r, no re-initialisation on load
    original = load()
    reloaded = METHODS["lora"].load(lambda: original, tmp_path)
    # W + (BA - B0A0) against W_res + BA: the conversion rounds once more
    assert_close(logits_of(reloaded, batch), logits_of(model, batch), steps=forward_steps(2) + 1)


def test_adalora_allocation_shrinks_ranks_and_records_them(bases, tmp_path):
    config = method("adalora", init_r=6, target_r=2, dropout=0.0, tinit=1, tfinal=2, target_modules=["q_proj", "v_proj"])
    model = apply_method(loader(bases["llama"], "causal_lm")(), config, "causal_lm")
    run_steps(model, make_batch(model, "causal_lm"), method_callbacks(model, config, RunDir(tmp_path)), steps=10)
    record = json.loads((tmp_path / "adalora_ranks.json").read_text())
    assert len(record["ranks"]) == 4 and record["initial_total_rank"] == 24
    assert record["total_rank"] == sum(record["ranks"].values()) == 2 * 4  # budget: target_r per layer
    assert min(record["ranks"].values()) < 6


def test_adalora_schedule_must_leave_steps_to_allocate(bases):
    config = method("adalora", tinit=2, tfinal=2)
    model = apply_method(loader(bases["llama"], "causal_lm")(), config, "causal_lm")
    [callback] = method_callbacks(model, config, RunDir(Path(".")))
    with pytest.raises(FtuneError, match=r"method.tinit \+ method.tfinal .* 4 optimizer steps"):
        callback.on_train_begin(None, SimpleNamespace(max_steps=4), None)


@pytest.mark.parametrize(
    ("base", "task", "config", "message"),
    [
        ("llama", "causal_lm", method("bitfit"), r"method: bitfit .* has none .* method: lora or method: freeze"),
        ("llama", "causal_lm", method("freeze", trainable_layers=3), r"method.trainable_layers: 3 is more than the model's 2 layers"),
        ("llama", "causal_lm", method("freeze", trainable_layers=[5]), r"method.trainable_layers: layer 5 does not exist"),
        ("llama", "causal_lm", method("freeze", extra_modules=["final_norm"]), r"method.extra_modules: 'final_norm' match no module"),
        ("llama", "causal_lm", method("lora", target_modules=["q_proj", "qv_proj"]), r"method.target_modules: 'qv_proj' match no module.*q_proj"),
        ("llama", "causal_lm", method("lora", modules_to_save=["head"]), r"method.modules_to_save: 'head'"),
        ("llama", "causal_lm", method("boft", block_size=48), r"method: peft cannot apply boft .*divisible by boft_block_size"),
        ("bert", "causal_lm", method("ia3", target_modules=["nope"], feedforward_modules=[]), r"method.target_modules: 'nope'"),
    ],
)
def test_conflicts_found_once_the_model_loads_name_key_and_fix(bases, base, task, config, message):
    with pytest.raises(FtuneError, match=message):
        apply_method(loader(bases[base], task)(), config, task)


def test_prefix_methods_need_a_model_that_takes_a_cache():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=2))
    with pytest.raises(FtuneError, match="ptuning_v2 .*key/value cache.*use method: prompt"):
        apply_method(model, method("ptuning_v2"), "classification")


def test_adapter_on_unsupported_architecture_suggests_lora():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32))
    with pytest.raises(FtuneError, match="method: adapter: .*'opt'.*method: lora"):
        apply_method(model, method("adapter"), "causal_lm")


# --- the schema side: ftune validate refuses impossible combinations before anything loads ---


def validate(alpaca_files, tmp_path, method_section: dict, **sections):
    from ftune.recipe import validate_recipe

    train, evaluation = alpaca_files
    raw = {"data": {"train": str(train), "eval": str(evaluation)}, "method": method_section, "output_dir": str(tmp_path / "run"), **sections}
    return validate_recipe(raw)


def problems_of(alpaca_files, tmp_path, method_section: dict, **sections) -> str:
    with pytest.raises(FtuneError) as info:
        validate(alpaca_files, tmp_path, method_section, **sections)
    return "\n".join(info.value.problems)


@pytest.mark.parametrize("name", method_names())
def test_every_method_validates_with_its_defaults(alpaca_files, tmp_path, name):
    assert validate(alpaca_files, tmp_path, {"name": name}).method.name == name


@pytest.mark.parametrize("name", method_names())
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_matrix_is_enforced(alpaca_files, tmp_path, name, bits):
    quantization = {"quantization": {"bits": bits}}
    if bits in method_class(name).quantized_base:
        validate(alpaca_files, tmp_path, {"name": name}, **quantization)
        return
    problem = problems_of(alpaca_files, tmp_path, {"name": name}, **quantization)
    assert f"quantization.bits: method '{name}' cannot train a {bits}-bit quantized base" in problem
    assert "method: lora" in problem


@pytest.mark.parametrize(
    ("method_section", "sections", "expected"),
    [
        ({"name": "prefix"}, {"training": {"gradient_checkpointing": True}}, "method 'prefix' does not work with gradient checkpointing"),
        ({"name": "ptuning_v2"}, {"training": {"gradient_checkpointing": True}}, "set training.gradient_checkpointing: false"),
        ({"name": "lora", "init": "pissa"}, {"quantization": {"bits": 4}}, "method.init: pissa rewrites the base weights"),
        ({"name": "lora", "init": "olora"}, {"quantization": {"bits": 8}}, "cannot start from a 8-bit base"),
        ({"name": "lora", "use_dora": True}, {"quantization": {"bits": 8}}, "method.use_dora: DoRA fails"),
        ({"name": "lora", "use_dora": True, "init": "pissa"}, {}, "use_dora cannot combine with init: pissa"),
        ({"name": "adalora", "tinit": 3, "tfinal": 2}, {"training": {"max_steps": 5}}, "method.tinit + method.tfinal (3 + 2)"),
        ({"name": "adalora", "init_r": 4, "target_r": 8}, {}, "target_r (8) must not exceed init_r (4)"),
        ({"name": "prefix", "prefix_projection": False, "encoder_hidden_size": 64}, {}, "encoder_hidden_size only applies with prefix_projection: true"),
        ({"name": "prompt", "init": "text"}, {}, "init: text needs init_text"),
        ({"name": "prompt", "init_text": "hi"}, {}, "init_text only applies with init: text"),
        ({"name": "ptuning", "encoder_num_layers": 3}, {}, "encoder_num_layers only applies with encoder: lstm"),
        ({"name": "ia3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}, {}, "feedforward_modules ['down_proj'] are not in target_modules"),
        ({"name": "boft", "block_size": 0}, {}, "set exactly one of block_size and block_num"),
        ({"name": "freeze", "trainable_layers": 0}, {}, "method.trainable_layers"),
        ({"name": "freeze", "trainable_layers": []}, {}, "must list at least one layer index"),
        ({"name": "loha", "target_modules": []}, {}, "method.target_modules"),
        ({"name": "adapter", "scaling": 4.0}, {}, "scaling only applies with style: parallel"),
        ({"name": "mam", "encoder_hidden_size": 64}, {}, "encoder_hidden_size only applies with prefix_projection: true"),
        ({"name": "mam"}, {"training": {"gradient_checkpointing": True}}, "method 'mam' does not work with gradient checkpointing"),
        ({"name": "unipelt", "lora": {"rank": 4}}, {}, "method.lora.rank: unknown key 'rank'; valid keys: r, alpha"),
    ],
)
def test_impossible_combinations_are_refused_by_validate(alpaca_files, tmp_path, method_section, sections, expected):
    assert expected in problems_of(alpaca_files, tmp_path, method_section, **sections)


@pytest.mark.parametrize("method_section", [
    {"name": "adapter", "style": "parallel"}, {"name": "mam"}, {"name": "unipelt"}, {"name": "unipelt", "gates": False},
])
def test_prefixes_and_adapters_refuse_to_merge_and_say_why(alpaca_files, tmp_path, method_section):
    from ftune.merge import check_mergeable

    with pytest.raises(FtuneError, match=r"cannot be merged into the base weights: .*(cannot be folded|non-linearity).*pick lora"):
        check_mergeable(validate(alpaca_files, tmp_path, method_section))


def test_capability_matrix_lists_every_method():
    from typer.testing import CliRunner

    from ftune.cli import app

    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0
    header, *rows = result.stdout.splitlines()
    assert "quantized" in header and "needs" in header
    by_name = {row.split()[0]: row for row in rows}
    assert set(by_name) == set(method_names())
    assert " 8 " in by_name["loha"] and " 4,8 " in by_name["lora"] and " no " in by_name["full"]
    assert all(cls.summary for cls in METHOD_CLASSES)


# --- real pretrained weights ---


@pytest.mark.slow
def test_bitfit_on_minilm_trains_biases_and_the_new_head():
    from ftune.model import load_base_model
    from ftune.recipe.schema import ModelConfig, QuantizationConfig

    base = load_base_model(ModelConfig(name_or_path="all-minilm-l6-v2", dtype="float32"), QuantizationConfig(),
                           task="classification", labels=["negative", "neutral", "positive"])
    biases = sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias") and not n.startswith("classifier."))
    head = sum(p.numel() for p in base.classifier.parameters())
    model = apply_method(base, method("bitfit"), "classification")
    trainable, total = count_parameters(model)
    assert trainable == biases + head and total == 22_714_371
    losses = run_steps(model, make_batch(model, "classification"), steps=4, lr=1e-2)
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_pissa_on_smollm2_reloads_on_the_original_base(tmp_path):
    from ftune.model import load_base_model
    from ftune.recipe.schema import ModelConfig, QuantizationConfig

    def load():
        return load_base_model(ModelConfig(dtype="float32"), QuantizationConfig())

    model = apply_method(load(), method("lora", r=8, dropout=0.0, init="pissa", target_modules=["q_proj", "v_proj"]), "causal_lm")
    batch = make_batch(model, "causal_lm")
    run_steps(model, batch, steps=2, lr=1e-3)
    METHODS["lora"].save(model, tmp_path)
    reloaded = METHODS["lora"].load(load, tmp_path)
    expected = logits_of(model, batch)
    # fp32 rounding of W_res + BA vs W + (BA - B0A0) grows with logit scale (~40 on SmolLM2)
    torch.testing.assert_close(logits_of(reloaded, batch), expected, rtol=0, atol=1e-3 * expected.abs().max().item())


@pytest.mark.parametrize("name", ["prefix", "ptuning_v2", "mam", "unipelt", "prompt", "ptuning"])
def test_generated_replies_are_what_the_trained_model_computes(bases, tmp_path, name):
    # Cached decoding must reproduce a plain greedy loop over full forwards (how the model trained): with peft's
    # prefixes it did not past the first new token, since peft re-injected a prefix-only cache at every step; with
    # soft prompts peft fed each new token behind the virtual tokens again, without the cache.
    from transformers import AutoTokenizer

    from ftune.data.templates import end_of_turn_ids
    from ftune.generation import generate_replies
    from tests.conftest import TOKENIZER_DIR

    knobs = {"unipelt": dict(lora={"r": 4}, prefix={"num_virtual_tokens": 4}, adapter={"bottleneck": 16}),
             "mam": dict(num_virtual_tokens=4, bottleneck=16)}.get(name, dict(num_virtual_tokens=4))
    model = apply_method(loader(bases["llama"], "causal_lm")(), method(name, **knobs), "causal_lm")
    torch.manual_seed(0)
    with torch.no_grad():  # a "trained" state: every trainable part away from its start
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    METHODS[name].save(model, tmp_path)
    model = METHODS[name].load(loader(bases["llama"], "causal_lm"), tmp_path).eval()  # as eval, generate and chat load it
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    stops = end_of_turn_ids(tokenizer)
    prompts = [[{"role": "user", "content": "moon"}], [{"role": "user", "content": "a longer question, so the first is padded"}]]

    expected = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        reply = []
        with torch.no_grad():
            while len(reply) < 10 and not (reply and reply[-1] in stops):
                reply.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax().item())
                ids = torch.cat([ids, torch.tensor([reply[-1:]])], dim=1)
        expected.append(reply)

    fed = []  # input lengths the model saw while generating: the prompt once, then one token a step
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    def feed(_, args, kwargs):  # soft prompts reach the model as embeddings at prefill (virtual tokens first)
        fed.append((kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[1])

    hook = inner.register_forward_pre_hook(feed, with_kwargs=True)
    try:
        replies = generate_replies(model, tokenizer, prompts, max_new_tokens=10, batch_size=2)
    finally:
        hook.remove()
    assert len(fed) == max(len(reply) for reply in expected) and set(fed[1:]) <= {1}
    assert [reply.text for reply in replies] == [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in expected]
    assert [reply.stopped for reply in replies] == [tokens[-1] in stops for tokens in expected]
