"""What this machine lends a run: CPU threads, free memory, and the data loader's share of the cores.

Limits come from where the operating system sets them: the affinity mask, a cgroup's CPU quota and
memory limit (v1 and v2), /proc/meminfo, and the local processes of a multi-process launch, which share
all of it. As in ``hardware``, probes whose name starts with ``cheap_`` read files only, so ``ftune plan``
stays instant, and tests fake a machine by monkeypatching them.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path


# --- threads -------------------------------------------------------------------------------------


def local_ranks(default: int = 1) -> int:
    """Processes of this launch on this machine (torchrun's LOCAL_WORLD_SIZE; ``default`` when not launched so): they
    share its cores and memory."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "") or default)


def cheap_affinity_cpus() -> int:
    """CPUs this process may run on (taskset, cpusets); os.cpu_count() where affinity is not exposed."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs granted by a cgroup CPU quota (containers, CI runners), or None when unlimited or unknown.

    cgroup v2 writes ``cpu.max`` as "QUOTA PERIOD" (QUOTA "max" = unlimited) in the process's own
    cgroup and each ancestor, the tightest one applying; v1 splits it into ``cpu.cfs_quota_us``
    (-1 = unlimited) and ``cpu.cfs_period_us``, both in microseconds.
    """
    limits = []
    for folder in _own_cgroup_folders(root, membership):
        try:
            quota, _, period = (folder / "cpu.max").read_text().strip().partition(" ")
            if quota != "max":
                limits.append(int(quota) / int(period or 100000))
        except (OSError, ValueError):
            continue
    if limits:
        return min(limits)
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def _own_cgroup_folders(root: Path, membership: Path) -> list[Path]:
    """The v2 cgroup folders of this process, its own first, then each ancestor up to ``root``."""
    try:
        line = next((l for l in membership.read_text().splitlines() if l.startswith("0::")), "0::/")
    except OSError:
        line = "0::/"
    own = root / line[3:].strip().lstrip("/")
    return [own, *[parent for parent in own.parents if parent == root or root in parent.parents]]


@dataclass(frozen=True)
class Threads:
    count: int
    reason: str


def resolve_threads(requested: int | None) -> Threads:
    """Intra-op threads for torch: the recipe's value, or the CPUs really available split across local ranks.

    torch defaults to every core of the host even when a cgroup quota grants two, and the
    oversubscribed threads then stall each other.
    """
    if requested is not None:
        return Threads(requested, "training.threads")
    affinity, quota = cheap_affinity_cpus(), cgroup_cpu_limit()
    cpus = affinity if quota is None else max(1, min(affinity, math.floor(quota)))
    reason = f"{affinity} CPUs in the affinity mask" + (f", cgroup quota {quota:g}" if quota is not None else "")
    ranks = local_ranks()
    if ranks > 1:
        reason += f", shared by {ranks} local processes"
    return Threads(max(1, cpus // ranks), reason)


def apply_threads(threads: Threads) -> None:
    import torch

    torch.set_num_threads(threads.count)


# --- memory ---------------------------------------------------------------------------


def cheap_meminfo(meminfo: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """The numeric fields of /proc/meminfo (or /proc/self/status), in KiB; empty where the file does not exist."""
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return {}
    values = {}
    for key, _, value in (line.partition(":") for line in lines):
        number = value.split()[0] if value.split() else ""
        if number.isdigit():
            values[key] = int(number)
    return values


def cgroup_memory_free_mib(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """Memory left under the tightest cgroup limit (v2 memory.max - memory.current in the own cgroup or
    an ancestor; v1 limit_in_bytes - usage_in_bytes of the memory controller's cgroup), or None if unlimited."""
    folders = [(f / "memory.max", f / "memory.current") for f in _own_cgroup_folders(root, membership)]
    v1 = _v1_cgroup_folder(root / "memory", membership, "memory")
    folders += [(v1 / "memory.limit_in_bytes", v1 / "memory.usage_in_bytes"), (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes")]
    free = []
    for limit_file, usage_file in folders:
        try:
            limit = limit_file.read_text().strip()
            usage = int(usage_file.read_text())
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < 2**60:  # v1 writes "no limit" as a huge number
            free.append((int(limit) - usage) / 2**20)
    return min(free) if free else None


def _v1_cgroup_folder(mount: Path, membership: Path, controller: str) -> Path:
    try:
        for line in membership.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                return mount / path.lstrip("/")
    except (OSError, ValueError):
        pass
    return mount


def free_memory_mib(device: str) -> float | None:
    """Memory a new run may use on ``device`` (MiB), or None where it cannot be known."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0] / 2**20
    available = cheap_meminfo().get("MemAvailable")
    if available is None:
        return None
    cgroup = cgroup_memory_free_mib()
    return min(available / 1024, cgroup) if cgroup is not None else available / 1024


def current_rss_mib() -> float:
    """Resident memory of this process now (the baseline a probe subtracts); 0 where /proc is missing."""
    return cheap_meminfo(Path("/proc/self/status")).get("VmRSS", 0) / 1024


def peak_rss_mib() -> float:
    """Highest resident memory of this process image so far (MiB).

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a run started by a
    large parent (a pytest worker, a notebook, a launcher) would report the parent's peak as its own.
    """
    peak_kib = cheap_meminfo(Path("/proc/self/status")).get("VmHWM")
    if peak_kib is not None:
        return peak_kib / 1024
    import resource
    import sys

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB elsewhere


def return_freed_memory() -> bool:
    """Hand the free pages of the C heap back to the operating system (glibc's ``malloc_trim``); False without glibc.

    PyTorch's CPU tensors come from malloc. glibc serves a block under its mmap threshold from the heap and raises
    that threshold (up to 32 MiB) each time a larger mmapped block is freed, so after the first long row most
    activations come from heap arenas, and pages freed there stay in the process: the next step's peak sits on top of
    the last one's leftovers. Measured on SmolLM2-135M LoRA, 4,096-token rows, checkpointing: peak RSS 3,778 MiB,
    2,800 MiB trimmed before each step (a fixed 128 KiB mmap threshold reaches 2,299 MiB but takes 1.9x the step time
    at 256 tokens: every new block page-faults in). The trim has its own cost on short rows (``training.trainer``).
    """
    trim = _malloc_trim()
    return bool(trim is not None and trim(0) >= 0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


@dataclass(frozen=True)
class Loader:
    pin_memory: bool
    workers: int


def resolve_loader(*, cuda: bool, cpus: int) -> Loader:
    """DataLoader settings: on CPU the training threads need every core (and pinning is pointless);
    on a GPU, pinned host memory and a few workers keep batches ready while the GPU computes."""
    if not cuda:
        return Loader(pin_memory=False, workers=0)
    ranks = local_ranks()
    return Loader(pin_memory=True, workers=max(0, min(4, cpus // ranks - 1)))  # one core stays with the training process
