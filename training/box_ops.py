"""Box utilities (xyxy absolute pixels unless a name says otherwise)."""

import math

import torch

# Sparse R-CNN's box-delta weights and the log-scale clamp.
DELTA_WEIGHTS = (2.0, 2.0, 1.0, 1.0)
SCALE_CLAMP = math.log(1000.0 / 16)


def cxcywh_to_xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def xyxy_to_cxcywh(b):
    x1, y1, x2, y2 = b.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def image_scale(image_sizes):
    """image_sizes (B, 2) = (height, width) -> (B, 4) = (w, h, w, h): xyxy box bounds."""
    h, w = image_sizes[:, 0], image_sizes[:, 1]
    return torch.stack([w, h, w, h], -1)


def usable_carried_boxes(carried, scale):
    """carried: (active (B, N) bool, last-frame boxes (B, N, 4) xyxy pixels); scale (B, 1, 4) from
    `image_scale`. -> the boxes clipped to the image, and active only where the clipped box is at
    least a pixel wide and high (boxes would otherwise drift off the image clip after clip)."""
    active, last = carried
    last = torch.minimum(last.to(scale.dtype).clamp(min=0), scale)
    return active & ((last[..., 2:] - last[..., :2]) >= 1).all(-1), last


def box_area(b):
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def pairwise_iou_giou(a, b):
    """a (..., P, 4), b (..., Q, 4) xyxy -> (iou, giou), each (..., P, Q)."""
    area_a, area_b = box_area(a)[..., :, None], box_area(b)[..., None, :]
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-7)
    lt_c = torch.minimum(a[..., :, None, :2], b[..., None, :, :2])
    rb_c = torch.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
    hull = (rb_c - lt_c).clamp(min=0).prod(-1)
    giou = iou - (hull - union) / hull.clamp(min=1e-7)
    return iou, giou


def elementwise_iou_giou(a, b):
    """a, b (..., 4) xyxy -> IoU, generalised IoU (...,) of corresponding boxes."""
    inter_wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = inter_wh.prod(-1)
    union = box_area(a) + box_area(b) - inter
    iou = inter / union.clamp(min=1e-7)
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    return iou, iou - (hull - union) / hull.clamp(min=1e-7)


def apply_deltas(deltas, boxes):
    """Sparse R-CNN box refinement: deltas (..., 4) applied to boxes (..., 4) xyxy."""
    wx, wy, ww, wh = DELTA_WEIGHTS
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=SCALE_CLAMP)
    dh = (deltas[..., 3] / wh).clamp(max=SCALE_CLAMP)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    return torch.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                        pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], -1)
