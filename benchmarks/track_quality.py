"""Where a results file's AP goes: class-agnostic AP and per-clip mask quality.

    python benchmarks/track_quality.py --gt data/synth/valid/annotations.json \
        --results work_dirs/ablations/baseline/metrics_e2e_results.json [--clip 6]

- class-agnostic AP: every ground truth and every track as one class (a track's top-k entries
  share their masks: its best-scoring entry is kept, `metric.track_entries`). If it equals the
  normal AP, classification is not what limits it.
- per-clip mask quality: for every ground-truth object and frame where it is visible, the best IoU
  of any predicted track's mask in that frame; the mean per clip of `--clip` frames. A drop after
  the first clip with query feedback, and not with every clip started from q* (hand-crafted
  linking), means the carried queries start worse than q*.
- per-clip AP: every video, its ground truth and its tracks cut into clips of `--clip` frames and
  each clip scored as a video of its own, so no track has to hold its identity across clips. Far
  above the AP, the linking between clips loses it; close to it, the clips themselves do.
"""

import argparse
import copy
import json

import numpy as np

from efficientvis.ytvis import format as ytvis_format
from efficientvis.ytvis import metric


def _mask(rle, height, width):
    return ytvis_format.decode(rle, height, width).astype(bool)


def class_agnostic_ap(gt_raw, tracks):
    gt_one = copy.deepcopy(gt_raw)
    for a in gt_one["annotations"]:
        a["category_id"] = 1
    gt_one["categories"] = [{"id": 1, "name": "object", "supercategory": "object"}]
    one = [{"video_id": vid, "category_id": 1, "score": d.score, "segmentations": d.rles}
           for vid, dets in tracks.items() for d in dets]
    return metric.evaluate(ytvis_format.parse(gt_one), one)


def per_clip_quality(gt, tracks, clip_length):
    per_clip = {}
    for video_id, anns in gt.tracks.items():
        video = gt.videos[video_id]
        h, w = video.height, video.width
        for ann in anns:
            for t, seg in enumerate(ann.segmentations):
                if seg is None:
                    continue
                g = _mask(seg, h, w)
                best = 0.0
                for d in tracks.get(video.id, []):
                    p = _mask(d.rles[t], h, w)
                    best = max(best, float((p & g).sum() / max((p | g).sum(), 1)))
                per_clip.setdefault(t // clip_length, []).append(best)
    return {k: float(np.mean(v)) for k, v in sorted(per_clip.items())}


def per_clip_ap(gt_raw, results, clip_length):
    """YouTube-VIS AP with every video cut into clips of `clip_length` frames, each one a video."""
    videos, annotations, clip_results, clip_id = [], [], [], {}
    for v in gt_raw["videos"]:
        for start in range(0, len(v["file_names"]), clip_length):
            clip_id[v["id"], start] = len(videos) + 1
            names = v["file_names"][start:start + clip_length]
            videos.append(dict(v, id=len(videos) + 1, file_names=names, length=len(names)))

    size = {v["id"]: (v["height"], v["width"]) for v in gt_raw["videos"]}

    def cut(entry):
        """(clip video id, entry restricted to that clip) for each clip where the entry has a mask."""
        h, w = size[entry["video_id"]]
        for start in range(0, len(entry["segmentations"]), clip_length):
            piece = {k: v[start:start + clip_length] for k, v in entry.items()
                     if k in ("segmentations", "areas", "bboxes") and v is not None}
            if any(ytvis_format.rle_area(ytvis_format.to_rle(s, h, w, "clip")) > 0
                   for s in piece["segmentations"]):
                yield clip_id[entry["video_id"], start], piece

    for a in gt_raw["annotations"]:
        for vid, piece in cut(a):
            annotations.append(dict(a, **piece, id=len(annotations) + 1, video_id=vid))
    for r in results:
        for vid, piece in cut(r):
            clip_results.append(dict(r, **piece, video_id=vid))
    clips = dict(gt_raw, videos=videos, annotations=annotations)
    return metric.evaluate(ytvis_format.parse(clips), clip_results)


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
    gt = ytvis_format.parse(gt_raw, args.gt)
    tracks = metric.track_entries(gt, results, args.results)
    full = metric.evaluate(gt, results, args.results)
    agnostic = class_agnostic_ap(gt_raw, tracks)
    print(f"AP {full['AP']:.4f} (AP50 {full['AP50']:.4f}); class-agnostic AP {agnostic['AP']:.4f} "
          f"(AP50 {agnostic['AP50']:.4f}); {sum(len(d) for d in tracks.values())} tracks "
          f"for {len(gt_raw['annotations'])} objects")
    clip_ap = per_clip_ap(gt_raw, results, args.clip)
    print(f"per-clip AP ({args.clip}-frame clips scored as videos, no linking needed) {clip_ap['AP']:.4f} "
          f"(AP50 {clip_ap['AP50']:.4f})")
    quality = per_clip_quality(gt, tracks, args.clip)
    print("mean best mask IoU per clip: " + "  ".join(f"{k + 1}: {v:.3f}" for k, v in quality.items()))


if __name__ == "__main__":
    main()
