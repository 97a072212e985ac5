"""The training room: ``ftune train`` and what it is built from.

``run`` drives a run (run directory, checkpoints, summary, manifest); ``session`` builds what a run
trains with; ``stages`` is the table of training stages (sft, pretrain, dpo, orpo, reward), each a row;
``trainer`` is the one place a transformers Trainer is built. ``plan`` and ``probe`` answer how much a
recipe needs before it runs, the probe through the same session a run uses.

Nothing heavy is imported here: ``ftune plan`` reads ``training.plan`` without torch.
"""


def __getattr__(name: str):
    if name in ("run_training", "run_preprocess"):
        from ftune.training import run

        return getattr(run, name)
    raise AttributeError(f"module 'ftune.training' has no attribute {name!r}")
