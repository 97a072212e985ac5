"""What this machine can do: mixed precision, CPU threads, accelerator capabilities and free memory.

Every fact comes from a small probe function so tests can fake any machine by monkeypatching it;
resolvers combine probes into a decision plus the reason shown to the user. Probes whose name
starts with ``cheap_`` read files only and never import torch, so ``ftune validate`` and ``ftune
plan`` stay instant; the others import torch inside the function and give the authoritative answer
at launch.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from ftune.errors import FtuneError

# Measured on a 2-core AVX2 CPU: torch bf16 GEMM 1.3 GFLOP/s vs 68 fp32, so autocast is ~50x slower.
CPU_BF16_SLOWDOWN = 50
SWITCH_TO_AUTO = "--set training.mixed_precision=auto"


@dataclass(frozen=True)
class Precision:
    """The autocast precision a run uses ("no", "bf16" or "fp16"), why, and a caveat worth printing."""

    mode: str
    reason: str
    warning: str | None = None

    def describe(self, requested: str) -> str:
        return f"mixed precision: {requested} -> {self.mode} ({self.reason})"


# --- probes (monkeypatched in tests) -------------------------------------------------------------


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cuda_bf16_supported() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def cuda_capability() -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability()


def cuda_device_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def mps_available() -> bool:
    import torch

    return torch.backends.mps.is_available()


def mps_bf16_supported() -> bool:
    import torch

    # Metal gained bfloat16 with macOS 14 (Sonoma); older systems fail inside the first kernel.
    return torch.backends.mps.is_macos_or_newer(14, 0)


# The CPU features with which oneDNN runs bf16 GEMMs natively; without them bf16 autocast is ~50x slower.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_native_bf16() -> bool:
    """True when the CPU has one of ``NATIVE_BF16_FLAGS``, as torch's oneDNN build sees it (the launch's decision)."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cheap_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """CPU feature flags from /proc/cpuinfo (Linux); empty where the file does not exist."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cheap_cpu_native_bf16() -> bool | None:
    """``cpu_native_bf16`` from /proc/cpuinfo, without torch (None where the flags cannot be read)."""
    flags = cheap_cpu_flags()
    return bool(flags & NATIVE_BF16_FLAGS) if flags else None


def cheap_autocast_16bit(requested: str, device: str) -> bool:
    """Whether training will autocast to bf16/fp16, as far as file probes can tell (the launch resolves it exactly)."""
    if requested != "auto":
        return requested != "no"
    return device != "cpu" or bool(cheap_cpu_native_bf16())


def cheap_nvidia_gpu_present(driver: Path = Path("/proc/driver/nvidia/gpus")) -> bool:
    """An NVIDIA driver with at least one GPU is loaded (Linux); says nothing about the GPU's generation."""
    try:
        return any(driver.iterdir())
    except OSError:
        return False


def cheap_is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


# --- precision -----------------------------------------------------------------------------------


def resolve_precision(requested: str) -> Precision:
    """The autocast precision to train with, decided once at launch from the hardware.

    ``auto`` picks the fastest safe choice; an explicit choice is kept, with a warning where it is
    slow, and refused (FtuneError) where it cannot work.
    """
    if cuda_available():
        return _cuda_precision(requested)
    if mps_available():
        return _mps_precision(requested)
    return _cpu_precision(requested)


def _cuda_precision(requested: str) -> Precision:
    name, bf16 = cuda_device_name(), cuda_bf16_supported()
    if requested == "auto":
        if bf16:
            return Precision("bf16", f"{name} supports bfloat16")
        return Precision("fp16", f"{name} has no bfloat16; float16 with loss scaling", fp16_overflow_caveat())
    if requested == "bf16" and not bf16:
        raise FtuneError(f"training.mixed_precision: bf16 is not supported on {name}; use fp16 or auto ({SWITCH_TO_AUTO})")
    if requested == "fp16":
        return Precision("fp16", f"requested; {name}", fp16_overflow_caveat())
    return Precision(requested, f"requested; {name}")


def fp16_overflow_caveat() -> str:
    return (
        "float16 overflows above 65504: a model pretrained in bfloat16 (most recent LLMs) can produce inf/nan losses; "
        "if the loss turns nan, set training.mixed_precision: no"
    )


def _mps_precision(requested: str) -> Precision:
    bf16 = mps_bf16_supported()
    if requested == "auto":
        if bf16:
            return Precision("bf16", "Apple GPU (MPS) on macOS 14+ supports bfloat16")
        return Precision("no", "Apple GPU (MPS) before macOS 14 has no bfloat16; float32")
    if requested == "bf16" and not bf16:
        raise FtuneError(f"training.mixed_precision: bf16 on the Apple GPU needs macOS 14 or newer; use auto ({SWITCH_TO_AUTO})")
    return Precision(requested, "requested; Apple GPU (MPS)")


def _cpu_precision(requested: str) -> Precision:
    native = cpu_native_bf16()
    if requested == "fp16":
        raise FtuneError(
            "training.mixed_precision: fp16 needs a GPU (CPU float16 autocast is slow and unstable); "
            f"use auto ({SWITCH_TO_AUTO}), bf16 or no"
        )
    if requested == "auto":
        if native:
            return Precision("bf16", "CPU has native bfloat16 (AVX512-BF16/AMX)")
        return Precision("no", "CPU has no native bfloat16 (no AVX512-BF16/AMX); float32 is fastest")
    if requested == "bf16" and not native:
        return Precision(
            "bf16",
            "requested; CPU has no native bfloat16",
            f"bf16 autocast on a CPU without AVX512-BF16/AMX runs ~{CPU_BF16_SLOWDOWN}x slower than float32 "
            f"(emulated GEMMs); switch with {SWITCH_TO_AUTO}",
        )
    return Precision(requested, "requested; CPU" + (" has native bfloat16" if native else ""))


def preview_precision(requested: str) -> str:
    """What ``resolve_precision`` will probably decide, from file probes only (no torch); for ``ftune validate``."""
    if cheap_nvidia_gpu_present():
        if requested == "auto":
            return "auto -> bf16 on Ampere+ GPUs, fp16 on older ones (NVIDIA GPU found; resolved at launch)"
        return f"{requested} (NVIDIA GPU found; checked at launch)"
    if cheap_is_apple_silicon():
        return f"{requested} (Apple GPU; resolved at launch)"
    native = cheap_cpu_native_bf16()
    if native is None:
        return f"{requested} (resolved at launch from the hardware)"
    if requested == "auto":
        return "auto -> bf16 (CPU has avx512_bf16/amx_bf16)" if native else "auto -> no (CPU has no avx512_bf16/amx_bf16; float32)"
    if requested == "fp16":
        return "fp16: refused at launch on this machine (no GPU found; fp16 needs one)"
    if requested == "bf16" and not native:
        return f"bf16: ~{CPU_BF16_SLOWDOWN}x slower than float32 on this CPU (no avx512_bf16/amx_bf16); {SWITCH_TO_AUTO}"
    return requested


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


# --- device and memory ---------------------------------------------------------------------------


def cheap_device() -> str:
    """'cuda' where an NVIDIA driver lists a GPU, else 'cpu' (file probes only; Apple GPUs plan as CPU memory)."""
    return "cuda" if cheap_nvidia_gpu_present() else "cpu"


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


# --- GPU path ------------------------------------------------------------------------------------

AMPERE = (8, 0)  # first generation with bf16 tensor cores, TF32 and flash-attention 2 support


def flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


@dataclass(frozen=True)
class Attention:
    implementation: str
    reason: str


def resolve_attention(requested: str, dtype_name: str) -> Attention:
    """The attention kernel: flash_attention_2 where it runs (package, Ampere+ GPU, 16-bit weights), else sdpa.

    ``dtype_name`` is the resolved weight dtype ("bfloat16", "float16", "float32"): flash-attention
    kernels have no float32 path.
    """
    if requested not in ("auto", "flash_attention_2"):
        return Attention(requested, "model.attn_implementation")
    blocker = None
    if not cuda_available():
        blocker = "no CUDA GPU"
    elif cuda_capability() < AMPERE:
        blocker = f"{cuda_device_name()} is older than Ampere (compute capability {'.'.join(map(str, cuda_capability()))} < 8.0)"
    elif not flash_attn_installed():
        blocker = "the flash-attn package is not installed (pip install flash-attn)"
    elif dtype_name not in ("bfloat16", "float16"):
        blocker = f"model.dtype resolves to {dtype_name}; flash attention needs bfloat16 or float16 weights"
    if blocker is None:
        return Attention("flash_attention_2", f"flash-attn on {cuda_device_name()}")
    if requested == "flash_attention_2":
        raise FtuneError(f"model.attn_implementation: flash_attention_2 cannot run here: {blocker}; use auto or sdpa")
    return Attention("sdpa", f"flash attention unavailable: {blocker}")


def resolve_tf32() -> bool:
    """TF32 for float32 matmuls on Ampere+ GPUs: ~8x the float32 tensor throughput, 10-bit mantissa inputs."""
    return cuda_available() and cuda_capability() >= AMPERE


def apply_tf32(enabled: bool) -> None:
    import torch

    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


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
