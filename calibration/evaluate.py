"""Accuracy and speed evidence for INT8: FP32 vs Q/DQ graphs in ONNX Runtime (CPU).

- `evaluate(model_dir, split)`: the YouTube-VIS AP of an exported model (MODEL_DIR or QDQ_DIR)
  on a split folder, through the same runtime as `evis run` (OrtBackend + the clip loop with
  queries fed forward + TrackCollector + ytvis/metric.py), with the time spent in the backend.
- `bench_clips([model_dir, ...], T, H, W)`: wall time of one full clip pass (backbone + every
  stage) on random frames, the models taking turns, median of `repeats` after `warmup` passes.

    python -m efficientvis.calibration.evaluate --model MODEL_DIR --data data/synth/valid \
        [--qdq QDQ_DIR ...] [--threads N] [--videos N] [--bench TxHxW] [--json OUT]

prints one row per model: AP, AP50, AR10, ms per clip in the backend, clips/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from efficientvis.errors import UserError
from efficientvis.ytvis.results import write_json_atomic


class _Timed:
    def __init__(self, backend):
        self.backend = backend
        self.num_queries, self.clip_length = backend.num_queries, backend.clip_length
        self.seconds, self.clips, self.frames = 0.0, 0, 0

    def start_video(self):
        self.backend.start_video()

    def run_clip(self, frames, reset, num_iterations=None, carried=None):
        t0 = time.perf_counter()
        out = self.backend.run_clip(frames, reset, num_iterations, carried)
        self.seconds += time.perf_counter() - t0
        self.clips += 1
        self.frames += len(frames)
        return out


def check_split(path, option="split"):
    """A YouTube-VIS split folder to evaluate on, or one line naming `option`."""
    from efficientvis.calibration.data import resolve_source

    if not os.path.exists(path):
        raise UserError(f"{option} {path}: not found")
    source = resolve_source(path)
    if source.kind != "ytvis":
        raise UserError(f"{option} {path}: evaluation needs a YouTube-VIS split folder (annotations.json + JPEGImages)")
    return source


def evaluate(model_dir, split, threads=0, max_videos=0, log=None, tensorrt_form=False) -> dict:
    """AP of MODEL_DIR (or a QDQ_DIR with its manifest) on a YouTube-VIS split folder, on ONNX
    Runtime's CPU provider (a QDQ_DIR's CPU form, or with `tensorrt_form` its TensorRT form)."""
    from efficientvis.runtime.dataset import run_video, video_frames
    from efficientvis.runtime.ort_backend import OrtBackend
    from efficientvis.ytvis import format as ytvis_format
    from efficientvis.ytvis import metric

    source = check_split(split)
    gt = ytvis_format.load(source.annotations)
    ids = sorted(gt.videos)[:max_videos] if max_videos else sorted(gt.videos)
    if len(ids) != len(gt.videos):
        gt = gt.subset(ids)
    backend = _Timed(OrtBackend(model_dir, threads=threads, tensorrt_form=tensorrt_form))
    m = backend.backend.manifest
    options = m.loop_options()
    top_k = m.top_k
    results, started = [], time.perf_counter()
    for vid in ids:
        video = gt.videos[vid]
        with run_video(backend, video_frames(video, source.image_root), video.length, options,
                       m.num_classes) as collector:
            results += list(collector.results(vid, m.category_ids, top_k))
    metrics = metric.evaluate(gt, results)
    out = {"AP": metrics["AP"], "AP50": metrics["AP50"], "AP75": metrics["AP75"], "AR10": metrics["AR10"],
           "videos": len(ids), "clips": backend.clips, "frames": backend.frames,
           "backend_seconds": round(backend.seconds, 3),
           "ms_per_clip": round(1000 * backend.seconds / max(backend.clips, 1), 2),
           "total_seconds": round(time.perf_counter() - started, 2),
           "providers": backend.backend.providers_in_use()}
    if log:
        log(f"{model_dir}: AP {out['AP']:.4f} AP50 {out['AP50']:.4f} on {len(ids)} videos, "
            f"{out['ms_per_clip']:.1f} ms per clip in ONNX Runtime")
    return out


def bench_clips(model_dirs, T=None, H=None, W=None, threads=0, repeats=5, warmup=1, seed=0) -> list:
    """Wall time of one clip pass (backbone + all stages, random uint8 frames) of each model,
    the models taking turns (round-robin) so that a busy machine slows them alike; per model
    {T, H, W, median_ms, min_ms, max_ms, times_ms, providers}."""
    from efficientvis.runtime.ort_backend import OrtBackend

    backends = [OrtBackend(d, threads=threads) for d in model_dirs]
    m = backends[0].manifest
    axes = m.dynamic_axes
    T = int(T or m.clip_length)
    H = int(H or axes.get("H", {}).get("opt", m.test_size))
    W = int(W or axes.get("W", {}).get("opt", m.test_size))
    frames = np.random.default_rng(seed).integers(0, 256, (T, 3, H, W), dtype=np.uint8)
    reset = np.zeros(m.num_queries, bool)
    for b in backends:
        b.start_video()
        for _ in range(warmup):
            b.run_clip(frames, reset)
    times = [[] for _ in backends]
    for _ in range(repeats):
        for i, b in enumerate(backends):
            t0 = time.perf_counter()
            b.run_clip(frames, reset)
            times[i].append(time.perf_counter() - t0)
    out = []
    for b, ts in zip(backends, times):
        s = sorted(ts)
        out.append({"T": T, "H": H, "W": W, "threads": threads, "repeats": repeats,
                    "median_ms": round(1000 * s[len(s) // 2], 1), "min_ms": round(1000 * s[0], 1),
                    "max_ms": round(1000 * s[-1], 1), "times_ms": [round(1000 * t, 1) for t in ts],
                    "providers": b.providers_in_use()})
    return out


def bench_clip(model_dir, T=None, H=None, W=None, threads=0, repeats=5, warmup=1, seed=0) -> dict:
    """bench_clips of one model."""
    return bench_clips([model_dir], T, H, W, threads, repeats, warmup, seed)[0]


def _shape(text):
    try:
        T, H, W = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TxHxW, e.g. 9x360x640, got {text!r}") from None
    return T, H, W


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m efficientvis.calibration.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, action="append", help="MODEL_DIR or QDQ_DIR (repeatable)")
    p.add_argument("--data", help="YouTube-VIS split folder for AP (e.g. data/synth/valid)")
    p.add_argument("--videos", type=int, default=0, help="only the first N videos (default all)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--bench", type=_shape, metavar="TxHxW", help="also time one clip pass at this shape")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = []
    try:
        benches = bench_clips(args.model, *args.bench, threads=args.threads, repeats=args.repeats) \
            if args.bench else [None] * len(args.model)
        for model, bench in zip(args.model, benches):
            row = {"model": model}
            if args.data:
                row.update(evaluate(model, args.data, threads=args.threads, max_videos=args.videos))
            if bench:
                row["bench"] = bench
            rows.append(row)
            ap = f"AP {row['AP']:.4f}  AP50 {row['AP50']:.4f}  {row['ms_per_clip']:8.1f} ms/clip" if args.data else ""
            speed = (f"  clip pass {bench['T']}x{bench['H']}x{bench['W']}: median {bench['median_ms']:.0f} ms "
                     f"(min {bench['min_ms']:.0f})") if bench else ""
            print(f"{model:<40} {ap}{speed}", flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        write_json_atomic(args.json, rows, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
