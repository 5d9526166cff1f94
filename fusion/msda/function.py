"""`ms_deform_attn`: the MSDeformAttn operator (docs/methods.md#msdeformattn) and its implementation dispatch.

    value              [B, S, H, Dh]         fp32 / fp16 / bf16 / fp64
    spatial_shapes     [L, 2] int            (h, w) of each level, S = sum(h*w)
    level_start_index  [L] int               first row of each level in S
    sampling_locations [B, Q, H, L, P, 2]    normalised (x, y); outside [0, 1] samples zeros
    attention_weights  [B, Q, H, L, P]       already softmaxed over (L, P)
    -> output          [B, Q, H*Dh]          in value's dtype

For each (b, q, h): sum over (l, p) of attn * bilinear(value_l, x*w_l - 0.5, y*h_l - 0.5), zero outside the
map (= grid_sample bilinear, zeros padding, align_corners=False). Locations, weights, coordinate math and the
accumulation are fp32 whatever the value dtype (fp64 for fp64 value).

Implementations: "grid_sample" (reference), "gather" (ONNX-friendly; eagerly a sparse autograd.Function, see
gather.py), "kernel" (a compiled kernel plugged in with `register_kernel`; the CUDA kernel lives in plugins_trt/),
"auto": the registered kernel for CUDA tensors when there is one, else the faster of grid_sample and gather as
measured once per (device type, value dtype, with / without backward) in this process (`auto_choice`;
docs/msda-op.md, "impl=auto").
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

from layerfuse.core.timing import time_once

from .gather import ms_deform_attn_gather
from .grid_sample import ms_deform_attn_grid_sample

MSDAFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
IMPLS: dict[str, MSDAFunction] = {"grid_sample": ms_deform_attn_grid_sample, "gather": ms_deform_attn_gather}
_KERNEL: dict[str, MSDAFunction] = {}  # the plugin slot: at most one compiled kernel, under key "kernel"

AUTO_CANDIDATES = ("grid_sample", "gather")  # what impl="auto" measures (the kernel, when registered, wins on CUDA)
AUTO_ENV = "LAYERFUSE_MSDA_IMPL"  # pins impl="auto" to one of AUTO_CANDIDATES (reproducible runs, no measurement)
AUTO_REPEATS = 2  # timed calls per candidate, interleaved, after one warm-up call each; the fastest counts
AutoKey = tuple[str, torch.dtype, bool]  # (device type, value dtype, with backward)
_AUTO: dict[AutoKey, tuple[str, dict[str, float]]] = {}  # key -> (choice, best seconds per candidate)
log = logging.getLogger(__name__)


def register_impl(name: str, fn: MSDAFunction) -> None:
    """Make `fn` selectable as impl=`name` (e.g. the ONNX exporter's marker op); same signature and contract."""
    if name in ("auto", "kernel", "grid_sample", "gather"):
        raise ValueError(f"impl name {name!r} is built in")
    IMPLS[name] = fn


def unregister_impl(name: str) -> None:
    if name not in ("grid_sample", "gather"):
        IMPLS.pop(name, None)


def register_kernel(fn: MSDAFunction) -> None:
    """Plug in a compiled kernel with the same signature and contract (it must support autograd to train)."""
    _KERNEL["kernel"] = fn


def unregister_kernel() -> None:
    _KERNEL.pop("kernel", None)


def kernel_available() -> bool:
    return "kernel" in _KERNEL


def auto_choices() -> dict[AutoKey, tuple[str, dict[str, float]]]:
    """What impl="auto" measured in this process: (device type, dtype, backward) -> (choice, best seconds)."""
    return dict(_AUTO)


def reset_auto() -> None:
    """Forget the measurements (the next impl="auto" call measures again)."""
    _AUTO.clear()


def _measurement_unsafe(value: torch.Tensor) -> bool:
    """Tracing, compiling or exporting (no timing possible), or capturing a CUDA graph (no synchronisation)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return True
    return value.is_cuda and torch.cuda.is_current_stream_capturing()


def _measure(args: tuple[torch.Tensor, ...], backward: bool) -> dict[str, float]:
    """Best seconds of each candidate on the call's own inputs (forward, or forward + backward of all three float
    inputs), interleaved; a candidate that raises is left out. The whole call, not a slice: the per-op overhead
    of `gather` makes a batch-1 slice favour grid_sample where the full batch does not (BENCHMARKS.md)."""
    value, shapes, starts, loc, attn = args
    sample = [t.detach() for t in (value, loc, attn)]
    times: dict[str, list[float]] = {}
    for impl in AUTO_CANDIDATES:
        try:
            _run(impl, sample, shapes, starts, backward)  # warm-up
            times[impl] = []
        except Exception as e:  # noqa: BLE001 - a candidate this device / dtype cannot run is simply not chosen
            log.warning("ms_deform_attn(impl='auto'): %s fails on %s %s (%s); not a candidate", impl, value.device.type, value.dtype, e)
    if not times:
        raise RuntimeError(f"ms_deform_attn(impl='auto'): no implementation runs on {value.device.type} {value.dtype}")
    for _ in range(AUTO_REPEATS):
        for impl in times:
            times[impl].append(time_once(lambda impl=impl: _run(impl, sample, shapes, starts, backward), value.device))
    return {impl: min(ts) for impl, ts in times.items()}


def _run(impl: str, sample: list[torch.Tensor], shapes: torch.Tensor, starts: torch.Tensor, backward: bool) -> None:
    """One call of `impl` on [value, locations, weights] (+ backward of the sum: gradients for all three)."""
    with torch.enable_grad() if backward else torch.no_grad():
        v, lc, a = (t.clone().requires_grad_(True) for t in sample) if backward else sample
        out = IMPLS[impl](v, shapes, starts, lc, a)
        if backward:
            out.sum().backward()


def auto_choice(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> str:
    """The implementation impl="auto" runs for these inputs (docs/msda-op.md, "impl=auto")."""
    if value.is_cuda and kernel_available():
        return "kernel"
    pinned = os.environ.get(AUTO_ENV)
    if pinned:
        if pinned not in AUTO_CANDIDATES:
            raise ValueError(f"{AUTO_ENV}={pinned!r}: use one of {', '.join(AUTO_CANDIDATES)}")
        return pinned
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (value, sampling_locations, attention_weights))
    key = (value.device.type, value.dtype, backward)
    if key in _AUTO:
        return _AUTO[key][0]
    if _measurement_unsafe(value):
        return "gather"  # the plain-op path: traces with dynamic shapes (grid_sample reads the level sizes in Python)
    times = _measure((value, spatial_shapes, level_start_index, sampling_locations, attention_weights), backward)
    choice = min(times, key=times.get)
    _AUTO[key] = (choice, times)
    log.info(
        "ms_deform_attn(impl='auto') on %s %s %s: %s (%s)", key[0], str(value.dtype).removeprefix("torch."),
        "forward+backward" if backward else "forward", choice, ", ".join(f"{k} {t * 1e3:.1f} ms" for k, t in times.items()),
    )
    return choice


def _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be [B, S, H, Dh], got shape {list(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"ms_deform_attn: sampling_locations must be [B, Q, H, L, P, 2], got {list(sampling_locations.shape)}")
    b, _, h, _ = value.shape
    _, q, h2, n_levels, n_points, _ = sampling_locations.shape
    if sampling_locations.shape[0] != b or h2 != h:
        raise ValueError(
            f"ms_deform_attn: sampling_locations {list(sampling_locations.shape)} disagree with value "
            f"{list(value.shape)} on batch or heads"
        )
    if tuple(attention_weights.shape) != (b, q, h, n_levels, n_points):
        raise ValueError(
            f"ms_deform_attn: attention_weights must be [B, Q, H, L, P] = {[b, q, h, n_levels, n_points]}, "
            f"got {list(attention_weights.shape)}"
        )
    if tuple(spatial_shapes.shape) != (n_levels, 2) or tuple(level_start_index.shape) != (n_levels,):
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be [L, 2] and level_start_index [L] with L = {n_levels}, "
            f"got {list(spatial_shapes.shape)} and {list(level_start_index.shape)}"
        )
    if spatial_shapes.is_floating_point() or level_start_index.is_floating_point():
        raise ValueError("ms_deform_attn: spatial_shapes and level_start_index must be integer tensors")
    if not torch.jit.is_tracing() and not torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export():
        sizes = spatial_shapes.prod(dim=1)
        if int(sizes.sum()) != value.shape[1]:
            raise ValueError(f"ms_deform_attn: value has S = {value.shape[1]} rows but the levels {spatial_shapes.tolist()} need {int(sizes.sum())}")
        expected = torch.cumsum(sizes, 0) - sizes
        if not torch.equal(expected.to(level_start_index.device, level_start_index.dtype), level_start_index):
            raise ValueError(f"ms_deform_attn: level_start_index {level_start_index.tolist()} does not match the level sizes {sizes.tolist()}")


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention core: [B, S, H, Dh] values -> [B, Q, H*Dh] (see module docstring)."""
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if value.dtype != torch.float64:  # fp32 locations and weights whatever the value dtype
        sampling_locations, attention_weights = sampling_locations.float(), attention_weights.float()
    if impl == "auto":
        with torch.autocast(value.device.type, enabled=False):
            impl = auto_choice(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if impl == "kernel":
        if not kernel_available():
            raise RuntimeError(
                "ms_deform_attn(impl='kernel'): no compiled kernel is registered; build plugins_trt (make kernel) "
                "and call layerfuse.fusion.msda.register_kernel, or use impl='grid_sample' / 'gather'"
            )
        fn = _KERNEL["kernel"]
    elif impl in IMPLS:
        fn = IMPLS[impl]
    else:
        raise ValueError(f"ms_deform_attn: unknown impl {impl!r}; use auto, {', '.join(IMPLS)} or kernel")
    with torch.autocast(value.device.type, enabled=False):
        out = fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return out.to(value.dtype)
