"""Build the MSDeformAttn libraries with nvcc / g++ directly (the CMake-free path; `make kernel`, tests, gpu_check).

    libmsda_kernel.so   CUDA kernels + C ABI (msda_forward, msda_backward, ...)        needs nvcc
    libmsda_host.so     the same arithmetic on the CPU (msda_forward_host, ...)      needs g++ (or nvcc) + CUDA headers
    libmsda_plugin.so   TensorRT IPluginV3 plugin with the kernels inside            needs nvcc + TensorRT headers

    python -m layerfuse.plugins_trt.build [--build-dir DIR] [--archs 80;90] [--plugin auto|on|off] [--no-host]

Architectures: `--archs` or LAYERFUSE_CUDA_ARCHS (default "80;90": SASS for sm_80 and sm_90, plus PTX of the
highest for newer GPUs). Compiler: NVCC or CUDA_HOME/bin/nvcc or nvcc on PATH; CXX or g++ for the host library.
TensorRT headers: TENSORRT_ROOT/include, the pip `tensorrt` package's folder (if a wheel ever ships them), or the
system include paths (Debian/Ubuntu libnvinfer-dev). Outputs are rebuilt only when a source or a flag changed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CSRC = PACKAGE_DIR / "csrc"
DEFAULT_BUILD_DIR = PACKAGE_DIR / "build"
DEFAULT_ARCHS = "80;90"

KERNEL_SOURCES = ["msda_kernel.cu", "msda_api.cu", "msda_status.cpp"]
HOST_SOURCES = ["msda_host.cpp", "msda_status.cpp"]
PLUGIN_SOURCES = ["plugin/msda_plugin.cpp", *KERNEL_SOURCES]
HEADERS = ["msda_api.h", "msda_dispatch.h", "msda_kernel.cuh", "msda_kernel.h", "plugin/msda_plugin.h",
           "plugin/msda_plugin_info.h", "plugin/msda_plugin_rules.h"]


class BuildError(RuntimeError):
    """A compiler is missing or a compile failed; the message carries the command and its output."""


@dataclass
class Toolchain:
    nvcc: str | None
    cxx: str | None
    cuda_include: Path | None
    archs: list[str] = field(default_factory=list)


def find_nvcc() -> str | None:
    """NVCC, CUDA_HOME/bin/nvcc, nvcc on PATH, /usr/local/cuda/bin/nvcc, in that order."""
    candidates = [os.environ.get("NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def find_cxx() -> str | None:
    return next((c for c in (os.environ.get("CXX"), shutil.which("g++"), shutil.which("c++")) if c), None)


def cuda_include_dir(nvcc: str | None) -> Path | None:
    """The CUDA include folder (cuda_fp16.h): from `nvcc --dryrun` (wrapper scripts included), else CUDA_HOME."""
    if nvcc:
        try:
            dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60, check=False)
            for match in re.finditer(r'INCLUDES="?-I"?([^"\s]+)', dry.stderr + dry.stdout):
                path = Path(match.group(1))
                if (path / "cuda_fp16.h").is_file():
                    return path.resolve()
        except (OSError, subprocess.SubprocessError):
            pass
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            return Path(root) / "include"
    return None


def parse_archs(archs: str | None) -> list[str]:
    """"80;90" / "80,90" / "sm_80 sm_90" -> ["80", "90"]."""
    text = archs or os.environ.get("LAYERFUSE_CUDA_ARCHS") or DEFAULT_ARCHS
    out = [a.replace("sm_", "").replace("compute_", "") for a in re.split(r"[;,\s]+", text) if a]
    if not out or not all(a.isdigit() for a in out):
        raise BuildError(f"CUDA architectures must look like '80;90', got {text!r}")
    return out


def gencode_flags(archs: list[str]) -> list[str]:
    """SASS for every architecture, plus PTX of the highest one so newer GPUs can JIT it."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    top = max(archs, key=int)
    return flags + [f"-gencode=arch=compute_{top},code=compute_{top}"]


def toolchain(archs: str | None = None) -> Toolchain:
    nvcc = find_nvcc()
    return Toolchain(nvcc=nvcc, cxx=find_cxx(), cuda_include=cuda_include_dir(nvcc), archs=parse_archs(archs))


def find_tensorrt_include() -> Path | None:
    """A folder holding NvInferRuntime.h: TENSORRT_ROOT, the pip tensorrt package, or the system include paths."""
    roots: list[Path] = []
    if os.environ.get("TENSORRT_ROOT"):
        roots += [Path(os.environ["TENSORRT_ROOT"]) / "include", Path(os.environ["TENSORRT_ROOT"])]
    for name in ("tensorrt", "tensorrt_libs", "tensorrt_bindings"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                roots += [Path(loc) / "include", Path(loc)]
    roots += [Path("/usr/include/x86_64-linux-gnu"), Path("/usr/include/aarch64-linux-gnu"), Path("/usr/include"),
              Path("/usr/local/tensorrt/include")]
    return next((r for r in roots if (r / "NvInferRuntime.h").is_file()), None)


def _stamp(sources: list[Path], command: list[str]) -> str:
    digest = hashlib.sha256(" ".join(command).encode())
    for path in sorted(set(sources)):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _run(command: list[str], output: Path, inputs: list[Path], verbose: bool) -> Path:
    """Run `command` unless `output` is up to date for these inputs and flags (a .stamp beside it)."""
    stamp_file = output.with_name(output.name + ".stamp")
    stamp = _stamp(inputs, command)
    if output.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(" ".join(command), file=sys.stderr)
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"build of {output.name} failed ({proc.returncode}):\n{' '.join(command)}\n{proc.stdout}{proc.stderr}")
    stamp_file.write_text(stamp)
    return output


def _header_paths() -> list[Path]:
    return [CSRC / h for h in HEADERS if (CSRC / h).is_file()]


def build_kernel(build_dir: Path = DEFAULT_BUILD_DIR, archs: str | None = None, verbose: bool = False,
                 keep_dir: Path | None = None) -> Path:
    """libmsda_kernel.so: the CUDA kernels and the C ABI (cudart linked statically); keep_dir keeps nvcc's
    intermediate files (the .ptx among them)."""
    tc = toolchain(archs)
    if tc.nvcc is None:
        raise BuildError("nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH); the CUDA kernel needs it")
    out = Path(build_dir) / "libmsda_kernel.so"
    sources = [CSRC / s for s in KERNEL_SOURCES]
    cmd = [tc.nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden,-fno-strict-aliasing",
           "--threads", "2", *gencode_flags(tc.archs), "-I", str(CSRC), *map(str, sources), "-o", str(out)]
    if keep_dir is not None:
        Path(keep_dir).mkdir(parents=True, exist_ok=True)
        cmd[1:1] = ["-keep", "-keep-dir", str(keep_dir)]
    return _run(cmd, out, sources + _header_paths(), verbose)


def build_host(build_dir: Path = DEFAULT_BUILD_DIR, verbose: bool = False) -> Path:
    """libmsda_host.so: the kernel arithmetic compiled for the CPU (g++, or nvcc as the host compiler driver)."""
    tc = toolchain()
    if tc.cuda_include is None:
        raise BuildError("CUDA headers (cuda_fp16.h) not found: the host build uses CUDA's fp16/bf16 types; install the "
                         "CUDA toolkit or set CUDA_HOME")
    out = Path(build_dir) / "libmsda_host.so"
    sources = [CSRC / s for s in HOST_SOURCES]
    flags = ["-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-fno-strict-aliasing"]
    if tc.cxx is not None:
        cmd = [tc.cxx, *flags, "-I", str(CSRC), "-I", str(tc.cuda_include), *map(str, sources), "-o", str(out)]
    elif tc.nvcc is not None:
        cmd = [tc.nvcc, "-x", "c++", "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
               "-I", str(CSRC), *map(str, sources), "-o", str(out)]
    else:
        raise BuildError("no C++ compiler (g++ / CXX) or nvcc found for the host build")
    return _run(cmd, out, sources + _header_paths(), verbose)


def build_plugin(build_dir: Path = DEFAULT_BUILD_DIR, archs: str | None = None, trt_include: Path | None = None,
                 verbose: bool = False) -> Path:
    """libmsda_plugin.so: the TensorRT plugin with the kernels linked in (one file for trtexec --dynamicPlugins)."""
    tc = toolchain(archs)
    trt_include = trt_include or find_tensorrt_include()
    if trt_include is None:
        raise BuildError("TensorRT headers (NvInferRuntime.h) not found: set TENSORRT_ROOT to a TensorRT install "
                         "(PyPI's tensorrt wheels ship no headers)")
    if tc.nvcc is None:
        raise BuildError("nvcc not found: the plugin library contains the CUDA kernels")
    out = Path(build_dir) / "libmsda_plugin.so"
    sources = [CSRC / s for s in PLUGIN_SOURCES]
    cmd = [tc.nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden,-fno-strict-aliasing",
           "--threads", "2", *gencode_flags(tc.archs), "-I", str(CSRC), "-I", str(CSRC / "plugin"),
           "-I", str(trt_include), *map(str, sources), "-o", str(out)]
    return _run(cmd, out, sources + _header_paths(), verbose)


def build_all(build_dir: Path = DEFAULT_BUILD_DIR, archs: str | None = None, plugin: str = "auto", host: bool = True,
              verbose: bool = False) -> dict[str, Path | None]:
    """Kernel (always), host library (unless host=False), plugin (auto: when TensorRT headers are found)."""
    built: dict[str, Path | None] = {"kernel": build_kernel(build_dir, archs, verbose)}
    built["host"] = build_host(build_dir, verbose) if host else None
    trt = find_tensorrt_include()
    if plugin == "on" or (plugin == "auto" and trt is not None):
        built["plugin"] = build_plugin(build_dir, archs, trt, verbose)
    else:
        built["plugin"] = None
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    parser.add_argument("--archs", default=None, help="CUDA architectures, e.g. '80;90' (env LAYERFUSE_CUDA_ARCHS)")
    parser.add_argument("--plugin", choices=["auto", "on", "off"], default="auto",
                        help="build the TensorRT plugin: auto = when TensorRT headers are found")
    parser.add_argument("--no-host", action="store_true", help="skip the CPU build of the kernel arithmetic")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the compiler commands")
    args = parser.parse_args(argv)
    try:
        built = build_all(args.build_dir, args.archs, args.plugin, not args.no_host, args.verbose)
    except BuildError as err:
        print(f"layerfuse.plugins_trt.build: {err}", file=sys.stderr)
        return 1
    for name, path in built.items():
        print(f"{name:7s} {path if path else 'not built'}")
    if built["plugin"] is None and args.plugin == "auto":
        print("TensorRT headers not found (set TENSORRT_ROOT): built the kernel only, not the TensorRT plugin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
