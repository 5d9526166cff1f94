"""Check an exported front end against PyTorch eager: same random inputs, several batch sizes, max abs errors.

Runtimes: "onnxruntime-cpu" and "onnxruntime-cuda" (ORT execution providers; CUDA needs onnxruntime-gpu and a GPU,
TF32 off) for `gather` / `hybrid` files; "reference" (`onnx.reference.ReferenceEvaluator` with the numpy
MSDeformAttn op of `layerfuse.export.msda_numpy`) for `custom` files, which no stock runtime can run. The
eager side is the fuser as trained, with its own MSDeformAttn implementation: by default `impl="auto"`, i.e. on CPU
whichever of `grid_sample` and the sparse CSR `gather` (an autograd.Function, not the plain-op formulation the
graph holds) measured faster in this process; either way an implementation independent of the graph's Gather ops.

Tolerance (fp32 graph): max |onnx - eager| <= atol * max(1, max |eager|) per output, atol = 1e-4 by default.

    report = verify_onnx("front.onnx", fuser, batch_sizes=(1, 3))
    report.max_errors()   # {"onnxruntime-cpu": {"tokens": 9.5e-07}}
    report.raise_on_failure()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch

from layerfuse.core.errors import CheckError
from layerfuse.fusion.base import Fuser

from .frontend import FrontEnd, OnnxExportError
from .msda_numpy import MSDeformAttnOp
from .msda_onnx import msda_nodes

RUNTIMES = ("onnxruntime-cpu", "onnxruntime-cuda", "reference")
DEFAULT_ATOL = 1e-4


class OnnxMismatchError(CheckError):
    """An exported graph's outputs differ from PyTorch eager by more than the tolerance."""


@dataclass(frozen=True)
class OutputCheck:
    """One output of one runtime at one batch size."""

    runtime: str
    batch: int
    output: str
    max_abs_err: float
    limit: float  # atol * max(1, max |eager|)

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_err <= self.limit)  # NaN fails


@dataclass
class VerifyReport:
    path: str
    checks: list[OutputCheck] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # runtime -> why it did not run

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def max_errors(self) -> dict[str, dict[str, float]]:
        """runtime -> output -> max abs error over the batch sizes."""
        out: dict[str, dict[str, float]] = {}
        for c in self.checks:
            per = out.setdefault(c.runtime, {})
            per[c.output] = max(per.get(c.output, 0.0), c.max_abs_err)
        return out

    def summary(self) -> str:
        lines = [f"{self.path}: {'OK' if self.ok else 'MISMATCH'}"]
        for c in self.checks:
            lines.append(f"  {c.runtime:17s} batch {c.batch:3d}  {c.output:28s} max abs err {c.max_abs_err:.3g}"
                         f" (limit {c.limit:.3g}){'' if c.ok else '  <-- FAIL'}")
        lines += [f"  {r}: skipped ({why})" for r, why in self.skipped.items()]
        return "\n".join(lines)

    def compare(self, runtime: str, batch: int, names: Sequence[str], got: Sequence[np.ndarray],
                expected: Sequence[np.ndarray], atol: float) -> None:
        """Record max |got - expected| per output (limit atol * max(1, max |expected|)); a shape mismatch raises."""
        for name, g, e in zip(names, got, expected, strict=True):
            g, e = np.asarray(g, dtype=np.float64), np.asarray(e, dtype=np.float64)
            if g.shape != e.shape:
                raise OnnxMismatchError(f"{self.path} [{runtime}, batch {batch}]: {name} has shape {g.shape}, eager {e.shape}")
            err = float(np.abs(g - e).max()) if e.size else 0.0
            self.checks.append(OutputCheck(runtime, batch, name, err, atol * max(1.0, float(np.abs(e).max(initial=0.0)))))

    def raise_on_failure(self) -> "VerifyReport":
        if not self.ok:
            raise OnnxMismatchError(self.summary() if self.checks else f"{self.path}: no runtime could run it")
        return self


def default_runtimes(model: onnx.ModelProto) -> list[str]:
    """custom nodes without a local function -> the reference evaluator; otherwise onnxruntime CPU and CUDA."""
    has_function = any(f.name == n.op_type and f.domain == n.domain for n in msda_nodes(model) for f in model.functions)
    if msda_nodes(model) and not has_function:
        return ["reference"]
    return ["onnxruntime-cpu", "onnxruntime-cuda"]


def cuda_unavailable_reason() -> str | None:
    """Why ORT's CUDA execution provider cannot be used here, or None when it can."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def run_onnx(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray], runtime: str) -> list[np.ndarray]:
    """Run the graph on one runtime; outputs in graph order."""
    if runtime == "reference":
        from onnx.reference import ReferenceEvaluator

        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        return list(ReferenceEvaluator(proto, new_ops=[MSDeformAttnOp]).run(None, feeds))
    import onnxruntime as ort

    if runtime == "onnxruntime-cpu":
        providers: list[Any] = ["CPUExecutionProvider"]
    elif runtime == "onnxruntime-cuda":
        providers = [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
    else:
        raise ValueError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=providers).run(None, feeds)


def verify_onnx(
    path: str | Path,
    fuser: Fuser,
    *,
    encoder: Any | None = None,
    batch_sizes: Sequence[int] = (1, 3),
    runtimes: Sequence[str] | None = None,
    atol: float = DEFAULT_ATOL,
    seed: int = 0,
) -> VerifyReport:
    """Compare the ONNX file's outputs with `fuser` (and `encoder`) in eager PyTorch on random inputs.

    runtimes: default `default_runtimes` (a CUDA runtime that is not available is skipped with the reason).
    Does not raise on a mismatch: see `VerifyReport.ok` / `raise_on_failure`.
    """
    for r in runtimes or ():
        if r not in RUNTIMES:
            raise ValueError(f"unknown runtime {r!r}; use one of {', '.join(RUNTIMES)}")
    front = FrontEnd(fuser, encoder)
    sig = front.signature
    header = onnx.load(str(path), load_external_data=False)
    names_in = tuple(i.name for i in header.graph.input)
    names_out = tuple(o.name for o in header.graph.output)
    if names_in != sig.inputs or names_out != sig.outputs:
        raise OnnxExportError(
            f"{path} has inputs {names_in} and outputs {names_out}, but this fuser"
            f"{' with its encoder' if encoder is not None else ''} has {sig.inputs} -> {sig.outputs}"
        )
    report = VerifyReport(str(path))
    wanted = list(runtimes) if runtimes else default_runtimes(header)
    if "onnxruntime-cuda" in wanted and (why := cuda_unavailable_reason()):
        report.skipped["onnxruntime-cuda"] = why
        wanted.remove("onnxruntime-cuda")
    model = onnx.load(str(path)) if "reference" in wanted else None
    device = front.device
    was_training = front.training
    front.eval()
    try:
        for i, batch in enumerate(batch_sizes):
            inputs = front.example_inputs(batch, seed=seed + i)
            with torch.no_grad():
                expected = [t.float().cpu().numpy() for t in front(*(x.to(device) for x in inputs))]
            feeds = {n: x.numpy() for n, x in zip(sig.inputs, inputs)}
            for runtime in wanted:
                got = run_onnx(model if runtime == "reference" else path, feeds, runtime)
                report.compare(runtime, batch, sig.outputs, got, expected, atol)
    finally:
        front.train(was_training)
    return report
