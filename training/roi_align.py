"""RoIAlign ("ROIAlignV2": aligned / half-pixel, fixed sampling ratio, average) in pure torch ops,
exportable to ONNX either as one standard ``RoiAlign`` node or as a plugin-free ``GridSample`` form.

Semantics (identical to torchvision ``roi_align(..., aligned=True)``, detectron2 ``ROIAlignV2`` and
ONNX ``RoiAlign`` opset >= 16 with mode="avg", coordinate_transformation_mode="half_pixel"):

- a box (x1, y1, x2, y2) in input-image pixels maps to the feature map as
  ``start = x1 * spatial_scale - 0.5``, ``size = (x2 - x1) * spatial_scale`` (no minimum size);
- the box is split into S_h x S_w bins; each bin is sampled at ``sampling_ratio`` x ``sampling_ratio``
  regular points ``start + p * bin + (i + 0.5) * bin / sr`` and the samples are averaged
  (the count is always sr * sr);
- a sample with ``y < -1 or y > H or x < -1 or x > W`` contributes 0; otherwise y, x are clamped to
  >= 0, and a coordinate beyond ``H - 1`` (``W - 1``) is set to ``H - 1`` (``W - 1``), then it is
  bilinearly interpolated from its four neighbours.

The computation is separable per axis (row taps and column taps with their weights). Two eager
kernels, same numbers up to float rounding (~5e-7):

- gathers of (K*S*S*taps, C) rows, all ``(2*sr)^2`` taps at once or in chunks of taps when that is
  large, so memory stays bounded (no Python loop over RoIs, no data-dependent shape): the custom
  op's kernel, and the eager form for large maps;
- two matrix products per frame, ``A_y (R*S_h, H) @ X (H, C*W)`` then ``@ A_x^T (W, S_w)`` per RoI,
  with the interpolation matrices A holding each bin's bilinear weights (`_roi_align_matmul`): more
  multiply-adds, but dense GEMMs instead of gathers and scatters, so faster while the map is small
  next to the RoI grid (`_matmul_pays`). This is what training the tiny config runs: 1.7x faster
  RoIAlign (forward + backward) at its P2 size, a training step about 7 % cheaper (docs/benchmarks.md).

Gradients flow to the features; boxes are treated as constants (detached), as in Sparse R-CNN /
QueryInst where the boxes are detached between stages anyway.

Export modes (module-level switch, `set_export_mode` / the `export_mode` context manager, or the
``mode=`` argument of each function):

- ``"roialign"`` (default): the computation runs through the custom op ``efficientvis::roi_align``
  (eager kernel = the pure-torch code above, autograd registered with ``register_autograd``). In
  ``torch.onnx.export(..., dynamo=True, custom_translation_table=ONNX_TRANSLATION_TABLE)`` each call
  becomes ONE ONNX ``RoiAlign`` node (opset >= 16; mode="avg", half_pixel, explicit sampling_ratio),
  which TensorRT maps to its ``ROIAlign_TRT`` plugin.
- ``"grouped"``: as ``"roialign"``, but ``multilevel_roi_align`` exports the eager form, each RoI
  pooled on its own FPN level only: per level a ``NonZero`` of the level test, ``GatherND`` of those
  boxes, one ``RoiAlign`` and a ``ScatterND`` back into place. A quarter of the RoIAlign work of
  the static form (r50 size, 90 RoIs at 7x7: 16 ms against 41 ms for four RoiAligns and their
  selection, ONNX Runtime CPU), with data-dependent shapes: ONNX Runtime only, TensorRT's builds
  (`evis build`, `evis check`) refuse it.
- ``"gridsample"``: plain torch ops only: the boxes of one frame build one sampling grid holding all
  of them, ``F.grid_sample`` (bilinear, align_corners=False, zeros padding -> ONNX ``GridSample``,
  TensorRT's native IGridSampleLayer, 4-D input) then ``F.avg_pool2d`` over sr x sr. The
  out-of-bounds rule is reproduced exactly by clamping each sample's coordinates in the grid and
  moving invalid samples far outside the map (zero padding); in float64 it equals the RoIAlign
  kernel to 1e-10 (tested). What remains in float32 is rounding of the pixel -> normalised -> pixel
  coordinate round trip (about W * 6e-8 pixel). Measured max abs difference to the RoIAlign kernel
  with N(0, 1) features: ~2e-6 on maps up to 17 wide, 9e-6 at 48x80, 1.8e-5 at 90x160, 2.9e-5 at
  180x320 -- below the float32-vs-float64 error of RoIAlign itself (1.7e-5 .. 5e-5 on the same cases).

Export usage::

    from efficientvis.training import roi_align
    with roi_align.export_mode("roialign"):   # or "gridsample"
        torch.onnx.export(model, args, dynamo=True, opset_version=17,   # >= 16 for half_pixel
                          custom_translation_table=roi_align.ONNX_TRANSLATION_TABLE, ...)

(Passing the table in "gridsample" mode is harmless. Exporting "roialign" mode without the table
fails with a ConversionError: no ONNX function for efficientvis::roi_align.)
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("roialign", "gridsample", "grouped")
_MODE = "roialign"


def set_export_mode(mode: str) -> None:
    """Select how RoIAlign is computed and exported: "roialign" (ONNX RoiAlign), "gridsample" or
    "grouped" (module docstring)."""
    global _MODE
    if mode not in MODES:
        raise ValueError(f"unknown RoIAlign mode {mode!r}: use one of {MODES}")
    _MODE = mode


def get_export_mode() -> str:
    return _MODE


@contextlib.contextmanager
def export_mode(mode: str):
    """``with export_mode("gridsample"): torch.onnx.export(...)`` -- restores the previous mode."""
    previous = _MODE
    set_export_mode(mode)
    try:
        yield
    finally:
        set_export_mode(previous)


def _resolve_mode(mode: str | None) -> str:
    mode = _MODE if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"unknown RoIAlign mode {mode!r}: use one of {MODES}")
    return mode


def _pair(output_size) -> tuple[int, int]:
    if isinstance(output_size, int):
        return output_size, output_size
    h, w = output_size
    return int(h), int(w)


# ----------------------------------------------------------------------------------------------
# Shared sampling geometry
# ----------------------------------------------------------------------------------------------

def _coord_dtype(features: Tensor) -> torch.dtype:
    # float64 features -> float64 coordinates; everything else (fp32/fp16/bf16) -> float32, as the
    # torchvision / ONNX Runtime kernels do for float input.
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _sample_positions(lo: Tensor, hi: Tensor, spatial_scale: float, bins: int, sr: int) -> Tensor:
    """lo, hi (...,) box edges in image pixels -> sample coordinates (..., bins, sr) in map pixels.

    Same operation order as the torchvision / ONNX Runtime kernels:
    start + p * bin + (i + 0.5) * bin / sr, with start = lo * scale - 0.5, bin = (end - start) / bins.
    """
    start = lo * spatial_scale - 0.5
    end = hi * spatial_scale - 0.5
    bin_size = ((end - start) / bins)[..., None, None]  # (..., 1, 1)
    p = torch.arange(bins, device=lo.device, dtype=lo.dtype).view(bins, 1)
    i = torch.arange(sr, device=lo.device, dtype=lo.dtype).view(1, sr) + 0.5
    return start[..., None, None] + p * bin_size + i * bin_size / sr  # (..., bins, sr)


def _axis_taps(coord: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """coord (..., n) map pixels along an axis of length ``size`` -> (index, weight), each (..., n, 2).

    Taps are (low, high) neighbours with bilinear weights; weights are 0 for an out-of-range sample
    (coord < -1 or coord > size), clamping as torchvision's ``bilinear_interpolate``.
    """
    valid = (coord >= -1.0) & (coord <= size)
    c = coord.clamp(min=0)
    low = c.floor()
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    c = torch.where(at_end, low, c)
    frac = c - low
    high = torch.where(at_end, low, low + 1)
    index = torch.stack([low, high], -1).long()
    weight = torch.stack([1 - frac, frac], -1) * valid[..., None].to(frac.dtype)
    return index, weight


def _taps(H: int, W: int, coord_dtype: torch.dtype, boxes: Tensor, spatial_scale: float,
          out_h: int, out_w: int, sr: int):
    """Per-RoI row/column taps. boxes (K, 4) -> ry, wy (K, out_h, 2*sr); rx, wx (K, out_w, 2*sr)."""
    b = boxes.detach().to(coord_dtype)
    y = _sample_positions(b[:, 1], b[:, 3], spatial_scale, out_h, sr)  # (K, out_h, sr)
    x = _sample_positions(b[:, 0], b[:, 2], spatial_scale, out_w, sr)  # (K, out_w, sr)
    ry, wy = _axis_taps(y, H)  # (K, out_h, sr, 2)
    rx, wx = _axis_taps(x, W)
    K = boxes.shape[0]
    return (ry.reshape(K, out_h, 2 * sr), wy.reshape(K, out_h, 2 * sr),
            rx.reshape(K, out_w, 2 * sr), wx.reshape(K, out_w, 2 * sr))


# ----------------------------------------------------------------------------------------------
# Pure-torch gather kernel (the custom op's eager implementation) and its backward
# ----------------------------------------------------------------------------------------------

# Elements of one gather, (RoI bins x taps) x C: all (2*sr)^2 taps are gathered at once unless
# that exceeds this, then in chunks of taps (a ResNet-50 mask pooler's 14x14 bins x 256 channels x
# hundreds of RoIs would need gigabytes at once).
_GATHER_ELEMENTS = 1 << 24


def _tap_chunks(H, W, coord_dtype, boxes, batch_indices, spatial_scale, out_h, out_w, sr, channels):
    """Yields (flat row index (K*out_h*out_w*t,), weight (K*out_h*out_w, t, 1)) for chunks of t of
    the (2*sr)^2 taps into the (B*H*W, C) channels-last view of the features. Few large gathers
    instead of one per tap: the kernel's cost was per-op overhead, not bandwidth."""
    ry, wy, rx, wx = _taps(H, W, coord_dtype, boxes, spatial_scale, out_h, out_w, sr)
    K, taps = boxes.shape[0], (2 * sr) ** 2
    base = (batch_indices.to(torch.long) * (H * W)).view(K, 1, 1, 1, 1)
    index = (base + ry[:, :, None, :, None] * W + rx[:, None, :, None, :]).reshape(-1, taps)
    weight = (wy[:, :, None, :, None] * wx[:, None, :, None, :] / (sr * sr)).reshape(-1, taps, 1)
    t = max(1, min(taps, _GATHER_ELEMENTS // max(1, index.shape[0] * channels)))
    for s in range(0, taps, t):
        yield index[:, s:s + t].reshape(-1), weight[:, s:s + t]


def roi_align_torch(features: Tensor, boxes: Tensor, batch_indices: Tensor, spatial_scale: float,
                    output_height: int, output_width: int, sampling_ratio: int = 2) -> Tensor:
    """Pure-torch RoIAlignV2. features (B, C, H, W); boxes (K, 4) xyxy image pixels; batch_indices
    (K,) int -> (K, C, output_height, output_width). Differentiable w.r.t. features by plain autograd
    (not used by the custom op, whose backward is `_roi_align_backward`)."""
    B, C, H, W = features.shape
    K = boxes.shape[0]
    flat = features.permute(0, 2, 3, 1).reshape(B * H * W, C)  # a view for channels-last features
    acc_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    out = 0
    for index, weight in _tap_chunks(H, W, _coord_dtype(features), boxes, batch_indices, spatial_scale,
                                     output_height, output_width, sampling_ratio, C):
        rows = flat.index_select(0, index).to(acc_dtype).view(*weight.shape[:2], C)  # (K*oh*ow, t, C)
        out = out + torch.bmm(weight.to(acc_dtype).transpose(1, 2), rows)[:, 0]  # (K*oh*ow, C)
    out = out.to(features.dtype).view(K, output_height, output_width, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _roi_align_backward(grad: Tensor, features_shape, boxes: Tensor, batch_indices: Tensor,
                        spatial_scale: float, sampling_ratio: int) -> Tensor:
    """grad (K, C, oh, ow) -> grad of features (B, C, H, W): the transpose of the gather (index_add),
    returned channels-last (a permuted view; no copy back to contiguous NCHW)."""
    B, C, H, W = features_shape
    K, _, oh, ow = grad.shape
    acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    g = grad.permute(0, 2, 3, 1).reshape(K * oh * ow, 1, C).to(acc_dtype)
    out = grad.new_zeros((B * H * W, C), dtype=acc_dtype)
    for index, weight in _tap_chunks(H, W, _coord_dtype(grad), boxes, batch_indices, spatial_scale,
                                     oh, ow, sampling_ratio, C):
        out.index_add_(0, index, (weight.to(acc_dtype) * g).reshape(index.shape[0], C))
    return out.to(grad.dtype).view(B, H, W, C).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# Eager matrix-product kernel (per frame)
# ----------------------------------------------------------------------------------------------

# A matrix-product RoIAlign does (H*W + W*S_w) / (S_w * (2*sr)^2) times the multiply-adds of the
# gather; on a 2-core CPU it is still faster up to about 100x (measured, forward + backward: 1.7x
# faster at 7x7 bins on a 32x43 map, 1.4x at 14x14 bins on 90x160, 0.8x at 7x7 bins on 90x160).
# Its intermediate (B, R*S_h, C*W) is not chunked: above this many elements the gather runs.
_MATMUL_MAX_WORK_RATIO = 96
_MATMUL_MAX_ELEMENTS = 1 << 26


def _matmul_pays(features: Tensor, rois_per_frame: int, out_h: int, out_w: int, sr: int) -> bool:
    B, C, H, W = features.shape
    return ((H * W + W * out_w) <= _MATMUL_MAX_WORK_RATIO * out_w * (2 * sr) ** 2
            and B * rois_per_frame * out_h * C * W <= _MATMUL_MAX_ELEMENTS)


def _interpolation_matrix(lo: Tensor, hi: Tensor, spatial_scale: float, bins: int, sr: int,
                          size: int) -> Tensor:
    """lo, hi (...,) box edges in image pixels -> (..., bins, size): row i holds the weights with
    which bin i averages the map's pixels along this axis (sr samples, two taps each)."""
    index, weight = _axis_taps(_sample_positions(lo, hi, spatial_scale, bins, sr), size)
    index, weight = index.flatten(-2), weight.flatten(-2) / sr  # (..., bins, 2*sr)
    pixels = torch.arange(size, device=lo.device)
    return ((index[..., None] == pixels) * weight[..., None]).sum(-2)


def _roi_align_matmul(features: Tensor, boxes: Tensor, oh: int, ow: int, spatial_scale: float,
                      sr: int, keep: Tensor | None = None) -> Tensor:
    """features (B, C, H, W), boxes (B, R, 4) -> (B, R, C, oh, ow) as A_y X A_x^T per RoI.
    ``keep`` (B, R) bool: RoIs outside it pool zeros (one FPN level's share of a multilevel call)."""
    B, C, H, W = features.shape
    R = boxes.shape[1]
    b = boxes.detach().to(_coord_dtype(features))
    a_y = _interpolation_matrix(b[..., 1], b[..., 3], spatial_scale, oh, sr, H)  # (B, R, oh, H)
    a_x = _interpolation_matrix(b[..., 0], b[..., 2], spatial_scale, ow, sr, W)  # (B, R, ow, W)
    if keep is not None:
        a_y = a_y * keep[:, :, None, None].to(a_y.dtype)
    rows = torch.bmm(a_y.reshape(B, R * oh, H).to(features.dtype),
                     features.transpose(1, 2).reshape(B, H, C * W))  # (B, R*oh, C*W)
    out = torch.bmm(rows.view(B * R, oh * C, W),
                    a_x.reshape(B * R, ow, W).transpose(1, 2).to(features.dtype))  # (B*R, oh*C, ow)
    return out.view(B, R, oh, C, ow).transpose(2, 3)


def _eager(mode: str) -> bool:
    """The "roialign" mode outside torch.export / torch.compile: any kernel may run."""
    return mode == "roialign" and not torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------
# Custom op: one node in torch.export graphs, one ONNX RoiAlign node after export
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("efficientvis::roi_align", mutates_args=())
def _roi_align_op(features: Tensor, rois: Tensor, batch_indices: Tensor, spatial_scale: float,
                  output_height: int, output_width: int, sampling_ratio: int) -> Tensor:
    """Signature of ONNX RoiAlign: X (B, C, H, W), rois (K, 4), batch_indices (K,) int64."""
    with torch.no_grad():
        return roi_align_torch(features, rois, batch_indices, spatial_scale, output_height,
                               output_width, sampling_ratio)


@_roi_align_op.register_fake
def _(features, rois, batch_indices, spatial_scale, output_height, output_width, sampling_ratio):
    return features.new_empty((rois.shape[0], features.shape[1], output_height, output_width))


def _setup_context(ctx, inputs, output):
    features, rois, batch_indices, spatial_scale, _, _, sampling_ratio = inputs
    ctx.save_for_backward(rois, batch_indices)
    ctx.features_shape = tuple(features.shape)
    ctx.spatial_scale = spatial_scale
    ctx.sampling_ratio = sampling_ratio


def _backward(ctx, grad):
    rois, batch_indices = ctx.saved_tensors
    grad_features = _roi_align_backward(grad, ctx.features_shape, rois, batch_indices,
                                        ctx.spatial_scale, ctx.sampling_ratio)
    return grad_features, None, None, None, None, None, None


_roi_align_op.register_autograd(_backward, setup_context=_setup_context)


def _roi_align_onnx(features, rois, batch_indices, spatial_scale: float, output_height: int,
                    output_width: int, sampling_ratio: int):
    """onnxscript translation of efficientvis::roi_align (used by the dynamo exporter)."""
    from onnxscript import opset16 as op

    return op.RoiAlign(features, op.CastLike(rois, features), batch_indices,
                       coordinate_transformation_mode="half_pixel", mode="avg",
                       output_height=output_height, output_width=output_width,
                       sampling_ratio=sampling_ratio, spatial_scale=spatial_scale)


# Pass to torch.onnx.export(..., dynamo=True, custom_translation_table=ONNX_TRANSLATION_TABLE).
ONNX_TRANSLATION_TABLE = {torch.ops.efficientvis.roi_align.default: _roi_align_onnx}


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _check_args(sampling_ratio: int):
    if not isinstance(sampling_ratio, int) or sampling_ratio < 1:
        # 0 ("adaptive", ceil(size / bins)) would make the sample count data-dependent.
        raise ValueError(f"sampling_ratio must be a positive int (fixed), got {sampling_ratio!r}")


def roi_align_flat(features: Tensor, boxes: Tensor, batch_indices: Tensor,
                   output_size: int | Sequence[int], spatial_scale: float,
                   sampling_ratio: int = 2) -> Tensor:
    """torchvision-style layout, always through the custom op (ONNX RoiAlign on export).

    features (B, C, H, W); boxes (K, 4) xyxy image pixels; batch_indices (K,) int -> (K, C, S_h, S_w).
    """
    _check_args(sampling_ratio)
    oh, ow = _pair(output_size)
    # boxes stay float32 (float64 with float64 features) even for fp16 features: coordinates in
    # fp16 would be off by up to half a pixel; the ONNX translation casts them like the features.
    rois = boxes.detach().to(_coord_dtype(features))
    return _roi_align_op(features, rois, batch_indices.to(torch.long), float(spatial_scale), oh, ow,
                         sampling_ratio)


def _roi_align_gridsample(features: Tensor, boxes: Tensor, oh: int, ow: int, spatial_scale: float,
                          sr: int) -> Tensor:
    """features (B, C, H, W), boxes (B, R, 4) -> (B, R, C, oh, ow) via one GridSample per frame."""
    B, C, H, W = features.shape
    R = boxes.shape[1]
    b = boxes.detach().to(_coord_dtype(features))
    y = _sample_positions(b[..., 1], b[..., 3], spatial_scale, oh, sr).reshape(B, R, oh * sr)
    x = _sample_positions(b[..., 0], b[..., 2], spatial_scale, ow, sr).reshape(B, R, ow * sr)

    def normalised(c: Tensor, size) -> Tensor:
        # torchvision's rule: out of [-1, size] -> 0; else clamp to [0, size - 1] (then bilinear).
        valid = (c >= -1.0) & (c <= size)
        c = torch.minimum(c.clamp(min=0), (size - 1) * torch.ones_like(c))
        g = (2 * c + 1) / size - 1  # align_corners=False: pixel c -> normalised g
        # invalid samples go to normalised -3 (pixel -size - 0.5): all four neighbours are padding.
        return torch.where(valid, g, torch.full_like(g, -3.0))

    gy = normalised(y, H)  # (B, R, oh*sr)
    gx = normalised(x, W)  # (B, R, ow*sr)
    grid = torch.stack([gx[:, :, None, :].expand(B, R, oh * sr, ow * sr),
                        gy[:, :, :, None].expand(B, R, oh * sr, ow * sr)], -1)
    grid = grid.reshape(B, R * oh * sr, ow * sr, 2).to(features.dtype)
    sampled = F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # (B, C, R*oh*sr, ow*sr)
    pooled = F.avg_pool2d(sampled, kernel_size=sr, stride=sr)  # (B, C, R*oh, ow)
    return pooled.reshape(B, C, R, oh, ow).permute(0, 2, 1, 3, 4)


def _frame_indices(B: int, R: int, device) -> Tensor:
    """(B*R,) frame index of each of R boxes per frame (expand, not repeat_interleave: the latter
    exported with a fixed R)."""
    return torch.arange(B, device=device).view(B, 1).expand(B, R).reshape(-1)


def roi_align(features: Tensor, boxes: Tensor, output_size: int | Sequence[int],
              spatial_scale: float, sampling_ratio: int = 2, mode: str | None = None) -> Tensor:
    """Per-frame batched RoIAlignV2.

    features (B, C, H, W); boxes (B, R, 4) xyxy in input-image pixels, the R boxes of frame b cut
    from features[b]; spatial_scale = 1 / stride -> (B, R, C, S_h, S_w). ``mode`` None = module switch.
    """
    _check_args(sampling_ratio)
    oh, ow = _pair(output_size)
    mode = _resolve_mode(mode)
    if mode == "gridsample":
        return _roi_align_gridsample(features, boxes, oh, ow, float(spatial_scale), sampling_ratio)
    if _eager(mode) and _matmul_pays(features, boxes.shape[1], oh, ow, sampling_ratio):
        return _roi_align_matmul(features, boxes, oh, ow, float(spatial_scale), sampling_ratio)
    B, R = boxes.shape[:2]
    batch_indices = _frame_indices(B, R, boxes.device)
    out = roi_align_flat(features, boxes.reshape(-1, 4), batch_indices, (oh, ow), spatial_scale,
                         sampling_ratio)  # (B*R, C, oh, ow)
    return out.reshape(B, R, out.shape[1], oh, ow)


def assign_levels(boxes: Tensor, num_levels: int = 4, min_level: int = 2, canonical_size: int = 224,
                  canonical_level: int = 4) -> Tensor:
    """boxes (..., 4) xyxy image pixels -> (...,) int64 index into the pyramid list (0 = min_level).

    level = floor(canonical_level + log2(sqrt(w * h) / canonical_size + 1e-8)) clamped to
    [min_level, min_level + num_levels - 1] (detectron2's assign_boxes_to_levels).
    """
    b = boxes.detach().float()
    wh = (b[..., 2:] - b[..., :2]).clamp(min=0)
    size = (wh[..., 0] * wh[..., 1]).sqrt()
    level = torch.floor(canonical_level + torch.log2(size / canonical_size + 1e-8))
    level = level.clamp(min=min_level, max=min_level + num_levels - 1)
    return (level - min_level).long()


def multilevel_roi_align(features: Sequence[Tensor], boxes: Tensor, output_size: int | Sequence[int],
                         sampling_ratio: int = 2, canonical_size: int = 224, canonical_level: int = 4,
                         strides: Sequence[int] | None = None, mode: str | None = None) -> Tensor:
    """FPN RoIAlign: features [P2, P3, P4, P5] each (B, C, H_l, W_l); boxes (B, R, 4) xyxy image
    pixels -> (B, R, C, S_h, S_w).

    Each RoI is pooled from the level `assign_levels` gives it. Exported ("roialign", "gridsample")
    with static shapes only: RoIAlign runs on every level for every RoI and the result is selected
    per RoI with ``torch.where`` (no NonZero, no boolean indexing). Eager, and exported in
    "grouped" mode: each level pools only its own RoIs. ``strides`` default 4, 8, 16, ... (level k
    has stride 2^k, first level P2).
    """
    features = list(features)
    if strides is None:
        strides = [2 ** (2 + i) for i in range(len(features))]
    min_level = int(round(math.log2(strides[0])))
    levels = assign_levels(boxes, len(features), min_level, canonical_size, canonical_level)  # (B, R)
    mode = _resolve_mode(mode)
    if mode == "grouped" or _eager(mode):
        return _grouped_by_level(features, boxes, levels, strides, output_size, sampling_ratio,
                                 matmul=_eager(mode))
    out = None
    for i, (feat, stride) in enumerate(zip(features, strides)):
        pooled = roi_align(feat, boxes, output_size, 1.0 / stride, sampling_ratio, mode)
        if out is None:
            out = pooled
        else:
            out = torch.where((levels == i)[:, :, None, None, None], pooled, out)
    return out


def _grouped_by_level(features, boxes, levels, strides, output_size, sampling_ratio, matmul=False):
    """Eager (training/PyTorch inference) and "grouped" export form of multilevel_roi_align: each
    RoI is pooled on its own level only (4x less work). Same numbers as the static form. While
    exporting there is no branch on a level's RoI count (a data-dependent guard would stop the
    export): a level without RoIs pools none. ``matmul`` (eager only): a level whose map is small
    enough pools with `_roi_align_matmul`, its other RoIs' rows of A_y zeroed."""
    oh, ow = _pair(output_size)
    B, R = boxes.shape[:2]
    flat_boxes = boxes.reshape(-1, 4)
    batch = _frame_indices(B, R, boxes.device)
    flat_levels = levels.reshape(-1)
    out = features[0].new_zeros(B * R, features[0].shape[1], oh, ow)
    for i, (feat, stride) in enumerate(zip(features, strides)):
        idx = torch.nonzero(flat_levels == i).flatten()
        if not torch.compiler.is_compiling() and not idx.numel():
            continue  # eager: no op (and no zero gradient of the whole level) for an empty level
        if matmul and _matmul_pays(feat, R, oh, ow, sampling_ratio):
            pooled = _roi_align_matmul(feat, boxes, oh, ow, 1.0 / stride, sampling_ratio, levels == i)
            out = out + pooled.reshape(out.shape)  # exact zeros on the other levels' rows
            continue
        pooled = roi_align_flat(feat, flat_boxes[idx], batch[idx], (oh, ow), 1.0 / stride, sampling_ratio)
        out = out.index_copy(0, idx, pooled)
    return out.reshape(B, R, out.shape[1], oh, ow)
