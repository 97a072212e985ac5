"""Hardware resolution: each machine is faked by monkeypatching the probes, so no case needs the hardware."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftune import hardware, resources
from ftune.cli import app
from ftune.errors import FtuneError
from ftune.hardware import resolve_precision
from ftune.recipe import load_recipe

runner = CliRunner()


@pytest.fixture
def machine(monkeypatch):
    """Fake a machine: machine(cuda=..., cuda_bf16=..., mps=..., mps_bf16=..., cpu_bf16=..., flags=...)."""

    def fake(*, cuda=False, cuda_bf16=False, mps=False, mps_bf16=False, cpu_bf16=False, gpu="Tesla V100-SXM2-16GB", flags=("avx2",)):
        for probe, value in {
            "cuda_available": cuda,
            "cuda_bf16_supported": cuda_bf16,
            "cuda_device_name": gpu,
            "mps_available": mps,
            "mps_bf16_supported": mps_bf16,
            "cpu_native_bf16": cpu_bf16,
            "cheap_cpu_flags": set(flags),
            "cheap_nvidia_gpu_present": cuda,
            "cheap_is_apple_silicon": mps,
        }.items():
            monkeypatch.setattr(hardware, probe, lambda value=value: value)

    return fake


def test_auto_on_a_bf16_gpu_is_bf16(machine):
    machine(cuda=True, cuda_bf16=True, gpu="NVIDIA A100-SXM4-40GB")
    precision = resolve_precision("auto")
    assert (precision.mode, precision.warning) == ("bf16", None)
    assert "A100" in precision.reason


def test_auto_on_a_gpu_without_bf16_is_fp16_with_the_overflow_caveat(machine):
    machine(cuda=True, cuda_bf16=False, gpu="Tesla T4")
    precision = resolve_precision("auto")
    assert precision.mode == "fp16" and "Tesla T4 has no bfloat16" in precision.reason
    assert "bfloat16" in precision.warning and "overflow" in precision.warning and "mixed_precision: no" in precision.warning


def test_explicit_bf16_on_a_gpu_without_bf16_is_refused(machine):
    machine(cuda=True, cuda_bf16=False, gpu="Tesla V100")
    with pytest.raises(FtuneError, match="bf16 is not supported on Tesla V100; use fp16 or auto"):
        resolve_precision("bf16")


def test_auto_on_a_cpu_with_native_bf16_is_bf16(machine):
    machine(cpu_bf16=True)
    assert resolve_precision("auto").mode == "bf16"


def test_auto_on_a_cpu_without_native_bf16_is_fp32(machine):
    machine(cpu_bf16=False)
    precision = resolve_precision("auto")
    assert (precision.mode, precision.warning) == ("no", None)
    assert "no native bfloat16" in precision.reason


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns_it_is_50x_slower_and_how_to_switch(machine):
    machine(cpu_bf16=False)
    precision = resolve_precision("bf16")
    assert precision.mode == "bf16"  # the user asked; keep it, but say what it costs
    assert "~50x slower" in precision.warning and "--set training.mixed_precision=auto" in precision.warning


def test_explicit_bf16_on_a_cpu_with_native_bf16_does_not_warn(machine):
    machine(cpu_bf16=True)
    assert resolve_precision("bf16").warning is None


@pytest.mark.parametrize("native", [True, False])
def test_fp16_on_cpu_is_refused_with_the_reason(machine, native):
    machine(cpu_bf16=native)
    with pytest.raises(FtuneError, match="fp16 needs a GPU") as refused:
        resolve_precision("fp16")
    assert len(refused.value.problems) == 1 and "--set training.mixed_precision=auto" in str(refused.value)


def test_apple_gpu_uses_bf16_only_where_metal_has_it(machine):
    machine(mps=True, mps_bf16=True)
    assert resolve_precision("auto").mode == "bf16"
    machine(mps=True, mps_bf16=False)
    assert resolve_precision("auto").mode == "no"
    with pytest.raises(FtuneError, match="macOS 14"):
        resolve_precision("bf16")


def test_no_stays_no_everywhere(machine):
    for case in ({"cuda": True, "cuda_bf16": True}, {"mps": True, "mps_bf16": True}, {"cpu_bf16": True}):
        machine(**case)
        assert resolve_precision("no").mode == "no"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert {"avx2", "avx512_bf16"} <= hardware.cheap_cpu_flags(cpuinfo)
    assert hardware.cheap_cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize(
    ("case", "requested", "expected"),
    [
        ({"flags": ("avx2",)}, "auto", "auto -> no (CPU has no avx512_bf16/amx_bf16; float32)"),
        ({"flags": ("avx2", "amx_bf16")}, "auto", "auto -> bf16 (CPU has avx512_bf16/amx_bf16)"),
        ({"flags": ("avx2",)}, "bf16", "~50x slower"),
        ({"flags": ("avx2",)}, "fp16", "refused at launch"),
        ({"cuda": True}, "auto", "resolved at launch"),
        ({"flags": ()}, "auto", "resolved at launch from the hardware"),
    ],
)
def test_validate_previews_the_resolution_without_torch(machine, make_recipe, case, requested, expected):
    machine(**case)
    result = runner.invoke(app, ["validate", str(make_recipe()), "--set", f"training.mixed_precision={requested}"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stderr.splitlines() if line.startswith("# training.mixed_precision: "))
    assert expected in line


def test_validate_previews_threads_with_the_reason(make_recipe, monkeypatch):
    monkeypatch.setattr("ftune.resources.cheap_affinity_cpus", lambda: 6)
    monkeypatch.setattr("ftune.resources.cgroup_cpu_limit", lambda *args: 2.5)
    result = runner.invoke(app, ["validate", str(make_recipe())])
    assert "# training.threads: 2 (6 CPUs in the affinity mask, cgroup quota 2.5)" in result.stderr.splitlines()
    result = runner.invoke(app, ["validate", str(make_recipe()), "--set", "training.threads=3"])
    assert "# training.threads: 3 (training.threads)" in result.stderr.splitlines()


@pytest.mark.parametrize("spelling", ["no", "off", "false", "'no'"])
def test_yaml_false_means_no_in_the_file_and_in_set(make_recipe, tmp_path, spelling):
    path = make_recipe()
    text = path.read_text().replace("training:\n", f"training:\n  mixed_precision: {spelling}\n", 1)
    path.write_text(text)
    assert load_recipe(path).training.mixed_precision == "no"
    assert load_recipe(make_recipe(), [f"training.mixed_precision={spelling}"]).training.mixed_precision == "no"


def test_default_is_auto_and_true_is_not_a_precision(make_recipe):
    assert load_recipe(make_recipe()).training.mixed_precision == "auto"
    with pytest.raises(FtuneError, match=r"training.mixed_precision \(--set\): True is not one of auto, no, bf16, fp16"):
        load_recipe(make_recipe(), ["training.mixed_precision=yes"])


def test_shipped_recipes_all_say_auto():
    from tests.conftest import REPO

    recipes = sorted((REPO / "recipes").glob("*/*.yaml"))
    assert recipes and all("  mixed_precision: auto" in path.read_text() for path in recipes)


def test_train_refuses_fp16_on_cpu_in_one_line_before_loading_anything(machine, make_recipe, tmp_path):
    machine(cpu_bf16=False)
    result = runner.invoke(app, ["train", str(make_recipe()), "--set", "training.mixed_precision=fp16"])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "fp16 needs a GPU" in errors[0]
    assert not (tmp_path / "run").exists()


def cgroup(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "cpus"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "200000 100000\n"}, 2.0),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({"cpu.max": "garbage"}, None),
        ({}, None),
    ],
)
def test_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path, files, cpus):
    assert resources.cgroup_cpu_limit(cgroup(tmp_path, files), membership=tmp_path / "no-such-file") == cpus


def test_the_tightest_quota_of_the_own_cgroup_and_its_ancestors_applies(tmp_path):
    root = cgroup(tmp_path / "fs", {"cpu.max": "max 100000\n", "ci/cpu.max": "400000 100000\n", "ci/job/cpu.max": "max 100000\n"})
    membership = tmp_path / "cgroup"
    membership.write_text("0::/ci/job\n")
    assert resources.cgroup_cpu_limit(root, membership) == 4.0
    membership.write_text("0::/\n")
    assert resources.cgroup_cpu_limit(root, membership) is None


@pytest.mark.parametrize(
    ("affinity", "quota", "ranks", "expected"),
    [(2, None, None, 2), (8, 2.0, None, 2), (8, 2.5, None, 2), (4, 0.5, None, 1), (8, None, "2", 4), (1, None, "4", 1)],
)
def test_threads_follow_the_cpus_this_process_may_use(monkeypatch, affinity, quota, ranks, expected):
    monkeypatch.setattr(resources, "cheap_affinity_cpus", lambda: affinity)
    monkeypatch.setattr(resources, "cgroup_cpu_limit", lambda: quota)
    if ranks:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
    else:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    threads = resources.resolve_threads(None)
    assert threads.count == expected
    assert f"{affinity} CPUs in the affinity mask" in threads.reason
    assert ("cgroup quota" in threads.reason) == (quota is not None)


def test_explicit_threads_win_and_must_be_positive(monkeypatch, make_recipe):
    monkeypatch.setattr(resources, "cheap_affinity_cpus", lambda: 64)
    assert resources.resolve_threads(3) == resources.Threads(3, "training.threads")
    assert load_recipe(make_recipe(), ["training.threads=3"]).training.threads == 3
    assert load_recipe(make_recipe()).training.threads is None
    with pytest.raises(FtuneError, match=r"training.threads \(--set\): must be greater than or equal to 1"):
        load_recipe(make_recipe(), ["training.threads=0"])


def test_applied_threads_reach_torch():
    import torch

    before = torch.get_num_threads()
    try:
        resources.apply_threads(resources.Threads(1, "test"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def gpu(monkeypatch, machine):
    """Fake a CUDA GPU of a compute capability, with or without the flash-attn package."""

    def fake(capability=(8, 0), *, flash=True, name="NVIDIA A100-SXM4-80GB"):
        machine(cuda=True, cuda_bf16=capability >= (8, 0), gpu=name)
        monkeypatch.setattr(hardware, "cuda_capability", lambda: capability)
        monkeypatch.setattr(hardware, "flash_attn_installed", lambda: flash)

    return fake


def test_flash_attention_on_ampere_with_the_package_and_16bit_weights(gpu):
    gpu((8, 0), flash=True)
    assert hardware.resolve_attention("auto", "bfloat16").implementation == "flash_attention_2"
    gpu((9, 0), flash=True, name="NVIDIA H100")
    assert hardware.resolve_attention("auto", "float16").implementation == "flash_attention_2"


@pytest.mark.parametrize(
    ("capability", "flash", "dtype", "why"),
    [
        ((7, 0), True, "float16", "older than Ampere (compute capability 7.0 < 8.0)"),
        ((8, 6), False, "bfloat16", "flash-attn package is not installed"),
        ((8, 0), True, "float32", "flash attention needs bfloat16 or float16"),
    ],
)
def test_auto_attention_falls_back_to_sdpa_and_says_why(gpu, capability, flash, dtype, why):
    gpu(capability, flash=flash, name="Tesla V100" if capability < (8, 0) else "NVIDIA A10")
    attention = hardware.resolve_attention("auto", dtype)
    assert attention.implementation == "sdpa" and why in attention.reason
    with pytest.raises(FtuneError, match=f"flash_attention_2 cannot run here: .*{why.split(' (')[0][:20]}"):
        hardware.resolve_attention("flash_attention_2", dtype)


def test_auto_attention_on_cpu_is_sdpa_and_explicit_choices_are_kept(machine):
    machine()
    assert hardware.resolve_attention("auto", "float32") == hardware.Attention("sdpa", "flash attention unavailable: no CUDA GPU")
    assert hardware.resolve_attention("eager", "float32").implementation == "eager"


def test_tf32_only_on_ampere_and_newer(gpu, machine):
    gpu((8, 0))
    assert hardware.resolve_tf32() is True
    gpu((7, 5), name="Tesla T4")
    assert hardware.resolve_tf32() is False
    machine()
    assert hardware.resolve_tf32() is False


def test_tf32_reaches_torch():
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        hardware.apply_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize(
    ("cuda", "cpus", "ranks", "expected"),
    [(False, 16, None, (False, 0)), (True, 16, None, (True, 4)), (True, 2, None, (True, 1)), (True, 1, None, (True, 0)), (True, 8, "4", (True, 1))],
)
def test_dataloader_is_sized_to_the_machine(monkeypatch, cuda, cpus, ranks, expected):
    if ranks:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
    else:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    loader = resources.resolve_loader(cuda=cuda, cpus=cpus)
    assert (loader.pin_memory, loader.workers) == expected


def test_training_arguments_carry_the_gpu_choices(machine, monkeypatch, make_recipe, tmp_path):
    import torch

    from ftune.run_dir import RunDir
    from ftune.training.distributed import Strategy
    from ftune.training.trainer import build_training_arguments

    monkeypatch.setattr(resources, "cheap_affinity_cpus", lambda: 2)
    recipe = load_recipe(make_recipe())
    args = build_training_arguments(recipe, RunDir(tmp_path), has_eval=True, precision=hardware.Precision("no", "test"),
                                    strategy=Strategy("single", 1, "single process"))
    assert (args.dataloader_pin_memory, args.dataloader_num_workers) == ((True, 1) if torch.cuda.is_available() else (False, 0))
    assert not args.bf16 and not args.fp16
    args = build_training_arguments(recipe, RunDir(tmp_path), has_eval=True, precision=hardware.Precision("bf16", "test"),
                                    strategy=Strategy("single", 1, "single process"))
    assert args.bf16 and not args.fp16


def test_the_model_loads_with_the_resolved_attention(machine, tiny_llama_dir):
    from ftune.model import load_base_model
    from ftune.recipe.schema import ModelConfig, QuantizationConfig

    machine()
    model = load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir)), QuantizationConfig())
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_peak_rss_is_this_process_alone_not_the_parent_that_started_it():
    # Linux carries getrusage's ru_maxrss across exec: a child of a 400 MiB parent would report 400.
    script = "from ftune.resources import peak_rss_mib; print(peak_rss_mib())"
    parent = bytearray(400 * 2**20)
    parent[:: 4096] = b"x" * len(parent[:: 4096])  # touch every page so it is resident
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    del parent
    assert 1 < float(child.stdout) < 200
