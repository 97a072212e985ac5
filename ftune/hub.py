"""Publishing a run on the Hugging Face Hub (``ftune push``): which files go, and the model card that describes them.

``plan_push`` picks the files of one artifact: the adapter (``RUN/model``), the complete weights (``RUN/merged``, or
``RUN/model`` of a full fine-tune) or the GGUF exports (``RUN/export/*.gguf`` with their Ollama Modelfiles), and writes
the card from the run directory alone (``ftune.model_card``). ``--dry-run`` stops there, before any network call;
``upload`` makes the only ones, through ``huggingface_hub``'s ``HfApi`` (create the repository, the branch, then one
commit of every file). The card and the upload folder live in a temporary directory, so pushing changes nothing in
the run directory, and a failure is one line naming the fix.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ftune.errors import FtuneError
from ftune.model_card import CARD_FILE, render_card
from ftune.run_dir import PARITY_FILE, RunDir, load_run

ARTIFACTS = ("adapter", "merged", "gguf")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
TOKENS_URL = "https://huggingface.co/settings/tokens"
# Left out of an upload: the card is ftune's own (peft writes one of its own into the adapter folder), and the merge
# parity report records local paths (its figures are in the card).
NOT_UPLOADED = {CARD_FILE, PARITY_FILE}


@dataclass
class PushPlan:
    repo_id: str
    artifact: str
    run: RunDir
    files: dict[str, Path]  # path in the repository -> file on disk
    card: str

    def listing(self) -> list[tuple[str, int]]:
        """(path in the repository, bytes) of every file the push sends, the card first."""
        return [(CARD_FILE, len(self.card.encode("utf-8"))), *((name, path.stat().st_size) for name, path in self.files.items())]


def check_repo_id(repo_id: str) -> None:
    if not REPO_ID.match(repo_id) or ".." in repo_id or len(repo_id) > 96:
        raise FtuneError(f"--repo {repo_id!r}: expected OWNER/NAME (letters, digits, '-', '_', '.'), e.g. --repo alice/smollm2-dates")


def default_artifact(run: RunDir) -> str:
    return "merged" if run.has_complete_weights() else "adapter"


def folder_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in NOT_UPLOADED and not p.name.startswith(".")}


def artifact_files(run: RunDir, artifact: str) -> dict[str, Path]:
    """The files of ``artifact``, refusing what the run does not hold with the command that makes it."""
    if artifact == "adapter":
        if run.has_complete_weights():
            raise FtuneError(f"--what adapter: {run.root} trained complete weights, not an adapter; push them with --what merged")
        return folder_files(run.model)
    if artifact == "merged":
        if run.has_complete_weights():
            return folder_files(run.model)
        if not run.is_merged():
            raise FtuneError(f"--what merged: {run.root} has no merged model yet; create it with: ftune merge {run.root}")
        return folder_files(run.merged)
    from ftune.ollama import modelfile_path

    files = {}
    for gguf in sorted(run.export_dir.glob("*.gguf")):
        files[gguf.name] = gguf
        if modelfile_path(gguf).is_file():
            files[modelfile_path(gguf).name] = modelfile_path(gguf)
    if not files:
        raise FtuneError(f"--what gguf: {run.export_dir} holds no GGUF file; create one with: ftune export {run.root} --format gguf")
    return files


def plan_push(run_dir, repo_id: str, artifact: str | None = None) -> PushPlan:
    """What ``ftune push`` would send: the files and the card; reads the run directory and nothing else."""
    check_repo_id(repo_id)
    run, recipe = load_run(run_dir)
    artifact = artifact or default_artifact(run)
    if artifact not in ARTIFACTS:
        raise FtuneError(f"--what {artifact!r}: expected one of {', '.join(ARTIFACTS)}")
    files = artifact_files(run, artifact)
    return PushPlan(repo_id, artifact, run, files, render_card(run, recipe, repo_id=repo_id, artifact=artifact, files=files))


def describe_plan(plan: PushPlan, *, private: bool, revision: str | None) -> str:
    where = f"https://huggingface.co/{plan.repo_id}" + (f" (branch {revision})" if revision else "")
    lines = [f"{plan.artifact} of {plan.run.root} -> {where}" + (" [private]" if private else "")]
    width = max(len(name) for name, _ in plan.listing())
    lines += [f"  {name:<{width}}  {human_size(size):>10}" for name, size in plan.listing()]
    return "\n".join(lines)


def human_size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def stage_upload(plan: PushPlan, folder: Path) -> None:
    """The upload folder: links to the run's files (nothing is copied, nothing in the run changes) and the card."""
    for name, source in plan.files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source.resolve())
    (folder / CARD_FILE).write_text(plan.card, encoding="utf-8")


def upload_failure(repo_id: str, err: Exception) -> str:
    """One line for a failed upload: what the Hub said and how to fix it."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    said = (str(err).strip().splitlines() or [type(err).__name__])[0]
    owner = repo_id.split("/")[0]
    if status == 401:
        return f"the Hub refused the token (401: {said}); log in again with `hf auth login` or set HF_TOKEN to a valid token ({TOKENS_URL})"
    if status == 403:
        return (f"the token may not write to {owner} (403: {said}); use a token with write access to {owner} ({TOKENS_URL}), "
                "or push to a namespace you own")
    if type(err).__name__ == "OfflineModeIsEnabled":
        return "HF_HUB_OFFLINE is set, which forbids the upload; unset it to push (or look with --dry-run)"
    return f"upload to {repo_id} failed ({said}); no files were committed; check the network and the repository name, then push again"


def upload(plan: PushPlan, *, private: bool = False, revision: str | None = None, echo=print) -> str:
    """Create the repository (and branch) if missing and commit every file of ``plan`` at once; returns the commit's URL."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise FtuneError(f"ftune push needs a Hugging Face token with write access: run `hf auth login`, or set HF_TOKEN "
                         f"(create one at {TOKENS_URL}); nothing was uploaded")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="ftune-push-") as folder:
        stage_upload(plan, Path(folder))
        echo(f"Uploading {len(plan.files) + 1} files to {plan.repo_id}...")
        try:
            api.create_repo(plan.repo_id, private=private, exist_ok=True, repo_type="model")
            if revision:
                api.create_branch(plan.repo_id, branch=revision, exist_ok=True, repo_type="model")
            commit = api.upload_folder(repo_id=plan.repo_id, folder_path=folder, revision=revision, repo_type="model",
                                       commit_message=f"ftune push: {plan.artifact} of run {plan.run.root.name}")
        except Exception as err:  # the network boundary: every failure there becomes one line naming the fix
            raise FtuneError(upload_failure(plan.repo_id, err)) from err
    return str(getattr(commit, "commit_url", None) or commit)
