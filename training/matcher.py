"""Tracklet matching (paper Eq. 4): one Hungarian assignment of whole tracklets per clip.

cost(i, j) = sum_t [ w_cls * -p_i^t(c_j^t)
                     + 1{j visible at t} * (w_l1 * L1 + w_giou * -GIoU + w_mask * -maskIoU) ]
where c_j^t is the background class on frames where ground truth j is absent; with sigmoid class
scores the background probability is 1 - max_k p_k. The mask IoU is the soft dice coefficient of
the predicted mask (2S x 2S) and the ground truth cropped by the predicted box.
"""

import torch
from scipy.optimize import linear_sum_assignment

from efficientvis.training.box_ops import pairwise_iou_giou
from efficientvis.training.roi_align import roi_align


def crop_target_masks(masks, boxes, size):
    """Ground-truth masks cut out by predicted boxes, as a mask head sees them.

    masks (G, T, H, W) uint8; boxes (T, R, 4) xyxy -> (T, R, G, size, size) float in [0, 1].
    """
    features = masks.transpose(0, 1).float()  # (T, G, H, W): one frame per batch entry
    return roi_align(features, boxes, size, spatial_scale=1.0, sampling_ratio=2)


def dice_coefficient(pred, target):
    """pred (..., P), target (..., P) in [0, 1] -> (...,) smoothed dice (QueryInst's form)."""
    return (2 * (pred * target).sum(-1) + 1) / (pred.sum(-1) + target.sum(-1) + 1)


def normalised(boxes, image_size):
    h, w = image_size
    return boxes / boxes.new_tensor([w, h, w, h])


@torch.no_grad()
def tracklet_costs(out, target, weights):
    """out: one clip's predictions {class_logits (N,T,K), boxes (N,T,4), mask_logits (N,T,S,S)};
    target: that clip's {labels (G,), boxes (G,T,4), masks (G,T,H,W), present (G,T)} + frame_valid (T,)
    -> cost matrix (N, G)."""
    prob = out["class_logits"].sigmoid()  # (N, T, K)
    present = target["present"].float()  # (G, T)
    valid = target["frame_valid"].float()  # (T,)
    fg = prob[:, :, target["labels"]].permute(0, 2, 1)  # (N, G, T): p_i^t(c_j)
    bg = 1 - prob.max(-1).values  # (N, T)
    cost_class = -(present * fg + (1 - present) * bg[:, None, :])  # (N, G, T)

    size = target["image_size"]
    pb = normalised(out["boxes"], size)  # (N, T, 4)
    gb = normalised(target["boxes"], size)  # (G, T, 4)
    cost_l1 = (pb[:, None] - gb[None]).abs().sum(-1)  # (N, G, T)
    _, giou = pairwise_iou_giou(pb.transpose(0, 1), gb.transpose(0, 1))  # (T, N, G)
    cost_giou = -giou.permute(1, 2, 0)

    S = out["mask_logits"].shape[-1]
    crops = crop_target_masks(target["masks"], out["boxes"].transpose(0, 1), S)  # (T, N, G, S, S)
    pred = out["mask_logits"].sigmoid().flatten(-2)  # (N, T, S*S)
    dice = dice_coefficient(pred.transpose(0, 1)[:, :, None], crops.flatten(-2))  # (T, N, G)
    cost_mask = -dice.permute(1, 2, 0)

    per_frame = weights.match_class * cost_class + present[None] * (
        weights.match_l1 * cost_l1 + weights.match_giou * cost_giou + weights.match_mask * cost_mask)
    return (per_frame * valid).sum(-1)  # (N, G)


def hungarian(cost, allowed_queries=None):
    """cost (N, G) -> (query_idx, gt_idx) int64 tensors; optionally only among allowed queries."""
    cost = cost.cpu()
    rows = torch.arange(cost.shape[0]) if allowed_queries is None else allowed_queries.cpu()
    if len(rows) == 0 or cost.shape[1] == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    r, c = linear_sum_assignment(cost[rows].numpy())
    return rows[torch.as_tensor(r, dtype=torch.int64)], torch.as_tensor(c, dtype=torch.int64)


def match_clip(out, target, weights):
    """Assignment of the ground-truth tracks visible somewhere in this clip."""
    seen = torch.nonzero(target["present"].any(1)).flatten().cpu()
    q, g = hungarian(tracklet_costs(out, target, weights)[:, seen])
    return q, seen[g]


def extend_assignment(out, target, weights, assignment):
    """Correspondence learning (Sec. 3.3): the second clip keeps the first clip's assignment.

    Ground-truth tracks that the first clip did not see (entering objects) are matched only among
    the query slots the first clip left free.
    """
    query_idx, gt_idx = assignment
    G, N = target["labels"].shape[0], out["class_logits"].shape[0]
    unseen = torch.tensor([j for j in range(G) if j not in set(gt_idx.tolist())], dtype=torch.int64)
    if len(unseen) == 0:
        return assignment
    free = torch.tensor([i for i in range(N) if i not in set(query_idx.tolist())], dtype=torch.int64)
    cost = tracklet_costs(out, target, weights)[:, unseen]
    q, g = hungarian(cost, free)
    return torch.cat([query_idx, q]), torch.cat([gt_idx, unseen[g]])
