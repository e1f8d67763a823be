"""What `evis run` writes: overlay video, tracks.jsonl, YouTube-VIS results, live window, status.

Every output takes the FrameResults of runtime/clip_loop.py one by one (`add`), is told when a clip
is complete (`end_clip`), and is finished by `close()`, which is also what an interrupted run calls,
so everything written stays readable:

- Overlay video (`OverlayVideo`): each track id has one colour (`track_colour`: golden-ratio hue
  steps of the id, the same on every run), its mask blended, its box and an "id class score" label.
  Format `mp4` (default): fourcc mp4v through FFmpeg. An MP4 is only playable once its index (the
  moov atom) is written, which happens on release: `evis run` releases the writer on normal end,
  on errors, on SIGINT and on SIGTERM. A hard kill (SIGKILL, power loss) leaves an unplayable .mp4;
  where that matters (unattended Jetsons) use format `avi`: Motion-JPEG in OpenCV's own AVI writer,
  readable up to the last frame written even without a release, at several times the size.
- `tracks.jsonl` (`TracksJsonl`): one JSON line per frame
  {"frame": i, "tracks": [{"id", "class", "category_id", "score", "box": [x1, y1, x2, y2],
  "mask": {"size": [H, W], "counts": str}}]}, written and flushed (fsync) after each clip, so a
  killed process leaves only complete lines (at most the last clip is missing).
- Results (`VideoResults`): for file and folder inputs, one video's YouTube-VIS results
  (TrackCollector + ResultsWriter; the video's length is the number of frames processed).
- `LiveWindow`: cv2.imshow, switched off (with one message) when there is no display or OpenCV
  has no GUI (opencv-python-headless); the q / Esc key asks the run to stop.
- `StatusLine`: "frames, FPS, clip latency" on stderr, refreshed at most `interval` seconds apart
  (in place on a terminal, as separate lines every few seconds otherwise).
"""

import json
import os
import sys
import time

import cv2
import numpy as np

from efficientvis.errors import UserError
from efficientvis.runtime.collect import TrackCollector
from efficientvis.ytvis.format import encode
from efficientvis.ytvis.results import ResultsWriter

VIDEO_FORMATS = {  # format -> (extension, fourcc, OpenCV writer backend)
    "mp4": (".mp4", "mp4v", cv2.CAP_FFMPEG),
    "avi": (".avi", "MJPG", cv2.CAP_OPENCV_MJPEG),
}


def track_colour(track_id: int) -> tuple:
    """A stable, well-spread BGR colour for a track id (hue steps of the golden ratio)."""
    hue = (int(track_id) * 0.618033988749895) % 1.0
    sat = 0.65 + 0.35 * ((int(track_id) * 7) % 3) / 2.0
    hsv = np.array([[[hue * 180.0, sat * 255.0, 255.0]]], np.float32)
    bgr = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def instance_rle(inst) -> dict:
    """The instance's mask as compressed RLE (str counts), encoded once and kept on the instance."""
    rle = getattr(inst, "rle", None)
    if rle is None:
        rle = encode(inst.mask)
        inst.rle = rle
    return rle


def make_parent(path, what):
    """Create the folder of an output file; an impossible path is a UserError naming it."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the {what} {path}: {e.strerror or e}") from None


def class_name(class_names, label: int) -> str:
    return class_names[label] if class_names and 0 <= label < len(class_names) else str(label)


def draw_instances(frame, instances, class_names=None, alpha=0.5):
    """A copy of the BGR frame with every instance's mask blended, box and label drawn."""
    out = frame.copy()
    height, width = out.shape[:2]
    scale = max(0.35, min(height, width) / 720.0)
    thickness = max(1, int(round(2 * scale)))
    for inst in instances:
        colour = track_colour(inst.track_id)
        if inst.mask is not None and inst.mask.any():
            region = out[inst.mask].astype(np.float32)
            out[inst.mask] = (region * (1 - alpha) + np.array(colour, np.float32) * alpha).astype(np.uint8)
        x1, y1, x2, y2 = (int(round(float(v))) for v in inst.box)
        x1, x2 = max(0, min(x1, width - 1)), max(0, min(x2, width - 1))
        y1, y2 = max(0, min(y1, height - 1)), max(0, min(y2, height - 1))
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness)
        label = f"{inst.track_id} {class_name(class_names, inst.label)} {inst.score:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, 1)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else min(y1 + th + base + 2, height - 1)
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw + 2, ty + 1), colour, -1)
        cv2.putText(out, label, (x1 + 1, ty - base + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return out


class OverlayVideo:
    """Overlay frames -> a video file (see the module docstring for mp4 vs avi)."""

    def __init__(self, path, fps, size, fmt="mp4"):
        if fmt not in VIDEO_FORMATS:
            raise UserError(f"video format must be one of {sorted(VIDEO_FORMATS)}, got {fmt!r}")
        ext, fourcc, api = VIDEO_FORMATS[fmt]
        self.path, self.size, self.frames = path, (int(size[0]), int(size[1])), 0
        make_parent(path, "overlay video")
        self.writer = cv2.VideoWriter(path, api, cv2.VideoWriter_fourcc(*fourcc), float(fps), self.size)
        if not self.writer.isOpened():
            self.writer.release()
            self.writer = None
            raise UserError(f"cannot write the overlay video {path}: OpenCV's VideoWriter did not open "
                            f"(fourcc {fourcc}, {self.size[0]}x{self.size[1]}); try --video-format "
                            f"{'avi' if fmt == 'mp4' else 'mp4'} or --no-video")

    def write(self, image):
        if self.writer is None:
            return
        if (image.shape[1], image.shape[0]) != self.size:
            image = cv2.resize(image, self.size, interpolation=cv2.INTER_LINEAR)
        self.writer.write(image)
        self.frames += 1

    def close(self):
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.release()
        return self.path


class TracksJsonl:
    """tracks.jsonl: lines buffered per clip, written + flushed + fsynced by end_clip()."""

    def __init__(self, path, class_names=None, category_ids=None):
        self.path = path
        self.class_names, self.category_ids = class_names, category_ids
        make_parent(path, "tracks file")
        try:
            self.file = open(path, "w")
        except OSError as e:
            raise UserError(f"cannot write the tracks file {path}: {e.strerror or e}") from None
        self.pending = []
        self.frames = 0

    def add(self, result):
        tracks = []
        for inst in result.instances:
            label = inst.label
            category = (int(self.category_ids[label]) if self.category_ids and label < len(self.category_ids)
                        else label + 1)
            tracks.append({"id": int(inst.track_id), "class": class_name(self.class_names, label),
                           "category_id": category, "score": round(inst.score, 5),
                           "box": [round(float(v), 2) for v in inst.box],
                           "mask": instance_rle(inst)})
        self.pending.append(json.dumps({"frame": int(result.index), "tracks": tracks}))

    def end_clip(self):
        if self.pending and self.file is not None:
            self.file.write("\n".join(self.pending) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())
            self.frames += len(self.pending)
        self.pending = []

    def close(self):
        self.end_clip()
        if self.file is not None:
            self.file.close()
            self.file = None
        return self.path


class VideoResults:
    """One video's YouTube-VIS results file, written on close() from what was processed."""

    def __init__(self, path, num_classes, category_ids, video_id=1, top_k=10):
        self.path, self.video_id, self.top_k = path, video_id, top_k
        self.category_ids = list(category_ids)
        self.collector = TrackCollector(None, num_classes)

    def add(self, result):
        for inst in result.instances:
            instance_rle(inst)  # encoded once, shared with tracks.jsonl
        self.collector.add(result)

    def close(self):
        if self.collector is None:
            return self.path
        collector, self.collector = self.collector, None
        with collector, ResultsWriter(self.path) as writer:
            writer.add(self.video_id, collector.results(self.video_id, self.category_ids, self.top_k))
        return self.path


def display_available() -> bool:
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


class LiveWindow:
    def __init__(self, title="evis run"):
        self.title = title
        self.enabled = display_available()
        if not self.enabled:
            print("evis run: --show ignored: no display (DISPLAY is not set)", file=sys.stderr)

    def show(self, image) -> bool:
        """Show a frame; False when the user asked to stop (q or Esc)."""
        if not self.enabled:
            return True
        try:
            cv2.imshow(self.title, image)
            key = cv2.waitKey(1) & 0xFF
        except cv2.error as e:
            self.enabled = False
            print(f"evis run: --show ignored: this OpenCV cannot open windows "
                  f"({str(e).strip().splitlines()[-1][:120]})", file=sys.stderr)
            return True
        return key not in (ord("q"), 27)

    def close(self):
        if self.enabled:
            try:
                cv2.destroyWindow(self.title)
                cv2.waitKey(1)
            except cv2.error:
                pass
            self.enabled = False


class StatusLine:
    """frames / FPS / clip latency on stderr, at most one refresh per `interval` seconds."""

    def __init__(self, stream=None, interval=0.25, clock=time.monotonic):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval if self.tty else max(interval, 5.0)
        self.clock = clock
        self.start = clock()
        self.last = None
        self.shown = False
        self.text = ""

    def update(self, frames, clip_ms=None, dropped=0, force=False):
        now = self.clock()
        if not force and self.last is not None and now - self.last < self.interval:
            return False
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        text = f"frames {frames}  {frames / elapsed:.1f} FPS"
        if clip_ms is not None:
            text += f"  clip latency {clip_ms:.0f} ms"
        if dropped:
            text += f"  dropped {dropped}"
        self.text = text
        if self.tty:
            self.stream.write("\r" + text.ljust(60))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.shown = True
        return True

    def close(self):
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()
