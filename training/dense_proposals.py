"""Dense initial proposals (model.init_boxes=dense; not in the paper, which starts every clip from
learned whole-image boxes).

A small FCOS-style head on one FPN level predicts, at every location of every frame, an objectness
logit and a box (distances from the location to the box's four sides). Each clip's free query
slots start from the strongest peaks of the clip's mean objectness, one box per frame read at the
peak's location, instead of the whole image: the first iteration starts near an object, so the
M iterations refine instead of search, and the dense loss (every location supervised, one-to-many)
learns where the objects are long before the one-to-one matching does. Slots that carry their
object from the previous clip (model.carry_proposals) keep their box; peaks on a carried box are
passed over. The proposals are not back-propagated through (two-stage DETR).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from efficientvis.training.box_ops import (elementwise_iou_giou, image_scale, pairwise_iou_giou,
                                           usable_carried_boxes)
from efficientvis.training.losses import sigmoid_focal_loss

CENTER_RADIUS = 1.5  # FCOS centre sampling: positives within this many strides of a box's centre
MAX_LOG_SIDE = 8.0   # exp() bound of the side distances (in strides)


class DenseProposalHead(nn.Module):
    def __init__(self, dim, level, convs=2, prior_prob=0.01):
        super().__init__()
        self.level, self.stride = level, 2 ** (level + 2)  # FPN maps start at P2 (stride 4)
        tower = []
        for _ in range(convs):
            tower += [nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(8, dim), nn.ReLU(inplace=True)]
        self.tower = nn.Sequential(*tower)
        self.objectness = nn.Conv2d(dim, 1, 3, padding=1)
        self.sides = nn.Conv2d(dim, 4, 3, padding=1)
        nn.init.constant_(self.objectness.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(self.sides.bias, math.log(2.0))  # boxes start 4 strides wide

    def forward(self, features):
        """FPN maps (B*T, C, h, w) -> objectness logits (B*T, h, w), sides (B*T, 4, h, w) in pixels
        (left, top, right, bottom distances from each location's centre)."""
        x = self.tower(features[self.level])
        sides = self.sides(x).clamp(max=MAX_LOG_SIDE).exp() * self.stride
        return self.objectness(x)[:, 0], sides


def location_centres(h, w, stride, device):
    """(h*w, 2) x, y pixel centres of a stride-`stride` map's cells (half-pixel convention)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return (torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * stride


def _boxes_at(centres, sides):
    """centres (L, 2), sides (..., 4, L) -> (..., L, 4) xyxy."""
    sides = sides.transpose(-1, -2)
    return torch.cat([centres - sides[..., :2], centres + sides[..., 2:]], -1)


@torch.no_grad()
def select_proposals(objectness, sides, stride, num_slots, image_sizes, carried=None, overlap=0.5):
    """Initial tracklet proposals (B, N, T, 4) xyxy pixels from the dense head's outputs.

    objectness (B*T, h, w), sides (B*T, 4, h, w); image_sizes (B, 2) (height, width).
    carried: (active (B, N) bool, boxes (B, N, 4)) or None: active slots keep their box on every
    frame; the others take the best peaks of the clip's mean objectness, best first, skipping
    peaks whose first-frame box overlaps an active slot's box by more than `overlap` IoU.
    Shapes never depend on the data (the ONNX stage_0 runs this): 2N candidates are always taken,
    a map with fewer locations being padded with whole-image boxes that rank last.
    """
    B = image_sizes.shape[0]
    BT, h, w = objectness.shape
    T, N, K = BT // B, num_slots, 2 * num_slots
    score = objectness.sigmoid().reshape(B, T, h, w).mean(1)  # (B, h, w)
    centres = location_centres(h, w, stride, objectness.device)  # (L, 2)
    inside = (centres[None, :, 0] < image_sizes[:, None, 1]) & (centres[None, :, 1] < image_sizes[:, None, 0])
    peaks = score == F.max_pool2d(score[:, None], 3, stride=1, padding=1)[:, 0]
    score = (score * peaks).flatten(1) * inside  # (B, L): local maxima inside the image
    scale = image_scale(image_sizes.float())[:, None, None]  # (B, 1, 1, 4)
    boxes = torch.minimum(_boxes_at(centres, sides.reshape(B, T, 4, h * w)).clamp(min=0), scale)  # (B, T, L, 4)
    whole = torch.cat([torch.zeros_like(scale[..., :2]), scale[..., 2:]], -1).expand(B, T, K, 4)
    score = torch.cat([score, score.new_full((B, K), -1.0)], 1)  # (B, L + K)
    boxes = torch.cat([boxes, whole], 2)
    top, where = score.topk(K, dim=1)  # (B, K)
    candidates = boxes.gather(2, where[:, None, :, None].expand(B, T, K, 4)).transpose(1, 2)  # (B, K, T, 4)
    free = torch.ones(B, N, device=objectness.device)
    if carried is not None:
        active, last = usable_carried_boxes(carried, scale[:, 0])  # (B, N), (B, N, 4)
        covered = pairwise_iou_giou(candidates[:, :, 0], last)[0]  # (B, K, N)
        covered = ((covered > overlap) & active[:, None, :]).any(-1)
        top = top - 4.0 * covered.float()  # covered peaks go last
        free = (~active).float()
    order = top.argsort(dim=1, descending=True)
    candidates = candidates.gather(1, order[:, :, None, None].expand(-1, -1, T, 4))
    # free slot n takes the rank-th best peak (a float cumsum: TensorRT's CumSum is float only)
    rank = (free.cumsum(1) - 1).clamp(min=0).long()
    proposals = candidates.gather(1, rank[:, :, None, None].expand(-1, -1, T, 4))  # (B, N, T, 4)
    if carried is not None:
        proposals = torch.where(free[:, :, None, None] > 0, proposals, last[:, :, None, :].expand(-1, -1, T, -1))
    return proposals


def dense_proposal_loss(objectness, sides, stride, targets, cfg):
    """Focal objectness + GIoU box loss of the dense head, summed over every frame of the batch's
    clips and divided by the number of positive locations (this process's: under DDP each process
    normalises its own batch).

    A location is positive for a visible ground-truth box when it lies within CENTER_RADIUS strides
    of the box's centre and inside the box (or in the cell holding the centre: boxes smaller than a
    cell keep one positive); a location positive for several boxes takes the smallest.
    objectness (B*T, h, w), sides (B*T, 4, h, w); targets: the clip targets of the batch.
    """
    BT, h, w = objectness.shape
    T = BT // len(targets)
    centres = location_centres(h, w, stride, objectness.device)  # (L, 2)
    labels, box_targets, valid = [], [], []
    for target in targets:
        gt = target["boxes"].float().transpose(0, 1)  # (T, G, 4)
        present = target["present"].transpose(0, 1) & target["frame_valid"][:, None]  # (T, G)
        centre = (gt[..., :2] + gt[..., 2:]) / 2  # (T, G, 2)
        offset = (centres[None, :, None] - centre[:, None]).abs()  # (T, L, G, 2)
        inside = ((centres[None, :, None] > gt[:, None, :, :2]) & (centres[None, :, None] < gt[:, None, :, 2:])).all(-1)
        near = (offset < CENTER_RADIUS * stride).all(-1) & (inside | (offset <= stride / 2).all(-1))
        near = near & present[:, None]  # (T, L, G)
        area = ((gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1]))[:, None].expand_as(near)
        area = torch.where(near, area, torch.full_like(area, float("inf")))
        labels.append(near.any(-1).float())
        if gt.shape[1]:  # a clip may hold no track
            best = area.argmin(-1)  # (T, L)
            box_targets.append(gt.gather(1, best[..., None].expand(-1, -1, 4)))
        else:
            box_targets.append(gt.new_ones(T, h * w, 4))
        valid.append(target["frame_valid"][:, None].expand(T, h * w))
    labels = torch.cat(labels)  # (B*T, L)
    box_targets, valid = torch.cat(box_targets), torch.cat(valid).float()
    positives = labels.sum().clamp(min=1.0)
    focal = sigmoid_focal_loss(objectness.flatten(1), labels, cfg.focal_alpha, cfg.focal_gamma)
    pred = _boxes_at(centres, sides.flatten(2))  # (B*T, L, 4)
    _, giou = elementwise_iou_giou(pred, box_targets)
    return ((focal * valid).sum() + ((1 - giou) * labels).sum()) / positives
