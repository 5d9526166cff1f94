"""Build the MSDeformAttn libraries: a thin driver of CMakeLists.txt, the one build description (`make kernel`,
the tests and `kernel.register()` all come through here).

    python -m layerfuse.plugins_trt.build [--build-dir DIR] [--archs "80;90"] [--plugin auto|on|off] [--no-host] [-q]

Runs `cmake -S plugins_trt -B <build-dir>/cmake -G Ninja ...` (only when a setting changed) and
`cmake --build <build-dir>/cmake --target ...` (Ninja rebuilds only what changed), with the cmake and ninja of the
PyPI packages (`pip install 'layerfuse[kernel]'`; on PATH otherwise). The libraries land in <build-dir>
(default plugins_trt/build/):

    libmsda_kernel.so   msda_kernel   CUDA kernels + C ABI (msda_forward, msda_backward, ...)    needs nvcc
    libmsda_host.so     msda_host     the same arithmetic on the CPU (msda_forward_host, ...)   needs CUDA headers
    libmsda_plugin.so   msda_plugin   TensorRT IPluginV3 plugin with the kernels inside   needs nvcc, TensorRT headers

Architectures: `archs` / `--archs`, else LAYERFUSE_CUDA_ARCHS, else what the build folder is configured with, else
"80;90" (SASS for each, plus PTX of the highest). nvcc: NVCC, CUDA_HOME/bin/nvcc, nvcc on PATH,
/usr/local/cuda/bin/nvcc. TensorRT headers: TENSORRT_ROOT, the pip `tensorrt` package, the system include paths
(CMakeLists.txt looks; a target it cannot build is reported with its reason).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from layerfuse.core.errors import ToolchainError

PACKAGE_DIR = Path(__file__).resolve().parent
CSRC = PACKAGE_DIR / "csrc"
DEFAULT_BUILD_DIR = PACKAGE_DIR / "build"
DEFAULT_ARCHS = "80;90"  # CMakeLists.txt's MSDA_CUDA_ARCHS default is the same (a test checks)

# CMake target -> the file it leaves in the build folder (libraries, PTX) or in its CMake tree (test executables)
LIBRARIES = {"msda_kernel": "libmsda_kernel.so", "msda_host": "libmsda_host.so", "msda_plugin": "libmsda_plugin.so",
             "msda_kernel_ptx": "msda_kernel.ptx"}
UNIT_TESTS = ("msda_plugin_rules_test", "msda_plugin_model_test")
PIP_HINT = "pip install 'layerfuse[kernel]' (the cmake and ninja PyPI packages)"


class BuildError(ToolchainError):
    """A tool or header is missing (`missing` names it), or a cmake command failed (the message carries the
    command and its output)."""

    def __init__(self, message: str, missing: str | None = None) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class Tools:
    cmake: str
    ninja: str
    nvcc: str | None  # None: CMake looks for its own, and leaves the CUDA targets out if it finds none


def find_nvcc() -> str | None:
    """NVCC, CUDA_HOME/bin/nvcc, nvcc on PATH, /usr/local/cuda/bin/nvcc, in that order."""
    candidates = [os.environ.get("NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def _pypi_tool(package: str, bin_dir_attr: str, name: str) -> str | None:
    """The executable shipped by a PyPI package (cmake.CMAKE_BIN_DIR, ninja.BIN_DIR), if that package is installed."""
    if importlib.util.find_spec(package) is None:
        return None
    path = Path(getattr(importlib.import_module(package), bin_dir_attr)) / name
    return str(path) if path.is_file() else None


def find_tools() -> Tools:
    """cmake and ninja from their PyPI packages, else from PATH; nvcc as find_nvcc."""
    cmake = _pypi_tool("cmake", "CMAKE_BIN_DIR", "cmake") or shutil.which("cmake")
    if cmake is None:
        raise BuildError(f"cmake not found: {PIP_HINT}", missing="cmake")
    ninja = _pypi_tool("ninja", "BIN_DIR", "ninja") or shutil.which("ninja")
    if ninja is None:
        raise BuildError(f"ninja not found: {PIP_HINT}", missing="ninja")
    return Tools(cmake=cmake, ninja=ninja, nvcc=find_nvcc())


def parse_archs(text: str) -> list[str]:
    """"80;90" / "80,90" / "sm_80 sm_90" -> ["80", "90"]."""
    out = [a.replace("sm_", "").replace("compute_", "") for a in re.split(r"[;,\s]+", text) if a]
    if not out or not all(a.isdigit() for a in out):
        raise BuildError(f"CUDA architectures must look like '80;90', got {text!r}")
    return out


def cmake_dir(build_dir: Path) -> Path:
    """The CMake tree inside a build folder."""
    return Path(build_dir) / "cmake"


def read_cache(build_dir: Path) -> dict[str, str]:
    """NAME -> value of the build folder's CMakeCache.txt ({} when not configured)."""
    path = cmake_dir(build_dir) / "CMakeCache.txt"
    if not path.is_file():
        return {}
    entries = {}
    for line in path.read_text().splitlines():
        match = re.match(r"([^#/][^:=]*):[A-Z]+=(.*)", line)
        if match:
            entries[match.group(1)] = match.group(2)
    return entries


def choose_archs(archs: str | None, build_dir: Path) -> list[str]:
    """archs, else LAYERFUSE_CUDA_ARCHS, else what build_dir is configured with, else DEFAULT_ARCHS."""
    text = archs or os.environ.get("LAYERFUSE_CUDA_ARCHS") or read_cache(build_dir).get("MSDA_CUDA_ARCHS")
    return parse_archs(text or DEFAULT_ARCHS)


@dataclass(frozen=True)
class Configuration:
    """A configured build folder: its architectures, and the targets CMake left out with the reason."""

    build_dir: Path
    archs: list[str]
    unavailable: dict[str, str]  # target -> reason, which starts with "<tool or header> not found"

    def output(self, target: str) -> Path:
        """Where `target` puts its file: libraries and PTX in the build folder, test programs in the CMake tree."""
        if target in LIBRARIES:
            return self.build_dir / LIBRARIES[target]
        if target in UNIT_TESTS:
            return cmake_dir(self.build_dir) / target
        raise KeyError(f"unknown MSDeformAttn target {target!r}; known: {[*LIBRARIES, *UNIT_TESTS]}")

    def check_available(self, target: str) -> None:
        """BuildError naming the missing tool or header when CMake left `target` out."""
        reason = self.unavailable.get(target)
        if reason is not None:
            missing = reason.split(" not found")[0]
            raise BuildError(f"cannot build {target} ({self.output(target).name}): {reason}", missing=missing)


def _run(command: list[str], quiet: bool) -> None:
    """Run a cmake command; quiet keeps its output for the error message only."""
    if not quiet:
        print(shlex.join(command), file=sys.stderr, flush=True)
    proc = subprocess.run(command, capture_output=quiet, text=True, check=False)
    if proc.returncode != 0:
        output = f"\n{proc.stdout}{proc.stderr}" if quiet else " (its output is above)"
        raise BuildError(f"command failed with exit status {proc.returncode}: {shlex.join(command)}{output}")


def configure(build_dir: Path = DEFAULT_BUILD_DIR, archs: str | None = None, quiet: bool = True) -> Configuration:
    """Configure build_dir/cmake with Ninja, unless it already is with the same settings."""
    build_dir = Path(build_dir).resolve()
    tools = find_tools()
    settings = {
        "MSDA_CUDA_ARCHS": ";".join(choose_archs(archs, build_dir)),
        "CMAKE_MAKE_PROGRAM": tools.ninja,
        "CMAKE_LIBRARY_OUTPUT_DIRECTORY": str(build_dir),
        "Python3_EXECUTABLE": sys.executable,  # for finding the pip tensorrt package
    }
    if tools.nvcc is not None:
        settings["CMAKE_CUDA_COMPILER"] = tools.nvcc
    if os.environ.get("TENSORRT_ROOT"):
        settings["TENSORRT_ROOT"] = os.environ["TENSORRT_ROOT"]
    cache = read_cache(build_dir)
    if cache.get("CMAKE_GENERATOR", "Ninja") != "Ninja":  # a tree made by another generator cannot switch
        (cmake_dir(build_dir) / "CMakeCache.txt").unlink()
        shutil.rmtree(cmake_dir(build_dir) / "CMakeFiles", ignore_errors=True)
        cache = {}
    cache_file = cmake_dir(build_dir) / "CMakeCache.txt"
    stale = not cache or (PACKAGE_DIR / "CMakeLists.txt").stat().st_mtime > cache_file.stat().st_mtime
    if stale or any(cache.get(key) != value for key, value in settings.items()):
        _run([tools.cmake, "-S", str(PACKAGE_DIR), "-B", str(cmake_dir(build_dir)), "-G", "Ninja",
              *(f"-D{key}={value}" for key, value in settings.items())], quiet)
        cache = read_cache(build_dir)
    unavailable = {key.removeprefix("MSDA_UNAVAILABLE_"): value for key, value in cache.items()
                   if key.startswith("MSDA_UNAVAILABLE_")}
    return Configuration(build_dir, parse_archs(cache["MSDA_CUDA_ARCHS"]), unavailable)


def build(targets: list[str], build_dir: Path = DEFAULT_BUILD_DIR, archs: str | None = None,
          quiet: bool = True) -> Configuration:
    """Configure if needed and bring `targets` up to date; BuildError if one cannot be built here."""
    config = configure(build_dir, archs, quiet)
    for target in targets:
        config.check_available(target)
    _run([find_tools().cmake, "--build", str(cmake_dir(config.build_dir)), "--target", *targets], quiet)
    return config


def build_all(build_dir: Path = DEFAULT_BUILD_DIR, archs: str | None = None, plugin: str = "auto", host: bool = True,
              quiet: bool = True) -> dict[str, Path | None]:
    """Kernel (always), host library (unless host=False), plugin (auto: when CMake found TensorRT headers)."""
    config = configure(build_dir, archs, quiet)
    with_plugin = plugin == "on" or (plugin == "auto" and "msda_plugin" not in config.unavailable)
    wanted = {"kernel": "msda_kernel", "host": "msda_host" if host else None,
              "plugin": "msda_plugin" if with_plugin else None}
    targets = [target for target in wanted.values() if target]
    build(targets, config.build_dir, ";".join(config.archs), quiet)
    return {name: config.output(target) if target else None for name, target in wanted.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    parser.add_argument("--archs", default=None,
                        help="e.g. '80;90' (else LAYERFUSE_CUDA_ARCHS, else the configured ones, else 80;90)")
    parser.add_argument("--plugin", choices=["auto", "on", "off"], default="auto",
                        help="build the TensorRT plugin: auto = when TensorRT headers are found")
    parser.add_argument("--no-host", action="store_true", help="skip the CPU build of the kernel arithmetic")
    parser.add_argument("-q", "--quiet", action="store_true", help="show cmake's output only when a step fails")
    args = parser.parse_args(argv)
    try:
        built = build_all(args.build_dir, args.archs, args.plugin, not args.no_host, args.quiet)
        reason = configure(args.build_dir, args.archs).unavailable.get("msda_plugin")
    except BuildError as err:
        print(f"layerfuse.plugins_trt.build: {err}", file=sys.stderr)
        return 1
    for name, path in built.items():
        why = f": {reason}" if name == "plugin" and reason else ""
        print(f"{name:7s} {path if path else 'not built' + why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
