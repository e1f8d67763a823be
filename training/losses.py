"""Clip loss (paper Eq. 5) with deep supervision over the M iterations.

For matched (query sigma(j), ground truth j), per frame t:
  focal class loss with target c_j on frames where j is visible and background elsewhere
  (`loss.class_loss=varifocal`: the target of c_j is the box IoU of that frame instead of 1,
  RT-DETR's varifocal loss, so the class score also ranks how well the track is localised),
  box L1 (image-normalised) + GIoU and mask dice on visible frames,
  mask BCE on every frame (absent frames learn an empty mask).
Unmatched queries only get the class loss towards background. Sums are divided by the number of
visible (track, frame) entries in the batch (all-reduced under DDP), BCE by its own entry count.
"""

import torch
import torch.nn.functional as F

from efficientvis.errors import UserError
from efficientvis.training.box_ops import elementwise_iou_giou
from efficientvis.training.matcher import (crop_target_masks, dice_coefficient, extend_assignment,
                                           match_clip, normalised)


CLASS_LOSSES = ("focal", "varifocal")
# hard: the ground-truth mask cropped by the predicted box, thresholded at 0.5 (QueryInst);
# soft: the crop's fraction of mask in each cell, so the 14x14 target keeps where inside a cell
# the boundary runs (the pasted-back hard target caps a mask's IoU at 0.915 on the synthetic
# valid objects, the soft one at 0.964: docs/ablations.md)
MASK_TARGETS = ("hard", "soft")


def sigmoid_focal_loss(logits, targets, alpha, gamma):
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    return (alpha * targets + (1 - alpha) * (1 - targets)) * loss


def varifocal_loss(logits, targets, alpha, gamma):
    """targets in [0, 1]: positives weighted by their target (IoU), negatives focal-weighted."""
    p = logits.sigmoid()
    weight = alpha * p.detach() ** gamma * (targets == 0) + targets
    return F.binary_cross_entropy_with_logits(logits, targets, weight=weight, reduction="none")


def clip_loss_terms(out, target, assignment, cfg):
    """Un-normalised loss sums of one clip at one iteration + the entry counts."""
    logits = out["class_logits"]  # (N, T, K)
    N, T, K = logits.shape
    q, g = assignment
    valid = target["frame_valid"].float()  # (T,)
    present = target["present"][g].float() * valid  # (m, T)

    pb = normalised(out["boxes"][q], target["image_size"])  # (m, T, 4)
    gb = normalised(target["boxes"][g], target["image_size"])
    iou, giou = elementwise_iou_giou(pb, gb)  # (m, T)

    class_target = torch.zeros_like(logits)
    if len(q):
        onehot = F.one_hot(target["labels"][g], K).float()  # (m, K)
        strength = present * iou.detach().clamp(min=0) if cfg.class_loss == "varifocal" else present
        class_target[q] = strength[:, :, None] * onehot[:, None, :]
    if cfg.class_loss == "varifocal":
        per_class = varifocal_loss(logits, class_target, cfg.varifocal_alpha, cfg.focal_gamma)
    else:
        per_class = sigmoid_focal_loss(logits, class_target, cfg.focal_alpha, cfg.focal_gamma)
    terms = {"class": (per_class.sum(-1) * valid).sum()}
    terms["l1"] = ((pb - gb).abs().sum(-1) * present).sum()
    terms["giou"] = ((1 - giou) * present).sum()

    mask_logits = out["mask_logits"][q]  # (m, T, S, S)
    S = mask_logits.shape[-1]
    if len(q):
        boxes = out["boxes"][q].detach().reshape(-1, 1, 4)  # one RoI per (track, frame)
        masks = target["masks"][g].reshape(-1, 1, *target["masks"].shape[-2:])  # (m*T, 1, H, W)
        crops = crop_target_masks(masks.transpose(0, 1), boxes, S)  # (m*T, 1, 1, S, S)
        mask_target = crops.reshape(len(q), T, S, S)
        if cfg.mask_targets == "hard":
            mask_target = (mask_target >= 0.5).float()
    else:
        mask_target = mask_logits.new_zeros(mask_logits.shape)
    dice = 1 - dice_coefficient(mask_logits.sigmoid().flatten(-2), mask_target.flatten(-2))  # (m, T)
    terms["dice"] = (dice * present).sum()
    bce = F.binary_cross_entropy_with_logits(mask_logits, mask_target, reduction="none").mean((-1, -2))
    terms["mask_bce"] = (bce * valid).sum()
    counts = {"visible": present.sum(), "entries": valid.sum() * len(q)}
    return terms, counts


WEIGHTS = {"class": "class_weight", "l1": "l1_weight", "giou": "giou_weight", "dice": "dice_weight",
           "mask_bce": "mask_bce_weight"}


def combine(terms, counts, cfg):
    """Weighted, normalised total and a dict of the parts (for logging)."""
    visible = counts["visible"].clamp(min=1.0)
    entries = counts["entries"].clamp(min=1.0)
    parts = {name: value / (entries if name == "mask_bce" else visible) for name, value in terms.items()}
    total = sum((getattr(cfg, WEIGHTS[name]) * value for name, value in parts.items()), visible.new_zeros(()))
    return total, parts


def semantic_loss(logits, targets, cfg):
    """Dense auxiliary loss of model.semantic_head: sigmoid focal loss of every P2 pixel against
    the fraction of each class's ground-truth mask in it, divided by the positive mass (CondInst).

    logits (B*T, K, h, w); targets: the batch's clip targets, masks (G, T, H, W) padded to the
    batch frame size (a multiple of h and w). Frames that are not valid do not count.
    """
    K, h, w = logits.shape[1:]
    maps, valid = [], []
    for target in targets:
        masks, labels = target["masks"], target["labels"]  # (G, T, H, W), (G,)
        cells = logits.new_zeros((masks.shape[1], K, h, w))
        present = labels.unique()  # only these classes get a full-resolution union (K can be 40)
        if len(present):
            union = torch.stack([masks[labels == c].amax(0) for c in present], 1).float()  # (T, Kp, H, W)
            cells[:, present] = F.adaptive_avg_pool2d(union, (h, w))
        maps.append(cells)
        valid.append(target["frame_valid"].float())
    class_map = torch.cat(maps)  # (B*T, K, h, w)
    valid = torch.cat(valid)[:, None, None, None]
    per_pixel = sigmoid_focal_loss(logits, class_map, cfg.focal_alpha, cfg.focal_gamma) * valid
    positives = (class_map * valid).sum().detach()
    return per_pixel.sum() / positives.clamp(min=1.0)


def _clip_outputs(stage, b):
    return {k: stage[k][b] for k in ("class_logits", "boxes", "mask_logits")}


class TrackletCriterion:
    """Matches and sums the loss of every iteration ("deep supervision") over a batch of clips.

    `assignments`: None to match (first clip, Eq. 4), or the first clip's final assignment per clip
    for the second clip of a correspondence pair (Sec. 3.3). `reduce` all-reduces the entry counts
    under DDP so every process divides by the same numbers.
    """

    def __init__(self, cfg, reduce=None):
        if cfg.class_loss not in CLASS_LOSSES:
            raise UserError(f"loss.class_loss must be one of {', '.join(CLASS_LOSSES)}, got {cfg.class_loss!r}")
        if cfg.mask_targets not in MASK_TARGETS:
            raise UserError(f"loss.mask_targets must be one of {', '.join(MASK_TARGETS)}, got {cfg.mask_targets!r}")
        if cfg.denoising_negatives and not 0 < cfg.denoising_noise < 0.5:
            raise UserError(f"loss.denoising_negatives needs 0 < loss.denoising_noise < 0.5 (negatives are noised "
                            f"up to twice as much), got {cfg.denoising_noise}")
        self.cfg = cfg
        self.reduce = reduce or (lambda x: x)

    def _stage_loss(self, items):
        """items: (outputs, target, assignment) of every clip at one iteration -> total, parts."""
        terms, counts = {}, {"visible": 0.0, "entries": 0.0}
        for out, target, assignment in items:
            t, c = clip_loss_terms(out, target, assignment, self.cfg)
            for k, v in t.items():
                terms[k] = terms.get(k, 0.0) + v
            for k, v in c.items():
                counts[k] = counts[k] + v
        # every process reduces, even one without items (DDP collectives must match)
        counts = {k: self.reduce(torch.as_tensor(v, dtype=torch.float32).detach()) for k, v in counts.items()}
        return combine(terms, counts, self.cfg)

    def __call__(self, outputs, targets, assignments=None):
        total, logs, final = 0.0, {}, None
        for m, stage in enumerate(outputs["stages"]):
            assigned = self.assign(stage, targets, assignments)
            items = [(_clip_outputs(stage, b), targets[b], assigned[b]) for b in range(len(targets))]
            stage_total, parts = self._stage_loss(items)
            total = total + stage_total
            for k, v in parts.items():
                logs[f"{k}_{m}"] = float(v.detach())
            final = [a for _, _, a in items]
        logs["loss"] = float(total.detach())
        return total, logs, final

    @torch.no_grad()
    def assign(self, stage, targets, assignments=None):
        """The assignment of one iteration's outputs without a loss (a lead clip's last iteration):
        matched (Eq. 4), or `assignments` extended to the tracks they do not hold."""
        outs = [_clip_outputs(stage, b) for b in range(len(targets))]
        if assignments is None:
            return [match_clip(out, target, self.cfg) for out, target in zip(outs, targets)]
        return [extend_assignment(out, target, self.cfg, a) for out, target, a in zip(outs, targets, assignments)]

    def denoising(self, denoise_outputs, targets, tracks, num_stages):
        """Loss of the denoising tracklets (training/denoising.py): in clip b, tracklet j is ground
        truth tracks[b][j], no matching. denoise_outputs[b]: that clip's list of stages, or None."""
        total, logs = 0.0, {}
        for m in range(num_stages):
            items = [(_clip_outputs(stages[m], 0), target, (torch.arange(len(idx), device=idx.device), idx))
                     for stages, target, idx in zip(denoise_outputs, targets, tracks) if stages]
            stage_total, parts = self._stage_loss(items)
            total = total + stage_total
            for k, v in parts.items():
                logs[f"dn_{k}_{m}"] = float(torch.as_tensor(v).detach())
        return total, logs
