"""``ftune train --nproc N``: start the processes through torch.distributed's own elastic launcher (what ``torchrun`` is).

Each child runs ``python -m ftune train`` with the same recipe and options, and sees the launcher's
RANK / WORLD_SIZE / LOCAL_RANK, so it trains as one rank of a data-parallel run (rank 0 writes the run
directory). One machine uses a standalone rendezvous on a free port; several machines meet at
``--master-addr:--master-port`` (start the same command on each, with its own ``--node-rank``).
"""

from __future__ import annotations

import os

from ftune.errors import FtuneError

DEFAULT_PORT = 29500


def launched_by_torch() -> bool:
    """Whether this process is already a rank of a torchrun / accelerate / --nproc launch."""
    return "LOCAL_RANK" in os.environ


def launcher_arguments(child_argv: list[str], *, nproc: int, nnodes: int, node_rank: int, master_addr: str | None,
                       master_port: int) -> list[str]:
    """torch.distributed.run's command line for ``python -m ftune <child_argv>`` on ``nproc`` processes per node."""
    if nproc < 1 or nnodes < 1:
        raise FtuneError("--nproc and --nnodes must be at least 1")
    if not 0 <= node_rank < nnodes:
        raise FtuneError(f"--node-rank {node_rank}: expected 0 to {nnodes - 1} (one per machine, --nnodes {nnodes})")
    if nnodes > 1 and not master_addr:
        raise FtuneError("--nnodes > 1 needs --master-addr: the address of the machine with --node-rank 0, reachable from every node")
    where = (["--standalone"] if nnodes == 1 else
             ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", master_addr, "--master-port", str(master_port)])
    return ["--nproc-per-node", str(nproc), *where, "-m", "ftune", *child_argv]


def launch(child_argv: list[str], **placement) -> int:
    """Run the launcher; the exit code of the first failed rank (2 for a recipe or data error), else 0."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(launcher_arguments(child_argv, **placement)))
    except ChildFailedError as failed:
        codes = [failure.exitcode for failure in failed.failures.values()]
        return next((code for code in codes if code and code > 0), 1)
    return 0


def describe_world(section) -> str | None:
    """The line train prints first in a multi-process run: how many processes, and how they share the work."""
    from ftune.resources import local_ranks
    from ftune.recipe.distributed import describe_strategy
    from ftune.training.distributed import world_size

    world = world_size()
    if world <= 1:
        return None if section.strategy == "auto" else f"processes: 1, distributed.strategy: {section.strategy} has nothing to shard; single process"
    return f"processes: world size {world} ({local_ranks(default=world)} on this machine), strategy {describe_strategy(section, world_size=world)}"
