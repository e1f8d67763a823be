"""Denoising tracklets: a training-only auxiliary task that makes short trainings converge.

Not in the paper. With one-to-one (Hungarian) matching alone, a model trained from scratch spends
its first thousands of steps with several queries on the same object: the matched one changes from
step to step, so the class head is taught "this object -> background" about as often as "-> its
class" and stays flat (measured on the tiny config: the per-stage class loss sat at the level of a
constant predictor for 1000 steps while a linear probe read the class off the RoI features at 98 %).
DN-DETR's remedy, applied to tracklets: besides the N matched queries, each clip also runs the M
iterations on one extra tracklet per ground-truth track whose proposals are that track's boxes with
noise, and whose target is that track (no matching). Those tracklets start from the mean of the
learned queries q* and only attend to each other (a separate pass), so nothing leaks into the
matched queries; the heads they train are the model's own. Inference and export are unchanged.

With loss.denoising_negatives each track also gets a negative tracklet (DINO's contrastive
denoising): its boxes are noised between one and two times as much, and its target is background.
It runs in the same pass as the positives, so the heads learn what inference needs with carried
proposals: of two slots near one object, the one off it is background.
"""

import torch


def noised_tracklet_boxes(target, noise, negatives=False):
    """target: a clip's {boxes (G, T, 4) xyxy, present (G, T), box_noise (G, T, 4) uniform in
    [-1, 1], image_size (H, W)} -> (G', T, 4) noised boxes of the G' tracks present somewhere in
    the clip, and their indices (G',). The uniform draws come with the sample (training/dataset.py),
    so a resumed training sees the same noise. With `negatives`, (2G', T, 4): the G' negatives
    follow, noised with target["negative_noise"] mapped to magnitudes between noise and 2 * noise.

    Per frame: centre moved by up to noise * (w, h) / 2, width and height scaled by 1 +- noise.
    Frames where a track is absent take the box of its nearest frame where it is present (the
    target there is background and an empty mask, as for a matched query).
    """
    present = target["present"]
    seen = torch.nonzero(present.any(1)).flatten()
    boxes = target["boxes"][seen].float()  # (G', T, 4)
    G, T = boxes.shape[:2]
    if G == 0:
        return boxes, seen
    frames = torch.arange(T, device=boxes.device)
    filled = boxes.clone()
    for g in range(G):
        where = frames[present[seen[g]]]
        nearest = where[(frames[:, None] - where[None]).abs().argmin(1)]  # (T,)
        filled[g] = boxes[g, nearest]
    cxcy = (filled[..., :2] + filled[..., 2:]) / 2
    wh = (filled[..., 2:] - filled[..., :2]).clamp(min=1.0)
    H, W = target["image_size"]
    limit = torch.tensor([W, H, W, H], dtype=torch.float32, device=boxes.device)
    u = target["box_noise"][seen].to(boxes.device)
    noised = _noised(cxcy, wh, u, noise, limit)
    if negatives:
        v = target["negative_noise"][seen].to(boxes.device)
        v = v.sign() * (1 + v.abs())  # magnitudes in [1, 2]
        noised = torch.cat([noised, _noised(cxcy, wh, v, noise, limit)])
    return noised, seen


def _noised(cxcy, wh, u, noise, limit):
    """Centre moved by u[..., :2] * noise * size / 2, size scaled by 1 + u[..., 2:] * noise,
    clipped to the image -> xyxy."""
    cxcy = cxcy + u[..., :2] * noise * wh / 2
    wh = wh * (1 + u[..., 2:] * noise)
    return torch.minimum(torch.cat([cxcy - wh / 2, cxcy + wh / 2], -1).clamp(min=0.0), limit)
