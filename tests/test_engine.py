"""evis build: the build plan per TensorRT version, optimisation profiles, engine metadata in the
schema runtime/trt_backend.py checks, and the whole build flow against a stand-in `tensorrt`
module that records the calls (TensorRT itself only where it imports: importorskip)."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from efficientvis.errors import UserError
from efficientvis.export import engine as E
from efficientvis.export import engine_plan as P
from efficientvis.runtime import manifest as manifest_lib
from efficientvis.runtime.trt_backend import check_engine_metadata, read_engine_metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

AXES = {"T": {"min": 1, "opt": 6, "max": 6}, "H": {"min": 32, "opt": 192, "max": 320},
        "W": {"min": 32, "opt": 341, "max": 320 + 160}}
for _s in (4, 8, 16, 32):
    for _side in "HW":
        AXES[f"{_side}{_s}"] = {"expr": f"ceil({_side}/{_s})", **{k: -(-AXES[_side][k] // _s) for k in ("min", "opt", "max")}}
C, N = 8, 3


def _stage_inputs(first):
    feats = [{"name": f"p{i}", "dtype": "float32", "shape": ["T", C, f"H{s}", f"W{s}"]}
             for i, s in zip(range(2, 6), (4, 8, 16, 32))]
    if first:
        return feats + [{"name": "init_queries", "dtype": "float32", "shape": [N, C]},
                        {"name": "image_size", "dtype": "float32", "shape": [2]},
                        {"name": "carried", "dtype": "float32", "shape": [N]},
                        {"name": "carried_boxes", "dtype": "float32", "shape": [N, 4]}]
    return feats + [{"name": "queries_in", "dtype": "float32", "shape": [N, "T", C]},
                    {"name": "proposals_in", "dtype": "float32", "shape": [N, "T", 4]}]


# ----------------------------------------------------------------------------------------------
# build plan per TensorRT version

def test_plan_tensorrt_10_3_weak_typing():
    fp16 = P.plan_build("10.3.0.26", "fp16")
    assert (fp16.strongly_typed, fp16.onnx_variant) == (False, "fp32")
    assert fp16.builder_flags == ["FP16", "PREFER_PRECISION_CONSTRAINTS"]
    assert fp16.fp32_op_types == ["RoiAlign", "GridSample"] and fp16.network_flags == []
    int8 = P.plan_build("10.3.0", "int8", has_qdq=True)
    assert (int8.strongly_typed, int8.onnx_variant) == (False, "qdq")
    assert int8.builder_flags[:2] == ["INT8", "FP16"]  # trtexec --int8 --fp16 on the Q/DQ model
    fp32 = P.plan_build("10.3", "fp32")
    assert (fp32.builder_flags, fp32.onnx_variant, fp32.strongly_typed) == ([], "fp32", False)
    strong = P.plan_build("10.3.0", "int8", typing="strong", has_qdq=True)
    assert strong.strongly_typed and strong.network_flags == ["STRONGLY_TYPED"] and strong.builder_flags == []


def test_plan_tensorrt_10_12_strong_by_default():
    fp16 = P.plan_build("10.12.0.36", "fp16", fp16_converter=True)
    assert fp16.strongly_typed and fp16.network_flags == ["STRONGLY_TYPED"]
    assert (fp16.builder_flags, fp16.onnx_variant) == ([], "fp16")
    int8 = P.plan_build("10.12.0", "int8", has_qdq=True)
    assert int8.strongly_typed and (int8.builder_flags, int8.onnx_variant) == ([], "qdq")
    # no converter: back to the (deprecated) FP16 flag, said in a note
    fallback = P.plan_build("10.12.0", "fp16", fp16_converter=False)
    assert not fallback.strongly_typed and fallback.builder_flags[0] == "FP16"
    assert any("onnxconverter-common" in n for n in fallback.notes)
    assert any("deprecated" in n for n in fallback.notes)
    weak = P.plan_build("10.13.0", "int8", typing="weak", has_qdq=True)
    assert not weak.strongly_typed and weak.builder_flags[:2] == ["INT8", "FP16"]


def test_plan_tensorrt_11_strong_only():
    fp16 = P.plan_build("11.1.0.5", "fp16")
    assert fp16.strongly_typed and fp16.network_flags == [] and fp16.builder_flags == []
    assert fp16.onnx_variant == "fp16"
    int8 = P.plan_build("11.0.0", "int8", has_qdq=True)
    assert (int8.builder_flags, int8.onnx_variant, int8.fp32_op_types) == ([], "qdq", [])
    with pytest.raises(UserError, match="onnxconverter-common"):
        P.plan_build("11.1.0", "fp16", fp16_converter=False)
    with pytest.raises(UserError, match="no weakly typed"):
        P.plan_build("11.1.0", "fp16", typing="weak")


def test_plan_refuses_old_tensorrt_and_bad_requests():
    with pytest.raises(UserError, match=r"TensorRT 8\.5\.3 is too old.*>= 8\.6"):
        P.plan_build("8.5.3.1", "fp16")
    eight_six = P.plan_build("8.6.1", "fp16")
    assert eight_six.network_flags == ["EXPLICIT_BATCH"] and eight_six.builder_flags[0] == "FP16"
    with pytest.raises(UserError, match="no strongly typed"):
        P.plan_build("8.6.1", "fp16", typing="strong")
    with pytest.raises(UserError, match="evis calibrate"):
        P.plan_build("10.3.0", "int8")
    with pytest.raises(UserError, match="--precision"):
        P.plan_build("10.3.0", "bf16")
    with pytest.raises(UserError, match="version"):
        P.plan_build("ten", "fp16")


# ----------------------------------------------------------------------------------------------
# profiles

def test_profiles_from_manifest_axes_and_overrides():
    shapes = P.clip_profile(AXES)
    assert shapes == {"min": (1, 32, 32), "opt": (6, 192, 341), "max": (6, 320, 480)}
    backbone = {"inputs": [{"name": "frames", "dtype": "uint8", "shape": ["T", 3, "H", "W"]}]}
    assert P.profile_shapes(backbone, shapes) == {"frames": ((1, 3, 32, 32), (6, 3, 192, 341), (6, 3, 320, 480))}
    stage0 = P.profile_shapes({"inputs": _stage_inputs(True)}, shapes)
    assert set(stage0) == {"p2", "p3", "p4", "p5"}  # init_queries, image_size, carried* are static
    assert stage0["p5"] == ((1, C, 1, 1), (6, C, 6, 11), (6, C, 10, 15))
    stage1 = P.profile_shapes({"inputs": _stage_inputs(False)}, shapes)
    assert stage1["queries_in"] == ((N, 1, C), (N, 6, C), (N, 6, C))
    # a Jetson profile for one camera size
    cam = P.clip_profile(AXES, "1x180x320", "6x180x320", "6x180x320")
    assert P.profile_shapes(backbone, cam)["frames"][0] == (1, 3, 180, 320)
    with pytest.raises(UserError, match="min 6 <= opt 2"):
        P.clip_profile(AXES, min_shape="6x64x64", opt_shape="2x64x64")
    with pytest.raises(UserError, match="outside what the graphs were exported for"):
        P.clip_profile(AXES, max_shape="6x640x640")
    with pytest.raises(UserError, match="TxHxW"):
        P.parse_shape("6x192")


# ----------------------------------------------------------------------------------------------
# metadata

def test_metadata_in_the_runtime_schema(tmp_path):
    plan = P.plan_build("10.3.0", "int8", has_qdq=True)
    profile = {"frames": ((1, 3, 32, 32), (6, 3, 192, 341), (6, 3, 320, 480))}
    meta = P.engine_metadata(plan, "backbone", "10.3.0.26", "Orin", (8, 7), profile, "ab" * 32,
                             "../qdq/backbone.onnx", 512, 12.3)
    assert meta["compute_capability"] == "8.7" and meta["precision"] == "int8"
    assert meta["profiles"] == [{"frames": [[1, 3, 32, 32], [6, 3, 192, 341], [6, 3, 320, 480]]}]
    engine = tmp_path / "backbone.engine"
    engine.write_bytes(b"plan")
    (tmp_path / "backbone.engine.json").write_text(json.dumps(meta))
    read = read_engine_metadata(str(engine))
    assert check_engine_metadata(read, "10.3.0.30", "Orin", "8.7")  # same major.minor.patch
    with pytest.raises(UserError, match="TensorRT 10.3.0.26"):
        check_engine_metadata(read, "10.4.0", "Orin", "8.7")
    with pytest.raises(UserError, match="built on Orin"):
        check_engine_metadata(read, "10.3.0", "NVIDIA A100", "8.0")


# ----------------------------------------------------------------------------------------------
# the build flow against a stand-in tensorrt module

def _tiny_onnx(path, inputs, outputs, roi=False):
    import onnx
    from onnx import TensorProto, helper

    def vi(spec):
        dtype = TensorProto.UINT8 if spec["dtype"] == "uint8" else TensorProto.FLOAT
        return helper.make_tensor_value_info(spec["name"], dtype, spec["shape"])

    nodes = []
    for k, out in enumerate(outputs):
        src = inputs[min(k, len(inputs) - 1)]["name"]
        if inputs[0]["dtype"] == "uint8":
            nodes.append(helper.make_node("Cast", [src], [out["name"]], to=TensorProto.FLOAT, name=f"cast_{k}"))
        else:
            nodes.append(helper.make_node("Identity", [src], [out["name"]], name=f"id_{k}"))
    inits = []
    if roi:  # a RoiAlign node, as in the real stage graphs (its output unused here)
        inits = [helper.make_tensor("rois", TensorProto.FLOAT, [1, 4], [0, 0, 4, 4]),
                 helper.make_tensor("batch", TensorProto.INT64, [1], [0])]
        nodes.append(helper.make_node("RoiAlign", ["p2", "rois", "batch"], ["roi_out"], name="node_roi_align",
                                      coordinate_transformation_mode="half_pixel", sampling_ratio=2))
    graph = helper.make_graph(nodes, "g", [vi(i) for i in inputs], [vi(o) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)


@pytest.fixture
def model_dir(tmp_path):
    pytest.importorskip("onnx")
    d = tmp_path / "model"
    d.mkdir()
    graphs = {}
    specs = {"backbone": ([{"name": "frames", "dtype": "uint8", "shape": ["T", 3, "H", "W"]}],
                          [{"name": "p2", "dtype": "float32", "shape": ["T", 3, "H", "W"]}]),
             "stage_0": (_stage_inputs(True), [{"name": "queries", "dtype": "float32", "shape": ["T", C, "H4", "W4"]}]),
             "stage_1": (_stage_inputs(False), [{"name": "queries", "dtype": "float32", "shape": ["T", C, "H4", "W4"]}])}
    mask_inputs = _stage_inputs(False)[:4] + [{"name": "attended", "dtype": "float32", "shape": [N, "T", C]},
                                              {"name": "proposals", "dtype": "float32", "shape": [N, "T", 4]}]
    for k in range(2):
        specs[f"mask_{k}"] = (mask_inputs, [{"name": "mask_probs", "dtype": "float32", "shape": ["T", C, "H4", "W4"]}])
    for name, (inputs, outputs) in specs.items():
        _tiny_onnx(str(d / f"{name}.onnx"), inputs, outputs, roi=name != "backbone")
        graphs[name] = {**manifest_lib.file_entry(str(d), f"{name}.onnx"), "inputs": inputs, "outputs": outputs}
    np.save(d / "initial_queries.npy", np.zeros((N, C), np.float32))
    manifest_lib.write(str(d), {
        "format": manifest_lib.FORMAT, "format_version": manifest_lib.FORMAT_VERSION, "T": 6, "N": N, "C": C, "M": 2, "K": 2,
        "class_names": ["a", "b"], "category_ids": [1, 2], "preprocessing": {"test_size": 192, "max_size": 480},
        "dynamic_axes": AXES, "stages": ["stage_0", "stage_1"], "graphs": graphs,
        "initial_queries": {**manifest_lib.file_entry(str(d), "initial_queries.npy"), "dtype": "float32", "shape": [N, C]}})
    return str(d)


class _Rec:
    """Stand-in TensorRT objects: every call is appended to `calls`."""

    def __init__(self, calls, name, **attrs):
        self._calls, self._name = calls, name
        self.__dict__.update(attrs)

    def __getattr__(self, attr):
        def call(*args, **kwargs):
            self._calls.append((f"{self._name}.{attr}", args))
            return _RESULTS.get(attr, lambda c: None)(self._calls)
        return call


_RESULTS = {}


def fake_tensorrt(version, layer_names=()):
    calls = []
    enum = lambda names: types.SimpleNamespace(**{n: i for i, n in enumerate(names)})  # noqa: E731
    layers = [types.SimpleNamespace(name=n, num_outputs=1, precision=None, types={}) for n in layer_names]
    for layer in layers:
        layer.set_output_type = lambda j, t, layer=layer: layer.types.__setitem__(j, t)
    network = _Rec(calls, "network", num_layers=len(layers), get_layer=lambda i: layers[i])
    parser = _Rec(calls, "parser", num_errors=0)
    config = _Rec(calls, "config")
    builder = _Rec(calls, "builder")
    _RESULTS.clear()
    _RESULTS.update(create_network=lambda c: network, create_builder_config=lambda c: config,
                    create_optimization_profile=lambda c: _Rec(c, "profile"),
                    build_serialized_network=lambda c: b"serialized-plan",
                    parse_from_file=lambda c: True, create_timing_cache=lambda c: "cache",
                    get_timing_cache=lambda c: types.SimpleNamespace(serialize=lambda: b"timing"))

    def init_plugins(logger, namespace):
        calls.append(("init_libnvinfer_plugins", (namespace,)))
        return True

    trt = types.SimpleNamespace(
        __version__=version, calls=calls, layers=layers, float32="float32",
        Logger=type("Logger", (), {"WARNING": 1, "VERBOSE": 0, "__init__": lambda self, level: None}),
        init_libnvinfer_plugins=init_plugins,
        Builder=lambda logger: (calls.append(("Builder", ())), builder)[1],
        OnnxParser=lambda net, logger: (calls.append(("OnnxParser", ())), parser)[1],
        NetworkDefinitionCreationFlag=enum(["EXPLICIT_BATCH", "STRONGLY_TYPED"]),
        BuilderFlag=enum(["FP16", "BF16", "INT8", "REFIT", "PREFER_PRECISION_CONSTRAINTS"]),
        MemoryPoolType=enum(["WORKSPACE"]))
    return trt


def test_build_flow_with_a_stand_in_tensorrt(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(E, "gpu_info", lambda: ("Orin", "8.7"))
    trt = fake_tensorrt("10.3.0.26", layer_names=["node_roi_align", "conv"])
    out = str(tmp_path / "engines")
    cache = str(tmp_path / "timing.cache")
    metas = E.build_engines(model_dir, out, precision="fp16", workspace_mb=256, timing_cache=cache,
                            opt_shape="4x192x320", trt=trt, log=lambda m: None)
    names = [c[0] for c in trt.calls]
    assert names[0] == "init_libnvinfer_plugins" and trt.calls[0][1] == ("",)
    # the documented order, once per graph
    order = ["Builder", "builder.create_network", "OnnxParser", "parser.parse_from_file",
             "builder.create_builder_config", "config.set_memory_pool_limit", "config.set_flag",
             "config.create_timing_cache", "config.set_timing_cache", "builder.create_optimization_profile",
             "profile.set_shape", "config.add_optimization_profile", "builder.build_serialized_network"]
    positions = [names.index(n) for n in order]
    assert positions == sorted(positions)
    assert names.count("builder.build_serialized_network") == 5  # backbone, 2 stages, 2 mask heads
    assert ("config.set_memory_pool_limit", (0, 256 << 20)) in trt.calls
    assert ("builder.create_network", (0,)) in trt.calls  # weak typing on 10.3
    # FP16 flag and FP32 RoiAlign layer on the weakly typed 10.3 build
    assert ("config.set_flag", (0,)) in trt.calls and trt.layers[0].precision == "float32"
    assert trt.layers[1].precision is None
    set_shapes = [c[1] for c in trt.calls if c[0] == "profile.set_shape"]
    assert ("frames", (1, 3, 32, 32), (4, 3, 192, 320), (6, 3, 320, 480)) in set_shapes
    # ENGINE_DIR as the runtime expects it
    for g in ("backbone", "stage_0", "stage_1", "mask_0", "mask_1"):
        assert open(os.path.join(out, f"{g}.engine"), "rb").read() == b"serialized-plan"
        meta = read_engine_metadata(os.path.join(out, f"{g}.engine"))
        assert check_engine_metadata(meta, "10.3.0", "Orin", "8.7")
        assert meta["onnx_sha256"] == manifest_lib.sha256_of(os.path.join(model_dir, f"{g}.onnx"))
        assert meta == metas[g]
    assert manifest_lib.load(out, verify=False).num_stages == 2
    assert os.path.isfile(os.path.join(out, "initial_queries.npy"))
    assert open(cache, "rb").read() == b"timing"


def test_build_flow_tensorrt_11_int8_needs_qdq(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(E, "gpu_info", lambda: ("RTX", "8.9"))
    trt = fake_tensorrt("11.1.0")
    with pytest.raises(UserError, match="evis calibrate"):
        E.build_engines(model_dir, str(tmp_path / "e"), precision="int8", trt=trt, log=lambda m: None)
    trt = fake_tensorrt("11.1.0")
    E.build_engines(model_dir, str(tmp_path / "e"), precision="fp32", trt=trt, log=lambda m: None)
    assert ("builder.create_network", (0,)) in trt.calls  # 11: no flag, strongly typed anyway
    assert not any(c[0] == "config.set_flag" for c in trt.calls)


def test_build_without_tensorrt_says_why(model_dir, tmp_path):
    if E.import_tensorrt()[0] is not None:
        pytest.skip("tensorrt is installed here")
    env = {**os.environ, "PYTHONPATH": REPO}
    cmd = [sys.executable, "-c", "import sys; from efficientvis.cli import main; sys.exit(main())", "build",
           model_dir, "--out", str(tmp_path / "e")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "engines not built: the tensorrt Python package is not installed" in r.stderr
    r = subprocess.run(cmd + ["--skip-if-unavailable"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "engines NOT built" in r.stderr and not os.path.exists(tmp_path / "e")


def test_fp16_onnx_conversion_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxconverter_common")
    ort = pytest.importorskip("onnxruntime")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Cast", ["frames"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("Softmax", ["y"], ["p"], axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("frames", TensorProto.UINT8, ["T", 3, "H", "W"])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["T", 4, "H", "W"])], [w])
    src, dst = str(tmp_path / "m.onnx"), str(tmp_path / "fp16" / "m.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    E.convert_fp16(src, dst)
    converted = onnx.load(dst)
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(t.data_type == TensorProto.FLOAT16 for t in converted.graph.initializer)
    frames = rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
    run = lambda p: ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, {"frames": frames})[0]  # noqa: E731
    assert np.abs(run(src) - run(dst)).max() < 2e-2


def test_real_tensorrt_plan_for_this_version():
    trt = pytest.importorskip("tensorrt")
    plan = P.plan_build(trt.__version__, "fp16", fp16_converter=E.have_fp16_converter())
    for name in plan.network_flags:
        assert hasattr(trt.NetworkDefinitionCreationFlag, name)
    for name in plan.builder_flags:
        assert hasattr(trt.BuilderFlag, name)
