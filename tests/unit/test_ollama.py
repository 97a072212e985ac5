"""The Modelfile's Go TEMPLATE renders conversations exactly as the tokenizer's Jinja template does.

``render_go`` below is an independent reading of Go text/template (trim markers, range over .Messages,
.Role/.Content) with Ollama's rule that the Modelfile's SYSTEM becomes the first message of a
conversation that has no system turn; it refuses any action it does not implement.
"""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from ftune.data.templates import read_chat_template
from ftune.export import export_gguf
from ftune.ollama import detect_chat_format, modelfile_path
from tests.conftest import TOKENIZER_DIR
from tests.unit.test_export import save_tiny

# SmolLM2-135M-Instruct's own template, as its tokenizer ships it (a default system turn when there is none).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are "
    "a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Rewrite 5 March 2024 as ISO."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Two\nlines, and  spaces."}],
    [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": "Calling."},
     {"role": "tool", "content": "{\"temp\": 3}"}, {"role": "user", "content": "And?"}],
]
ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def render_go(template: str, messages: list[dict], system: str | None) -> str:
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    pieces, position = [], 0  # text and ("action", body) items, trim markers applied to the text beside them
    for match in ACTION.finditer(template):
        text = template[position:match.start()]
        if match.group(1):
            text = text.rstrip(" \t\r\n")
        pieces += [("text", text), ("action", match.group(2))]
        position = match.end()
        if match.group(3):
            rest = template[position:]
            position += len(rest) - len(rest.lstrip(" \t\r\n"))
    pieces.append(("text", template[position:]))

    out, index = [], 0
    while index < len(pieces):
        kind, body = pieces[index]
        if kind == "text":
            out.append(body)
        elif body == "range .Messages":
            end = next(i for i in range(index, len(pieces)) if pieces[i] == ("action", "end"))
            loop = pieces[index + 1 : end]
            for message in messages:
                out += [body if kind == "text" else message[{".Role": "role", ".Content": "content"}[body]] for kind, body in loop]
            index = end
        else:
            raise AssertionError(f"render_go does not implement {{{{ {body} }}}}")
        index += 1
    return "".join(out)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.mark.parametrize(("template", "layout", "default_system"), [
    (read_chat_template("chatml"), "chatml", None),
    (SMOLLM2_TEMPLATE, "chatml", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    (read_chat_template("llama3"), "llama3", None),
    (read_chat_template("phi3"), "phi3", None),
])
def test_modelfile_template_renders_what_the_tokenizer_renders(tokenizer, template, layout, default_system):
    tokenizer.chat_template = template
    chat = detect_chat_format(tokenizer, runtime_adds_bos=True)
    assert (chat.layout, chat.default_system) == (layout, default_system)
    for messages in CONVERSATIONS:
        jinja = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        jinja = jinja.removeprefix(tokenizer.bos_token)  # llama.cpp adds BOS itself (runtime_adds_bos)
        assert render_go(chat.template, messages, chat.default_system) == jinja


def test_layouts_the_go_form_cannot_express_get_no_template(tokenizer):
    for name in ("alpaca", "gemma", "mistral", "deepseek"):
        tokenizer.chat_template = read_chat_template(name)
        assert detect_chat_format(tokenizer, runtime_adds_bos=False) is None, name
    tokenizer.chat_template = None
    assert detect_chat_format(tokenizer, runtime_adds_bos=False) is None


def test_export_writes_a_modelfile_beside_the_gguf(tmp_path, tokenizer):
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    model_dir = save_tiny(tmp_path / "model", tokenizer)
    report = export_gguf(model_dir, tmp_path / "model-q8_0.gguf", quant="q8_0")
    text = modelfile_path(report.path).read_text()
    assert report.modelfile == str(tmp_path / "model-q8_0.Modelfile") and report.chat_layout == "chatml"
    assert "FROM ./model-q8_0.gguf\n" in text
    assert 'PARAMETER stop "<|im_end|>"\n' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    assert render_go(template, CONVERSATIONS[0], None).startswith("<|im_start|>user\n")

    recipe_system = export_gguf(model_dir, tmp_path / "model-f16.gguf", quant="f16", system_prompt="Answer with the date only.")
    assert 'SYSTEM """Answer with the date only."""' in modelfile_path(recipe_system.path).read_text()

    tokenizer.chat_template = read_chat_template("alpaca")
    plain = export_gguf(save_tiny(tmp_path / "alpaca", tokenizer), tmp_path / "alpaca.gguf", quant="f16")
    assert "TEMPLATE" not in modelfile_path(plain.path).read_text() and plain.chat_layout is None
    assert any("Modelfile has no TEMPLATE" in note for note in plain.notes)
