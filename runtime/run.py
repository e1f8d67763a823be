"""`evis run`: an exported model on a video file, image folder, camera or stream (torch-free).

    evis run --model MODEL_DIR|ENGINE_DIR --source SPEC --out OUT_DIR [--backend ort|trt]
             [--provider cpu|cuda|tensorrt] [--stages K] [--clip T] [--fp16] [--threads N]
             [--linking e2e|handcrafted] [--fused] [--show] [--no-video] [--max-frames N]
    evis run --model MODEL_DIR|ENGINE_DIR --dataset DIR [--ann FILE] --out OUT_DIR [...]

Frames are read from the source (runtime/sources.py), grouped into clips and run through the
backend with the queries fed forward (runtime/clip_loop.py); every frame result goes to all
outputs (runtime/outputs.py): OUT/overlay.mp4 (or .avi), OUT/tracks.jsonl and, for file and folder
sources, OUT/results.json (YouTube-VIS). ENGINE_DIR (TensorRT engines, recognised by their
`.engine.json` metadata) selects the TensorRT backend, MODEL_DIR the ONNX Runtime one.
`--dataset` runs every video of a YouTube-VIS split and writes only OUT/results.json, with the same
clip loop, collector and writer as `evis infer` (compare the two with `evis parity --results`).

Ctrl-C (SIGINT) or SIGTERM: reading stops, the frames already read are processed, tracks.jsonl is
flushed, the video writer released (the MP4 stays playable), the results of what was processed
written, and the command exits with 130. A second Ctrl-C stops at once (outputs are still
closed). Bad input (missing model, corrupt model file, unreadable source, camera not there, frames
that cannot be resized to the model's input) is one line and exit 1; outputs written so far stay.
"""

import os
import signal
import sys
import time
from itertools import islice

from efficientvis.errors import UserError
from efficientvis.runtime import outputs as out_mod
from efficientvis.runtime.clip_loop import run_clips
from efficientvis.runtime.linking import LINKING, linker_factory
from efficientvis.runtime import manifest as manifest_lib
from efficientvis.runtime.sources import open_source
from efficientvis.runtime.trt_backend import is_engine_dir
from efficientvis.ytvis.clips import resized_shape
from efficientvis.ytvis.results import check_output_file

MIN_INPUT_SIDE = 32  # one cell of the coarsest feature map (P5, stride 32), if the manifest says nothing


def add_arguments(p):
    p.add_argument("--model", required=True, metavar="MODEL_DIR|ENGINE_DIR",
                   help="folder written by `evis export` (ONNX) or `evis build` (TensorRT engines)")
    p.add_argument("--source", metavar="SPEC",
                   help="video file, image folder, camera index (0), csi://N, GStreamer pipeline "
                        "(contains '!') or rtsp:// / http(s):// URL")
    p.add_argument("--dataset", metavar="DIR",
                   help="instead of --source: every video of a YouTube-VIS split (DIR/JPEGImages/ + "
                        "DIR/annotations.json, or --ann) -> OUT/results.json, as `evis infer` writes it")
    p.add_argument("--ann", metavar="FILE", help="annotation file of --dataset (default DIR/annotations.json)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--backend", choices=["ort", "trt"], help="default: trt for an ENGINE_DIR, else ort")
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu",
                   help="ONNX Runtime execution provider (default cpu)")
    p.add_argument("--stages", type=int, default=0, metavar="K",
                   help="run only the first K of the M stages (anytime inference; default all)")
    p.add_argument("--clip", type=int, default=0, metavar="T",
                   help="frames per clip, 1..the exported T (default the exported T)")
    p.add_argument("--linking", choices=LINKING,
                   help="e2e: each clip's output queries start the next (the paper; default, or the "
                        "manifest's infer.linking); handcrafted: every clip from q*, tracklets linked by "
                        "box/mask IoU + class (Table 1d baseline; needs scipy)")
    p.add_argument("--duplicate-iou", type=float, metavar="IOU",
                   help="hide a track in a clip where a higher-scoring one's mask overlaps it by this "
                        "mean IoU (less id flicker on overlays and tracks.jsonl; default the manifest's "
                        "infer.duplicate_iou, 0 = off)")
    p.add_argument("--fused", action="store_true",
                   help="run model.onnx (backbone + all stages in one graph; `evis export --fused`): "
                        "only the last stage's masks are computed, about 2x faster on CPU at the "
                        "r50 size; no --stages (ONNX Runtime only)")
    p.add_argument("--fp16", action="store_true", help="FP16 (TensorRT execution provider)")
    p.add_argument("--qdq", metavar="DIR", help="INT8: Q/DQ graphs written by `evis calibrate`")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: default)")
    p.add_argument("--cache", metavar="DIR", help="TensorRT EP engine/timing cache (default MODEL_DIR/trt_cache)")
    p.add_argument("--show", action="store_true", help="live window (needs a display)")
    p.add_argument("--no-video", action="store_true", help="do not write the overlay video")
    p.add_argument("--no-results", action="store_true",
                   help="do not write results.json for a file/folder source (tracks.jsonl has the same "
                        "masks frame by frame)")
    p.add_argument("--video-format", choices=sorted(out_mod.VIDEO_FORMATS), default="mp4",
                   help="mp4 (mp4v, playable after a normal end, an error, Ctrl-C or SIGTERM) or "
                        "avi (MJPG, also readable after a hard kill; larger)")
    p.add_argument("--max-frames", type=int, default=0, metavar="N", help="stop after N frames")
    p.add_argument("--video-id", type=int, default=1, help="video_id in results.json (default 1)")
    p.add_argument("--fps", type=float, default=0, help="frame rate of an image folder / the overlay")


class TimedBackend:
    """Wraps a backend; records the wall time of every run_clip (the clip latency)."""

    def __init__(self, backend):
        self.backend = backend
        self.num_queries, self.clip_length = backend.num_queries, backend.clip_length
        self.latencies = []

    def start_video(self):
        self.backend.start_video()

    def run_clip(self, frames, reset, num_iterations=None, carried=None):
        start = time.perf_counter()
        out = self.backend.run_clip(frames, reset, num_iterations, carried)
        self.latencies.append(time.perf_counter() - start)
        return out


def _check_positive(value, name, upper=None, hint=""):
    """0 is the option's default; negative, NaN or infinite values are refused."""
    if not 0 <= value < float("inf") or (upper is not None and value > upper):
        raise UserError(f"{name} must be " + (f"1..{upper}" if upper else "positive") + f" (0: the default), "
                        f"got {value}" + (f"; {hint}" if hint else ""))


def build_backend(args, manifest, resized=None):
    """TrtBackend for an ENGINE_DIR (or --backend trt), else OrtBackend; `resized` (H, W) of the
    model input sets the TensorRT EP's optimisation profile to exactly this source's size."""
    if args.backend == "trt" or (args.backend is None and is_engine_dir(args.model)):
        from efficientvis.runtime.trt_backend import TrtBackend

        if args.fused:
            raise UserError("--fused runs model.onnx in ONNX Runtime; the TensorRT backend runs one engine per graph")
        return TrtBackend(args.model, manifest=manifest)
    from efficientvis.runtime.ort_backend import OrtBackend

    profile = None
    if resized is not None:
        T = args.clip or manifest.clip_length
        profile = {"min": (1, *resized), "opt": (T, *resized), "max": (T, *resized)}
    return OrtBackend(args.model, provider=args.provider, fp16=args.fp16, int8=bool(args.qdq),
                      threads=args.threads, cache_dir=args.cache, profile_shapes=profile,
                      qdq_dir=args.qdq, fused=args.fused, manifest=manifest)


class Outputs:
    """All outputs of one run; close() finishes every one of them, whatever happened."""

    def __init__(self, args, info, manifest):
        self.parts = []
        self.video = self.tracks = self.results = self.window = None
        results_path = None if (info.is_live or args.no_results) else os.path.join(args.out, "results.json")
        if results_path:  # both checked before any output file is created
            top_k = manifest.top_k
            check_output_file(results_path, "results file")
        out_mod.make_parent(os.path.join(args.out, "tracks.jsonl"), "output folder")
        self.class_names = manifest.class_names
        self.tracks = out_mod.TracksJsonl(os.path.join(args.out, "tracks.jsonl"),
                                          manifest.class_names, manifest.category_ids)
        if not args.no_video:
            ext = out_mod.VIDEO_FORMATS[args.video_format][0]
            self.video = out_mod.OverlayVideo(os.path.join(args.out, "overlay" + ext),
                                              args.fps or info.fps, info.size, args.video_format)
        if results_path:
            self.results = out_mod.VideoResults(results_path, manifest.num_classes, manifest.category_ids,
                                                args.video_id, top_k)
        if args.show:
            self.window = out_mod.LiveWindow()
        self.frames = 0

    def add(self, result) -> bool:
        """False when the live window asks to stop."""
        self.tracks.add(result)
        if self.results is not None:
            self.results.add(result)
        keep_going = True
        if self.video is not None or (self.window is not None and self.window.enabled):
            image = out_mod.draw_instances(result.frame, result.instances, self.class_names)
            if self.video is not None:
                self.video.write(image)
            if self.window is not None:
                keep_going = self.window.show(image)
        self.frames += 1
        return keep_going

    def end_clip(self):
        self.tracks.end_clip()

    def close(self):
        """Close every output (each one even if another fails); {name: path} of what was written."""
        written, first_error = {}, None
        for name in ("tracks", "video", "results", "window"):
            part = getattr(self, name)
            if part is None:
                continue
            try:
                path = part.close()
                if path:
                    written[name] = path
            except Exception as e:  # noqa: BLE001 - close the others, then report the first
                first_error = first_error or e
            setattr(self, name, None)
        if first_error is not None:
            raise first_error
        return written


def run(args) -> int:
    if bool(args.source) == bool(args.dataset):
        raise UserError("evis run needs exactly one of --source SPEC or --dataset DIR")
    _check_positive(args.stages, "--stages")
    _check_positive(args.clip, "--clip")
    _check_positive(args.max_frames, "--max-frames")
    _check_positive(args.fps, "--fps")
    _check_positive(args.threads, "--threads")
    if args.duplicate_iou is not None and not 0 <= args.duplicate_iou <= 1:  # False for NaN
        raise UserError(f"--duplicate-iou must be in [0, 1] (0: off), got {args.duplicate_iou}")
    if not os.path.isdir(args.model):
        raise UserError(f"model folder not found: {args.model}")
    # the model first: a missing or corrupt model fails before the camera is opened
    engine = (args.backend or ("trt" if is_engine_dir(args.model) else "ort")) == "trt"
    manifest = manifest_lib.load(args.model, verify=not engine)
    _check_positive(args.clip, "--clip", manifest.clip_length,
                    "longer clips need a model exported with evis export --max-clip T")
    _check_positive(args.stages, "--stages", manifest.num_stages)
    clip_length = args.clip or manifest.clip_length
    args.stages = args.stages or manifest.infer_value("num_iterations", int, 0)  # 0: all M
    manifest.loop_options(clip_length, args.stages, args.duplicate_iou)  # the manifest's infer values, checked now
    if args.fused and args.stages not in (0, manifest.num_stages):
        raise UserError(f"--fused runs all {manifest.num_stages} stages (model.onnx); --stages {args.stages} "
                        f"(anytime inference) needs the split graphs")

    if args.dataset:
        return _run_dataset(args, manifest, clip_length)
    source = open_source(args.source, fps=args.fps or None)
    try:
        return _run(args, manifest, source, clip_length)
    finally:
        source.close()


def _run_dataset(args, manifest, clip_length):
    """--dataset: the split's videos one after the other -> OUT/results.json (video by video)."""
    from efficientvis.runtime.dataset import load_split, run_dataset

    gt, _, image_root = load_split(args.dataset, args.ann, "--dataset", manifest.class_names)
    backend = build_backend(args, manifest)
    out_path = os.path.join(args.out, "results.json")
    out_mod.make_parent(out_path, "output folder")
    check_output_file(out_path, "results file")
    start = time.perf_counter()
    try:
        run_dataset(backend, gt, image_root, manifest.loop_options(clip_length, args.stages, args.duplicate_iou),
                    out_path, manifest.num_classes, gt.category_ids, manifest.top_k,
                    _make_linker(args, manifest))
    finally:
        if hasattr(backend, "close"):
            backend.close()
    frames = sum(v.length for v in gt.videos.values())
    elapsed = time.perf_counter() - start
    print(f"evis run: {len(gt.videos)} videos, {frames} frames in {elapsed:.1f}s "
          f"({frames / max(elapsed, 1e-9):.1f} FPS end to end)")
    print(f"results: {out_path}")
    return 0


def _make_linker(args, manifest):
    return linker_factory(args.linking or manifest.infer.get("linking") or "e2e", manifest.num_queries,
                          manifest.infer_value("background_threshold", float, 0.2))


def _check_input_size(manifest, info):
    """(H, W) of the model input for this source, or a UserError when the graphs cannot take it."""
    try:
        resized = resized_shape(info.height, info.width, manifest.test_size, manifest.max_size)
    except ValueError as e:
        raise UserError(f"{info.name}: {e}") from None
    axes = manifest.dynamic_axes
    limits = [(axes.get(a, {}).get("min", MIN_INPUT_SIDE), axes.get(a, {}).get("max", 1 << 30)) for a in "HW"]
    if not all(lo <= side <= hi for side, (lo, hi) in zip(resized, limits)):
        raise UserError(f"{info.name}: frames of {info.width}x{info.height} become {resized[1]}x{resized[0]} "
                        f"at the model's input (shortest side {manifest.test_size}, longest at most "
                        f"{manifest.max_size}); the exported graphs take {limits[1][0]}..{limits[1][1]} x "
                        f"{limits[0][0]}..{limits[0][1]} pixels (export with other --min-size/--max-size)")
    return resized


def _graphs_note(backend, manifest):
    """', INT8 (backbone.cpu.onnx), RoIAlign grouped': what an ONNX Runtime backend runs, when it is
    not the default export's FP32 graphs."""
    notes = []
    files = getattr(backend, "files", None)  # OrtBackend's (a TrtBackend names its precision already)
    if files is not None and backend.precision != "fp32":
        cpu_form = [os.path.basename(f) for f in files.values() if f.endswith(manifest_lib.CPU_FORM_SUFFIX)]
        notes.append(backend.precision.upper() + (f" ({', '.join(cpu_form)})" if cpu_form else ""))
    if manifest.data.get("roi_align", "roialign") != "roialign":
        notes.append(f"RoIAlign {manifest.data['roi_align']}")
    return "".join(", " + n for n in notes)


def _run(args, manifest, source, clip_length):
    info = source.info
    resized = _check_input_size(manifest, info)
    backend = TimedBackend(build_backend(args, manifest, resized))
    inner = backend.backend
    in_use = inner.providers_in_use() if hasattr(inner, "providers_in_use") else []
    print(f"evis run: {info.kind} {info.name} ({info.width}x{info.height} @ {info.fps:.1f} fps"
          f"{', live' if info.is_live else ''}) -> model input {resized[1]}x{resized[0]}, clips of "
          f"{clip_length}, {args.stages or manifest.num_stages}/{manifest.num_stages} stages, "
          f"{type(inner).__name__} on {', '.join(in_use) or '?'}{_graphs_note(inner, manifest)}",
          file=sys.stderr, flush=True)

    options = manifest.loop_options(clip_length, args.stages, args.duplicate_iou)
    make_linker = _make_linker(args, manifest)
    outputs = Outputs(args, info, manifest)
    status = out_mod.StatusLine()
    stopped = {"signal": None}

    def on_signal(signum, frame):
        if stopped["signal"] is not None:
            raise KeyboardInterrupt  # second Ctrl-C: stop at once (outputs still closed)
        stopped["signal"] = signum
        source.stop()
        print(f"\nevis run: {signal.Signals(signum).name}: finishing the frames already read "
              f"(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    start = time.perf_counter()
    written = {}
    try:
        frames = iter(source) if not args.max_frames else islice(iter(source), args.max_frames)
        for result in run_clips(backend, frames, options, make_linker() if make_linker else None):
            if not outputs.add(result):
                source.stop()
            if (result.index + 1) % clip_length == 0:
                outputs.end_clip()
                status.update(outputs.frames, backend.latencies[-1] * 1000 if backend.latencies else None,
                              source.dropped)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        try:
            written = outputs.close()
        finally:
            status.close()
            if hasattr(inner, "close"):
                inner.close()
    elapsed = time.perf_counter() - start
    lat = sorted(backend.latencies)
    print(f"evis run: {outputs.frames} frames in {elapsed:.1f}s ({outputs.frames / max(elapsed, 1e-9):.1f} FPS"
          f" end to end)" + (f", clip latency mean {1000 * sum(lat) / len(lat):.0f} ms, "
                             f"median {1000 * lat[len(lat) // 2]:.0f} ms over {len(lat)} clips" if lat else "")
          + (f", {source.dropped} frames dropped" if source.dropped else ""))
    for name, label in (("video", "overlay"), ("tracks", "tracks"), ("results", "results")):
        if name in written:
            print(f"{label}: {written[name]}")
    if stopped["signal"] is not None:  # 130 for SIGINT, 143 for SIGTERM
        print("evis run: interrupted; outputs hold the frames processed so far", file=sys.stderr)
        return 128 + int(stopped["signal"])
    return 0
