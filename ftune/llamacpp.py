"""``ftune export --verify llama.cpp``: run the exported GGUF in llama.cpp itself and compare its replies with the model's.

transformers' GGUF loader proves the file reads back; llama.cpp is what people deploy with (directly, or
inside Ollama and LM Studio), and it tokenizes, applies rotary embeddings and computes in its own way.
The run's held-out prompts are rendered with the run's chat template once; llama.cpp tokenizes that text
with its own tokenizer and decodes greedily, and the replies are compared with greedy decoding of the
complete weights in transformers. llama-cpp-python is an optional extra (``pip install 'ftune[llamacpp]'``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

# Unquantized files must reproduce every reply; for the others the agreement is reported, not required.
EXACT_QUANTS = ("f32", "f16")
INSTALL_HINT = "pip install 'ftune[llamacpp]' (builds llama.cpp from source: several minutes)"


@dataclass
class LlamaCppReport:
    prompts: int
    same_text: float  # share of prompts whose llama.cpp reply equals the transformers reply
    same_tokens: float  # share of prompts llama.cpp's tokenizer splits exactly as the transformers tokenizer does
    stopped_rate: float  # share of llama.cpp replies that ended on EOS before max_new_tokens
    required: bool  # whether same_text must be 1.0 for the export to pass
    passed: bool
    examples: list[dict]  # the prompts whose replies differ (at most 5)

    def to_dict(self) -> dict:
        return asdict(self)


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def verify_with_llama_cpp(gguf_file: Path, model_dir: Path, prompts: list[list[dict]], *, quant: str,
                          max_new_tokens: int, batch_size: int, lora: Path | None = None) -> LlamaCppReport:
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftune.generation import generate_replies
    from ftune.resources import resolve_threads

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = generate_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    del model

    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    hf_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    longest = max(map(len, hf_ids)) + max_new_tokens
    llm = Llama(model_path=str(gguf_file), n_ctx=max(512, longest), n_threads=resolve_threads(None).count,
                n_batch=512, verbose=False, seed=0, lora_path=str(lora) if lora else None)
    from ftune.data.templates import end_of_turn_ids

    stops = set(end_of_turn_ids(tokenizer))
    same_text = same_tokens = stopped = 0
    differing = []
    for prompt, text, ids, want in zip(prompts, texts, hf_ids, expected):
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        same_tokens += tokens == ids
        reply, ended = [], False
        for token in llm.generate(tokens, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if token in stops:
                ended = True
                break
            reply.append(token)
            if len(reply) >= max_new_tokens:
                break
        # The same decoding transformers' side used: special tokens dropped, surrounding space trimmed.
        got = tokenizer.decode(reply, skip_special_tokens=True).strip()
        stopped += ended
        same_text += got == want.text
        if got != want.text and len(differing) < 5:
            differing.append({"prompt": prompt[-1]["content"], "transformers": want.text, "llama.cpp": got})
    count = len(prompts)
    required = quant in EXACT_QUANTS
    return LlamaCppReport(prompts=count, same_text=same_text / count, same_tokens=same_tokens / count, stopped_rate=stopped / count,
                          required=required, passed=same_text == count or not required, examples=differing)
