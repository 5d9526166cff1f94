"""`layerfuse.export.graph_opt`: same values, constants materialised only where they broadcast on inner axes, an
Expand folded into the constant only when broadcasting makes it redundant; `ort_session` runs a file."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from layerfuse.export.graph_opt import broadcast_friendly
from layerfuse.export.onnx import ort_session


def _model(nodes, inits, x_shape=("B", 3, 4, 2), out_shape=("B", 3, 4, 2)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _inits(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in model.graph.initializer}


def test_inner_broadcast_constant_is_materialised_with_the_same_values():
    c = numpy_helper.from_array(np.array([[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]], np.float32).reshape(1, 3, 1, 2), "c")
    lead = numpy_helper.from_array(np.full((1, 1, 1, 1), 2.0, np.float32), "s")
    model = _model([helper.make_node("Div", ["x", "c"], ["t"]), helper.make_node("Mul", ["t", "s"], ["y"])], [c, lead])
    x = np.random.default_rng(0).standard_normal((5, 3, 4, 2)).astype(np.float32)
    out = broadcast_friendly(model)
    onnx.checker.check_model(out, full_check=True)
    assert _inits(out) == {"s": [1, 1, 1, 1], "c_bcast": [1, 3, 4, 2]}  # the scalar-like one stays as it was
    np.testing.assert_array_equal(_run(out, x), _run(model, x))


def test_expand_chain_folds_only_when_redundant():
    c = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "c")
    shape = numpy_helper.from_array(np.array([1, 3, 4, 2], np.int64), "shape")
    axes = numpy_helper.from_array(np.array([0, 2], np.int64), "axes")
    nodes = [helper.make_node("Unsqueeze", ["c", "axes"], ["u"]), helper.make_node("Expand", ["u", "shape"], ["e"]),
             helper.make_node("Add", ["x", "e"], ["y"])]
    model = _model(nodes, [c, shape, axes])
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 2)).astype(np.float32)
    out = broadcast_friendly(model)
    assert [n.op_type for n in out.graph.node] == ["Add"] and _inits(out) == {"e_bcast": [1, 3, 4, 2]}
    np.testing.assert_array_equal(_run(out, x), _run(model, x))
    # an Expand that widens the result (x's axis 2 is 1) is needed: nothing changes
    widened = _model(nodes, [c, shape, axes], x_shape=("B", 3, 1, 2))
    assert [n.op_type for n in broadcast_friendly(widened).graph.node] == ["Unsqueeze", "Expand", "Add"]


def test_ort_session_runs_a_file(tmp_path):
    lead = numpy_helper.from_array(np.full((1, 1, 1, 1), 2.0, np.float32), "s")
    path = tmp_path / "m.onnx"
    onnx.save(_model([helper.make_node("Mul", ["x", "s"], ["y"])], [lead]), str(path))
    x = np.ones((2, 3, 4, 2), np.float32)
    np.testing.assert_array_equal(ort_session(path, threads=1).run(None, {"x": x})[0], 2 * x)
