"""ONNX export of a fuser's visual front end (fuser + projector, optionally the vision encoder in front).

    inputs   layers        [B, k, T, D]   the fuser's required hidden states, in `fuser.required_layers` order
             (or pixel_values [B, 3, H, W] with `encoder=`: the encoder runs in the graph and its hidden states
              `fuser.required_layers` are selected)
             text          [B, d_s]       instruction embedding (igva in allocator mode, tgif router=sentence), or
                           [B, d]         the prompt's mean LLM token embedding (tgif router=llm)
    outputs  tokens        [B, N_v, d]    the visual tokens
             weights       [B, K]         per-sample group (igva) or layer (tgif) weights
             internal_<k>_llm_layer_<m>  [B, N, d]   internal fusers: projector P_k's features, fed to LLM layer m

Batch is dynamic; everything else is fixed by the fuser. fp32 graph (precision is chosen when a TensorRT engine is
built from it). MSDeformAttn (mmfuser) is exported in one of four modes, see `layerfuse.export.msda_onnx`:
`gather` (default, plain ONNX ops), `custom` (one `layerfuse::MSDeformAttn` node per call, for the TensorRT plugin),
`hybrid` (that node carrying its gather graph as a local function), `grid_sample` (plain ONNX with one GridSample per
level: the fastest in onnxruntime's CPU EP for small models). Fusers without MSDeformAttn give the same graph in
every mode.

Mechanism: torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`) with a custom translation table for the
MSDeformAttn core op; the mode is applied to the exported graph afterwards. Every file written passes
`onnx.checker.check_model(full_check=True)` and strict shape inference before `export_onnx` returns.

    path = export_onnx(fuser, "front.onnx", msda="hybrid")
    report = verify_onnx(path, fuser)            # layerfuse.export.verify: ORT / onnx.reference vs PyTorch
    session = ort_session(path)                  # onnxruntime CPU with the options BENCHMARKS.md measured

After packaging, `layerfuse.export.graph_opt` folds constants (the inlined gather function's shape arithmetic) and
stores constant operands of inner-axis broadcasts materialised (onnxruntime's elementwise kernels are slow on those);
plain ONNX ops in, the same plain ops out.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import onnx
import torch

from layerfuse.core.config import check_choice
from layerfuse.fusion.base import Fuser
from layerfuse.plugins_trt.info import ONNX_DOMAIN, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

from .frontend import FrontEnd, OnnxExportError, eval_mode
from .graph_opt import broadcast_friendly, fold_constants
from .msda_onnx import MsdaMode, msda_for_export, msda_nodes, package, register_onnx_schema, translation_table
from .verify import verify_onnx

DEFAULT_OPSET = 18  # LayerNormalization needs >= 17; TensorRT 10 parses up to opset 20+
EXAMPLE_BATCH = 2  # traced batch size (not 1: torch.export specialises size-1 dims)
MAX_BATCH = 4096
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to a side file `<name>.data` (protobuf's 2 GiB limit)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's chatter that says nothing about this model (missing torchvision ops,
    optimizer notes, axis renaming); errors still raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx._internal.exporter._registration", "onnxscript.optimizer._constant_folding")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(
    fuser: Fuser,
    out_path: str | Path,
    *,
    msda: MsdaMode = "gather",
    encoder: Any | None = None,
    opset: int = DEFAULT_OPSET,
    check_batch_sizes: Sequence[int] = (),
) -> Path:
    """Export `fuser`'s front end (with `encoder` in front when given) to `out_path`; returns the path.

    msda: "gather" | "custom" | "hybrid" | "grid_sample" (see module docstring). The written file is checked with
    `onnx.checker` (full_check) and strict shape inference. `check_batch_sizes`, when given, also runs
    `layerfuse.export.verify.verify_onnx` on it and raises if an output is off by more than its tolerance.
    """
    check_choice(msda, MsdaMode, "--msda", OnnxExportError)
    if opset < 17:
        raise OnnxExportError(f"opset {opset} is too old: LayerNormalization (used by the fusers) needs opset >= 17")
    wrong = sorted({str(p.dtype) for p in fuser.parameters() if p.dtype != torch.float32})
    if wrong:
        raise OnnxExportError(f"export needs an fp32 fuser (got parameters in {', '.join(wrong)}); call fuser.float() first")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    front = FrontEnd(fuser, encoder)
    sig = front.signature
    args = tuple(x.to(front.device) for x in front.example_inputs(EXAMPLE_BATCH))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with eval_mode(front), torch.no_grad(), msda_for_export(front, msda), _quiet_exporter():
        program = torch.onnx.export(
            front, args, dynamo=True, opset_version=opset,
            input_names=list(sig.inputs), output_names=list(sig.outputs),
            dynamic_shapes=tuple({0: batch} for _ in args),
            custom_translation_table=translation_table(), optimize=True, verbose=False,
        )
    with _quiet_exporter():
        model = broadcast_friendly(fold_constants(package(program.model_proto, msda)))
    _describe(model, fuser, msda, encoder)
    _save(model, out_path)
    check_onnx(out_path)
    if check_batch_sizes:
        verify_onnx(out_path, fuser, encoder=encoder, batch_sizes=check_batch_sizes).raise_on_failure()
    return out_path


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU `InferenceSession` for an exported file: all graph optimisations, `threads` intra-op
    threads (default torch's), sequential execution, and intra-op threads that block instead of spinning between
    ops and runs (spinning threads take the cores from whatever runs next, e.g. PyTorch in the same process, and
    from each other on a shared or oversubscribed machine; BENCHMARKS.md, ONNX export)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _describe(model: onnx.ModelProto, fuser: Fuser, msda: str, encoder: Any | None) -> None:
    """Metadata a runtime (or `layerfuse export engine`) can read back without the run."""
    n_msda = len(msda_nodes(model)) if msda in ("custom", "hybrid") else 0
    meta = {
        "layerfuse.fuser": fuser.name,
        "layerfuse.layers": fuser.selection.describe(),
        "layerfuse.required_layers": ",".join(map(str, fuser.required_layers)),
        "layerfuse.with_encoder": str(encoder is not None).lower(),
        "layerfuse.msda": msda,
        "layerfuse.msda_nodes": str(n_msda),
        "layerfuse.msda_plugin": f"{ONNX_DOMAIN}::{PLUGIN_NAME} version {PLUGIN_VERSION} namespace {PLUGIN_NAMESPACE}",
    }
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "layerfuse"


def metadata(path: str | Path) -> dict[str, str]:
    """The `layerfuse.*` metadata of an exported file (weights are not loaded)."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def _save(model: onnx.ModelProto, path: Path) -> None:
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    external = weights > EXTERNAL_DATA_BYTES
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=data.name)


def check_onnx(path: str | Path) -> None:
    """`onnx.checker` with full_check and strict, type-checked shape inference; raises on any problem."""
    register_onnx_schema()  # custom / hybrid nodes are validated against the op's schema
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)  # shapes need no weights
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
