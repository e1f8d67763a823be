"""Identity metrics of tracked instance masks: IDF1 (Ristani et al. 2016, the MOTChallenge measure)
with a mask IoU >= 0.5 match, and id switches split by where they happen.

Why both: the best-IoU-track id switch count of a long run mixes two failures that need different
fixes. A switch at a clip boundary is a query slot that did not keep its object through the query
feedback (the model's correspondence); a switch inside a clip is two tracks on one object trading
the best IoU from frame to frame (duplicates). IDF1 scores identity once, with one global
assignment of predicted tracks to objects, so flickering duplicates and broken tracks both cost
what they should.

Inputs, one entry per frame: `gt[t]` maps an object id to its RLE (objects not in view are left
out) and `pred[t]` is a list of (track id, RLE) -- the per-frame content of `tracks.jsonl`.
"""

from collections import defaultdict

import numpy as np
from pycocotools import mask as mask_utils


def frame_matches(gt_frame, pred_frame, min_iou=0.5):
    """-> [(object id, track id)] of the pairs of one frame with mask IoU >= min_iou, and the best
    track of each object ({object id: track id, or None below min_iou})."""
    objects = list(gt_frame)
    if not objects:
        return [], {}
    if not pred_frame:
        return [], {g: None for g in objects}
    ious = mask_utils.iou([rle for _, rle in pred_frame], [gt_frame[g] for g in objects],
                          [0] * len(objects))  # (tracks, objects)
    ious = np.asarray(ious).reshape(len(pred_frame), len(objects))
    pairs = [(objects[j], pred_frame[p][0]) for p, j in zip(*np.nonzero(ious >= min_iou))]
    best = {}
    for j, g in enumerate(objects):
        p = int(np.argmax(ious[:, j]))
        best[g] = pred_frame[p][0] if ious[p, j] >= min_iou else None
    return pairs, best


def identity_metrics(gt, pred, clip_length=0, min_iou=0.5):
    """gt, pred: per-frame lists (module docstring). -> dict with
    idf1, idp, idr: identity F1 / precision / recall (IDTP over predicted / ground-truth detections);
    id_switches: changes of an object's best track (IoU >= min_iou) between the frames it is found
    in, split into at_clip_start (the frame starts a clip of `clip_length`) and within_clip;
    objects: per object id {frames, idtp, track} (its globally assigned track and the frames it
    holds the object)."""
    n = min(len(gt), len(pred))
    together = defaultdict(int)  # (object, track) -> frames matched
    gt_frames, pred_detections = defaultdict(int), 0
    last_best, switches = {}, {"at_clip_start": 0, "within_clip": 0}
    for t in range(n):
        pairs, best = frame_matches(gt[t], pred[t], min_iou)
        for pair in pairs:
            together[pair] += 1
        for g in gt[t]:
            gt_frames[g] += 1
        pred_detections += len(pred[t])
        for g, track in best.items():
            if track is None:
                continue
            if g in last_best and last_best[g] != track:
                at_start = clip_length > 0 and t % clip_length == 0
                switches["at_clip_start" if at_start else "within_clip"] += 1
            last_best[g] = track
    objects = sorted(gt_frames)
    tracks = sorted({track for _, track in together})
    assigned = {}
    if objects and tracks:
        from scipy.optimize import linear_sum_assignment  # scipy is not in the base install
        counts = np.zeros((len(objects), len(tracks)))
        for (g, track), c in together.items():
            counts[objects.index(g), tracks.index(track)] = c
        rows, cols = linear_sum_assignment(counts, maximize=True)
        assigned = {objects[r]: (tracks[c], int(counts[r, c])) for r, c in zip(rows, cols) if counts[r, c] > 0}
    idtp = sum(c for _, c in assigned.values())
    gt_detections = sum(gt_frames.values())
    return {
        "idf1": round(2 * idtp / (gt_detections + pred_detections), 4) if gt_detections + pred_detections else 0.0,
        "idp": round(idtp / pred_detections, 4) if pred_detections else 0.0,
        "idr": round(idtp / gt_detections, 4) if gt_detections else 0.0,
        "id_switches": {"total": sum(switches.values()), **switches},
        "objects": {g: {"frames": gt_frames[g], "idtp": assigned.get(g, (None, 0))[1],
                        "track": assigned.get(g, (None, 0))[0]} for g in objects},
    }
