"""What this machine can compute with: mixed precision, accelerator capabilities, attention kernels, TF32.

Every fact comes from a small probe function so tests can fake any machine by monkeypatching it;
resolvers combine probes into a decision plus the reason shown to the user. Probes whose name
starts with ``cheap_`` read files only and never import torch, so ``ftune validate`` and ``ftune
plan`` stay instant; the others import torch inside the function and give the authoritative answer
at launch. How many CPUs and how much memory a run may use is ``resources``' business.
"""

from __future__ import annotations

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


def cheap_device() -> str:
    """'cuda' where an NVIDIA driver lists a GPU, else 'cpu' (file probes only; Apple GPUs plan as CPU memory)."""
    return "cuda" if cheap_nvidia_gpu_present() else "cpu"


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
