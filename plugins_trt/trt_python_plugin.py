"""MSDeformAttn as a TensorRT Python plugin (`tensorrt.plugin`, TensorRT >= 10.6), for users who prefer it to the
C++ plugin library: same op id (PLUGIN_NAMESPACE::PLUGIN_NAME), same five inputs, same kernel (libmsda_kernel.so
through ctypes). Register one of the two in a process, not both.

    import layerfuse.plugins_trt.trt_python_plugin  # registers the plugin lazily
    # then parse an ONNX model with the custom MSDeformAttn node, or add it with tensorrt.plugin.op

Not run in this repository's CI (no TensorRT there); the C++ plugin is the tested path.
"""

from __future__ import annotations

import tensorrt as trt
import tensorrt.plugin as trtp

from .info import PLUGIN_NAME, PLUGIN_NAMESPACE
from .kernel import MSDALibrary, load_kernel_library

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
_VALUE_CODES = {trt.float32: 0, trt.float16: 1, trt.bfloat16: 2}
_INDEX_CODES = {trt.int32: 0, trt.int64: 1}
_LIB: list[MSDALibrary] = []


@trtp.register(PLUGIN_ID, lazy_register=True)
def msda_desc(
    value: trtp.TensorDesc,  # [B, S, H, Dh]
    spatial_shapes: trtp.TensorDesc,  # [L, 2]
    level_start_index: trtp.TensorDesc,  # [L]
    sampling_locations: trtp.TensorDesc,  # [B, Q, H, L, P, 2] fp32
    attention_weights: trtp.TensorDesc,  # [B, Q, H, L, P] fp32
) -> trtp.TensorDesc:  # [B, Q, H*Dh] in value's dtype
    v, loc = value.shape_expr, sampling_locations.shape_expr
    return trtp.from_shape_expr(trtp.ShapeExprs.from_tuple((v[0], loc[1], v[2] * v[3])), dtype=value.dtype)


@trtp.impl(PLUGIN_ID)
def msda_enqueue(value: trtp.Tensor, spatial_shapes: trtp.Tensor, level_start_index: trtp.Tensor,
                 sampling_locations: trtp.Tensor, attention_weights: trtp.Tensor, outputs: tuple[trtp.Tensor],
                 stream: int) -> None:
    if not _LIB:
        _LIB.append(load_kernel_library())
    b, s, h, dh = value.shape
    q, n_levels, n_points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    if value.dtype not in _VALUE_CODES or spatial_shapes.dtype not in _INDEX_CODES:
        raise TypeError(f"{PLUGIN_ID}: value must be fp32/fp16/bf16 and the index inputs int32/int64, got "
                        f"{value.dtype} and {spatial_shapes.dtype}")
    pointers = (value.data_ptr, spatial_shapes.data_ptr, level_start_index.data_ptr, sampling_locations.data_ptr,
                attention_weights.data_ptr, outputs[0].data_ptr)
    _LIB[0].forward_pointers(pointers, (b, s, h, dh, q, n_levels, n_points), _VALUE_CODES[value.dtype],
                             _INDEX_CODES[spatial_shapes.dtype], stream)
