"""TensorRT engines of an exported front end: build (ONNX -> plan), run, compare with PyTorch, time.

    info = build_engine("front.onnx", "front.plan", precision="fp16", plugin_library=default_plugin_library())
    outs = run_engine("front.plan", {"layers": x}, plugin_library=...)           # name -> numpy array
    report = compare_engine("front.plan", fuser, plugin_library=...)             # VerifyReport vs PyTorch eager
    rows = bench_engine("front.plan", fuser, batch_sizes=(1, 8), plugin_library=...)

Building: the plugin library is loaded into TensorRT's plugin registry (its MSDeformAttn creator must then be
found under the ONNX node's name/version/namespace), the ONNX file is parsed with `OnnxParser` (an unknown node
becomes the registered plugin; for `hybrid` files TensorRT >= 10.7 prefers the plugin over the local function,
older parsers and builds without the plugin use the function body), one optimization profile covers the dynamic
batch (min/opt/max), and the precision picks builder flags:

    fp32   TF32 off, so the engine can be compared at fp32 tolerance
    fp16   BuilderFlag.FP16 / bf16 BuilderFlag.BF16 (TensorRT 10.x weak typing; the plugin keeps its coordinates
           and attention weights fp32). TensorRT 11 removed these flags: there the precision must be in the ONNX
           graph itself (e.g. ModelOpt AutoCast), and `build_engine` says so.

`tensorrt` is imported lazily: everything else in layerfuse works without it, and a missing (or stub) package
raises `TensorRTUnavailable` naming how to install it. Running needs a CUDA GPU (buffers are torch CUDA tensors).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import onnx
import torch

from layerfuse.core.config import check_choice
from layerfuse.core.errors import ConfigError, MissingError, ToolchainError
from layerfuse.core.timing import median_time
from layerfuse.fusion.base import Fuser
from layerfuse.plugins_trt.build import DEFAULT_BUILD_DIR
from layerfuse.plugins_trt.info import ONNX_DOMAIN, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

from .frontend import FrontEnd
from .msda_onnx import msda_nodes
from .verify import VerifyReport, run_onnx

Precision = Literal["fp32", "fp16", "bf16"]  # an engine's builder precision
ATOL = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}  # x max(1, max |eager|), per output
INSTALL_HINT = (
    "install NVIDIA TensorRT >= 10.8 for this machine's CUDA: `pip install 'layerfuse[tensorrt]'` (pulls NVIDIA's "
    "tensorrt wheels, Linux/Windows x86_64 or aarch64 with an NVIDIA driver), or run in an NGC TensorRT container "
    "(nvcr.io/nvidia/tensorrt) with `make install VENV_FLAGS=--system-site-packages`"
)


class TensorRTUnavailable(ToolchainError):
    """TensorRT (or a GPU) is not available here."""


class EngineBuildError(ToolchainError):
    """TensorRT could not parse or build the network."""


def import_tensorrt() -> Any:
    """The `tensorrt` module, or TensorRTUnavailable with the install hint (also for PyPI's stub package)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(f"TensorRT is not installed ({e}); {INSTALL_HINT}") from e
    if not hasattr(trt, "Builder"):
        raise TensorRTUnavailable(f"the installed 'tensorrt' package has no TensorRT runtime (a stub?); {INSTALL_HINT}")
    return trt


@dataclass(frozen=True)
class BatchProfile:
    """The optimization profile's batch range."""

    min: int = 1
    opt: int = 8
    max: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigError(f"batch profile needs 1 <= min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}")


@dataclass
class EngineInfo:
    """What was built; written next to the plan as `<plan>.json`."""

    plan: str
    onnx: str
    precision: Precision
    batch: BatchProfile
    plugin_library: str | None
    msda_nodes: int
    tensorrt_version: str
    inputs: dict[str, list[int]] = field(default_factory=dict)  # name -> shape with -1 for the batch
    notes: list[str] = field(default_factory=list)

    def save(self) -> Path:
        path = Path(self.plan + ".json")
        path.write_text(json.dumps(asdict(self), indent=1))
        return path


def _graph_inputs(model: onnx.ModelProto) -> dict[str, list[int]]:
    """name -> shape, dim 0 (batch) as -1; every other dim must be static."""
    shapes = {}
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim
        shape = [-1] + [d.dim_value if d.HasField("dim_value") else 0 for d in dims[1:]]
        if any(s <= 0 for s in shape[1:]):
            raise EngineBuildError(f"input {i.name!r} has a dynamic dimension besides the batch: {shape}")
        shapes[i.name] = shape
    return shapes


def _check_build_args(onnx_path: Path, precision: Precision, plugin_library: Path | None) -> onnx.ModelProto:
    """Everything that can be refused before TensorRT is touched; returns the ONNX header (no weights)."""
    check_choice(precision, Precision, "precision")
    if not onnx_path.is_file():
        raise MissingError(f"ONNX file {onnx_path} does not exist; export one first (layerfuse export onnx)")
    if plugin_library is not None and not plugin_library.is_file():
        raise MissingError(f"plugin library {plugin_library} does not exist; build it with `make kernel`")
    header = onnx.load(str(onnx_path), load_external_data=False)
    nodes = msda_nodes(header)
    has_function = any(f.domain == ONNX_DOMAIN and f.name == PLUGIN_NAME for f in header.functions)
    if nodes and not has_function and plugin_library is None:
        raise ConfigError(
            f"{onnx_path} has {len(nodes)} custom {ONNX_DOMAIN}::{PLUGIN_NAME} node(s) without a fallback body "
            "(--msda custom): pass plugin_library (the MSDeformAttn plugin, `make kernel`), or export with "
            "--msda hybrid / gather"
        )
    return header


def default_plugin_library() -> Path | None:
    """`plugins_trt/build/libmsda_plugin.so` (what `make kernel` builds when TensorRT headers are found), if built."""
    path = DEFAULT_BUILD_DIR / "libmsda_plugin.so"
    return path if path.is_file() else None


def load_plugin_library(trt: Any, plugin_library: str | Path) -> Any:
    """Load the plugin library into TensorRT's global registry and check it registered our creator."""
    registry = trt.get_plugin_registry()
    handle = registry.load_library(str(plugin_library))
    if handle is None:
        raise EngineBuildError(f"TensorRT could not load the plugin library {plugin_library}")
    get = getattr(registry, "get_creator", None) or registry.get_plugin_creator
    if get(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        raise EngineBuildError(
            f"{plugin_library} registered no plugin {PLUGIN_NAME!r} version {PLUGIN_VERSION!r} namespace "
            f"{PLUGIN_NAMESPACE!r} (the ONNX node's identity, layerfuse.plugins_trt.info)"
        )
    return handle


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def build_engine(
    onnx_path: str | Path,
    out_plan: str | Path,
    precision: Precision = "fp32",
    plugin_library: str | Path | None = None,
    *,
    batch: BatchProfile = BatchProfile(),
    workspace_gib: float = 4.0,
) -> EngineInfo:
    """Build and serialize a TensorRT engine of an exported front end; writes `out_plan` and `<out_plan>.json`."""
    onnx_path, out_plan = Path(onnx_path), Path(out_plan)
    plugin = Path(plugin_library) if plugin_library is not None else None
    header = _check_build_args(onnx_path, precision, plugin)
    inputs = _graph_inputs(header)
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # NVIDIA's plugins (MultiscaleDeformableAttnPlugin_TRT among them)
    info = EngineInfo(str(out_plan), str(onnx_path), precision, batch, str(plugin) if plugin else None,
                      len(msda_nodes(header)), trt.__version__, inputs)
    if plugin is not None:
        load_plugin_library(trt, plugin)
    elif msda_nodes(header):
        info.notes.append("no plugin library: MSDeformAttn runs as the hybrid file's gather function body")
    if plugin is not None and msda_nodes(header) and header.functions and _version_tuple(trt.__version__) < (10, 7):
        info.notes.append(f"TensorRT {trt.__version__} < 10.7 imports local functions before plugins: the hybrid "
                          "file's gather body is used, not the plugin (export with --msda custom to force the plugin)")

    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n{errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp32":
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
    else:
        flag = getattr(trt.BuilderFlag, precision.upper(), None)
        if flag is None:
            raise EngineBuildError(
                f"TensorRT {trt.__version__} has no BuilderFlag.{precision.upper()} (strongly typed networks only, "
                f"TensorRT >= 11): convert {onnx_path} to {precision} first (e.g. `python -m modelopt.onnx.autocast "
                f"--onnx_path {onnx_path} --low_precision_type {precision}`, keeping {PLUGIN_NAME}'s sampling "
                "locations and attention weights fp32) and build that with precision='fp32'"
            )
        config.set_flag(flag)
    profile = builder.create_optimization_profile()
    for name, shape in inputs.items():
        rest = tuple(shape[1:])
        profile.set_shape(name, (batch.min, *rest), (batch.opt, *rest), (batch.max, *rest))
    config.add_optimization_profile(profile)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    out_plan.parent.mkdir(parents=True, exist_ok=True)
    out_plan.write_bytes(bytes(plan))
    info.save()
    return info


# -- running -----------------------------------------------------------------------------------------------------


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.BOOL: torch.bool, trt.DataType.INT8: torch.int8}
    for name, t in (("BF16", torch.bfloat16), ("INT64", torch.int64)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = t
    if dtype not in table:
        raise TypeError(f"engine tensor type {dtype} has no torch equivalent here")
    return table[dtype]


class EngineRunner:
    """A deserialized engine with one execution context; call with CUDA tensors, get CUDA tensors.

    runner({"layers": x [B, k, T, D]}) -> {"tokens": [B, N_v, d], ...}
    """

    def __init__(self, plan: str | Path, plugin_library: str | Path | None = None):
        if not torch.cuda.is_available():
            raise TensorRTUnavailable("running a TensorRT engine needs a CUDA GPU; none is visible to torch")
        trt = self.trt = import_tensorrt()
        self.logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self.logger, "")
        if plugin_library is not None:
            load_plugin_library(trt, plugin_library)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"TensorRT could not deserialize {plan} (built by another TensorRT version, or the "
                                   "plugin library is missing)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]

    def __call__(self, feeds: Mapping[str, torch.Tensor], stream: torch.cuda.Stream | None = None) -> dict[str, torch.Tensor]:
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise ValueError(f"engine inputs {sorted(missing)} not given (it takes {self.inputs})")
        keep = []
        for name in self.inputs:
            t = torch.as_tensor(feeds[name]).to("cuda", _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=_torch_dtype(self.trt, self.engine.get_tensor_dtype(name)), device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        stream = stream or torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the log)")
        stream.synchronize()
        return outs


def run_engine(plan: str | Path, feeds: Mapping[str, np.ndarray | torch.Tensor],
               plugin_library: str | Path | None = None) -> dict[str, np.ndarray]:
    """Run an engine once on host or device inputs; outputs as fp32 numpy arrays by name."""
    runner = EngineRunner(plan, plugin_library)
    return {k: v.float().cpu().numpy() for k, v in runner({k: torch.as_tensor(v) for k, v in feeds.items()}).items()}


def _engine_precision(plan: str | Path) -> str:
    meta = Path(str(plan) + ".json")
    return json.loads(meta.read_text())["precision"] if meta.exists() else "fp32"


def compare_engine(
    plan: str | Path,
    fuser: Fuser,
    *,
    encoder: Any | None = None,
    onnx_path: str | Path | None = None,
    batch_sizes: Sequence[int] = (1, 3),
    plugin_library: str | Path | None = None,
    atol: float | None = None,
    seed: int = 0,
) -> VerifyReport:
    """Engine outputs vs PyTorch eager (fp32, CUDA) on random inputs; with `onnx_path` also vs onnxruntime CPU.
    Tolerance: `ATOL[precision]` x max(1, max |eager|) unless `atol` is given."""
    precision = _engine_precision(plan)
    atol = ATOL[precision] if atol is None else atol
    runner = EngineRunner(plan, plugin_library)
    front = FrontEnd(fuser, encoder).eval().cuda()
    sig = front.signature
    report = VerifyReport(str(plan))
    for i, batch in enumerate(batch_sizes):
        inputs = front.example_inputs(batch, seed=seed + i)
        with torch.no_grad():
            expected = [t.float().cpu().numpy() for t in front(*(x.cuda() for x in inputs))]
        got = runner({n: x.cuda() for n, x in zip(sig.inputs, inputs)})
        report.compare(f"tensorrt-{precision}", batch, sig.outputs, [got[n].float().cpu().numpy() for n in sig.outputs], expected, atol)
        if onnx_path is not None:
            ort_out = run_onnx(onnx_path, {n: x.numpy() for n, x in zip(sig.inputs, inputs)}, "onnxruntime-cpu")
            report.compare(f"tensorrt-{precision}-vs-onnxruntime", batch, sig.outputs,
                           [got[n].float().cpu().numpy() for n in sig.outputs], ort_out, atol)
    return report


@dataclass(frozen=True)
class EngineTiming:
    batch: int
    tensorrt_ms: float  # median over repeats, CUDA events
    torch_ms: float  # PyTorch eager on the same GPU, same precision (autocast for fp16/bf16)

    @property
    def speedup(self) -> float:
        return self.torch_ms / self.tensorrt_ms


def bench_engine(
    plan: str | Path,
    fuser: Fuser,
    *,
    encoder: Any | None = None,
    batch_sizes: Sequence[int] = (1, 8),
    repeats: int = 50,
    warmup: int = 10,
    plugin_library: str | Path | None = None,
) -> list[EngineTiming]:
    """Median latency of the engine vs PyTorch eager on the same GPU, per batch size (CUDA events)."""
    precision = _engine_precision(plan)
    runner = EngineRunner(plan, plugin_library)
    front = FrontEnd(fuser, encoder).eval().cuda()
    sig = front.signature
    autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    rows = []
    for batch in batch_sizes:
        inputs = [x.cuda() for x in front.example_inputs(batch)]
        feeds = dict(zip(sig.inputs, inputs))

        def eager() -> None:
            with torch.no_grad(), torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                front(*inputs)

        tensorrt_ms = 1e3 * median_time(lambda: runner(feeds), repeats, device="cuda", warmup=warmup)
        torch_ms = 1e3 * median_time(eager, repeats, device="cuda", warmup=warmup)
        rows.append(EngineTiming(batch, tensorrt_ms, torch_ms))
    return rows
