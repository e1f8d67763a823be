"""Time the YouTube-VIS metric on a YouTube-VIS-2019-sized random problem (not a test).

300 videos of 30 frames at 720x1280, 2-4 ground-truth tracks per video (40 categories), 10 results
per video (most of them jittered copies of a ground-truth track, the rest random). Masks are
ellipses rasterised straight to RLE by pycocotools (polygons), so building the problem is quick.

    .venv/bin/python benchmarks/bench_eval.py [--videos 300] [--frames 30] [--repeat 1]
"""

import argparse
import time

import numpy as np
from pycocotools import mask as mask_utils

from efficientvis.ytvis import format as fmt
from efficientvis.ytvis.metric import evaluate, format_table


def ellipse_rle(cy, cx, ry, rx, height, width, points=16):
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    poly = np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], 1).ravel().tolist()
    rle = mask_utils.frPyObjects([poly], height, width)[0]
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def random_track(rng, length, height, width, base=None):
    """Per-frame (cy, cx, ry, rx) or None: a moving ellipse present over a random span, or a
    jittered copy of `base`."""
    if base is not None:
        jitter = rng.normal(0, 0.08, 4)
        return [None if b is None or rng.random() < 0.05 else
                (b[0] + jitter[0] * b[2], b[1] + jitter[1] * b[3], b[2] * (1 + jitter[2]),
                 b[3] * (1 + jitter[3])) for b in base]
    start = int(rng.integers(0, length // 2))
    stop = int(rng.integers(start + 1, length + 1))
    cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    ry, rx = np.exp(rng.uniform(np.log(10), np.log(300), 2))
    vy, vx = rng.normal(0, 5, 2)
    return [(cy + vy * t, cx + vx * t, ry, rx) if start <= t < stop else None
            for t in range(length)]


def make_problem(videos=300, frames=30, height=720, width=1280, per_video=10, categories=40, seed=0):
    rng = np.random.default_rng(seed)
    gt = {"videos": [], "annotations": [],
          "categories": [{"id": c, "name": f"class{c}"} for c in range(1, categories + 1)]}
    results = []
    for vid in range(1, videos + 1):
        gt["videos"].append({"id": vid, "height": height, "width": width, "length": frames,
                             "file_names": [f"{vid:05d}/{t:05d}.jpg" for t in range(frames)]})
        tracks = []
        for _ in range(int(rng.integers(2, 5))):
            shape, cat = random_track(rng, frames, height, width), int(rng.integers(1, categories + 1))
            segs = [None if s is None else ellipse_rle(*s, height, width) for s in shape]
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "video_id": vid, "category_id": cat,
                "iscrowd": 0, "segmentations": segs,
                "areas": [None if s is None else float(mask_utils.area(s)) for s in segs]})
            tracks.append((shape, cat))
        for _ in range(per_video):
            if rng.random() < 0.7:
                base, cat = tracks[int(rng.integers(len(tracks)))]
                shape = random_track(rng, frames, height, width, base)
                if rng.random() < 0.2:
                    cat = int(rng.integers(1, categories + 1))
            else:
                shape = random_track(rng, frames, height, width)
                cat = int(rng.integers(1, categories + 1))
            results.append({"video_id": vid, "category_id": cat, "score": float(rng.random()),
                            "segmentations": [None if s is None else ellipse_rle(*s, height, width)
                                              for s in shape]})
    return gt, results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=300)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--per-video", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    tic = time.perf_counter()
    data, results = make_problem(args.videos, args.frames, per_video=args.per_video)
    gt = fmt.parse(data)
    print(f"problem: {args.videos} videos x {args.frames} frames (720x1280), "
          f"{len(data['annotations'])} gt tracks, {len(results)} results "
          f"(built in {time.perf_counter() - tic:.1f} s)")
    times = []
    for _ in range(args.repeat):
        tic = time.perf_counter()
        metrics = evaluate(gt, results)
        times.append(time.perf_counter() - tic)
    print(format_table(metrics))
    print(f"evaluate: {min(times):.2f} s (best of {len(times)})")


if __name__ == "__main__":
    main()
