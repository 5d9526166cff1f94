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

Implementations: "grid_sample" (reference), "gather" (ONNX-friendly), "kernel" (a compiled kernel plugged in
with `register_kernel`; the CUDA kernel lives in plugins_trt/), "auto" = the registered kernel for CUDA
tensors when there is one, else grid_sample, the faster of the two PyTorch paths on CPU and GPU
(see BENCHMARKS.md, `bench/msda.py`).
"""

from __future__ import annotations

from typing import Callable

import torch

from .gather import ms_deform_attn_gather
from .grid_sample import ms_deform_attn_grid_sample

MSDAFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
IMPLS: dict[str, MSDAFunction] = {"grid_sample": ms_deform_attn_grid_sample, "gather": ms_deform_attn_gather}
_KERNEL: dict[str, MSDAFunction] = {}  # the plugin slot: at most one compiled kernel, under key "kernel"


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
    if impl == "auto":
        impl = "kernel" if value.is_cuda and kernel_available() else "grid_sample"
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
        out = fn(value, spatial_shapes, level_start_index, sampling_locations.float() if value.dtype != torch.float64 else sampling_locations, attention_weights.float() if value.dtype != torch.float64 else attention_weights)
    return out.to(value.dtype)
