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
The three node modes are then packagings of that one graph:

    custom  the node as exported (runtimes need the plugin; onnx.reference runs it with `layerfuse.export.msda_numpy`)
    hybrid  the node + `gather_function()`, the gather graph as an ONNX local function of the same domain/name
    gather  `hybrid` with the function inlined: plain ONNX ops only, no custom domain, no GridSample

A fourth mode exports no node: `grid_sample` traces MSDeformAttn's grid_sample formulation (pipeline of
fusion/msda/grid_sample.py), one standard `GridSample` (opset >= 16) per level, the level sizes fixed at export
(a fuser's are). Plain ONNX as well; onnxruntime's CPU GridSample kernel runs it faster than the gather graph's
Gather + MatMul chain on small models (BENCHMARKS.md, ONNX export); TensorRT >= 8.6 has a GridSample layer.
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

MsdaMode = Literal["gather", "custom", "hybrid", "grid_sample"]  # how MSDeformAttn is written (module docstring)
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
def msda_routed(model: nn.Module, impl: str) -> Iterator[int]:
    """Run the core call of every MSDeformAttn in `model` with `impl`; yields how many modules. Restores each
    module's own `impl` on exit."""
    modules = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    saved = [m.impl for m in modules]
    try:
        for m in modules:
            m.impl = impl
        yield len(modules)
    finally:
        for m, own in zip(modules, saved):
            m.impl = own


@contextlib.contextmanager
def msda_as_export_op(model: nn.Module) -> Iterator[int]:
    """Route the core call of every MSDeformAttn in `model` to the export op; yields how many modules.
    Restores each module's `impl` and unregisters the export impl on exit."""
    register_impl(EXPORT_IMPL, msda_export_op)
    try:
        with msda_routed(model, EXPORT_IMPL) as n:
            yield n
    finally:
        unregister_impl(EXPORT_IMPL)


def msda_for_export(model: nn.Module, mode: MsdaMode) -> contextlib.AbstractContextManager[int]:
    """How `mode` exports MSDeformAttn: the traced grid_sample formulation, or the export op (the node modes)."""
    return msda_routed(model, "grid_sample") if mode == "grid_sample" else msda_as_export_op(model)


# -- the gather body: bilinear sampling by index gathering, shape-generic ------------------------------------


@script(LAYERFUSE_OPSET, default_opset=op)
def msda_gather(value, spatial_shapes: INT32, level_start_index: INT32, sampling_locations: FLOAT, attention_weights: FLOAT):
    # value is read as one flat table [B*S*H, Dh] (a reshape, no transpose). Points are laid out
    # [B, Q, H, 2 (corner), 2 (x, y), L, P]: every broadcast in here is against per-(h, .., l, p) constants or
    # over (l, p) blocks, never on the innermost axis alone (onnxruntime runs those element by element).
    # Corner (dx, dy) of a point is table row ry[dy] + rx[dx] with rx = x*H and ry = (b*S + start_l + y*w_l)*H + h,
    # weight wy[dy] * wx[dx] * attn (0 outside the level: zero padding); one Gather of all K = 4*L*P corners
    # of every (b, q, h) and one batched MatMul [B*Q*H, 1, K] @ [B*Q*H, K, Dh].
    one = op.Constant(value_ints=[1])
    minus_one = op.Constant(value_ints=[-1])
    zero_s = op.Constant(value_int=0)
    one_s = op.Constant(value_int=1)
    b = op.Shape(value, start=0, end=1)
    s = op.Shape(value, start=1, end=2)
    h = op.Shape(value, start=2, end=3)
    dh = op.Shape(value, start=3, end=4)
    n_levels = op.Shape(attention_weights, start=3, end=4)
    lp_shape = op.Shape(attention_weights, start=3, end=5)  # (L, P)
    k = op.ReduceProd(lp_shape, keepdims=1) * op.Constant(value_ints=[4])  # corners per (b, q, h)

    # per-(h, coordinate, l, p) constants [H, 2, L, P]: level size (w, h), row stride (H, w_l*H)
    wh = op.Transpose(op.Gather(op.Cast(spatial_shapes, to=INT64.dtype), op.Constant(value_ints=[1, 0]), axis=1))  # [2, L] (w; h)
    per_level = op.Concat(op.Constant(value_ints=[1, 2]), n_levels, one, axis=0)  # [1, 2, L, 1]
    full = op.Concat(h, op.Constant(value_ints=[2]), lp_shape, axis=0)  # [H, 2, L, P]
    size = op.Expand(op.Reshape(wh, per_level), full)
    size_f = op.Cast(size, to=FLOAT.dtype)
    stride = op.Expand(op.Reshape(op.Concat(op.Expand(one, n_levels), op.Gather(wh, zero_s), axis=0) * h, per_level), full)
    # the rest of a row: start_l*H + h [H, 1, L, P] and the batch's b*S*H [B, 1, 1, 1, 1, 1]
    start = op.Reshape(op.Cast(level_start_index, to=INT64.dtype), op.Concat(one, one, n_levels, one, axis=0))
    head = op.Reshape(op.Range(zero_s, op.Squeeze(h), one_s), op.Constant(value_ints=[-1, 1, 1, 1]))
    offset = op.Expand(start * h + head, op.Concat(h, one, lp_shape, axis=0))
    batch = op.Reshape(op.Range(zero_s, op.Squeeze(b), one_s) * op.Squeeze(s * h), op.Constant(value_ints=[-1, 1, 1, 1, 1, 1]))

    # [B, Q, H, 2 (x, y), L, P] by Split + Concat (onnxruntime's Transpose of this permutation is ~10x slower)
    loc_x, loc_y = op.Split(op.Cast(sampling_locations, to=FLOAT.dtype), axis=-1, num_outputs=2)
    three = op.Constant(value_ints=[3])
    loc = op.Concat(op.Unsqueeze(op.Squeeze(loc_x, minus_one), three), op.Unsqueeze(op.Squeeze(loc_y, minus_one), three), axis=3)
    # far-outside points only touch zero-padded corners; clamping keeps the integer casts in range
    pix = op.Min(op.Max(loc * size_f - op.Constant(value_float=0.5), op.Constant(value_float=-2.0)), size_f + op.Constant(value_float=0.5))
    low = op.Floor(pix)
    frac = pix - low
    corner = op.Concat(op.Unsqueeze(low, three), op.Unsqueeze(low + op.Constant(value_float=1.0), three), axis=3)  # [B, Q, H, 2 (corner), 2, L, P]
    size_f = op.Unsqueeze(size_f, one)  # [H, 1, 2, L, P]
    clamped = op.Min(op.Max(corner, op.Constant(value_float=0.0)), size_f - op.Constant(value_float=1.0))
    weights = op.Concat(op.Unsqueeze(op.Constant(value_float=1.0) - frac, three), op.Unsqueeze(frac, three), axis=3)
    weights = weights * op.Cast(op.Equal(clamped, corner), to=FLOAT.dtype)  # (1 - f, f), 0 outside the level
    rows = op.Cast(clamped, to=INT64.dtype) * op.Unsqueeze(stride, one)  # [B, Q, H, 2 (corner), 2 (x, y), L, P]
    four = op.Constant(value_ints=[4])
    rx = op.Unsqueeze(op.Gather(rows, zero_s, axis=4), three)  # [B, Q, H, 1, 2 (dx), L, P]
    ry = op.Unsqueeze(op.Gather(rows, one_s, axis=4) + offset + batch, four)  # [B, Q, H, 2 (dy), 1, L, P]
    wx = op.Unsqueeze(op.Gather(weights, zero_s, axis=4), three)
    attn = op.Unsqueeze(op.Cast(attention_weights, to=FLOAT.dtype), three)  # [B, Q, H, 1, L, P]
    wy = op.Unsqueeze(op.Gather(weights, one_s, axis=4) * attn, four)

    table = op.Reshape(value, op.Concat(minus_one, dh, axis=0))  # [B*S*H, Dh]
    picked = op.Gather(table, ry + rx, axis=0)  # [B, Q, H, 2, 2, L, P, Dh]
    picked = op.Reshape(op.Cast(picked, to=FLOAT.dtype), op.Concat(minus_one, k, dh, axis=0))  # [B*Q*H, K, Dh] fp32
    coef = op.Reshape(wy * wx, op.Concat(minus_one, one, k, axis=0))  # [B*Q*H, 1, K]
    q_hdh = op.Concat(op.Shape(sampling_locations, start=1, end=2), h * dh, axis=0)
    return op.CastLike(op.Reshape(op.MatMul(coef, picked), op.Concat(minus_one, q_hdh, axis=0)), value)  # [B, Q, H*Dh]


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
