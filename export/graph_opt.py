"""Runtime-friendly rewrites of an exported graph; plain ONNX ops in, the same plain ops out, same values.

    fold_constants(model)           onnxscript's optimizer: constant folding (the inlined MSDeformAttn gather
                                    function's shape arithmetic becomes initializers), dead nodes dropped
    broadcast_friendly(model)       a constant operand of an elementwise op that broadcasts on inner axes
                                    (e.g. x [B, Q, H, L, P, 2] / c [1, 1, 1, L, 1, 2]) is stored materialised over
                                    trailing axes of the result ([1, 1, H, L, P, 2]), so the op broadcasts over long
                                    contiguous runs; an Expand / Unsqueeze chain from a constant into such an
                                    operand is folded into the constant when broadcasting makes the Expand redundant

Why: onnxruntime's CPU elementwise kernels loop over contiguous spans of the broadcast; a constant that varies on
an inner axis but not on the innermost one cuts those spans to a few elements (measured: 13x slower for the
[8, 64, 16, 4, 4, 2] / [1, 1, 1, 4, 1, 2] division of MMFuser's sampling offsets, BENCHMARKS.md). Materialised
constants are bounded by `MAX_CONSTANT_ELEMENTS`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Equal", "Less", "Greater", "LessOrEqual",
               "GreaterOrEqual", "And", "Or"}
MAX_CONSTANT_ELEMENTS = 1 << 20  # a materialised constant holds at most this many elements (4 MiB in fp32)
MIN_SPAN = 64  # a constant whose contiguous run in the result is at least this long (e.g. a bias) is left alone
TARGET_SPAN = 512  # others are materialised over as few trailing axes as give a run this long

Dims = list  # [int | str | None] per axis: static size, symbolic name, or unknown


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxscript's optimizer (constant folding, shape-op simplification, dead-node removal; local functions are
    kept, not inlined); returns a new model."""
    import onnxscript.optimizer

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return onnxscript.optimizer.optimize(copy, inline=False)


def _shapes(model: onnx.ModelProto) -> dict[str, Dims]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out: dict[str, Dims] = {}
    for v in [*g.value_info, *g.input, *g.output]:
        if v.type.tensor_type.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in v.type.tensor_type.shape.dim]
    for t in g.initializer:
        out[t.name] = list(t.dims)
    return out


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1 and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return consts


def _resolve(name: str, producers: dict[str, onnx.NodeProto], consts: dict[str, np.ndarray]) -> tuple[np.ndarray, bool] | None:
    """The constant behind `name` through Unsqueeze / Expand nodes, the Expands left out; (array, any Expand
    skipped) or None when `name` is not such a chain."""
    if name in consts:
        return consts[name], False
    node = producers.get(name)
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Expand":
        inner = _resolve(node.input[0], producers, consts)
        return None if inner is None else (inner[0], True)
    if node.op_type == "Unsqueeze" and len(node.input) == 2 and node.input[1] in consts:
        inner = _resolve(node.input[0], producers, consts)
        if inner is None:
            return None
        axes = [int(a) for a in consts[node.input[1]].reshape(-1)]
        rank = inner[0].ndim + len(axes)
        return np.expand_dims(inner[0], tuple(a % rank for a in axes)), inner[1]
    return None


def _materialised(c: np.ndarray, other: Dims, out: Dims) -> np.ndarray | None:
    """`c` stored over trailing static axes of the result (the fewest that make a contiguous run of `TARGET_SPAN`,
    at most `MAX_CONSTANT_ELEMENTS`; leading axes left at 1), or None when its run in the result is already
    `MIN_SPAN` long, or when that is not possible with static sizes."""
    rank = len(out)
    if c.ndim > rank or len(other) > rank:
        return None
    cd = [1] * (rank - c.ndim) + list(c.shape)
    od = [1] * (rank - len(other)) + list(other)
    for a in range(rank):  # the result must be `out` without `c` (c never widens it) and c must fit in it
        if cd[a] != 1 and cd[a] != out[a]:
            return None
        if od[a] != out[a] and not (cd[a] == out[a] and od[a] == 1):
            return None
    varying = [a for a in range(rank) if cd[a] != 1]
    if not varying:
        return None
    run = 1  # elements of the innermost axes where c and the result agree: what one broadcast span covers
    for a in reversed(range(rank)):
        if cd[a] != out[a]:
            break
        run *= int(cd[a])
    if run >= MIN_SPAN and run == int(np.prod(cd)):
        return None
    static = rank
    while static > 0 and isinstance(out[static - 1], int) and out[static - 1] > 0:
        static -= 1
    fits = [j for j in range(static, varying[0] + 1) if int(np.prod(out[j:])) <= MAX_CONSTANT_ELEMENTS]
    if not fits:
        return None
    long_enough = [j for j in fits if int(np.prod(out[j:])) >= TARGET_SPAN]
    j = max(long_enough) if long_enough else min(fits)  # the shortest run >= TARGET_SPAN, else the longest one
    return np.ascontiguousarray(np.broadcast_to(c.reshape(cd), [1] * j + list(out[j:])))


def broadcast_friendly(model: onnx.ModelProto) -> onnx.ModelProto:
    """See the module docstring; returns a new model (the input is not changed)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    shapes = _shapes(out)
    consts = _constants(out)
    producers = {o: n for n in g.node for o in n.output}
    names = {t.name for t in g.initializer} | set(producers) | {i.name for i in g.input}
    changed = False
    for node in g.node:
        if node.op_type not in ELEMENTWISE or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        result = shapes.get(node.output[0])
        for i in (0, 1):
            resolved = _resolve(node.input[i], producers, consts)
            other = shapes.get(node.input[1 - i])
            if resolved is None or result is None or other is None or node.input[1 - i] in consts:
                continue
            c, skipped_expand = resolved
            full = _materialised(c, other, result)
            if full is None:
                continue
            if not skipped_expand and list(full.shape) == [1] * (len(result) - c.ndim) + list(c.shape):
                continue  # already as long a run as it can get
            name = f"{node.input[i]}_bcast"
            while name in names:
                name += "_"
            names.add(name)
            g.initializer.append(numpy_helper.from_array(full, name))
            node.input[i] = name
            changed = True
    if changed:
        _drop_dead(out)
    return out


def _drop_dead(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nothing reads, then unread initializers."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
            for a in node.attribute:  # subgraphs (If / Loop) read outer names
                for sub in [a.g, *a.graphs]:
                    needed.update(i for n in sub.node for i in n.input)
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
