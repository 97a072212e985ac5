"""MAM on a tiny Llama: the parallel feed-forward adapters start at zero beside peft's prefixes, train,
and travel inside peft's own adapter folder, so reload and a Trainer resume both restore them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from ftune.errors import FtuneError
from ftune.methods import METHODS, apply_method, count_parameters
from ftune.methods.adapter import ParallelAdapterLayer
from ftune.recipe.methods import method_class
from tests.tolerances import assert_close, forward_steps

HIDDEN, LAYERS, VOCAB = 64, 2, 128
IDS = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(7))


def tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()


def config(name: str = "mam", **knobs):
    return method_class(name).model_validate({"name": name, **knobs})


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def train(model, steps: int = 4) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.numerical
def test_fresh_adapters_add_nothing_to_the_prefix_model():
    """peft's prefixes start random (as with method: prefix); the parallel adapters start at exactly zero."""
    mam = apply_method(tiny(), config(num_virtual_tokens=4, bottleneck=16), "causal_lm")
    prefix = apply_method(tiny(), config("prefix", num_virtual_tokens=4, prefix_projection=False), "causal_lm")  # as mam's
    prefix.prompt_encoder.load_state_dict(mam.prompt_encoder.state_dict())
    assert_close(logits(mam), logits(prefix), steps=forward_steps(LAYERS))
    with mam.disable_adapter():  # prefixes off: the adapters alone leave the base untouched
        assert_close(logits(mam), logits(tiny()), steps=forward_steps(LAYERS))


def test_parallel_adapters_sit_beside_every_feed_forward_block_with_the_papers_scaling():
    model = apply_method(tiny(), config(num_virtual_tokens=4, bottleneck=16), "causal_lm")
    blocks = [layer.mlp for layer in model.get_base_model().model.layers]
    assert all(isinstance(b, ParallelAdapterLayer) and b.scaling == 4.0 for b in blocks)
    assert not any(isinstance(layer.self_attn, ParallelAdapterLayer) for layer in model.get_base_model().model.layers)
    prefix = 4 * LAYERS * 2 * 32  # tokens x layers x (key, value) x kv width (2 heads of 16)
    adapters = LAYERS * (HIDDEN * 16 + 16 + 16 * HIDDEN + HIDDEN)
    gates = LAYERS * 4  # init: gated, one gate per layer and query head
    assert count_parameters(model)[0] == prefix + adapters + gates


def test_the_artifact_is_one_peft_folder_that_holds_the_adapters(tmp_path):
    model = apply_method(tiny(), config(num_virtual_tokens=4, bottleneck=16), "causal_lm")
    train(model)
    METHODS["mam"].save(model, tmp_path)
    files = {p.name for p in tmp_path.iterdir()} - {"README.md"}  # peft's model card
    assert files == {"adapter_config.json", "adapter_model.safetensors", "parallel_adapter_config.json"}
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "prompt_embeddings" in saved
    ups = [t for name, t in saved.items() if name.endswith("mlp.adapter.up.weight")]
    assert len(ups) == LAYERS and all(t.abs().sum() > 0 for t in ups)  # up starts at zero: non-zero means it trained


@pytest.mark.numerical
def test_a_trainer_resume_restores_the_adapters(tmp_path):
    """On resume the Trainer calls peft's load_adapter on a freshly applied model; the adapters must come back too."""
    model = apply_method(tiny(), config(num_virtual_tokens=4, bottleneck=16), "causal_lm")
    train(model)
    model.save_pretrained(tmp_path)  # what the Trainer writes into a checkpoint
    expected = logits(model)
    resumed = apply_method(tiny(), config(num_virtual_tokens=4, bottleneck=16), "causal_lm")
    resumed.load_adapter(str(tmp_path), "default", is_trainable=True)
    assert_close(logits(resumed), expected, steps=forward_steps(LAYERS))
    trainable = {n for n, p in resumed.named_parameters() if p.requires_grad}
    assert any("mlp.adapter.modules_to_save" in n for n in trainable) and any("prompt_encoder" in n for n in trainable)


def test_post_norm_encoders_are_refused_with_the_supported_families():
    bert = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2, num_labels=2))
    with pytest.raises(FtuneError, match=r"method: mam: parallel bottleneck adapters do not support model_type 'bert'.*llama"):
        apply_method(bert, config(), "classification")
