"""Calibration data: what every graph of MODEL_DIR sees when the FP32 model runs clip after clip.

Calibration inputs are recorded, not synthesised: the FP32 ONNX graphs run through the runtime's
own clip loop (`runtime/clip_loop.run_clips` over `runtime/ort_backend.OrtBackend`, CPU), so each
stage sees realistic features, and stage_0 sees realistic `init_queries` -- q* on a video's first
clip, the previous clip's `next_queries` (and slots reset to q*) afterwards -- and, for a model
trained with carried proposals, the carried boxes the clip loop gives it. A thin proxy around
each ONNX Runtime session copies the inputs of every call to disk (.npy files; the FPN features every
stage of a clip reads are written once), which keeps memory flat for large models (a 360x640 clip
of 9 frames is ~170 MB of FPN features).

Sources (`resolve_source`):
- a YouTube-VIS split folder (`annotations.json` + `JPEGImages/`), or a dataset root holding
  `train/` (preferred: calibrating on the split you evaluate on flatters the result) or `valid/`;
- a video file (or anything `runtime/sources.open_source` reads: an image folder, ...).

Clip selection (`plan_videos`): videos evenly spread over the split, each run from its first frame
for `clips_per_video` consecutive clips (default 4: three of four clips start from carried-over
queries, as at inference), until `clips` clips are recorded. A video source is one long video.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np

from efficientvis.errors import UserError

DEFAULT_CLIPS = 48
DEFAULT_CLIPS_PER_VIDEO = 4


@dataclass
class Source:
    kind: str  # "ytvis" | "video"
    path: str
    annotations: str = ""
    image_root: str = ""

    def describe(self) -> str:
        return f"{self.kind} {self.path}"


def resolve_source(path: str) -> Source:
    """--data DIR|VIDEO -> Source; UserError (one line) when it is neither."""
    if not path:
        raise UserError("--data is required (a YouTube-VIS folder or a video file)")
    if os.path.isdir(path):
        for split in ("", "train", "valid"):
            folder = os.path.join(path, split) if split else path
            ann = os.path.join(folder, "annotations.json")
            if os.path.isfile(ann):
                images = os.path.join(folder, "JPEGImages")
                if not os.path.isdir(images):
                    raise UserError(f"{folder}: annotations.json but no JPEGImages/ folder")
                return Source("ytvis", folder, ann, images)
        if any(n.lower().endswith((".jpg", ".jpeg", ".png", ".bmp")) for n in os.listdir(path)):
            return Source("video", path)  # an image folder: one video
        raise UserError(f"{path}: not a YouTube-VIS folder (no annotations.json here or in train/ "
                        f"or valid/) and no images")
    if os.path.isfile(path):
        return Source("video", path)
    raise UserError(f"calibration data not found: {path}")


def plan_videos(video_ids: list, lengths: dict, clip_length: int, clips: int,
                clips_per_video: int = DEFAULT_CLIPS_PER_VIDEO) -> list:
    """[(video_id, number of clips to run from its first frame)] covering `clips` clips, videos
    spread evenly over `video_ids` (pure: tested)."""
    if clips < 1:
        raise UserError(f"--clips must be >= 1, got {clips}")
    if clips_per_video < 1:
        raise UserError(f"--clips-per-video must be >= 1, got {clips_per_video}")
    if not video_ids:
        raise UserError("the calibration data has no videos")
    per_video = {v: min(clips_per_video, math.ceil(lengths[v] / clip_length)) for v in video_ids}
    wanted_videos = min(len(video_ids), math.ceil(clips / clips_per_video))
    step = len(video_ids) / wanted_videos
    order = [video_ids[int(i * step)] for i in range(wanted_videos)]
    order += [v for v in video_ids if v not in set(order)]  # short videos: take more
    plan, total = [], 0
    for v in order:
        if total >= clips:
            break
        n = min(per_video[v], clips - total)
        if n > 0:
            plan.append((v, n))
            total += n
    return plan


# ----------------------------------------------------------------------------------------------
# recording

class _RecordingSession:
    """Wraps an onnxruntime.InferenceSession: run() saves its feeds, then runs as usual."""

    def __init__(self, session, graph, recording):
        self._session, self._graph, self._recording = session, graph, recording

    def run(self, output_names, feeds, *args, **kwargs):
        self._recording.add(self._graph, feeds)
        return self._session.run(output_names, feeds, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._session, name)


@dataclass
class Recording:
    """Inputs of every graph call, on disk: folder/<graph>/<call>_<input>.npy. An array passed to
    several graphs of one clip (the FPN features every stage reads) is written once."""
    folder: str
    files: dict = field(default_factory=dict)  # graph -> [{input name: .npy path}] one per call
    videos: int = 0
    clips: int = 0
    frames: int = 0
    shapes: set = field(default_factory=set)  # (T, H, W) of the clips run
    _owned: bool = False
    _shared: dict = field(default_factory=dict, repr=False)  # id(array) -> (path, array) this clip

    def add(self, graph, feeds):
        calls = self.files.setdefault(graph, [])
        folder = os.path.join(self.folder, graph)
        os.makedirs(folder, exist_ok=True)
        if graph == "backbone":  # a new clip
            self._shared = {}
            frames = np.asarray(feeds["frames"])
            self.shapes.add((int(frames.shape[0]), int(frames.shape[2]), int(frames.shape[3])))
            self.clips += 1
        entry = {}
        for name, value in feeds.items():
            known = self._shared.get(id(value))
            if known is not None and known[1] is value:
                entry[name] = known[0]
                continue
            path = os.path.join(folder, f"{len(calls):05d}_{name}.npy")
            np.save(path, np.asarray(value))
            self._shared[id(value)] = (path, value)
            entry[name] = path
        calls.append(entry)

    def reader(self, graph, input_names=None):
        return RecordedReader(self.files.get(graph, []), input_names)

    def cleanup(self):
        self._shared = {}
        if self._owned:
            shutil.rmtree(self.folder, ignore_errors=True)

    def summary(self) -> dict:
        return {"videos": self.videos, "clips": self.clips, "frames": self.frames,
                "clip_shapes": sorted([list(s) for s in self.shapes])}


def _reader_base():
    try:
        from onnxruntime.quantization import CalibrationDataReader
    except ImportError:  # pragma: no cover - onnxruntime is a dependency of calibration
        return object
    return CalibrationDataReader


class RecordedReader(_reader_base()):
    """onnxruntime.quantization CalibrationDataReader over recorded feeds (one call = one batch)."""

    def __init__(self, calls, input_names=None):
        self.calls, self.input_names = list(calls), input_names
        self._it = iter(self.calls)

    def get_next(self):
        call = next(self._it, None)
        if call is None:
            return None
        names = self.input_names or list(call)
        return {n: np.load(call[n]) for n in names}

    def rewind(self):
        self._it = iter(self.calls)

    def __len__(self):
        return len(self.calls)


def _dataset_videos(source: Source):
    from efficientvis.ytvis import format as ytvis_format

    dataset = ytvis_format.load(source.annotations)
    return dataset, sorted(dataset.videos)


def _frames_of(source: Source, video):
    from efficientvis.ytvis import format as ytvis_format

    for t in range(video.length):
        yield ytvis_format.read_frame(source.image_root, video, t, rgb=False)


def record(model_dir, data, clips=DEFAULT_CLIPS, clips_per_video=DEFAULT_CLIPS_PER_VIDEO,
           threads=0, folder=None, log=print, manifest=None, clip_length=0) -> Recording:
    """Run MODEL_DIR's FP32 graphs (ONNX Runtime, CPU) on calibration clips and record every
    graph's inputs. `data`: path or Source. `clip_length`: frames per clip (0: the model's T; a
    shorter clip bounds the memory of large models). Returns the Recording (call cleanup() when done)."""
    from itertools import islice

    from efficientvis.runtime.clip_loop import run_clips
    from efficientvis.runtime.ort_backend import OrtBackend

    source = data if isinstance(data, Source) else resolve_source(data)
    backend = OrtBackend(model_dir, threads=threads, manifest=manifest, every_mask_head=True)
    if backend.fused:
        raise UserError(f"{model_dir}: calibration needs the split graphs (backbone, stage_k, mask_k .onnx)")
    m = backend.manifest
    owned = folder is None
    folder = folder or tempfile.mkdtemp(prefix="evis-calib-")
    recording = Recording(folder, _owned=owned)
    for g in list(backend.sessions):
        backend.sessions[g] = _RecordingSession(backend.sessions[g], g, recording)
    if not 0 <= clip_length <= m.clip_length:
        raise UserError(f"--clip-length must be between 1 and the model's T = {m.clip_length}, got {clip_length}")
    T = clip_length or m.clip_length
    options = m.loop_options(T, num_iterations=0)

    def run_video(frames, n_clips):
        for _ in run_clips(backend, islice(frames, n_clips * T), options):
            recording.frames += 1
        recording.videos += 1

    try:
        if source.kind == "ytvis":
            dataset, ids = _dataset_videos(source)
            lengths = {v: dataset.videos[v].length for v in ids}
            for video_id, n in plan_videos(ids, lengths, T, clips, clips_per_video):
                run_video(_frames_of(source, dataset.videos[video_id]), n)
        else:
            from efficientvis.runtime.sources import open_source

            src = open_source(source.path)
            try:
                run_video(iter(src), clips)
            finally:
                src.close()
    except BaseException:
        recording.cleanup()
        raise
    if recording.clips == 0:
        recording.cleanup()
        raise UserError(f"{source.path}: no frames could be read for calibration")
    log(f"recorded {recording.clips} clips ({recording.frames} frames, {recording.videos} videos, "
        f"clip shapes T x H x W {', '.join('x'.join(map(str, s)) for s in sorted(recording.shapes))}) "
        f"from {source.describe()}")
    return recording
