"""The model card ``ftune push`` writes, from the run directory alone: a README.md that huggingface_hub's ModelCard reads.

Metadata the Hub acts on: ``base_model`` (the hub id the chain of runs began from), ``library_name`` (``peft`` for an
adapter, ``transformers`` for complete weights, ``gguf`` for GGUF files) so the Hub shows the right snippet, tags, the
pipeline, hub datasets, and the base model's license where its card (or its GGUF metadata) has one, read only from
local files. The body: method and settings, training figures, data sources with their row counts and hashes, the
``ftune eval`` table and benchmark scores (base vs tuned), the lineage of chained runs and framework versions.
Local paths are shown by their last part only, and the values of secrets are masked before the card leaves.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from ftune.model import BUILTIN_GGUF
from ftune.recipe import Recipe
from ftune.recipe.tasks import CAUSAL_LM, TASKS
from ftune.run_dir import RunDir

CARD_FILE = "README.md"
LIBRARIES = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}
PIPELINES = {CAUSAL_LM: "text-generation", "classification": "text-classification"}
# Built-in aliases of ftune.model and the Hub repositories their weights come from.
BUILTIN_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct", "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
TRAINING_SHOWN = ("epochs", "max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
                  "warmup_ratio", "weight_decay", "optimizer", "seed")
SUMMARY_SHOWN = ("steps", "epochs", "train_loss", "eval_loss", "tokens_seen", "trainable_params", "total_params", "wall_time_s")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def shown(name: str) -> str:
    """A model or data location as the card shows it: hub ids whole, local paths by their last part."""
    return name if HUB_ID.match(name) and not Path(name).exists() else Path(name).name


def origin_model(recipe: Recipe, manifest: dict) -> str:
    """The model the chain of runs began from: follows ``model.name_or_path`` through earlier run directories."""
    name, seen = recipe.model.name_or_path, set()
    while (path := Path(name).expanduser()).is_dir() and (path / "recipe.yaml").is_file() and path.resolve() not in seen:
        seen.add(path.resolve())
        name = ((yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8")) or {}).get("model") or {}).get("name_or_path", name)
    lineage = manifest.get("lineage") or []
    if not Path(name).exists() and lineage and lineage[0].get("model_source") and not HUB_ID.match(name):
        name = lineage[0]["model_source"]  # the first run's folder is gone: its recorded source
    return name


def hub_id(name: str) -> str | None:
    if name in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[name]
    return name if HUB_ID.match(name) and not Path(name).exists() else None


def gguf_license(path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("general.license")
    return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None


def base_license(name: str) -> str | None:
    """The license of the base model's card (or GGUF metadata), from local files only; None when there is none."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    from ftune.model import BUILTIN_FOLDERS, builtin_package_dir

    readme = None
    try:
        if name in BUILTIN_GGUF:
            return gguf_license(builtin_package_dir(name, BUILTIN_GGUF[name][0]) / BUILTIN_GGUF[name][1])
        if name in BUILTIN_FOLDERS:
            readme = builtin_package_dir(name, BUILTIN_FOLDERS[name][0]) / BUILTIN_FOLDERS[name][1] / CARD_FILE
        elif name.endswith(".gguf") and Path(name).is_file():
            return gguf_license(Path(name))
        elif Path(name).is_dir():
            readme = Path(name) / CARD_FILE
        elif hub_id(name):
            cached = try_to_load_from_cache(hub_id(name), CARD_FILE)
            readme = Path(cached) if isinstance(cached, str) else None
        if readme is None or not readme.is_file():
            return None
        license_ = ModelCard.load(readme, ignore_metadata_errors=True).data.license
    except Exception:  # an unreadable card or file: the card just names no license
        return None
    return license_ if isinstance(license_, str) else None


def data_sources(recipe: Recipe) -> list[dict]:
    """Each data entry with its row count and content hash, where its files are on this machine (hub datasets are not
    read: that would need the network)."""
    from ftune.data.sources import read_source, source_fingerprint

    entries = []
    for split in ("train", "eval"):
        for index, source in enumerate(getattr(recipe.data, split)):
            entry = {"split": split, "source": source.hub or shown(source.path), "format": source.format, "rows": None, "sha256": None}
            if source.hub is None and Path(source.path).exists():
                try:
                    entry["rows"] = len(read_source(source, [], key=f"data.{split}.{index}"))
                    entry["sha256"] = source_fingerprint(source)
                except Exception:  # a file changed since training into something unreadable: listed without figures
                    pass
            entries.append(entry)
    return entries


def number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return "" if value is None else str(value)


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(number(cell) for cell in row) + " |" for row in rows]


def score_table(scores: dict) -> list[str]:
    """Markdown table of an eval or benchmark result (tuned, and base and delta when scored)."""
    tuned, base = scores.get("tuned") or {}, scores.get("base")
    names = [k for k, v in tuned.items() if isinstance(v, (int, float)) and not k.endswith("_stderr")]
    header = ["metric", "tuned"] + (["base", "delta"] if base else [])
    rows = []
    for name in names:
        value = number(tuned[name]) + (f" ± {number(tuned[name + '_stderr'])}" if name + "_stderr" in tuned else "")
        row = [name, value]
        if base:
            row += [base.get(name), (scores.get("delta") or {}).get(name)]
        rows.append(row)
    return table(header, rows)


def mask_secrets(text: str) -> str:
    """The card with secrets masked: the token huggingface_hub sends, every secret-named environment variable's value
    (``ftune.redaction``), and anything shaped like a Hub token."""
    from huggingface_hub import get_token

    from ftune.redaction import MASK, redact

    token = get_token()
    return TOKEN_PATTERN.sub(MASK, redact(text.replace(token, MASK) if token else text))


def render_card(run: RunDir, recipe: Recipe, *, repo_id: str, artifact: str, files: dict[str, Path]) -> str:
    from huggingface_hub import ModelCardData

    manifest, summary = read_json(run.manifest), read_json(run.summary)
    origin = origin_model(recipe, manifest)
    base = hub_id(origin)
    method = recipe.method.model_dump(mode="json", exclude_none=True)
    hub_datasets = sorted({s.hub for s in recipe.data.train + recipe.data.eval if s.hub})
    library = LIBRARIES[artifact] if artifact != "adapter" or (run.model / "adapter_config.json").is_file() else None
    data = ModelCardData(
        base_model=base, library_name=library, license=base_license(origin), pipeline_tag=PIPELINES.get(recipe.task),
        tags=["ftune", recipe.stage, method["name"], *(["gguf"] if artifact == "gguf" else [])], datasets=hub_datasets or None,
    )
    lines = [f"# {repo_id.split('/')[1]}", "",
             f"{ {'adapter': 'An adapter', 'merged': 'A model', 'gguf': 'GGUF files'}[artifact] } fine-tuned from "
             f"{f'[{base}](https://huggingface.co/{base})' if base else '`' + shown(origin) + '`'} with ftune "
             f"(stage `{recipe.stage}`, method `{method['name']}`"
             + (f", {recipe.quantization.bits}-bit base" if recipe.quantization.bits else "") + ").", ""]
    if origin in BUILTIN_GGUF:  # what the run trained on is not the Hub's float weights
        lines += [f"The base weights were ftune's built-in `{origin}`: `{BUILTIN_GGUF[origin][1]}` dequantized, which differs "
                  "from the Hub model by that quantization.", ""]
    lines += ["## Use", "", "```python"] + usage(repo_id, artifact, recipe, files, base) + ["```", ""]
    lines += ["## Method", ""] + table(["setting", "value"], [[k, json.dumps(v) if isinstance(v, (list, dict)) else v]
                                                                for k, v in method.items()]) + [""]
    training = recipe.training.model_dump(mode="json")
    precision = (manifest.get("mixed_precision") or {}).get("used")
    rows = [[k, training[k]] for k in TRAINING_SHOWN if training.get(k) is not None]
    rows += [["precision", precision]] if precision else []
    rows += [[k, summary[k]] for k in SUMMARY_SHOWN if summary.get(k) is not None]
    lines += ["## Training", ""] + table(["setting", "value"], rows) + [""]
    lines += ["## Data", ""] + table(["split", "source", "format", "rows", "sha256"],
                                     [[e["split"], e["source"], e["format"], e["rows"] if e["rows"] is not None else "not on this machine",
                                       e["sha256"]] for e in data_sources(recipe)])
    if manifest.get("data_fingerprint"):
        lines += ["", f"Fingerprint of all the data the run read (sha256): `{manifest['data_fingerprint']}`"]
    lines += [""] + evaluation_section(run)
    parity = read_json(run.parity_report())
    if artifact == "merged" and parity:
        lines += [f"The merged weights reproduce the adapter model: max |logit diff| {number(parity.get('max_abs_logit_diff'))} "
                  f"(tolerance {number(parity.get('tolerance'))}) on {parity.get('prompts')} held-out prompts, {parity.get('dtype')}.", ""]
    lineage = [*manifest.get("lineage", []), {"run": str(run.root), "stage": recipe.stage}]
    if len(lineage) > 1:
        lines += ["## Lineage", ""] + [f"{i}. run `{Path(step['run']).name}` (stage `{step['stage']}`)" for i, step in enumerate(lineage, 1)] + [""]
    versions = {"ftune": manifest.get("ftune"), **(manifest.get("versions") or {}), "python": manifest.get("python")}
    lines += ["## Framework versions", ""] + [f"- {name} {v}" for name, v in versions.items() if v] + [""]
    return mask_secrets(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def evaluation_section(run: RunDir) -> list[str]:
    lines = ["## Evaluation", ""]
    scores = read_json(run.eval_metrics)
    if scores:
        lines += [f"`ftune eval` on the held-out split ({scores.get('split', 'eval')}):", ""] + score_table(scores) + [""]
    bench = read_json(run.eval_dir / "benchmark.json")
    if bench:
        lines += [f"lm-evaluation-harness {bench.get('lm_eval', '')} ({bench.get('model', 'adapter')} model), "
                  f"tasks {', '.join(bench.get('tasks', []))}:", ""] + score_table(bench) + [""]
    return lines + ([] if scores or bench else ["Not evaluated yet (`ftune eval RUN --base`).", ""])


def usage(repo_id: str, artifact: str, recipe: Recipe, files: dict[str, Path], base: str | None) -> list[str]:
    if artifact == "gguf":
        name = next(iter(files))
        return ["# llama.cpp: llama-cli -hf " + repo_id, "from huggingface_hub import hf_hub_download",
                f"path = hf_hub_download({repo_id!r}, {name!r})"]
    auto = TASKS[recipe.task].auto_class
    if artifact == "adapter":
        return ["from peft import PeftModel", f"from transformers import {auto}, AutoTokenizer", "",
                f"tokenizer = AutoTokenizer.from_pretrained({repo_id!r})  # with the chat template the run trained with",
                f"base = {auto}.from_pretrained({base!r})" if base else "base = ...  # the base model named above, loaded with transformers",
                f"model = PeftModel.from_pretrained(base, {repo_id!r})"]
    return [f"from transformers import {auto}, AutoTokenizer", "", f"tokenizer = AutoTokenizer.from_pretrained({repo_id!r})",
            f"model = {auto}.from_pretrained({repo_id!r})"]
