"""Hand-crafted linking of tracklets between clips (the paper's Table 1d "Hand-craft" baseline).

Every clip starts from q* (no query feedback). The tracklets of a clip are linked to the tracks
seen before by Hungarian matching on an affinity of box IoU + mask IoU - box L1 (normalised by the
image diagonal) + class agreement, between each track's last visible frame and the tracklet's
first visible frame. Pairs with affinity below `min_affinity` start new tracks; tracks unseen for
`max_age` clips are forgotten.
"""

import numpy as np

from efficientvis.errors import UserError
from efficientvis.runtime.postprocess import paste_mask

LINKING = ("e2e", "handcrafted")


def linker_factory(linking, num_slots, background_threshold=0.2):
    """None for "e2e" (query feedback, no linker), else a function making one HandcraftedLinker per
    video; an unknown name, or scipy missing (the runtime does not otherwise need it), is a UserError."""
    if linking not in LINKING:
        raise UserError(f"linking must be one of {', '.join(LINKING)}, got {linking!r}")
    if linking == "e2e":
        return None
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        raise UserError("--linking handcrafted needs scipy (pip install scipy)") from None
    return lambda: HandcraftedLinker(num_slots, background_threshold)


def _box_iou(a, b):
    lt = np.maximum(a[:2], b[:2])
    rb = np.minimum(a[2:], b[2:])
    inter = np.prod(np.clip(rb - lt, 0, None))
    union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
    return inter / union if union > 0 else 0.0


def _mask_iou(a, b):
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 0.0


class HandcraftedLinker:
    def __init__(self, num_slots, background_threshold=0.2, min_affinity=0.5, max_age=3):
        self.num_slots = num_slots
        self.background_threshold = background_threshold
        self.min_affinity = min_affinity
        self.max_age = max_age
        self.tracks = {}  # id -> dict(box, mask, label, age)
        self.next_id = 1

    def _appearance(self, probs, boxes, masks, size, n, last):
        """(box, mask, label) of slot n at its first (or last) visible frame, or None."""
        frames = np.nonzero(probs[n].max(-1) >= self.background_threshold)[0]
        if len(frames) == 0:
            return None
        t = frames[-1] if last else frames[0]
        return boxes[n, t], paste_mask(masks[n, t], boxes[n, t], *size), int(probs[n, t].argmax())

    def update(self, probs, boxes, masks, size):
        """One clip: probs (N, T, K), boxes (N, T, 4) original pixels, masks (N, T, S, S)
        probabilities, size (H, W) -> (track ids (N,), 0 = none; slots to reset: all)."""
        diag = float(np.hypot(*size))
        slots = [n for n in range(self.num_slots) if probs[n].max() >= self.background_threshold]
        firsts = {n: self._appearance(probs, boxes, masks, size, n, last=False) for n in slots}
        ids = np.zeros(self.num_slots, np.int64)
        known = list(self.tracks)
        if slots and known:
            affinity = np.zeros((len(slots), len(known)))
            for i, n in enumerate(slots):
                box, mask, label = firsts[n]
                for j, tid in enumerate(known):
                    tr = self.tracks[tid]
                    affinity[i, j] = (_box_iou(box, tr["box"]) + _mask_iou(mask, tr["mask"])
                                      - np.abs(box - tr["box"]).sum() / diag + (label == tr["label"]))
            from scipy.optimize import linear_sum_assignment  # only this ablation needs scipy
            rows, cols = linear_sum_assignment(-affinity)
            for i, j in zip(rows, cols):
                if affinity[i, j] >= self.min_affinity:
                    ids[slots[i]] = known[j]
        for n in slots:
            if ids[n] == 0:
                ids[n] = self.next_id
                self.next_id += 1
        for tid in known:
            self.tracks[tid]["age"] += 1
        for n in slots:
            box, mask, label = self._appearance(probs, boxes, masks, size, n, last=True)
            self.tracks[int(ids[n])] = {"box": box, "mask": mask, "label": label, "age": 0}
        self.tracks = {k: v for k, v in self.tracks.items() if v["age"] < self.max_age}
        return ids, np.ones(self.num_slots, bool)
