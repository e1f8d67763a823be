"""Long-run check of the runtime: `evis run` on a long synthetic video (3,000 frames by default).

Measures what a user leaving the runtime on a camera relies on:
- resident memory (VmRSS of the `evis run` process, sampled from /proc) stays flat after warm-up:
  growth = (largest RSS after warm-up - RSS at the end of warm-up) / RSS at the end of warm-up;
- track ids stay stable for the objects that stay in view: for every ground-truth track visible
  in at least 95 % of the frames, each frame's prediction is the track with the best mask IoU
  (>= 0.5) with it; we count the id switches and the frames it is found in;
- over every object, IDF1 (one global assignment of tracks to objects, ytvis/identity.py) and the
  id switches split into those where a clip starts (the query feedback lost the object) and those
  inside a clip (two tracks on one object trading the best IoU).

    python benchmarks/long_run.py --model outputs/model --out outputs/long_run [--frames 3000]

Writes OUT/long_run.json (summary), OUT/memory.csv (seconds, frames, rss_mb), OUT/long_run.png
(RSS vs frames and the id of each long-lived object over time), OUT/run.log and the run's outputs
in OUT/run/.
Exits 1 when memory grows by 5 % or more. Linux only (/proc).
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
from pycocotools import mask as mask_utils

from efficientvis.runtime.linking import LINKING
from efficientvis.ytvis.identity import frame_matches, identity_metrics


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


class LineCounter:
    """Frames written so far = lines of tracks.jsonl (flushed per clip by evis run)."""

    def __init__(self, path):
        self.path, self.offset, self.lines = path, 0, 0

    def count(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return self.lines
        end = chunk.rfind(b"\n") + 1  # only complete lines
        self.lines += chunk[:end].count(b"\n")
        self.offset += end
        return self.lines


def run_and_sample(cmd, tracks_path, log_path, interval):
    """Runs cmd (output to log_path), sampling (seconds, frames, rss_mb) every `interval` s
    -> (samples, returncode, log text)."""
    counter, samples, start = LineCounter(tracks_path), [], time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            rss = rss_mb(proc.pid)
            if rss is not None:
                samples.append((time.monotonic() - start, counter.count(), rss))
            time.sleep(interval)
    with open(log_path) as f:
        return samples, proc.returncode, f.read()


def memory_growth(samples, warmup_frames):
    after = [s for s in samples if s[1] >= warmup_frames]
    if len(after) < 2:
        raise SystemExit(f"long_run: fewer than 2 memory samples after {warmup_frames} frames; "
                         f"use a longer video or a smaller --warmup-frames")
    reference = after[0][2]
    peak = max(s[2] for s in after)
    return {"rss_at_warmup_mb": round(reference, 1), "rss_peak_after_warmup_mb": round(peak, 1),
            "rss_final_mb": round(after[-1][2], 1),
            "growth_percent": round(100.0 * (peak - reference) / reference, 2)}


def load_predictions(tracks_path):
    """tracks.jsonl -> per frame list of (track id, RLE)."""
    frames = []
    with open(tracks_path) as f:
        for line in f:
            entry = json.loads(line)
            items = []
            for t in entry["tracks"]:
                rle = dict(t["mask"])
                if isinstance(rle["counts"], str):
                    rle["counts"] = rle["counts"].encode()
                items.append((t["id"], rle))
            frames.append(items)
    return frames


def gt_per_frame(gt, n):
    """The long video's annotations -> per frame {object id: RLE} of the objects in view."""
    video = gt["videos"][0]
    h, w = video["height"], video["width"]
    frames = [{} for _ in range(n)]
    for ann in gt["annotations"]:
        for t, g in enumerate(ann["segmentations"][:n]):
            if g is None:
                continue
            g = mask_utils.frPyObjects(g, h, w) if isinstance(g["counts"], list) else g
            if isinstance(g["counts"], str):
                g = {"size": g["size"], "counts": g["counts"].encode()}
            frames[t][ann["id"]] = g
    return frames


def id_stability(gt, objects, predictions, min_visible=0.95):
    """Per long-lived object (in view in >= min_visible of the frames): frames found, id switches,
    the ids it was given (its best track with mask IoU >= 0.5 in each frame it is in view)."""
    n = len(objects)
    best = [frame_matches(objects[t], predictions[t])[1] for t in range(n)]
    report = []
    for ann in gt["annotations"]:
        visible = [t for t in range(n) if ann["id"] in objects[t]]
        if len(visible) < min_visible * n:
            continue
        ids = [best[t][ann["id"]] for t in visible]
        found = [i for i in ids if i is not None]
        switches = sum(1 for a, b in zip(found, found[1:]) if a != b)
        main_id = max(set(found), key=found.count) if found else None
        report.append({"gt_id": ann["id"], "category_id": ann["category_id"], "frames_visible": len(visible),
                       "frames_found": len(found), "id_switches": switches, "distinct_ids": len(set(found)),
                       "main_id": main_id, "main_id_share": round(found.count(main_id) / len(found), 4) if found else 0.0,
                       "ids": ids})
    return report


def plot(samples, warmup_frames, stability, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    frames = [s[1] for s in samples]
    ax1.plot(frames, [s[2] for s in samples], lw=1.2)
    ax1.axvline(warmup_frames, color="grey", ls="--", lw=1, label="end of warm-up")
    ax1.set_ylabel("resident memory (MB)")
    ax1.set_title("evis run on a long video: memory and track ids")
    ax1.legend(loc="lower right")
    for track in stability:
        ids = [np.nan if i is None else i for i in track["ids"]]
        ax2.plot(range(len(ids)), ids, ".", ms=2, label=f"object {track['gt_id']}")
    ax2.set_xlabel("frame")
    ax2.set_ylabel("predicted track id")
    if stability:
        ax2.legend(loc="upper left", fontsize=8, markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="outputs/model", help="MODEL_DIR written by evis export")
    p.add_argument("--out", default="outputs/long_run")
    p.add_argument("--frames", type=int, default=3000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--warmup-frames", type=int, default=300)
    p.add_argument("--interval", type=float, default=0.5, help="memory sampling period (s)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-results", action="store_true", help="evis run --no-results: no results.json")
    p.add_argument("--linking", choices=LINKING, help="evis run --linking")
    p.add_argument("--clip", type=int, default=0, help="evis run --clip (0: the manifest's T)")
    p.add_argument("--duplicate-iou", type=float, help="evis run --duplicate-iou")
    args = p.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    video = os.path.join(args.out, f"long_{args.frames}.mp4")
    if not (os.path.exists(video) and os.path.exists(video[:-4] + ".json")):
        subprocess.run([sys.executable, "-m", "efficientvis", "synth", "--video", video, "--frames", str(args.frames),
                        "--seed", str(args.seed)], check=True)
    run_dir = os.path.join(args.out, "run")
    cmd = [sys.executable, "-m", "efficientvis", "run", "--model", args.model, "--source", video, "--out", run_dir]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.no_results:
        cmd.append("--no-results")
    if args.linking:
        cmd += ["--linking", args.linking]
    if args.clip:
        cmd += ["--clip", str(args.clip)]
    if args.duplicate_iou is not None:
        cmd += ["--duplicate-iou", str(args.duplicate_iou)]
    tracks_path = os.path.join(run_dir, "tracks.jsonl")
    if os.path.exists(tracks_path):
        os.remove(tracks_path)
    samples, code, log = run_and_sample(cmd, tracks_path, os.path.join(args.out, "run.log"), args.interval)
    if code != 0:
        sys.stderr.write(log[-2000:])
        raise SystemExit(f"long_run: evis run exited with {code}")

    with open(os.path.join(args.out, "memory.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seconds", "frames", "rss_mb"])
        writer.writerows((round(s, 2), n, round(r, 1)) for s, n, r in samples)
    with open(video[:-4] + ".json") as f:
        gt = json.load(f)
    predictions = load_predictions(tracks_path)
    objects = gt_per_frame(gt, min(len(predictions), gt["videos"][0]["length"]))
    stability = id_stability(gt, objects, predictions)
    from efficientvis.runtime import manifest
    clip_length = args.clip or manifest.load(args.model, verify=False).clip_length
    identity = identity_metrics(objects, predictions, clip_length)
    memory = memory_growth(samples, args.warmup_frames)
    summary = {"video": video, "frames": len(predictions), "model": args.model, "command": cmd,
               "track_ids": len({tid for items in predictions for tid, _ in items}),
               "seconds": round(samples[-1][0], 1) if samples else None,
               "warmup_frames": args.warmup_frames, **memory,
               "memory_flat": memory["growth_percent"] < 5.0,
               "clip_length": clip_length, "identity": identity,
               "long_lived_objects": [{k: v for k, v in t.items() if k != "ids"} for t in stability],
               "run_log_tail": log.strip().splitlines()[-4:]}
    from efficientvis.ytvis.results import write_json_atomic
    write_json_atomic(os.path.join(args.out, "long_run.json"), summary, indent=1)
    plot(samples, args.warmup_frames, stability, os.path.join(args.out, "long_run.png"))

    print(f"{summary['frames']} frames in {summary['seconds']} s; RSS {memory['rss_at_warmup_mb']} MB after "
          f"{args.warmup_frames} frames, peak after warm-up {memory['rss_peak_after_warmup_mb']} MB "
          f"(+{memory['growth_percent']} %), final {memory['rss_final_mb']} MB")
    for t in summary["long_lived_objects"]:
        print(f"object {t['gt_id']} (category {t['category_id']}): found in {t['frames_found']}/"
              f"{t['frames_visible']} frames, {t['id_switches']} id switches, main id {t['main_id']} "
              f"in {100 * t['main_id_share']:.1f} % of them")
    switches = identity["id_switches"]
    print(f"identity over every object: IDF1 {identity['idf1']:.3f} (IDP {identity['idp']:.3f}, IDR "
          f"{identity['idr']:.3f}); best-track id switches {switches['total']}: {switches['at_clip_start']} "
          f"where a clip of {clip_length} starts (query feedback), {switches['within_clip']} inside a clip "
          f"(tracks trading the best IoU)")
    print(f"written: {args.out}/long_run.json, memory.csv, long_run.png")
    return 0 if summary["memory_flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
