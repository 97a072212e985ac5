"""Unit tests for the verified safetensors and GGUF export writers, on tiny random models."""

from __future__ import annotations

import json
import pathlib

import gguf
import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import ftune.gguf as gguf_writer
from ftune.errors import FtuneError
from ftune.export import FORMATS, LOGIT_TOLERANCE, export_gguf, export_safetensors
from ftune.gguf import GGUF_QUANTS, SUPPORTED_GGUF_ARCHITECTURES, UnsupportedExport
from ftune.parity import compare_logits

TOKENIZER_DIR = pathlib.Path(__file__).resolve().parents[1] / "assets" / "tiny-tokenizer"
CHAT = [
    {"role": "user", "content": "Add 17 and 25, then say hi 👋"},
    {"role": "assistant", "content": "42. Hi!"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def save_tiny(path: pathlib.Path, tokenizer, config_cls=LlamaConfig, model_cls=LlamaForCausalLM, **overrides):
    """A tiny causal LM folder as `ftune merge` writes it: config, safetensors, tokenizer."""
    torch.manual_seed(0)
    settings = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        # Not the default 0.02: with weights that small attention is nearly uniform, and a q/k
        # permutation mistake would hide inside quantization noise.
        initializer_range=0.1,
    )
    model_cls(config_cls(**{**settings, **overrides})).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> pathlib.Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", tokenizer)


def tensor_types(path: pathlib.Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("quant", GGUF_QUANTS)
def test_gguf_round_trip_within_tolerance(tiny_dir, tmp_path, quant):
    out = tmp_path / f"tiny-{quant}.gguf"
    report = export_gguf(tiny_dir, out, quant=quant)

    assert report.passed, report.to_dict()
    assert report.max_abs_logit_diff <= report.tolerance
    assert report.writer_max_abs_logit_diff <= report.writer_tolerance
    # 4-5 bit files are scored by the writer check; their own agreement on random ids is ~0.5-0.75.
    assert report.next_token_agreement >= (0.9 if quant in ("f32", "f16", "bf16", "q8_0") else 0.4)
    assert report.size_bytes == out.stat().st_size
    assert report.tokenizer_match and report.notes == []
    if quant == "f32":
        assert report.max_abs_logit_diff < 1e-5
    types = tensor_types(out)
    assert types["blk.0.attn_norm.weight"] == "F32"  # norms never quantized
    assert types["blk.0.attn_q.weight"] == quant.upper()
    assert json.loads(json.dumps(report.to_dict()))["path"] == str(out)


def test_quantized_files_are_smaller(tiny_dir, tmp_path):
    order = ("f32", "f16", "q8_0", "q5_1", "q5_0", "q4_0")
    sizes = [export_gguf(tiny_dir, tmp_path / f"{q}.gguf", quant=q).size_bytes for q in order]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), dict(zip(order, sizes))


def test_k_quants_are_refused_with_the_llama_cpp_route(tiny_dir, tmp_path):
    with pytest.raises(UnsupportedExport, match="llama-quantize model-f16.gguf model-q4_k.gguf Q4_K"):
        export_gguf(tiny_dir, tmp_path / "x.gguf", quant="q4_k")
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_metadata_and_tokenizer_round_trip(tiny_dir, tmp_path, tokenizer):
    out = tmp_path / "tiny.gguf"
    export_gguf(tiny_dir, out, quant="f16")

    fields = gguf.GGUFReader(out).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("general.architecture") == "llama"
    assert value("llama.block_count") == 2 and value("llama.attention.head_count_kv") == 2
    assert value("tokenizer.ggml.model") == "gpt2"
    assert len(value("tokenizer.ggml.tokens")) == len(tokenizer)
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert value("tokenizer.ggml.padding_token_id") == tokenizer.convert_tokens_to_ids("<|pad|>")
    assert value("tokenizer.chat_template") == tokenizer.chat_template

    loaded = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert loaded.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == text
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_verification_ignores_files_beside_the_gguf(tiny_dir, tmp_path, tokenizer):
    # A different model's config and tokenizer in the target folder must not stand in for the GGUF's own.
    decoy = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    BertForSequenceClassification(decoy).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")

    report = export_gguf(tiny_dir, tmp_path / "model.gguf", quant="f32")
    assert report.passed and report.tokenizer_match, report.to_dict()


def test_tied_embeddings_write_no_output_tensor(tmp_path, tokenizer):
    tied = save_tiny(tmp_path / "tied", tokenizer, tie_word_embeddings=True)
    report = export_gguf(tied, tmp_path / "tied.gguf", quant="f32")
    assert report.passed
    assert "output.weight" not in tensor_types(report.path)


def test_untied_embeddings_write_output_tensor(tiny_dir, tmp_path):
    report = export_gguf(tiny_dir, tmp_path / "untied.gguf", quant="f32")
    assert "output.weight" in tensor_types(report.path)


@pytest.mark.parametrize("quant", ["f32", "q4_0"])
def test_verification_catches_missing_rope_permutation(tiny_dir, tmp_path, monkeypatch, quant):
    # At 4 bits the quantization error alone is as large as this mistake; the writer check still sees it.
    monkeypatch.setattr(gguf_writer, "_permute_for_rope", lambda weights, n_head: weights)
    report = export_gguf(tiny_dir, tmp_path / "unpermuted.gguf", quant=quant)
    assert not report.passed
    assert report.writer_max_abs_logit_diff > 100 * report.writer_tolerance
    if quant == "f32":
        assert report.max_abs_logit_diff > 100 * report.tolerance


def test_q8_0_falls_back_for_rows_not_divisible_by_32(tmp_path, tokenizer):
    # hidden 48: every matrix fed by the hidden state has 48-wide rows; only ffn_down (128) fits q8_0.
    model_dir = save_tiny(tmp_path / "narrow", tokenizer, hidden_size=48)
    report = export_gguf(model_dir, tmp_path / "narrow.gguf", quant="q8_0")

    assert report.passed, report.to_dict()
    types = tensor_types(report.path)
    assert types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "F16"
    assert report.writer_max_abs_logit_diff == 0.0  # the reference rounds the fallen-back tensors to f16 too
    assert len(report.notes) == 1 and "blk.0.attn_q.weight" in report.notes[0]
    assert "blk.0.ffn_down.weight" not in report.notes[0]


@pytest.mark.parametrize(
    ("config_cls", "model_cls", "arch"),
    [(MistralConfig, MistralForCausalLM, "llama"), (Qwen2Config, Qwen2ForCausalLM, "qwen2")],
)
def test_other_architectures_round_trip(tmp_path, tokenizer, config_cls, model_cls, arch):
    model_dir = save_tiny(tmp_path / "model", tokenizer, config_cls=config_cls, model_cls=model_cls)
    report = export_gguf(model_dir, tmp_path / "model.gguf", quant="q8_0")
    assert report.passed, report.to_dict()
    assert gguf.GGUFReader(report.path).fields["general.architecture"].contents() == arch


def test_atomic_write_leaves_no_temp_file(tiny_dir, tmp_path):
    out = tmp_path / "model.gguf"
    export_gguf(tiny_dir, out, quant="f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.Modelfile", "model.gguf"]


def test_crash_mid_write_keeps_previous_file(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous export")

    def crash(writer, **kwargs):
        writer.fout[0].write(b"half a tensor")
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(tiny_dir, out, quant="f16")
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_unsupported_architecture_lists_supported_ones(tmp_path):
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")

    with pytest.raises(UnsupportedExport) as raised:
        export_gguf(tmp_path / "bert", tmp_path / "bert.gguf")
    message = str(raised.value)
    assert "'bert'" in message
    assert all(arch in message for arch in SUPPORTED_GGUF_ARCHITECTURES)
    assert not (tmp_path / "bert.gguf").exists()


def test_unknown_quant_lists_supported_ones(tiny_dir, tmp_path):
    with pytest.raises(UnsupportedExport) as raised:
        export_gguf(tiny_dir, tmp_path / "x.gguf", quant="q3_0")
    assert all(quant in str(raised.value) for quant in GGUF_QUANTS)
    assert isinstance(raised.value, FtuneError)  # so the CLI prints it without a traceback


def test_safetensors_export_shards_and_reloads(tiny_dir, tmp_path):
    out = tmp_path / "exported"
    report = export_safetensors(tiny_dir, out, max_shard_size="100KB")

    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert report.passed and report.max_abs_logit_diff == 0.0 and report.next_token_agreement == 1.0
    assert report.tokenizer_match
    assert report.size_bytes == sum(p.stat().st_size for p in out.iterdir())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).is_file()
    assert (out / "generation_config.json").read_bytes() == (tiny_dir / "generation_config.json").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no staging folder left behind


def test_safetensors_export_refuses_non_empty_folder(tiny_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FtuneError, match="not empty"):
        export_safetensors(tiny_dir, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_compare_logits(tiny_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_dir).eval()
    other = LlamaForCausalLM.from_pretrained(tiny_dir).eval()
    ids = torch.arange(10, 30).reshape(2, 10)
    same = compare_logits(model, other, ids)
    assert (same.max_abs_diff, same.agreement) == (0.0, 1.0) and same.scale > 0

    with torch.no_grad():
        other.lm_head.weight.mul_(-1)  # flips the ranking of every token
    flipped = compare_logits(model, other, [list(range(5)), list(range(5, 25))])
    assert flipped.max_abs_diff > 0.1 and flipped.agreement < 0.5


def test_formats_dispatch_and_tolerance_table():
    from ftune.export.writers import export_gguf_lora

    assert {name: f.write for name, f in FORMATS.items()} == {"safetensors": export_safetensors, "gguf": export_gguf,
                                                              "gguf-lora": export_gguf_lora}
    assert set(LOGIT_TOLERANCE) == {"safetensors", *GGUF_QUANTS}
    assert "llama" in SUPPORTED_GGUF_ARCHITECTURES


def test_qwen3_export_needs_the_head_dim_its_loader_assumes(tmp_path, tokenizer):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model_dir = save_tiny(tmp_path / "qwen3", tokenizer, config_cls=Qwen3Config, model_cls=Qwen3ForCausalLM, head_dim=16)
    with pytest.raises(UnsupportedExport, match="Qwen3 needs head_dim 128"):
        export_gguf(model_dir, tmp_path / "model.gguf")


def test_gemma2_export_needs_the_query_scale_llama_cpp_uses(tmp_path, tokenizer):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model_dir = save_tiny(tmp_path / "gemma2", tokenizer, config_cls=Gemma2Config, model_cls=Gemma2ForCausalLM, head_dim=16)
    with pytest.raises(UnsupportedExport, match=r"query_pre_attn_scalar = head_dim \(16\).*'query_pre_attn_scalar': 256"):
        export_gguf(model_dir, tmp_path / "model.gguf")
