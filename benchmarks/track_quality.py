"""Where a results file's AP goes: class-agnostic AP and per-clip mask quality.

    python benchmarks/track_quality.py --gt data/synth/valid/annotations.json \
        --results work_dirs/ablations/baseline/metrics_e2e_results.json [--clip 6]

- class-agnostic AP: every ground truth and every track as one class (a track's entries, one per
  top-k class, share their masks: the best score is kept). If it equals the normal AP,
  classification is not what limits it.
- per-clip mask quality: for every ground-truth object and frame where it is visible, the best IoU
  of any predicted track's mask in that frame; the mean per clip of `--clip` frames. A drop after
  the first clip with query feedback, and not with every clip started from q* (hand-crafted
  linking), means the carried queries start worse than q*.
"""

import argparse
import copy
import json

import numpy as np

from efficientvis.ytvis import format as ytvis_format
from efficientvis.ytvis import metric


def _tracks(results):
    """{video id: [(score, segmentations)]}, one per track (its top-k entries merged)."""
    best = {}
    for r in results:
        key = (r["video_id"], json.dumps(r["segmentations"]))
        if key not in best or r["score"] > best[key][0]:
            best[key] = (r["score"], r["segmentations"])
    out = {}
    for (video_id, _), track in best.items():
        out.setdefault(video_id, []).append(track)
    return out


def _decode(seg, height, width):
    return ytvis_format.decode(seg, height, width).astype(bool)


def class_agnostic_ap(gt_raw, results):
    gt_one = copy.deepcopy(gt_raw)
    for a in gt_one["annotations"]:
        a["category_id"] = 1
    gt_one["categories"] = [{"id": 1, "name": "object", "supercategory": "object"}]
    one = [{"video_id": v, "category_id": 1, "score": score, "segmentations": segs}
           for v, tracks in _tracks(results).items() for score, segs in tracks]
    return metric.evaluate(ytvis_format.parse(gt_one), one)


def per_clip_quality(gt_raw, results, clip_length):
    videos = {v["id"]: v for v in gt_raw["videos"]}
    tracks = _tracks(results)
    per_clip = {}
    for ann in gt_raw["annotations"]:
        video = videos[ann["video_id"]]
        h, w = video["height"], video["width"]
        preds = [segs for _, segs in tracks.get(ann["video_id"], [])]
        for t, seg in enumerate(ann["segmentations"]):
            if seg is None:
                continue
            g = _decode(seg, h, w)
            best = 0.0
            for segs in preds:
                p = _decode(segs[t], h, w)
                best = max(best, float((p & g).sum() / max((p | g).sum(), 1)))
            per_clip.setdefault(t // clip_length, []).append(best)
    return {k: float(np.mean(v)) for k, v in sorted(per_clip.items())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gt", required=True, help="YouTube-VIS annotations.json")
    p.add_argument("--results", required=True, help="YouTube-VIS results JSON")
    p.add_argument("--clip", type=int, default=6, help="clip length for the per-clip table")
    args = p.parse_args(argv)
    with open(args.gt) as f:
        gt_raw = json.load(f)
    with open(args.results) as f:
        results = json.load(f)
    full = metric.evaluate(ytvis_format.parse(gt_raw), results)
    agnostic = class_agnostic_ap(gt_raw, results)
    print(f"AP {full['AP']:.4f} (AP50 {full['AP50']:.4f}); class-agnostic AP {agnostic['AP']:.4f} "
          f"(AP50 {agnostic['AP50']:.4f}); {sum(len(t) for t in _tracks(results).values())} tracks "
          f"for {len(gt_raw['annotations'])} objects")
    quality = per_clip_quality(gt_raw, results, args.clip)
    print("mean best mask IoU per clip: " + "  ".join(f"{k + 1}: {v:.3f}" for k, v in quality.items()))


if __name__ == "__main__":
    main()
