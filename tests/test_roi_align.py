"""RoIAlign: against a Python-loop reference written from the definition, gradients, FPN level
assignment, and ONNX export in both modes (one RoiAlign node / GridSample) checked in ONNX Runtime."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from efficientvis.training import roi_align as ra

# ------------------------------------------------------------------------------------------------
# Reference: torchvision / ONNX RoiAlign (aligned=True, half_pixel, avg) straight from the definition
# ------------------------------------------------------------------------------------------------


def _bilinear(img, y, x):
    """img (C, H, W) float64; the out-of-bounds rule of torchvision's bilinear_interpolate."""
    _, H, W = img.shape
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return np.zeros(img.shape[0])
    y = max(float(y), 0.0)
    x = max(float(x), 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= H - 1:
        y_low = y_high = H - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= W - 1:
        x_low = x_high = W - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * img[:, y_low, x_low] + hy * lx * img[:, y_low, x_high]
            + ly * hx * img[:, y_high, x_low] + ly * lx * img[:, y_high, x_high])


def reference_roi_align(features, boxes, batch_indices, spatial_scale, out_h, out_w, sr,
                        coord=np.float64):
    """Loops over RoIs, bins and samples. ``coord``: float type of the coordinate arithmetic (float32
    reproduces the C kernels' float arithmetic for float32 input, in their operation order)."""
    feats = features.detach().double().numpy()
    out = np.zeros((len(boxes), feats.shape[1], out_h, out_w))
    f = coord
    for k, (box, b) in enumerate(zip(boxes.tolist(), batch_indices.tolist())):
        x1, y1, x2, y2 = (f(v) for v in box)
        scale = f(spatial_scale)
        start_w, start_h = x1 * scale - f(0.5), y1 * scale - f(0.5)
        end_w, end_h = x2 * scale - f(0.5), y2 * scale - f(0.5)
        bin_w, bin_h = (end_w - start_w) / f(out_w), (end_h - start_h) / f(out_h)
        for ph in range(out_h):
            for pw in range(out_w):
                acc = np.zeros(feats.shape[1])
                for iy in range(sr):
                    y = start_h + f(ph) * bin_h + f(iy + 0.5) * bin_h / f(sr)
                    for ix in range(sr):
                        x = start_w + f(pw) * bin_w + f(ix + 0.5) * bin_w / f(sr)
                        acc += _bilinear(feats[b], y, x)
                out[k, :, ph, pw] = acc / (sr * sr)
    return out


def _boxes(H, W, scale):
    """Boxes in image pixels for a map of H x W at spatial_scale: inside, crossing each border,
    fully outside, in the [-1, 0] / [size-1, size] clamping bands, tiny, empty and huge."""
    iw, ih = W / scale, H / scale  # image size
    u = 1.0 / scale  # one map pixel in image pixels
    b = [
        [0.1 * iw, 0.2 * ih, 0.7 * iw, 0.9 * ih],  # inside
        [0.0, 0.0, iw, ih],  # the whole image
        [-0.3 * iw, -0.2 * ih, 0.4 * iw, 0.5 * ih],  # crossing top-left
        [0.6 * iw, 0.5 * ih, 1.4 * iw, 1.3 * ih],  # crossing bottom-right
        [-2.0 * iw, -1.5 * ih, -1.1 * iw, -0.6 * ih],  # fully outside (top-left)
        [1.3 * iw, 0.2 * ih, 2.0 * iw, 0.6 * ih],  # fully outside (right)
        [-0.4 * u, -0.2 * u, 0.4 * u, 0.45 * u],  # clamping band around (0, 0)
        [iw - 0.3 * u, ih - 0.6 * u, iw + 0.3 * u, ih + 0.4 * u],  # clamping band at the far edges
        [0.5 * iw, 0.5 * ih, 0.5 * iw + 0.05 * u, 0.5 * ih + 0.03 * u],  # tiny
        [0.3 * iw, 0.3 * ih, 0.3 * iw, 0.3 * ih],  # empty (zero size)
        [-3.0 * iw, -2.5 * ih, 4.0 * iw, 3.5 * ih],  # huge
        [0.25 * iw, -0.7 * ih, 0.55 * iw, 1.8 * ih],  # taller than the map
    ]
    return torch.tensor(b, dtype=torch.float32)


CASES = [  # (H, W, spatial_scale, output size, sampling ratio)
    (13, 17, 1.0, (7, 7), 2),
    (9, 11, 0.5, (3, 5), 2),
    (16, 10, 0.25, (4, 4), 3),
    (7, 12, 1 / 32, (2, 3), 1),
]


@pytest.mark.parametrize("H,W,scale,size,sr", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_loop_reference(H, W, scale, size, sr, dtype):
    torch.manual_seed(0)
    feats = torch.randn(2, 3, H, W, dtype=dtype)
    boxes = _boxes(H, W, scale)
    K = len(boxes)
    bidx = torch.arange(K) % 2
    coord = np.float64 if dtype == torch.float64 else np.float32
    ref = reference_roi_align(feats, boxes, bidx, scale, *size, sr, coord=coord)
    out = ra.roi_align_flat(feats, boxes, bidx, size, scale, sr)
    assert out.shape == (K, 3, *size) and out.dtype == dtype
    err = np.abs(out.double().numpy() - ref).max()
    assert err <= (1e-10 if dtype == torch.float64 else 1e-5), err
    # the pure-torch kernel alone and the batched API give the same numbers
    torch.testing.assert_close(ra.roi_align_torch(feats, boxes, bidx, scale, *size, sr), out,
                               rtol=0, atol=0)
    # the batched API runs the matrix-product kernel on maps this small: the reference holds for it too
    assert ra._matmul_pays(feats, K, *size, sr)
    batched = ra.roi_align(feats, boxes.view(1, K, 4).expand(2, K, 4), size, scale, sr,
                           mode="roialign")[bidx, torch.arange(K)]
    err = np.abs(batched.double().numpy() - ref).max()
    assert batched.dtype == dtype and err <= (1e-10 if dtype == torch.float64 else 1e-5), err
    # fully outside boxes give exactly zero
    assert out[4].abs().max() == 0 and out[5].abs().max() == 0


@pytest.mark.parametrize("H,W,scale,size,sr", CASES)
def test_gridsample_mode_matches_reference(H, W, scale, size, sr):
    torch.manual_seed(1)
    feats = torch.randn(2, 3, H, W)
    boxes = _boxes(H, W, scale)
    K = len(boxes)
    ref = reference_roi_align(feats, boxes, torch.zeros(K, dtype=torch.long), scale, *size, sr)
    ref2 = reference_roi_align(feats, boxes, torch.ones(K, dtype=torch.long), scale, *size, sr)
    out = ra.roi_align(feats, boxes.view(1, K, 4).expand(2, K, 4), size, scale, sr, mode="gridsample")
    assert out.shape == (2, K, 3, *size)
    err = max(np.abs(out[0].numpy() - ref).max(), np.abs(out[1].numpy() - ref2).max())
    print(f"gridsample vs reference, {H}x{W} scale {scale}: max abs error {err:.2e}")
    assert err <= 1e-4, err
    # float64 removes the float rounding: what is left would be a semantic difference
    out64 = ra.roi_align(feats[:1].double(), boxes.view(1, K, 4), size, scale, sr, mode="gridsample")
    assert np.abs(out64[0].numpy() - ref).max() <= 1e-10


def test_mode_switch():
    assert ra.get_export_mode() == "roialign"
    with ra.export_mode("gridsample"):
        assert ra.get_export_mode() == "gridsample"
    assert ra.get_export_mode() == "roialign"
    with pytest.raises(ValueError):
        ra.set_export_mode("bogus")
    with pytest.raises(ValueError):
        ra.roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4), 2, 1.0, sampling_ratio=0)


@pytest.mark.parametrize("mode", ["roialign", "gridsample"])
def test_gradcheck(mode):
    torch.manual_seed(0)
    feats = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[[1.0, 2.0, 9.0, 7.0], [-3.0, -1.0, 5.0, 4.0]],
                          [[6.0, 3.0, 14.0, 12.0], [0.3, 0.2, 1.1, 0.9]]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: ra.roi_align(f, boxes, (3, 2), 0.5, 2, mode=mode),
                                    (feats,))


def test_custom_op_backward_equals_autograd_of_pure_torch():
    torch.manual_seed(0)
    feats = torch.randn(2, 4, 9, 8, requires_grad=True)
    boxes = _boxes(9, 8, 0.5)
    bidx = torch.arange(len(boxes)) % 2
    grad = torch.randn(len(boxes), 4, 3, 3)
    (g_op,) = torch.autograd.grad(ra.roi_align_flat(feats, boxes, bidx, 3, 0.5, 2), feats, grad)
    (g_pt,) = torch.autograd.grad(ra.roi_align_torch(feats, boxes, bidx, 0.5, 3, 3, 2), feats, grad)
    torch.testing.assert_close(g_op, g_pt, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels, rois", [(0, 3), (4, 0)])
def test_empty_channels_or_rois(channels, rois):
    """Zero channels (the ground-truth masks of a clip without objects) or zero RoIs: empty output
    and an empty-safe backward, no reshape error."""
    feats = torch.randn(2, channels, 9, 8, requires_grad=True)
    boxes = _boxes(9, 8, 0.5)[:rois]
    out = ra.roi_align_flat(feats, boxes, torch.arange(rois) % 2, 3, 0.5, 2)
    assert out.shape == (rois, channels, 3, 3)
    out.sum().backward()
    assert feats.grad.shape == feats.shape and not feats.grad.any()
    # the batched API (the matrix-product kernel at this size) too
    assert ra._matmul_pays(feats, rois, 3, 3, 2)
    out = ra.roi_align(feats, boxes[None].expand(2, rois, 4), 3, 0.5, 2)
    assert out.shape == (2, rois, channels, 3, 3)
    out.sum().backward()
    assert not feats.grad.any()


def test_gather_in_chunks_of_taps_equals_all_at_once(monkeypatch):
    """Large problems gather a few taps at a time (bounded memory): same numbers, both directions."""
    torch.manual_seed(0)
    feats = torch.randn(2, 4, 9, 8, requires_grad=True)
    boxes = _boxes(9, 8, 0.5)
    bidx = torch.arange(len(boxes)) % 2
    grad = torch.randn(len(boxes), 4, 3, 3)
    outs = []
    for budget in (1 << 24, len(boxes) * 9 * 4 * 3):  # all 16 taps at once; 3 taps per gather
        monkeypatch.setattr(ra, "_GATHER_ELEMENTS", budget)
        out = ra.roi_align_flat(feats, boxes, bidx, 3, 0.5, 2)
        outs.append((out, torch.autograd.grad(out, feats, grad)[0]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_assign_levels():
    sizes = [5.0, 100.0, 111.9, 112.0, 223.9, 224.0, 447.0, 448.0, 2000.0]
    boxes = torch.tensor([[10.0, 20.0, 10.0 + s, 20.0 + s] for s in sizes])
    levels = ra.assign_levels(boxes) + 2
    expected = [min(max(math.floor(4 + math.log2(s / 224 + 1e-8)), 2), 5) for s in sizes]
    assert levels.tolist() == expected == [2, 2, 2, 3, 3, 4, 4, 5, 5]
    # a degenerate (inverted) box does not give NaN
    assert ra.assign_levels(torch.tensor([[5.0, 5.0, 1.0, 1.0]])).tolist() == [0]


@pytest.mark.parametrize("mode", ["roialign", "gridsample"])
def test_multilevel_selects_per_roi(mode):
    torch.manual_seed(0)
    H, W = 200, 264  # image
    feats = [torch.randn(2, 3, math.ceil(H / s), math.ceil(W / s)) for s in (4, 8, 16, 32)]
    boxes = torch.tensor([[[10, 10, 40, 50], [0, 0, 264, 200], [-30, 100, 120, 260], [50, 60, 170, 190]],
                          [[100, 20, 101, 21], [-500, -500, 700, 700], [5, 5, 110, 115], [20, 20, 250, 30]]],
                         dtype=torch.float32)
    out = ra.multilevel_roi_align(feats, boxes, 7, 2, mode=mode)
    assert out.shape == (2, 4, 3, 7, 7)
    levels = ra.assign_levels(boxes)
    assert set(levels.flatten().tolist()) == {0, 1, 2, 3}
    for b in range(2):
        for r in range(4):
            lv = int(levels[b, r])
            ref = reference_roi_align(feats[lv], boxes[b, r:r + 1], torch.tensor([b]),
                                      1 / (4 * 2 ** lv), 7, 7, 2)
            assert np.abs(out[b, r:r + 1].numpy() - ref).max() <= 1e-4


# ------------------------------------------------------------------------------------------------
# ONNX export
# ------------------------------------------------------------------------------------------------

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

DATA_DEPENDENT_OPS = {"NonZero", "Compress", "Unique", "TopK", "Loop", "If", "Scan"}


class _TinyRoI(nn.Module):
    def __init__(self, multilevel=False):
        super().__init__()
        self.multilevel = multilevel
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)

    def forward(self, image, boxes):  # image (B, 3, H, W), boxes (B, R, 4) -> (B, R, 8, 7, 7)
        p2 = self.conv(image)
        if not self.multilevel:
            return ra.roi_align(p2, boxes, 7, 0.25, 2)
        pyramid = [p2]
        for _ in range(3):
            pyramid.append(nn.functional.max_pool2d(pyramid[-1], 2, ceil_mode=True))
        return ra.multilevel_roi_align(pyramid, boxes, 7, 2)


def _export(module, mode, path):
    torch.manual_seed(0)
    image = torch.randn(2, 3, 64, 96)
    boxes = torch.tensor([[[4, 4, 60, 40], [-10, 20, 50, 70], [30, 0, 100, 64]]] * 2, dtype=torch.float32)
    B, R = torch.export.Dim("B", min=1, max=64), torch.export.Dim("R", min=1, max=1024)
    H, W = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC
    with ra.export_mode(mode):
        program = torch.onnx.export(
            module.eval(), (image, boxes), dynamo=True, opset_version=17, verbose=False,
            input_names=["image", "boxes"], output_names=["rois"],
            dynamic_shapes={"image": {0: B, 2: H, 3: W}, "boxes": {0: B, 1: R}},
            custom_translation_table=ra.ONNX_TRANSLATION_TABLE)
    program.save(str(path), external_data=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model


def _ort_vs_torch(module, path, mode):
    """Run at another B, R, H, W than exported, boxes crossing the border / outside."""
    torch.manual_seed(3)
    image = torch.randn(3, 3, 83, 115)  # odd size, different from the export size
    xy = torch.rand(3, 6, 2) * torch.tensor([160.0, 120.0]) - 20
    wh = torch.rand(3, 6, 2) * 90 + 1
    boxes = torch.cat([xy, xy + wh], -1)
    boxes[0, 0] = torch.tensor([-200.0, -100.0, -150.0, -40.0])  # fully outside
    boxes[1, 1] = torch.tensor([-300.0, -300.0, 500.0, 400.0])  # huge
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"image": image.numpy(), "boxes": boxes.numpy()})[0]
    with torch.no_grad(), ra.export_mode(mode):
        ref = module(image, boxes).numpy()
    assert out.shape == ref.shape == (3, 6, 8, 7, 7)
    return float(np.abs(out - ref).max())


def _check_graph(model):
    ops = [n.op_type for n in model.graph.node]
    assert not DATA_DEPENDENT_OPS & set(ops), ops
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    dims = model.graph.output[0].type.tensor_type.shape.dim
    # static-shape graph: output dims are the input's symbols or constants, no data-dependent symbol
    assert [d.dim_param or d.dim_value for d in dims] == ["B", "R", 8, 7, 7]
    return ops


def _single_roialign_model(sr, size, scale):
    from onnx import TensorProto, helper

    node = helper.make_node("RoiAlign", ["X", "rois", "batch_indices"], ["Y"], mode="avg",
                            coordinate_transformation_mode="half_pixel", sampling_ratio=sr,
                            output_height=size[0], output_width=size[1], spatial_scale=scale)
    graph = helper.make_graph(
        [node], "roialign",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("rois", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("batch_indices", TensorProto.INT64, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])


@pytest.mark.parametrize("H,W,scale,size,sr", CASES)
def test_onnxruntime_and_onnx_reference_roialign_equal_ours(H, W, scale, size, sr):
    """ONNX RoiAlign (half_pixel) in ONNX Runtime and in onnx's reference evaluator, on the boxes of
    every out-of-bounds situation, equals our kernel (and hence torchvision's rule)."""
    from onnx.reference import ReferenceEvaluator

    torch.manual_seed(2)
    feats = torch.randn(2, 3, H, W)
    boxes = _boxes(H, W, scale)
    bidx = torch.arange(len(boxes)) % 2
    model = _single_roialign_model(sr, size, scale)
    feeds = {"X": feats.numpy(), "rois": boxes.numpy(), "batch_indices": bidx.numpy()}
    ours = ra.roi_align_flat(feats, boxes, bidx, size, scale, sr).numpy()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    err_ort = np.abs(sess.run(None, feeds)[0] - ours).max()
    err_ref = np.abs(ReferenceEvaluator(model).run(None, feeds)[0] - ours).max()
    assert err_ort <= 1e-5 and err_ref <= 1e-5, (err_ort, err_ref)


def test_export_roialign_single_node(tmp_path):
    module = _TinyRoI()
    model = _export(module, "roialign", tmp_path / "m.onnx")
    ops = _check_graph(model)
    assert ops.count("RoiAlign") == 1 and "GridSample" not in ops
    node = next(n for n in model.graph.node if n.op_type == "RoiAlign")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["coordinate_transformation_mode"] == b"half_pixel"
    assert attrs["mode"] == b"avg"
    assert attrs["sampling_ratio"] == 2  # written explicitly
    assert attrs["output_height"] == attrs["output_width"] == 7
    assert attrs["spatial_scale"] == pytest.approx(0.25)
    err = _ort_vs_torch(module, tmp_path / "m.onnx", "roialign")
    print(f"ONNX RoiAlign (ORT CPU) vs torch: max abs error {err:.2e}")
    assert err <= 1e-5


def test_export_gridsample(tmp_path):
    module = _TinyRoI()
    model = _export(module, "gridsample", tmp_path / "m.onnx")
    ops = _check_graph(model)
    assert "RoiAlign" not in ops and ops.count("GridSample") == 1
    node = next(n for n in model.graph.node if n.op_type == "GridSample")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs.get("align_corners", 0) == 0 and attrs.get("mode", b"bilinear") == b"bilinear"
    assert attrs.get("padding_mode", b"zeros") == b"zeros"
    err = _ort_vs_torch(module, tmp_path / "m.onnx", "gridsample")
    # the plugin-free graph against the RoiAlign semantics (the pure-torch kernel)
    err_ra = _ort_vs_torch_cross(module, tmp_path / "m.onnx")
    print(f"ONNX GridSample (ORT CPU) vs torch gridsample: {err:.2e}; vs torch RoIAlign: {err_ra:.2e}")
    assert err <= 1e-4 and err_ra <= 1e-4


def _ort_vs_torch_cross(module, path):
    torch.manual_seed(4)
    image = torch.randn(1, 3, 75, 101)
    boxes = torch.tensor([[[-30, -20, 60, 50], [10, 10, 90, 70], [70, 40, 130, 90], [0, 0, 101, 75]]],
                         dtype=torch.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"image": image.numpy(), "boxes": boxes.numpy()})[0]
    with torch.no_grad(), ra.export_mode("roialign"):
        ref = module(image, boxes).numpy()
    return float(np.abs(out - ref).max())


def test_export_multilevel_roialign(tmp_path):
    module = _TinyRoI(multilevel=True)
    model = _export(module, "roialign", tmp_path / "m.onnx")
    ops = _check_graph(model)
    assert ops.count("RoiAlign") == 4
    err = _ort_vs_torch(module, tmp_path / "m.onnx", "roialign")
    print(f"multilevel ONNX RoiAlign vs torch: {err:.2e}")
    assert err <= 1e-5


def test_export_multilevel_grouped(tmp_path):
    """--roi-align grouped: per level a NonZero picks that level's RoIs, one RoiAlign pools them and
    a ScatterND puts them back (data-dependent shapes, no Where over four levels); the same numbers
    as PyTorch, also when a level has no RoI (boxes on one level only)."""
    module = _TinyRoI(multilevel=True)
    model = _export(module, "grouped", tmp_path / "m.onnx")
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("RoiAlign") == 4 and ops.count("NonZero") == 4 and "Where" not in ops, sorted(set(ops))
    err = _ort_vs_torch(module, tmp_path / "m.onnx", "grouped")
    print(f"multilevel grouped ONNX RoiAlign vs torch: {err:.2e}")
    assert err <= 1e-5
    image = torch.randn(2, 3, 64, 96)
    boxes = torch.tensor([[[4, 4, 20, 20], [30, 10, 50, 30]]] * 2, dtype=torch.float32)  # all on P2
    assert set(ra.assign_levels(boxes).flatten().tolist()) == {0}
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"image": image.numpy(), "boxes": boxes.numpy()})[0]
    with torch.no_grad():
        assert np.abs(out - module(image, boxes).numpy()).max() <= 1e-5


def test_eager_level_grouping_equals_the_static_export_form():
    """Training pools each RoI on its own level only; export pools every level and selects."""
    torch.manual_seed(0)
    strides = [4, 8, 16, 32]
    feats = [torch.randn(3, 8, 64 // s, 96 // s, requires_grad=True) for s in (1, 2, 4, 8)]
    boxes = torch.rand(3, 6, 4) * torch.tensor([96, 64, 96, 64.0])
    boxes[..., 2:] = boxes[..., :2] + torch.rand(3, 6, 2) * 400
    grouped = ra.multilevel_roi_align(feats, boxes, 7, 2, strides=strides)
    levels = ra.assign_levels(boxes)
    assert len(levels.unique()) >= 3
    static = None
    for i, (f, s) in enumerate(zip(feats, strides)):
        pooled = ra.roi_align(f, boxes, 7, 1.0 / s, 2)
        static = pooled if static is None else torch.where((levels == i)[:, :, None, None, None], pooled, static)
    assert torch.equal(grouped, static)
    g1 = torch.autograd.grad(grouped.sum(), feats, allow_unused=True, materialize_grads=True)
    g2 = torch.autograd.grad(static.sum(), feats)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("ratio", [0, 3])  # every level gathers / P2 gathers, P3-P5 multiply
def test_matrix_product_kernel_equals_the_gather_kernel(monkeypatch, ratio):
    """Eager RoIAlign multiplies interpolation matrices where the map is small and gathers where
    it is large: both kernels, and a multilevel call mixing them, give the same values and
    feature gradients."""
    torch.manual_seed(0)
    feats = [torch.randn(3, 8, 64 // s, 96 // s, requires_grad=True) for s in (4, 8, 16, 32)]
    boxes = torch.rand(3, 6, 4) * torch.tensor([96, 64, 96, 64.0]) - 8
    boxes[..., 2:] = boxes[..., :2] + torch.rand(3, 6, 2) * 400
    assert len(ra.assign_levels(boxes).unique()) >= 3
    grad = torch.randn(3, 6, 8, 7, 7)
    results = []
    for max_ratio in (1e9, ratio):
        monkeypatch.setattr(ra, "_MATMUL_MAX_WORK_RATIO", max_ratio)
        out = ra.multilevel_roi_align(feats, boxes, 7, 2)
        grads = torch.autograd.grad(out, feats, grad, allow_unused=True, materialize_grads=True)
        results.append((out, grads))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
