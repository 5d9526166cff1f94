"""The MSDeformAttn operator in ONNX (docs/methods.md#msdeformattn): the custom node, its gather body, the three
modes.

    value              [B, S, H, Dh]        float (fp16 / bf16 allowed by the schema)
    spatial_shapes     [L, 2] int32         (h, w) of each level
    level_start_index  [L] int32            first row of each level in S
    sampling_locations [B, Q, H, L, P, 2]   float, normalised (x, y)
    attention_weights  [B, Q, H, L, P]      float, already softmaxed
    -> output          [B, Q, H*Dh]         value's dtype

Node: op_type `PLUGIN_NAME` in domain `ONNX_DOMAIN`, string attributes `plugin_version` / `plugin_namespace`
(the TensorRT plugin's identity, from `layerfuse.plugins_trt.info`).

Mechanism. During export every `MSDeformAttn` module routes its core call (only the core: value_proj, offsets,
softmax and output_proj stay ordinary ops) to the torch custom op `layerfuse_export::ms_deform_attn`
(`torch.library.custom_op`; its eager body is the `gather` implementation). torch's dynamo exporter
(`torch.onnx.export(..., dynamo=True, custom_translation_table=...)`) translates that op with `translate_msda`
into one custom node, the two index inputs cast to int32. The exporter resolves ops through onnx's schema
registry, so `register_onnx_schema` registers the node's schema (with type and shape inference) first.
The three modes are then packagings of that one graph:

    custom  the node as exported (runtimes need the plugin; onnx.reference runs it with `layerfuse.export.msda_numpy`)
    hybrid  the node + `gather_function()`, the gather graph as an ONNX local function of the same domain/name
    gather  `hybrid` with the function inlined: plain ONNX ops only, no custom domain, no GridSample
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import onnx
import onnx.inliner
import torch
from onnxscript import FLOAT, INT32, INT64, script
from onnxscript import opset18 as op
from onnxscript.values import Opset
from torch import nn

from layerfuse.core.config import check_choice
from layerfuse.fusion.msda import MSDeformAttn, ms_deform_attn_gather, register_impl, unregister_impl
from layerfuse.plugins_trt.info import ONNX_DOMAIN, ONNX_DOMAIN_VERSION, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

MsdaMode = Literal["gather", "custom", "hybrid"]  # how MSDeformAttn is written (module docstring)
FUNCTION_OPSET = 18  # opset of the standard ops inside the gather function
EXPORT_IMPL = "onnx_export"  # the `impl` name MSDeformAttn modules are switched to while exporting
INPUT_NAMES = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
NODE_ATTRIBUTES = {"plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE}

LAYERFUSE_OPSET = Opset(ONNX_DOMAIN, ONNX_DOMAIN_VERSION)


# -- the node's schema (onnx's registry: exporter, checker and shape inference) -------------------------------


def _infer_output(ctx: onnx.shape_inference.InferenceContext) -> None:
    """output [B, Q, H*Dh] from value [B, S, H, Dh] and sampling_locations [B, Q, H, L, P, 2]."""
    value, loc = ctx.get_input_type(0), ctx.get_input_type(3)
    out = onnx.TypeProto()
    out.tensor_type.elem_type = value.tensor_type.elem_type
    vdims, ldims = value.tensor_type.shape.dim, loc.tensor_type.shape.dim
    if len(vdims) == 4 and len(ldims) == 6:
        shape = out.tensor_type.shape
        shape.dim.add().CopyFrom(ldims[0])
        shape.dim.add().CopyFrom(ldims[1])
        channels = shape.dim.add()
        if vdims[2].HasField("dim_value") and vdims[3].HasField("dim_value"):
            channels.dim_value = vdims[2].dim_value * vdims[3].dim_value
    ctx.set_output_type(0, out)


def register_onnx_schema() -> None:
    """Register the node's schema in onnx's (process-wide) registry; idempotent. Needed by the exporter; makes
    `onnx.checker` validate the node's inputs/attributes and shape inference see through it."""
    if onnx.defs.has(PLUGIN_NAME, ONNX_DOMAIN):
        return
    schema = onnx.defs.OpSchema
    param = schema.FormalParameter
    s = schema(
        PLUGIN_NAME, ONNX_DOMAIN, ONNX_DOMAIN_VERSION,
        "Multi-scale deformable attention core (layerfuse, docs/methods.md#msdeformattn; docs/msda-op.md).",
        inputs=[param("value", "T"), param("spatial_shapes", "I"), param("level_start_index", "I"),
                param("sampling_locations", "F"), param("attention_weights", "F")],
        outputs=[param("output", "T")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "value and output"),
            ("I", ["tensor(int32)"], "level sizes and starts"),
            ("F", ["tensor(float)"], "sampling locations and attention weights (fp32 whatever T is)"),
        ],
        attributes=[
            schema.Attribute("plugin_version", schema.AttrType.STRING, "TensorRT plugin version"),
            schema.Attribute("plugin_namespace", schema.AttrType.STRING, "TensorRT plugin namespace"),
        ],
    )
    s.set_type_and_shape_inference_function(_infer_output)
    onnx.defs.register_schema(s)


# -- the torch op the exporter sees ---------------------------------------------------------------------------


@torch.library.custom_op("layerfuse_export::ms_deform_attn", mutates_args=())
def msda_export_op(
    value: torch.Tensor,  # [B, S, H, Dh]
    spatial_shapes: torch.Tensor,  # [L, 2]
    level_start_index: torch.Tensor,  # [L]
    sampling_locations: torch.Tensor,  # [B, Q, H, L, P, 2]
    attention_weights: torch.Tensor,  # [B, Q, H, L, P]
) -> torch.Tensor:  # [B, Q, H*Dh] fp32, like every MSDA implementation (the dispatcher casts to value's dtype)
    """Marker op for export; eagerly it is the gather implementation."""
    return ms_deform_attn_gather(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@msda_export_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    b, _, h, dh = value.shape
    return value.new_empty(b, sampling_locations.shape[1], h * dh, dtype=torch.float32)


def translate_msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """custom_translation_table entry: one custom node, index inputs cast to int32."""
    return LAYERFUSE_OPSET.MSDeformAttn(
        value,
        op.Cast(spatial_shapes, to=onnx.TensorProto.INT32),
        op.Cast(level_start_index, to=onnx.TensorProto.INT32),
        sampling_locations,
        attention_weights,
        **NODE_ATTRIBUTES,
    )


def translation_table() -> dict:
    """What `torch.onnx.export(..., custom_translation_table=)` needs for the MSDeformAttn node."""
    register_onnx_schema()
    return {torch.ops.layerfuse_export.ms_deform_attn.default: translate_msda}


@contextlib.contextmanager
def msda_as_export_op(model: nn.Module) -> Iterator[int]:
    """Route the core call of every MSDeformAttn in `model` to the export op; yields how many modules.
    Restores each module's `impl` and unregisters the export impl on exit."""
    modules = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    saved = [m.impl for m in modules]
    register_impl(EXPORT_IMPL, msda_export_op)
    try:
        for m in modules:
            m.impl = EXPORT_IMPL
        yield len(modules)
    finally:
        for m, impl in zip(modules, saved):
            m.impl = impl
        unregister_impl(EXPORT_IMPL)


# -- the gather body: bilinear sampling by index gathering, shape-generic ------------------------------------


@script(LAYERFUSE_OPSET, default_opset=op)
def msda_gather(value, spatial_shapes: INT32, level_start_index: INT32, sampling_locations: FLOAT, attention_weights: FLOAT):
    # Every level is one block of rows of a flat [B*H*S, Dh] table; each bilinear corner is a row index
    # b*H*S + h*S + start_l + y*w_l + x, gathered with one Gather; corners outside their level get coefficient 0.
    b = op.Shape(value, start=0, end=1)
    s = op.Shape(value, start=1, end=2)
    h = op.Shape(value, start=2, end=3)
    dh = op.Shape(value, start=3, end=4)
    q = op.Shape(sampling_locations, start=1, end=2)
    n_levels = op.Shape(sampling_locations, start=3, end=4)
    one = op.Constant(value_ints=[1])
    minus_one = op.Constant(value_ints=[-1])
    level_shape = op.Concat(one, one, one, n_levels, one, axis=0)  # broadcast per level over [B, Q, H, L, P]

    sizes = op.Cast(spatial_shapes, to=INT64.dtype)  # [L, 2]
    h_int = op.Reshape(op.Gather(sizes, op.Constant(value_int=0), axis=1), level_shape)
    w_int = op.Reshape(op.Gather(sizes, op.Constant(value_int=1), axis=1), level_shape)
    start = op.Reshape(op.Cast(level_start_index, to=INT64.dtype), level_shape)
    h_f = op.Cast(h_int, to=FLOAT.dtype)
    w_f = op.Cast(w_int, to=FLOAT.dtype)

    half = op.Constant(value_float=0.5)
    two = op.Constant(value_float=2.0)
    loc = op.Cast(sampling_locations, to=FLOAT.dtype)
    x = op.Gather(loc, op.Constant(value_int=0), axis=-1) * w_f - half  # [B, Q, H, L, P] pixel coordinates
    y = op.Gather(loc, op.Constant(value_int=1), axis=-1) * h_f - half
    # far-outside points only ever touch zero-padded corners; clamping keeps the integer casts in range
    x = op.Min(op.Max(x, -two), w_f + half)
    y = op.Min(op.Max(y, -two), h_f + half)
    x0 = op.Floor(x)
    y0 = op.Floor(y)
    fx = x - x0
    fy = y - y0
    gx = op.Constant(value_float=1.0) - fx
    gy = op.Constant(value_float=1.0) - fy
    x0i = op.Cast(x0, to=INT64.dtype)
    y0i = op.Cast(y0, to=INT64.dtype)
    x1i = x0i + op.Constant(value_int=1)
    y1i = y0i + op.Constant(value_int=1)
    zero_i = op.Constant(value_int=0)
    attn = op.Cast(attention_weights, to=FLOAT.dtype)

    in_x0 = op.And(op.GreaterOrEqual(x0i, zero_i), op.Less(x0i, w_int))
    in_x1 = op.And(op.GreaterOrEqual(x1i, zero_i), op.Less(x1i, w_int))
    in_y0 = op.And(op.GreaterOrEqual(y0i, zero_i), op.Less(y0i, h_int))
    in_y1 = op.And(op.GreaterOrEqual(y1i, zero_i), op.Less(y1i, h_int))
    cx0 = op.Min(op.Max(x0i, zero_i), w_int - op.Constant(value_int=1))
    cx1 = op.Min(op.Max(x1i, zero_i), w_int - op.Constant(value_int=1))
    cy0 = op.Min(op.Max(y0i, zero_i), h_int - op.Constant(value_int=1))
    cy1 = op.Min(op.Max(y1i, zero_i), h_int - op.Constant(value_int=1))

    axis = op.Constant(value_ints=[-1])
    idx = op.Concat(  # [B, Q, H, L, P, 4] rows within the batch-head block
        op.Unsqueeze(start + cy0 * w_int + cx0, axis),
        op.Unsqueeze(start + cy0 * w_int + cx1, axis),
        op.Unsqueeze(start + cy1 * w_int + cx0, axis),
        op.Unsqueeze(start + cy1 * w_int + cx1, axis),
        axis=-1,
    )
    coef = op.Concat(  # [B, Q, H, L, P, 4] bilinear weight x attention weight, 0 outside the level
        op.Unsqueeze(gx * gy * attn * op.Cast(op.And(in_x0, in_y0), to=FLOAT.dtype), axis),
        op.Unsqueeze(fx * gy * attn * op.Cast(op.And(in_x1, in_y0), to=FLOAT.dtype), axis),
        op.Unsqueeze(gx * fy * attn * op.Cast(op.And(in_x0, in_y1), to=FLOAT.dtype), axis),
        op.Unsqueeze(fx * fy * attn * op.Cast(op.And(in_x1, in_y1), to=FLOAT.dtype), axis),
        axis=-1,
    )
    bh = b * h
    idx = op.Reshape(op.Transpose(idx, perm=[0, 2, 1, 3, 4, 5]), op.Concat(bh, minus_one, axis=0))  # [B*H, Q*L*P*4]
    block = op.Range(op.Constant(value_int=0), op.Squeeze(bh), op.Constant(value_int=1)) * op.Squeeze(s)
    idx = idx + op.Unsqueeze(block, axis)  # flat rows of the [B*H*S, Dh] table
    table = op.Reshape(op.Transpose(value, perm=[0, 2, 1, 3]), op.Concat(minus_one, dh, axis=0))  # [B*H*S, Dh]
    picked = op.Cast(op.Gather(table, idx, axis=0), to=FLOAT.dtype)  # [B*H, Q*L*P*4, Dh], fp32 accumulation
    picked = op.Reshape(picked, op.Concat(bh * q, minus_one, dh, axis=0))  # [B*H*Q, L*P*4, Dh]
    coef = op.Reshape(op.Transpose(coef, perm=[0, 2, 1, 3, 4, 5]), op.Concat(bh * q, one, minus_one, axis=0))  # [B*H*Q, 1, L*P*4]
    out = op.Reshape(op.MatMul(coef, picked), op.Concat(b, h, q, dh, axis=0))  # [B, H, Q, Dh]
    out = op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), op.Concat(b, q, minus_one, axis=0))  # [B, Q, H*Dh]
    return op.CastLike(out, value)


def gather_function() -> onnx.FunctionProto:
    """The gather graph as an ONNX local function `ONNX_DOMAIN::PLUGIN_NAME` (attributes accepted, unused)."""
    fn = msda_gather.to_function_proto()
    fn.name, fn.domain = PLUGIN_NAME, ONNX_DOMAIN
    del fn.attribute[:]
    fn.attribute.extend(NODE_ATTRIBUTES)
    return fn


# -- packaging the exported graph into a mode ------------------------------------------------------------------


def msda_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The custom MSDeformAttn nodes of the main graph."""
    return [n for n in model.graph.node if n.domain == ONNX_DOMAIN and n.op_type == PLUGIN_NAME]


def package(model: onnx.ModelProto, mode: MsdaMode) -> onnx.ModelProto:
    """Turn an export with custom nodes into `mode` (see module docstring); returns a new model."""
    check_choice(mode, MsdaMode, "MSDeformAttn export mode")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if mode == "custom" or not msda_nodes(out):
        if not msda_nodes(out):
            _drop_opset(out, ONNX_DOMAIN)
        return out
    out.functions.append(gather_function())
    if not any(o.domain in ("", "ai.onnx") for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid("", FUNCTION_OPSET))
    if mode == "gather":
        out = onnx.inliner.inline_local_functions(out)
        _drop_opset(out, ONNX_DOMAIN)
    return out


def _drop_opset(model: onnx.ModelProto, domain: str) -> None:
    keep = [o for o in model.opset_import if o.domain != domain]
    del model.opset_import[:]
    model.opset_import.extend(keep)
