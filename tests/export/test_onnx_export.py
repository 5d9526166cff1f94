"""ONNX export of the visual front end (issue 6): every fuser, the three MSDeformAttn modes, two batch sizes,
onnx.checker + strict shape inference, onnxruntime / onnx.reference against PyTorch eager, the custom node's
contract on the graph, the encoder in front, and the TensorRT paths that need no TensorRT."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from layerfuse.export.engine import (
    BatchProfile,
    TensorRTUnavailable,
    _check_build_args,
    build_engine,
    import_tensorrt,
)
from layerfuse.export.msda_numpy import ms_deform_attn_numpy
from layerfuse.export.msda_onnx import EXPORT_IMPL, gather_function, msda_nodes
from layerfuse.export.onnx import (
    FrontEnd,
    OnnxExportError,
    check_onnx,
    export_onnx,
    metadata,
)
from layerfuse.export.verify import (
    OnnxMismatchError,
    cuda_unavailable_reason,
    run_onnx,
    verify_onnx,
)
from layerfuse.fusion import LLMSpec, VisionSpec, build_fuser
from layerfuse.fusion.msda import IMPLS, MSDeformAttn, ms_deform_attn_grid_sample
from layerfuse.plugins_trt.info import (
    ONNX_DOMAIN,
    ONNX_DOMAIN_VERSION,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
)

from tests.support import REPO

VISION = VisionSpec(num_layers=24, hidden_size=32, grid=(4, 4), has_cls=True, text_dim=16)  # T = 17 tokens
LLM = LLMSpec(hidden_size=48, num_layers=4, num_heads=4)
OPTIONS = {
    "single": {},
    "concat": {"layers": "3-18-23"},
    "sti": {"layers": "8-16", "pool": 2},
    "mmfuser": {"heads": 4, "points": 2},  # head dim 8, 4 levels of 4x4
    "igva": {"allocator_dim": 32, "allocator_blocks": 2},
    "inject": {"layers": "3-18-23"},
    "xattn": {"layers": "3-18-23"},
    "tgif": {"router_dim": 16},  # text = the prompt's mean LLM token embedding [B, d]
    "tgif-sentence": {"router": "sentence", "router_dim": 16},  # text = the sentence embedding [B, d_s]
    "tokenpacker": {"heads": 4},  # 4 tokens out of 16
    "deepstack": {},  # 8, 15, 22 into LLM layers 1, 2, 3
}
FUSER_OF = {"tgif-sentence": "tgif"}  # cases that are another fuser with other options
WEIGHTED = ("igva", "tgif", "tgif-sentence")  # text in, per-sample weights out
FUSERS = list(OPTIONS)
BATCHES = (1, 3)
TRT_REASON = "TensorRT is not installable on this machine (PyPI has only stubs)"


def make_fuser(name: str, vision: VisionSpec = VISION, seed: int = 0):
    """A fuser with every parameter moved off its init (MMFuser's LayerScale 0 would hide the deformable attention,
    zero offset weights would hide the sampling), so a wrong graph cannot pass."""
    torch.manual_seed(seed)
    fuser = build_fuser(FUSER_OF.get(name, name), vision, LLM, **OPTIONS[name])
    with torch.no_grad():
        for p in fuser.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return fuser.eval()


@pytest.fixture(scope="module")
def fusers():
    return {name: make_fuser(name) for name in FUSERS}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, fusers):
    """(fuser, mode) -> exported file, exported once per module."""
    root = tmp_path_factory.mktemp("onnx")
    done: dict[tuple[str, str], Path] = {}

    def get(name: str, mode: str = "gather") -> Path:
        if (name, mode) not in done:
            done[(name, mode)] = export_onnx(fusers[name], root / f"{name}-{mode}.onnx", msda=mode)
        return done[(name, mode)]

    return get


def ops(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(n.domain, n.op_type) for n in model.graph.node]


def value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    g = inferred.graph
    types_ = {v.name: v.type for v in [*g.value_info, *g.input, *g.output]}
    for t in g.initializer:
        types_[t.name] = onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims))
    return types_


def dims(t: onnx.TypeProto) -> list:
    return [d.dim_param or d.dim_value for d in t.tensor_type.shape.dim]


# -- every fuser, default mode ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FUSERS)
def test_every_fuser_exports_and_matches_eager(name, fusers, exported):
    fuser = fusers[name]
    path = exported(name)
    check_onnx(path)  # full_check + strict shape inference (export_onnx ran it too; explicit here)
    model = onnx.load(str(path))
    # names: inputs, and the outputs each fuser family has
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    assert inputs == (["layers", "text"] if name in WEIGHTED else ["layers"])
    if name in WEIGHTED:
        assert outputs == ["tokens", "weights"]
        assert dims(model.graph.input[1].type)[1:] == [fuser.text_dim] == [LLM.hidden_size if name == "tgif" else VISION.text_dim]
    elif name in ("inject", "xattn", "deepstack"):
        assert outputs == ["tokens"] + [f"internal_{k}_llm_layer_{m}" for k, m in enumerate(fuser.llm_layer_of)]
        # 3-18-23 on a 4-layer LLM: three per-layer projectors; deepstack: 8, 15, 22 into the first layers after layer 0
        assert fuser.llm_layer_of == ([1, 2, 3] if name == "deepstack" else [0, 2, 2])
    else:
        assert outputs == ["tokens"]
    # dynamic batch: a symbolic leading dim on every input and output, everything else static
    for v in [*model.graph.input, *model.graph.output]:
        d = dims(v.type)
        assert isinstance(d[0], str) and all(isinstance(x, int) and x > 0 for x in d[1:]), (v.name, d)
    assert dims(model.graph.input[0].type)[1:] == [len(fuser.required_layers), VISION.num_tokens, VISION.hidden_size]
    assert dims(model.graph.output[0].type)[1:] == [fuser.num_visual_tokens, LLM.hidden_size]
    # plain ONNX: no custom domain, no GridSample
    assert {d for d, _ in ops(model)} <= {"", "ai.onnx"} and ("", "GridSample") not in ops(model)
    assert not model.functions and {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    # values at two batch sizes
    report = verify_onnx(path, fuser, batch_sizes=BATCHES)
    assert report.ok, report.summary()
    assert {(c.runtime, c.batch) for c in report.checks} == {("onnxruntime-cpu", b) for b in BATCHES}
    assert len(report.checks) == len(BATCHES) * len(outputs)


def test_export_metadata_and_restores_the_fuser(fusers, exported):
    fuser = fusers["mmfuser"]
    fuser.train()
    impls = [m.impl for m in fuser.modules() if isinstance(m, MSDeformAttn)]
    try:
        path = export_onnx(fuser, Path(exported("single")).parent / "restore.onnx", msda="custom")
        assert fuser.training and [m.impl for m in fuser.modules() if isinstance(m, MSDeformAttn)] == impls
        assert EXPORT_IMPL not in IMPLS
    finally:
        fuser.eval()
    meta = metadata(path)
    assert meta["layerfuse.fuser"] == "mmfuser" and meta["layerfuse.msda"] == "custom"
    assert meta["layerfuse.msda_nodes"] == "2" and meta["layerfuse.required_layers"] == "3,8,13,18,23"


# -- MSDeformAttn modes -------------------------------------------------------------------------------------------


def test_gather_mode_is_plain_onnx_for_mmfuser(exported):
    model = onnx.load(str(exported("mmfuser", "gather")))
    op_types = {t for _, t in ops(model)}
    assert "GridSample" not in op_types and "Gather" in op_types and "Floor" in op_types
    assert not msda_nodes(model) and not model.functions
    assert metadata(exported("mmfuser", "gather"))["layerfuse.msda_nodes"] == "0"


def test_custom_node_contract(exported):
    model = onnx.load(str(exported("mmfuser", "custom")))
    nodes = msda_nodes(model)
    assert len(nodes) == 2  # MMFuser's deformable cross- and self-attention: one node per core call
    assert ("", "GridSample") not in ops(model) and not model.functions
    assert {(o.domain, o.version) for o in model.opset_import} >= {(ONNX_DOMAIN, ONNX_DOMAIN_VERSION)}
    vt = value_types(model)
    heads, head_dim = 4, VISION.hidden_size // 4
    for node, levels in zip(nodes, (4, 1)):  # cross: 4 levels of 4x4; self: 1 level
        assert node.op_type == PLUGIN_NAME and node.domain == ONNX_DOMAIN
        attrs = {a.name: onnx.helper.get_attribute_value(a).decode() for a in node.attribute}
        assert attrs == {"plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE}
        assert len(node.input) == 5 and len(node.output) == 1
        value, shapes, starts, loc, attn = (vt[i] for i in node.input)
        assert shapes.tensor_type.elem_type == onnx.TensorProto.INT32 and dims(shapes) == [levels, 2]
        assert starts.tensor_type.elem_type == onnx.TensorProto.INT32 and dims(starts) == [levels]
        assert value.tensor_type.elem_type == loc.tensor_type.elem_type == attn.tensor_type.elem_type == onnx.TensorProto.FLOAT
        b = dims(value)[0]
        assert isinstance(b, str)  # dynamic batch
        assert dims(value) == [b, levels * VISION.num_patches, heads, head_dim]
        assert dims(loc) == [b, VISION.num_patches, heads, levels, 2, 2]
        assert dims(attn) == [b, VISION.num_patches, heads, levels, 2]
        assert dims(vt[node.output[0]]) == [b, VISION.num_patches, heads * head_dim]  # 3-D output
    # value_proj, offsets, softmax and output_proj stay ordinary ops around the node
    assert sum(t == "Softmax" for _, t in ops(model)) == 2 and sum(t == "MatMul" for _, t in ops(model)) >= 8


def test_custom_runs_in_the_reference_evaluator_and_needs_the_plugin_elsewhere(fusers, exported):
    path = exported("mmfuser", "custom")
    report = verify_onnx(path, fusers["mmfuser"], batch_sizes=BATCHES)
    assert report.ok, report.summary()
    assert {c.runtime for c in report.checks} == {"reference"}
    with pytest.raises(Exception, match=PLUGIN_NAME):
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_hybrid_carries_the_gather_function_and_runs_in_onnxruntime(fusers, exported):
    path = exported("mmfuser", "hybrid")
    model = onnx.load(str(path))
    assert len(msda_nodes(model)) == 2
    assert [(f.domain, f.name) for f in model.functions] == [(ONNX_DOMAIN, PLUGIN_NAME)]
    body = {n.op_type for n in model.functions[0].node}
    assert "GridSample" not in body and "Gather" in body
    assert list(model.functions[0].attribute) == ["plugin_version", "plugin_namespace"]
    report = verify_onnx(path, fusers["mmfuser"], batch_sizes=BATCHES, runtimes=["onnxruntime-cpu", "reference"])
    assert report.ok, report.summary()
    assert {c.runtime for c in report.checks} == {"onnxruntime-cpu", "reference"}


def test_hybrid_on_onnxruntime_cuda(fusers, exported):
    if why := cuda_unavailable_reason():
        report = verify_onnx(exported("mmfuser", "hybrid"), fusers["mmfuser"], runtimes=["onnxruntime-cuda"])
        assert report.skipped == {"onnxruntime-cuda": why} and not report.ok
        pytest.skip(f"onnxruntime CUDA EP: {why}")
    report = verify_onnx(exported("mmfuser", "hybrid"), fusers["mmfuser"], batch_sizes=BATCHES, runtimes=["onnxruntime-cuda"])
    assert report.ok, report.summary()


def test_modes_are_the_same_graph_without_msdeformattn(fusers, exported, tmp_path):
    gather = onnx.load(str(exported("single")))
    custom = onnx.load(str(export_onnx(fusers["single"], tmp_path / "single-custom.onnx", msda="custom")))
    assert ops(gather) == ops(custom) and not custom.functions
    assert {o.domain for o in custom.opset_import} <= {"", "ai.onnx"}


def test_verify_catches_a_wrong_model(fusers, exported):
    """The comparison can fail: the same graph against a fuser whose deformable attention differs slightly."""
    other = make_fuser("mmfuser")
    with torch.no_grad():
        other.block.cross.sampling_offsets.bias.add_(0.05)
    report = verify_onnx(exported("mmfuser", "hybrid"), other, batch_sizes=(2,))
    assert not report.ok
    with pytest.raises(OnnxMismatchError, match="FAIL"):
        report.raise_on_failure()
    with pytest.raises(OnnxExportError, match="inputs"):
        verify_onnx(exported("mmfuser"), fusers["igva"])  # igva takes text too


# -- the op's ONNX forms against the grid_sample reference -----------------------------------------------------------


def msda_case(levels, b, q, heads=3, head_dim=5, points=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels)
    sizes = shapes.prod(1)
    starts = torch.cumsum(sizes, 0) - sizes
    value = torch.randn(b, int(sizes.sum()), heads, head_dim, generator=g, dtype=torch.float64)
    loc = torch.rand(b, q, heads, len(levels), points, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    loc[0, 0, 0, 0, 0] = torch.tensor([1e9, -1e9], dtype=torch.float64)  # far outside: zero, and no overflow
    attn = torch.rand(b, q, heads, len(levels), points, generator=g, dtype=torch.float64).softmax(-1)
    return value, shapes, starts, loc, attn


CASES = [([(4, 6), (2, 3), (1, 1), (3, 1)], 2, 7), ([(5, 5)], 1, 3), ([(6, 6), (3, 3)], 3, 36)]


@pytest.mark.parametrize("levels, b, q", CASES)
def test_numpy_op_matches_grid_sample(levels, b, q):
    value, shapes, starts, loc, attn = msda_case(levels, b, q)
    ref = ms_deform_attn_grid_sample(value, shapes, starts, loc, attn).numpy()
    out = ms_deform_attn_numpy(value.numpy(), shapes.numpy(), starts.numpy(), loc.numpy(), attn.numpy())
    np.testing.assert_allclose(out, ref, atol=1e-12, rtol=0)


def test_gather_function_matches_grid_sample_on_multiscale_shapes():
    """The local function alone, in onnxruntime, on Deformable-DETR-like unequal levels (the fusers only use equal ones)."""
    f, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
    node = onnx.helper.make_node(PLUGIN_NAME, ["v", "s", "l", "loc", "a"], ["y"], domain=ONNX_DOMAIN,
                                 plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE)
    vi = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [node], "msda",
        [vi("v", f, ["B", "S", 3, 5]), vi("s", i32, ["L", 2]), vi("l", i32, ["L"]),
         vi("loc", f, ["B", "Q", 3, "L", 2, 2]), vi("a", f, ["B", "Q", 3, "L", 2])],
        [vi("y", f, ["B", "Q", 15])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid(ONNX_DOMAIN, 1)],
                                   functions=[gather_function()])
    onnx.checker.check_model(model, full_check=True)
    for levels, b, q in CASES:
        value, shapes, starts, loc, attn = msda_case(levels, b, q)
        ref = ms_deform_attn_grid_sample(value, shapes, starts, loc, attn).numpy()
        feeds = {"v": value.float().numpy(), "s": shapes.int().numpy(), "l": starts.int().numpy(),
                 "loc": loc.float().numpy(), "a": attn.float().numpy()}
        np.testing.assert_allclose(run_onnx(model, feeds, "onnxruntime-cpu")[0], ref, atol=1e-5, rtol=0)


# -- the encoder in front ----------------------------------------------------------------------------------------


def test_with_encoder_pixel_values_and_text(vision_dir, tmp_path):
    from layerfuse.pipeline.models.encoder import load_vision_encoder

    encoder = load_vision_encoder(str(vision_dir))
    info = encoder.info
    vision = VisionSpec(info.num_layers, info.hidden_size, info.grid, info.has_cls, text_dim=16)
    fuser = make_fuser("igva", vision)
    path = export_onnx(fuser, tmp_path / "igva-encoder.onnx", encoder=encoder)
    model = onnx.load(str(path), load_external_data=False)
    size = encoder.model.config.image_size
    assert [(i.name, dims(i.type)[1:]) for i in model.graph.input] == [("pixel_values", [3, size, size]), ("text", [16])]
    assert [o.name for o in model.graph.output] == ["tokens", "weights"]
    assert metadata(path)["layerfuse.with_encoder"] == "true"
    report = verify_onnx(path, fuser, encoder=encoder, batch_sizes=BATCHES)
    assert report.ok, report.summary()
    # a fuser built for other features is refused, naming both
    with pytest.raises(OnnxExportError, match="built for"):
        FrontEnd(make_fuser("single"), encoder)


def test_grid_sample_mode_is_plain_onnx_with_one_gridsample_per_level(fusers, exported):
    """--msda grid_sample: no custom node or domain, a standard GridSample per level and MSDeformAttn call, the same
    outputs as eager at several batch sizes (batch stays dynamic), and the modules' own impl restored afterwards."""
    fuser = fusers["mmfuser"]
    modules = [m for m in fuser.modules() if isinstance(m, MSDeformAttn)]
    own = [m.impl for m in modules]
    path = exported("mmfuser", "grid_sample")
    model = onnx.load(str(path))
    assert not msda_nodes(model) and not model.functions and {d for d, _ in ops(model)} <= {"", "ai.onnx"}
    assert sum(t == "GridSample" for _, t in ops(model)) == sum(m.n_levels for m in modules) > 0
    assert metadata(path)["layerfuse.msda"] == "grid_sample" and metadata(path)["layerfuse.msda_nodes"] == "0"
    # onnxruntime only: onnx.reference's GridSample knows opset 20's mode names ("linear"), not opset 16-19's "bilinear"
    report = verify_onnx(path, fuser, batch_sizes=(*BATCHES, 5), runtimes=["onnxruntime-cpu"])
    assert report.ok, report.summary()
    assert [m.impl for m in modules] == own


# -- refusals ------------------------------------------------------------------------------------------------------


def test_export_refuses_bad_arguments(fusers, tmp_path):
    with pytest.raises(OnnxExportError, match="gather, custom, hybrid, grid_sample"):
        export_onnx(fusers["single"], tmp_path / "x.onnx", msda="bilinear")
    with pytest.raises(OnnxExportError, match="opset"):
        export_onnx(fusers["single"], tmp_path / "x.onnx", opset=16)
    half = make_fuser("single").half()
    with pytest.raises(OnnxExportError, match="fp32"):
        export_onnx(half, tmp_path / "x.onnx")


# -- TensorRT: what can be checked without it -------------------------------------------------------------------------


def test_engine_refuses_bad_arguments_before_touching_tensorrt(exported, tmp_path):
    gather, custom = Path(exported("mmfuser")), Path(exported("mmfuser", "custom"))
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        build_engine(gather, tmp_path / "x.plan", precision="int8")
    with pytest.raises(FileNotFoundError, match="export one first"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "x.plan")
    with pytest.raises(FileNotFoundError, match="make kernel"):
        build_engine(gather, tmp_path / "x.plan", plugin_library=tmp_path / "libmissing.so")
    with pytest.raises(ValueError, match="plugin_library"):
        build_engine(custom, tmp_path / "x.plan")  # custom nodes have no fallback body
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BatchProfile(min=4, opt=2, max=8)
    _check_build_args(Path(exported("mmfuser", "hybrid")), "fp16", None)  # hybrid without the plugin is fine


def test_missing_tensorrt_says_how_to_install(monkeypatch, exported, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails like an absent package
    with pytest.raises(TensorRTUnavailable, match="pip install"):
        import_tensorrt()
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        build_engine(exported("mmfuser"), tmp_path / "x.plan")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # PyPI's stub: no runtime inside
    with pytest.raises(TensorRTUnavailable, match="stub"):
        import_tensorrt()


def _tensorrt_usable() -> bool:
    try:
        import_tensorrt()
    except TensorRTUnavailable:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _tensorrt_usable(), reason=TRT_REASON)
def test_engine_build_run_and_compare(fusers, exported, tmp_path):  # pragma: no cover - needs TensorRT and a GPU
    from layerfuse.export.engine import bench_engine, compare_engine

    info = build_engine(exported("mmfuser", "hybrid"), tmp_path / "mmfuser.plan", precision="fp32", batch=BatchProfile(1, 2, 4))
    assert Path(info.plan).exists() and Path(info.plan + ".json").exists()
    report = compare_engine(info.plan, fusers["mmfuser"], onnx_path=exported("mmfuser", "hybrid"), batch_sizes=BATCHES)
    assert report.ok, report.summary()
    rows = bench_engine(info.plan, fusers["mmfuser"], batch_sizes=(1, 4), repeats=3, warmup=1)
    assert [r.batch for r in rows] == [1, 4] and all(r.tensorrt_ms > 0 for r in rows)


# -- the benchmark script ----------------------------------------------------------------------------------------------


def test_benchmark_script_writes_its_section(tmp_path):
    """bench/export.py --quick runs end to end and replaces only its own section."""
    out = tmp_path / "BENCH.md"
    out.write_text("# layerfuse benchmarks\n\n## Other (`x`)\n\nkeep me\n")
    script = REPO / "bench" / "export.py"
    for _ in range(2):
        subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], check=True, capture_output=True, timeout=300)
    text = out.read_text()
    assert "keep me" in text and text.count("## ONNX export (bench/export.py)") == 1
    assert "| mmfuser |" in text and "| single |" in text
