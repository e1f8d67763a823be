"""evis export / evis check on a tiny model: ONNX Runtime vs PyTorch per graph at several clip lengths
and frame sizes (one export), both RoIAlign forms, fused graph, manifest and TensorRT-readiness check.

Two exports (RoiAlign form with --fused, GridSample form) are made once per module; everything else
runs them. Errors are max abs errors in float32; proposals are pixel coordinates (hundreds of pixels
with random weights), so their bound scales with their magnitude (float32 spacing at 512 is 6e-5).
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from efficientvis.cli import main as evis  # noqa: E402
from efficientvis.errors import UserError  # noqa: E402
from efficientvis.export import export as E  # noqa: E402
from efficientvis.export import graphs as G  # noqa: E402
from efficientvis.runtime import manifest as manifest_lib  # noqa: E402
from efficientvis.export import trt_check  # noqa: E402
from efficientvis.training import checkpoint  # noqa: E402
from efficientvis.training.config import Config, ModelConfig  # noqa: E402
from efficientvis.training.infer import load_model  # noqa: E402
from efficientvis.training.model import build_model  # noqa: E402
from efficientvis.ytvis.synth import iter_video_frames  # noqa: E402

TINY = dict(backbone="resnet18", backbone_width=8, norm="bn", freeze_at=0, hidden_dim=32, num_queries=4,
            num_iterations=2, clip_length=4, num_classes=3, num_heads=4, ffn_dim=64, dynamic_dim=8)
CLASSES = ["disc", "square", "triangle"]
# Trained with T=4, run with up to 6 (infer.clip_length: no weight depends on T): the graphs take
# T = 1..6. (T, H, W) at run time; traced at T=6, 96x171. T=1 is the first/last-frame-only case of Eq. 3.
MAX_CLIP = 6
SHAPES = [(6, 96, 160), (2, 64, 128), (1, 83, 115)]
ATOL = 1e-4
DATA_DEPENDENT = {"NonZero", "Compress", "Unique", "NonMaxSuppression", "TopK", "Loop", "If", "Scan"}


def tolerance(name, ref, atol=ATOL, rel=2e-6):
    """ATOL; for proposals (pixels) also `rel` of their magnitude: their error is the float32
    rounding of the box deltas times box sizes of hundreds of pixels (~1e-6 relative; the fused
    graph also carries its own backbone's rounding into the boxes)."""
    return max(atol, rel * float(np.abs(ref).max())) if name == "proposals" else atol


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    cfg = Config()
    cfg.name = "tiny-test"
    cfg.model = dataclasses.replace(ModelConfig(), **TINY)
    cfg.data.test_size, cfg.data.max_size = 96, 192
    cfg.infer.clip_length = MAX_CLIP
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # varied learned proposals: boxes land on different FPN levels
        model.init_boxes.weight[:, :2].uniform_(0.25, 0.75)
        model.init_boxes.weight[:, 2:].uniform_(0.1, 0.9)
        for m in model.modules():  # non-trivial BatchNorm statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    checkpoint.save(path, model=model.state_dict(), config=cfg.to_dict(), class_names=CLASSES)
    return path


@pytest.fixture(scope="module")
def model(checkpoint_path):
    return load_model(checkpoint_path, "cpu")[0]


@pytest.fixture(scope="module")
def exported(checkpoint_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("model_roialign"))
    lines = []
    data = E.export_model(checkpoint_path, out, fused=True, log=lines.append)
    return out, data


@pytest.fixture(scope="module")
def exported_gs(model, tmp_path_factory):
    """The GridSample form of stage_0 and mask_0 only, through the exporter's own per-graph function
    (a whole `--roi-align gridsample` export differs only in the stage and mask graphs, and each
    export costs ~20 s per graph on a busy 2-core machine); saved in MODEL_DIR with a manifest."""
    return _stage_and_mask_export(model, "gridsample", tmp_path_factory)


@pytest.fixture(scope="module")
def exported_grouped(model, tmp_path_factory):
    """The grouped RoIAlign form (ONNX Runtime only) of stage_0 and mask_0, as exported_gs."""
    return _stage_and_mask_export(model, "grouped", tmp_path_factory)


def _stage_and_mask_export(model, form, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(f"model_{form}"))
    cfg = model.cfg
    axes = E.axis_ranges(MAX_CLIP, 96, 192)
    graphs = {}
    for name in ("stage_0", "mask_0"):
        spec = E.graph_spec(name, cfg.num_queries, cfg.hidden_dim, cfg.num_classes, 28)
        proto = E.export_graph(model, name, form, 17, axes, MAX_CLIP, spec, torch)
        graphs[name] = {**E.save_graph(proto, out, f"{name}.onnx"), "inputs": spec[0], "outputs": spec[1]}
    data = {"format": manifest_lib.FORMAT, "format_version": manifest_lib.FORMAT_VERSION, "roi_align": form,
            "T": MAX_CLIP, "N": cfg.num_queries, "C": cfg.hidden_dim, "M": 1, "K": cfg.num_classes,
            "class_names": [f"c{k}" for k in range(cfg.num_classes)],
            "category_ids": list(range(1, cfg.num_classes + 1)),
            "preprocessing": {"test_size": 96, "max_size": 192},
            "graphs": graphs}
    manifest_lib.write(out, data)
    return out, data


def synthetic_frames(T, H, W, seed=0):
    """(T, 3, H, W) uint8 RGB frames of a synthetic video."""
    frames = [f.image[:, :, ::-1].transpose(2, 0, 1) for f in
              iter_video_frames(frames=T, height=H, width=W, seed=seed, long_term=False, video_index=seed)]
    return np.ascontiguousarray(np.stack(frames))


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_graph(model_dir, name, feeds):
    s = session(os.path.join(model_dir, f"{name}.onnx"))
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


# ------------------------------------------------------------------------------------------------
# ONNX Runtime vs PyTorch
# ------------------------------------------------------------------------------------------------

def _carried(H, W):
    """stage_0's carried proposals: slot 0 starts from a box of its own, slot 1 from one clipped to
    the image, slot 2 from the learned box (its carried box has no pixel inside), slot 3 from the
    learned box (not carried)."""
    boxes = np.array([[0.1, 0.2, 0.5, 0.9], [0.4, -0.1, 1.3, 0.6], [1.1, 0.1, 1.5, 0.6], [0, 0, 1, 1]]) * [W, H, W, H]
    return np.array([True, True, True, False]), boxes.astype(np.float32)


@pytest.mark.parametrize("form", ["roialign", "gridsample", "grouped"])
@pytest.mark.parametrize("T,H,W", SHAPES)
def test_every_graph_matches_pytorch(form, T, H, W, model, exported, exported_gs, exported_grouped, request):
    model_dir = {"roialign": exported, "gridsample": exported_gs, "grouped": exported_grouped}[form][0]
    frames = synthetic_frames(T, H, W, seed=T)
    q0 = model.init_queries.weight.detach().numpy() + 0.1  # not q*: any clip's start queries
    ref, feeds = E.torch_reference(model, frames, E.clip_start(q0, frames, _carried(H, W)), form)
    names = G.split_names(2) + ["model"] if form == "roialign" else ["stage_0", "mask_0"]
    errors = {}
    for name in names:
        got = run_graph(model_dir, name, feeds[name])
        assert set(got) == set(ref[name])
        for out, value in got.items():
            assert value.shape == ref[name][out].shape, (name, out)
            assert value.dtype == np.float32
            err = float(np.abs(value - ref[name][out]).max())
            errors[f"{name}.{out}"] = err
            assert err <= tolerance(out, ref[name][out], rel=5e-6 if name == "model" else 2e-6), \
                (name, out, err)
    assert ref["mask_0"]["mask_probs"].shape == (4, T, 28, 28)
    assert ref["stage_0"]["next_queries"].shape == (4, 32)
    print(f"\n{form} T={T} {H}x{W}: " + json.dumps({k: f"{v:.1e}" for k, v in errors.items()}))


def test_gridsample_form_close_to_roialign_kernel(model, exported_gs):
    """The GridSample graphs against the RoiAlign-form PyTorch model (different float32 rounding)."""
    T, H, W = 2, 96, 160
    frames = synthetic_frames(T, H, W)
    ref, feeds = E.torch_reference(model, frames, E.clip_start(model.init_queries.weight.detach().numpy(), frames),
                                   "roialign")
    for name in ("stage_0", "mask_0"):
        got = run_graph(exported_gs[0], name, feeds[name])
        for out in set(got) - {"proposals"}:
            assert np.abs(got[out] - ref[name][out]).max() <= 1e-3, (name, out)


def test_fused_graph_equals_stages_in_sequence(exported):
    model_dir = exported[0]
    T, H, W = 3, 80, 144
    frames = synthetic_frames(T, H, W, seed=5)
    start = E.clip_start(np.load(os.path.join(model_dir, "initial_queries.npy")), frames, _carried(H, W))
    feats = run_graph(model_dir, "backbone", {"frames": frames})
    out = run_graph(model_dir, "stage_0", {**feats, **start})
    out = run_graph(model_dir, "stage_1", {**feats, "queries_in": out["queries"],
                                           "proposals_in": out["proposals"]})
    out.update(run_graph(model_dir, "mask_1", {**feats, "attended": out["attended"], "proposals": out["proposals"]}))
    fused = run_graph(model_dir, "model", {"frames": frames, **start})
    assert list(fused) == list(G.FUSED_OUTPUTS)
    for name in G.FUSED_OUTPUTS:
        assert np.abs(fused[name] - out[name]).max() <= tolerance(name, out[name], 1e-5), name


# ------------------------------------------------------------------------------------------------
# graph structure
# ------------------------------------------------------------------------------------------------

def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_graph_interface_names_and_shapes(exported):
    model_dir, data = exported
    assert sorted(data["graphs"]) == ["backbone", "mask_0", "mask_1", "model", "stage_0", "stage_1"]
    features = [(f"p{k}", 1, ["T", 32, f"H{2 ** k}", f"W{2 ** k}"]) for k in (2, 3, 4, 5)]
    mask_head = (features + [("attended", 1, [4, "T", 32]), ("proposals", 1, [4, "T", 4])],
                 [("mask_probs", 1, [4, "T", 28, 28])])
    expect = {
        "backbone": ([("frames", 2, ["T", 3, "H", "W"])],
                     [(f"p{k}", 1, ["T", 32, f"H{2 ** k}", f"W{2 ** k}"]) for k in (2, 3, 4, 5)]),
        "stage_0": ([(f"p{k}", 1, ["T", 32, f"H{2 ** k}", f"W{2 ** k}"]) for k in (2, 3, 4, 5)]
                    + [("init_queries", 1, [4, 32]), ("image_size", 1, [2]), ("carried", 1, [4]),
                       ("carried_boxes", 1, [4, 4])], None),
        "stage_1": ([(f"p{k}", 1, ["T", 32, f"H{2 ** k}", f"W{2 ** k}"]) for k in (2, 3, 4, 5)]
                    + [("queries_in", 1, [4, "T", 32]), ("proposals_in", 1, [4, "T", 4])], None),
        "model": ([("frames", 2, ["T", 3, "H", "W"]), ("init_queries", 1, [4, 32]), ("image_size", 1, [2]),
                   ("carried", 1, [4]), ("carried_boxes", 1, [4, 4])],
                  [("class_logits", 1, [4, "T", 3]), ("proposals", 1, [4, "T", 4]),
                   ("mask_probs", 1, [4, "T", 28, 28]), ("next_queries", 1, [4, 32])]),
        "mask_0": mask_head, "mask_1": mask_head,
    }
    stage_out = [("queries", 1, [4, "T", 32]), ("proposals", 1, [4, "T", 4]), ("class_logits", 1, [4, "T", 3]),
                 ("attended", 1, [4, "T", 32]), ("next_queries", 1, [4, 32])]
    for name, (inputs, outputs) in expect.items():
        m = onnx.load(os.path.join(model_dir, f"{name}.onnx"))
        got_in = [(v.name, v.type.tensor_type.elem_type, _dims(v)) for v in m.graph.input]
        got_out = [(v.name, v.type.tensor_type.elem_type, _dims(v)) for v in m.graph.output]
        assert got_in == inputs, name
        assert got_out == (outputs or stage_out), name
        entry = data["graphs"][name]  # the manifest says the same
        assert [(i["name"], i["shape"]) for i in entry["inputs"]] == [(n, s) for n, _, s in got_in]
        assert [(o["name"], o["shape"]) for o in entry["outputs"]] == [(n, s) for n, _, s in got_out]


@pytest.mark.parametrize("form", ["roialign", "gridsample"])
def test_checker_full_and_static_shape_ops(form, exported, exported_gs):
    model_dir, data = exported if form == "roialign" else exported_gs
    for name, entry in data["graphs"].items():
        path = os.path.join(model_dir, entry["file"])
        onnx.checker.check_model(path, full_check=True)
        m = onnx.load(path)
        assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [17]
        assert m.graph.node[0].op_type == "Cast" or name != "backbone"  # uint8 straight into a Cast
        assert {o.domain for o in m.opset_import} <= {"", "ai.onnx"}
        ops = {n.op_type for n in m.graph.node}
        assert not ops & DATA_DEPENDENT, (name, ops & DATA_DEPENDENT)
        assert not m.functions
        if name.startswith(("stage", "mask")):
            assert ("RoiAlign" in ops) == (form == "roialign") and ("GridSample" in ops) == (form == "gridsample")
        else:
            assert "RoiAlign" not in ops and "GridSample" not in ops or name == "model"


@pytest.mark.parametrize("name,size", [("stage_1", 7), ("mask_1", 14)])
def test_roialign_nodes_half_pixel_explicit_sampling_ratio(exported, name, size):
    m = onnx.load(os.path.join(exported[0], f"{name}.onnx"))
    nodes = [n for n in m.graph.node if n.op_type == "RoiAlign"]
    assert len(nodes) == 4  # 4 FPN levels: query path 7x7 (stage), mask path 14x14 (mask head)
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["coordinate_transformation_mode"] == b"half_pixel"
        assert attrs["mode"] == b"avg" and attrs["sampling_ratio"] == 2
        assert (attrs["output_height"], attrs["output_width"]) == (size, size)


@pytest.mark.parametrize("name", ["stage_0", "mask_0"])
def test_gridsample_nodes(exported_gs, name):
    m = onnx.load(os.path.join(exported_gs[0], f"{name}.onnx"))
    nodes = [n for n in m.graph.node if n.op_type == "GridSample"]
    assert len(nodes) == 4 and not [n for n in m.graph.node if n.op_type == "RoiAlign"]
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs.get("mode", b"bilinear") == b"bilinear" and attrs.get("align_corners", 0) == 0


# ------------------------------------------------------------------------------------------------
# manifest
# ------------------------------------------------------------------------------------------------

def test_manifest_content(exported, model):
    model_dir, data = exported
    with open(os.path.join(model_dir, "manifest.json")) as f:
        on_disk = json.load(f)
    assert on_disk == data
    assert data["format"] == manifest_lib.FORMAT and data["format_version"] == manifest_lib.FORMAT_VERSION
    assert (data["T"], data["N"], data["C"], data["M"], data["K"], data["mask_size"]) == (6, 4, 32, 2, 3, 28)
    assert data["trained_clip_length"] == 4 and data["infer"]["clip_length"] == 6
    assert data["opset"] == 17 and data["roi_align"] == "roialign"
    assert data["class_names"] == CLASSES and data["category_ids"] == [1, 2, 3]
    pre = data["preprocessing"]
    assert (pre["dtype"], pre["layout"], pre["colour"], pre["test_size"], pre["max_size"]) == \
        ("uint8", "T3HW", "RGB", 96, 192)
    assert pre["normalisation"]["where"] == "inside_graph"
    np.testing.assert_allclose(pre["normalisation"]["mean"], [123.675, 116.28, 103.53], atol=1e-4)
    assert data["infer"]["reset_after"] == 3 and "background_threshold" in data["infer"]
    axes = data["dynamic_axes"]
    assert axes["T"] == {"min": 1, "opt": 6, "max": 6}
    assert axes["H"]["max"] == axes["W"]["max"] == 192 and axes["H"]["min"] == 32
    assert axes["W4"] == {"expr": "ceil(W/4)", "min": 8, "opt": -(-axes["W"]["opt"] // 4), "max": 48}
    assert data["stages"] == ["stage_0", "stage_1"] and data["mask_heads"] == ["mask_0", "mask_1"]
    for name, entry in data["graphs"].items():
        assert entry["file"] == f"{name}.onnx" and entry["external_data"] == []
        assert entry["sha256"] == manifest_lib.sha256_of(os.path.join(model_dir, entry["file"]))
        assert entry["export_seconds"] > 0
    q = np.load(os.path.join(model_dir, data["initial_queries"]["file"]))
    assert q.dtype == np.float32 and q.shape == (4, 32)
    np.testing.assert_array_equal(q, model.init_queries.weight.detach().numpy())
    verification = data["verification"]
    assert (verification["T"], verification["H"], verification["W"]) != (6, 96, 171)  # not the traced shape
    for graph, errors in verification["max_abs_error"].items():
        for out, err in errors.items():
            assert err < (1e-2 if out == "proposals" else 1e-4), (graph, out, err)


def test_manifest_load_verifies_every_file(exported, tmp_path):
    m = manifest_lib.load(exported[0])
    assert m.graph("stage_0")["path"] == os.path.join(exported[0], "stage_0.onnx")
    assert m.stages == ["stage_0", "stage_1"] and m["N"] == 4
    with pytest.raises(UserError, match="no graph 'stage_7'"):
        m.graph("stage_7")
    copy = str(tmp_path / "m")
    shutil.copytree(exported[0], copy)
    with open(os.path.join(copy, "stage_1.onnx"), "r+b") as f:  # flip one byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(UserError, match=r"stage_1\.onnx: corrupt"):
        manifest_lib.load(copy)
    assert manifest_lib.load(copy, verify=False)["M"] == 2
    shutil.copy(os.path.join(exported[0], "stage_1.onnx"), os.path.join(copy, "stage_1.onnx"))
    os.unlink(os.path.join(copy, "initial_queries.npy"))
    with pytest.raises(UserError, match=r"initial_queries\.npy: missing"):
        manifest_lib.load(copy)
    assert evis(["check", copy]) == 1  # the check reads the manifest too
    for version, message in ((1, "older evis export .*mask logits.* export the checkpoint again"),
                             (2, "older evis export .*mask heads.* export the checkpoint again"),
                             (3, "older evis export .*no carried/carried_boxes inputs"), (99, "newer than")):
        data = json.load(open(os.path.join(exported[0], "manifest.json")))
        data["format_version"] = version
        with open(os.path.join(copy, "manifest.json"), "w") as f:
            json.dump(data, f)
        with pytest.raises(UserError, match=message):
            manifest_lib.load(copy, verify=False)
    data = json.load(open(os.path.join(exported[0], "manifest.json")))
    data["graphs"]["backbone"]["cpu_form"] = {"sha256": "0" * 64}  # a hand-edited entry
    with open(os.path.join(copy, "manifest.json"), "w") as f:
        json.dump(data, f)
    with pytest.raises(UserError, match="incomplete manifest .*cpu_form names no file"):
        manifest_lib.load(copy, verify=False)


def test_roi_align_forms_agree(capsys):
    """The export's --roi-align forms are the RoIAlign module's modes; a wrong one is one line."""
    from efficientvis.training import roi_align

    assert list(E.ROI_FORMS) == list(roi_align.MODES)
    with pytest.raises(UserError, match="--roi-align must be one of roialign, gridsample, grouped"):
        E.export_model("unused.pt", "unused", roi_form="canvas")
    capsys.readouterr()
    assert evis(["bench", "--model", "some_dir", "--checkpoint", "x.pt", "--roi-align", "grouped"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--roi-align sets the form of the export evis bench makes" in err[0], err


def test_the_manifest_says_whether_the_model_carries_proposals(exported, checkpoint_path, tmp_path):
    """model.carry_proposals is a rule of the clip loop, not of the graphs: the manifest carries
    its threshold to the runtime (null: the paper's learned proposals every clip)."""
    assert exported[1]["carry_threshold"] is None
    assert manifest_lib.load(exported[0]).loop_options().carry_threshold is None
    ckpt = checkpoint.load(checkpoint_path)
    ckpt["config"]["model"].update(carry_proposals=True, carry_threshold=0.3)
    path = str(tmp_path / "carry.pt")
    checkpoint.save(path, **ckpt)
    data = E.export_model(path, str(tmp_path / "model"), verify=False, max_clip=2, log=lambda m: None)
    assert data["carry_threshold"] == 0.3
    assert manifest_lib.load(str(tmp_path / "model")).loop_options().carry_threshold == 0.3
    data["carry_threshold"] = "yes"
    manifest_lib.write(str(tmp_path / "model"), data)
    with pytest.raises(UserError, match=r"manifest.json: carry_threshold must be null or a number in \[0, 1\], got 'yes'"):
        manifest_lib.load(str(tmp_path / "model")).loop_options()


def test_manifest_module_imports_neither_torch_nor_onnx():
    code = ("import sys, efficientvis.runtime.manifest; "
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ------------------------------------------------------------------------------------------------
# evis check
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["roialign", "gridsample"])
def test_check_passes_on_export(form, exported, exported_gs, capsys):
    model_dir = (exported if form == "roialign" else exported_gs)[0]
    assert trt_check.check_model_dir(model_dir) == []
    assert evis(["check", model_dir]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and ("RoiAlign" in out) == (form == "roialign") and "Conv" in out


def test_grouped_form_is_refused_for_tensorrt(exported_grouped, tmp_path, capsys):
    """--roi-align grouped has data-dependent shapes: evis check names the NonZero nodes, evis build
    stops before TensorRT with one line saying which export to make instead."""
    from efficientvis.export.engine import build_engines

    model_dir = exported_grouped[0]
    problems = trt_check.check_model_dir(model_dir)
    assert problems and all("NonZero" in p for p in problems), problems
    assert evis(["check", model_dir]) != 0
    capsys.readouterr()
    with pytest.raises(UserError, match="--roi-align grouped .* export again with --roi-align roialign"):
        build_engines(model_dir, str(tmp_path / "engines"))


def _save(path, nodes, inputs, outputs, opset, initializers=()):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def _roialign_model(path, opset, **attrs):
    from onnx import TensorProto, helper

    node = helper.make_node("RoiAlign", ["x", "rois", "idx"], ["y"], output_height=7, output_width=7, **attrs)
    return _save(path, [node],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 32, 32]),
                  helper.make_tensor_value_info("rois", TensorProto.FLOAT, [5, 4]),
                  helper.make_tensor_value_info("idx", TensorProto.INT32, [5])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 8, 7, 7])], opset)


def test_check_fails_on_bad_graphs(tmp_path, capsys):
    from onnx import TensorProto, helper

    nonzero = _save(tmp_path / "nonzero.onnx", [helper.make_node("NonZero", ["x"], ["y"])],
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                    [helper.make_tensor_value_info("y", TensorProto.INT64, [2, None])], 17)
    old = _roialign_model(tmp_path / "roialign10.onnx", 10, sampling_ratio=2)
    no_sr = _roialign_model(tmp_path / "roialign_no_sr.onnx", 17, coordinate_transformation_mode="half_pixel")
    output_half = _roialign_model(tmp_path / "roialign_out.onnx", 17, sampling_ratio=2,
                                  coordinate_transformation_mode="output_half_pixel")
    int64_in = _save(tmp_path / "int64.onnx", [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
                     [helper.make_tensor_value_info("x", TensorProto.INT64, [3])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], 17)
    good = _roialign_model(tmp_path / "good.onnx", 17, sampling_ratio=2)
    assert trt_check.check_onnx(good) == []
    cases = {nonzero: "NonZero", old: "opset 10", no_sr: "sampling_ratio", output_half: "output_half_pixel",
             int64_in: "int64"}
    for path, words in cases.items():
        problems = trt_check.check_onnx(path)
        assert problems and any(words in p for p in problems), (path, problems)
        assert evis(["check", path, "--quiet"]) == 1
        out = capsys.readouterr().out
        assert words in out and "problem" in out, out
    assert any("data-dependent" in p for p in trt_check.check_onnx(nonzero))


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------

def test_export_cli_errors(checkpoint_path, tmp_path, capsys):
    assert evis(["export", "--checkpoint", checkpoint_path, "--out", str(tmp_path / "a"), "--opset", "16"]) == 1
    assert "LayerNormalization" in capsys.readouterr().err
    assert evis(["export", "--checkpoint", checkpoint_path, "--out", str(tmp_path / "b"), "--max-clip", "0"]) == 1
    assert "--max-clip must be >= 1" in capsys.readouterr().err
    assert evis(["export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "c")]) == 1
    assert "not found" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "b" / "manifest.json")


def test_an_interrupted_re_export_keeps_the_previous_export(checkpoint_path, exported, tmp_path, monkeypatch):
    """The export is staged and moved into place at the end: Ctrl-C during a re-export (here in
    the first graph's torch.onnx.export) leaves the earlier export whole and no staging folder."""
    previous = str(tmp_path / "model")
    shutil.copytree(exported[0], previous)
    before = sorted(os.listdir(previous))
    os.makedirs(os.path.join(previous, E.STAGING_PREFIX + "killed", "stage_0.onnx"))  # a SIGKILLed export's

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        E.export_model(checkpoint_path, previous, log=lambda m: None)
    assert sorted(os.listdir(previous)) == before
    manifest_lib.load(previous)  # every file still matches its sha256
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file; give a folder"):
        E.export_model(checkpoint_path, str(tmp_path / "file"), log=lambda m: None)


def test_publishing_a_staged_export_replaces_only_the_exports_files(tmp_path):
    out, staging = tmp_path / "model", tmp_path / "model" / (E.STAGING_PREFIX + "x")
    staging.mkdir(parents=True)
    for name in ("manifest.json", "backbone.onnx", "stage_2.onnx", "mask_2.onnx", "notes.txt"):
        (out / name).write_text("old")
    (out / "trt_cache").mkdir()
    for name in ("manifest.json", "backbone.onnx", "stage_0.onnx", "mask_0.onnx"):
        (staging / name).write_text("new")
    E._publish(str(staging), str(out))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [E.STAGING_PREFIX + "x", "backbone.onnx", "mask_0.onnx", "manifest.json", "notes.txt", "stage_0.onnx",
         "trt_cache"])
    assert all((out / n).read_text() == "new" for n in ("manifest.json", "backbone.onnx", "stage_0.onnx"))
    assert (out / "notes.txt").read_text() == "old" and not list(staging.iterdir())


def test_simplify_keeps_outputs(exported):
    """--simplify (onnxslim, optional): fewer nodes, same outputs, same interface."""
    pytest.importorskip("onnxslim")
    model_dir = exported[0]
    proto = onnx.load(os.path.join(model_dir, "backbone.onnx"))
    slim = E._simplify(proto, "backbone", log=lambda m: None)
    assert len(slim.graph.node) <= len(proto.graph.node)
    assert [(v.name, _dims(v)) for v in slim.graph.input] == [(v.name, _dims(v)) for v in proto.graph.input]
    assert [(v.name, _dims(v)) for v in slim.graph.output] == [(v.name, _dims(v)) for v in proto.graph.output]
    frames = synthetic_frames(2, 64, 96)
    a = session(os.path.join(model_dir, "backbone.onnx")).run(None, {"frames": frames})
    b = ort.InferenceSession(slim.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"frames": frames})
    for x, y in zip(a, b):
        assert np.abs(x - y).max() <= 1e-5
