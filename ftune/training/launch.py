"""``ftune train --nproc N``: start the processes through torch.distributed's own elastic launcher (what ``torchrun`` is).

Each child runs ``python -m ftune train`` with the same recipe and options, and sees the launcher's
RANK / WORLD_SIZE / LOCAL_RANK, so it trains as one rank of a data-parallel run (rank 0 writes the run
directory). One machine uses a standalone rendezvous on a free port; several machines meet at
``--master-addr:--master-port`` (start the same command on each, with its own ``--node-rank``).

When a process ends before the others (killed, crashed, a user error), the launcher stops the rest at once (SIGTERM,
then SIGKILL after ``SHUTDOWN_S``), the command prints one line naming the process that failed first and why, and
releases the run directory's lock its rank 0 held, so ``--resume`` continues from the last complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from ftune.errors import FtuneError
from ftune.training.distributed import PEER_LOST

DEFAULT_PORT = 29500
MONITOR_S = 0.1  # how often the launcher looks at its processes
SHUTDOWN_S = 5  # how long a process stopped by the launcher may take before it is killed


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
    return ["--nproc-per-node", str(nproc), *where, "--monitor-interval", str(MONITOR_S), "--shutdown-timeout", str(SHUTDOWN_S),
            "-m", "ftune", *child_argv]


def launch(child_argv: list[str], *, output_dir: Path | None = None, **placement) -> int:
    """Run the launcher; 0, or the first failed rank's exit code (2 for a recipe or data error, which that rank has
    printed; 1 for a killed rank) after one line on stderr naming it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    quiet_launcher_logs()
    try:
        run(parse_args(launcher_arguments(child_argv, **placement)))
    except ChildFailedError as failed:
        rank, failure = first_failure(failed.failures)
        release_lock(output_dir)
        if failure.exitcode != 2:  # a user error: the rank printed its one line
            world = placement.get("nproc", 1) * placement.get("nnodes", 1)
            print(f"error: {describe_failure(rank, failure, world)}; the other processes were stopped; complete checkpoints are "
                  "kept: continue with the same command and --resume", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 and failure.exitcode != PEER_LOST else 1
    except SignalException as stopped:  # the launcher itself was stopped (Ctrl-C, SIGTERM); it stopped the ranks first
        release_lock(output_dir)
        print(f"interrupted by {signal.Signals(stopped.sigval).name}; complete checkpoints are kept (continue with --resume)", file=sys.stderr)
        return 128 + stopped.sigval
    return 0


def first_failure(failures: dict) -> tuple:
    """(rank, failure) of the process that failed first: one that ended by itself (killed, crashed, a user error) before
    one the launcher stopped (SIGTERM) or one that stopped because another was gone; then the earliest, then the lowest rank."""
    def order(item):
        rank, failure = item
        followed = failure.exitcode == PEER_LOST or failure.exitcode == -signal.SIGTERM
        return followed, failure.timestamp, rank

    return min(failures.items(), key=order)


def describe_failure(rank: int, failure, world: int) -> str:
    """What happened to one process, in words: its signal, or its exit code and the one line it left."""
    who = f"rank {rank} of {world} (pid {failure.pid})"
    if failure.exitcode < 0:
        name = failure.signal_name()
        cause = f"{who} was killed by {name}" + (" (also what the kernel's out-of-memory killer sends)" if name == "SIGKILL" else "")
    elif failure.exitcode == PEER_LOST:
        cause = f"{who} stopped"
    else:
        cause = f"{who} failed with exit code {failure.exitcode}"
    message = failure.message if isinstance(failure.message, str) and failure.error_file not in ("", "<N/A>") else ""
    return f"{cause}: {message}" if message else cause


def release_lock(output_dir: Path | None) -> None:
    """Remove the run directory's lock when the process that held it (a rank this launcher started) no longer runs."""
    from ftune.run_dir import LOCK_FILE, run_lock

    if output_dir is None or not (Path(output_dir) / LOCK_FILE).is_file():
        return
    try:
        with run_lock(Path(output_dir), echo=lambda *_: None):
            pass  # taking a dead holder's lock over, then letting it go
    except FtuneError:
        pass  # a live process holds it (another node's rank 0, or another run): not ours to remove


def quiet_launcher_logs() -> None:
    """Silence torch's elastic agent's own failure report (a log line per stopped process, a table per failure):
    ``launch`` prints the one line that matters."""
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def describe_world(section) -> str | None:
    """The line train prints first in a multi-process run: how many processes, and how they share the work."""
    from ftune.resources import local_ranks
    from ftune.recipe.distributed import describe_strategy
    from ftune.training.distributed import world_size

    world = world_size()
    if world <= 1:
        return None if section.strategy == "auto" else f"processes: 1, distributed.strategy: {section.strategy} has nothing to shard; single process"
    return f"processes: world size {world} ({local_ranks(default=world)} on this machine), strategy {describe_strategy(section, world_size=world)}"
