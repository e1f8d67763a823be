"""Frame sources for `evis run`: video files, image folders, V4L2 cameras, GStreamer pipelines
(Jetson CSI cameras) and network streams, as one iterator of BGR frames (numpy + OpenCV only).

`open_source(spec)` understands:
  path/to/video.mp4          a video file (anything OpenCV's FFmpeg backend decodes); ends at EOF
  path/to/folder             an image folder: its .jpg/.jpeg/.png files in sorted name order
  path/to/image.jpg          one image (a one-frame video)
  0, 1, ... or /dev/videoN   a V4L2 camera by index or device path                     (live)
  "... ! ... ! appsink"      a GStreamer pipeline (any spec containing "!")            (live)
  csi://0                    the Jetson CSI camera 0: `csi_pipeline(0)`                 (live)
  rtsp://, http(s)://        a network stream through FFmpeg                            (live)
                             (an http(s) URL with a known frame count is read as a file)

Live sources reconnect after a failed read: up to `max_reconnects` attempts with exponential
back-off (`backoff`, doubling, at most `max_backoff` seconds), each reported on stderr; a source
that comes back resets the count, one that does not raises UserError. Files end at the first failed
read. Empty frames (read succeeded, no pixels) are skipped and counted (`source.dropped`), as are
unreadable images of a folder. Frames of another size than the first are resized to the first
frame's size for live sources (a camera may renegotiate after a reconnect); in a folder they are a
UserError naming the image.

`source.stop()` makes the iterator end before its next read (used by the SIGINT handler).
GStreamer specs need an OpenCV built with GStreamer: PyPI's opencv-python wheels are built without
it; on a Jetson use JetPack's OpenCV (`python3-opencv`, `cv2.getBuildInformation()` shows
"GStreamer: YES").
"""

import os
import re
import sys
import time
from dataclasses import dataclass

import cv2
import numpy as np

from efficientvis.errors import UserError
from efficientvis.ytvis.format import read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
NETWORK_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://")
DEFAULT_FPS = 30.0


@dataclass
class SourceInfo:
    name: str  # what to call the source in messages (the spec, or the file name)
    kind: str  # file | folder | image | camera | gstreamer | network
    fps: float
    width: int
    height: int
    is_live: bool
    frame_count: int = 0  # 0: unknown (live)

    @property
    def size(self):
        return self.width, self.height


def csi_pipeline(sensor_id=0, width=1920, height=1080, fps=30, flip=0):
    """The GStreamer pipeline of a Jetson CSI camera (nvarguscamerasrc, NVMM NV12 -> BGR appsink).
    `flip` is nvvidconv's flip-method (0 none, 2 rotate 180, ...); appsink drops stale frames so
    the model always sees the newest one."""
    return (f"nvarguscamerasrc sensor-id={int(sensor_id)} ! "
            f"video/x-raw(memory:NVMM), width=(int){int(width)}, height=(int){int(height)}, "
            f"framerate=(fraction){int(fps)}/1, format=(string)NV12 ! "
            f"nvvidconv flip-method={int(flip)} ! "
            f"video/x-raw, width=(int){int(width)}, height=(int){int(height)}, format=(string)BGRx ! "
            f"videoconvert ! video/x-raw, format=(string)BGR ! appsink drop=1 max-buffers=1")


def gstreamer_available(build_information=None) -> bool:
    """Whether this OpenCV was built with GStreamer (the 'GStreamer: YES' line of the build info)."""
    info = cv2.getBuildInformation() if build_information is None else build_information
    match = re.search(r"^\s*GStreamer:\s*(\S+)", info, re.MULTILINE)
    return bool(match) and match.group(1).upper().startswith("YES")


def _default_capture(target, api):
    # OpenCV's and FFmpeg's own warnings ("moov atom not found", "can't open camera by index") would
    # surround our one-line messages: quiet while opening (OPENCV_FFMPEG_LOGLEVEL set by the user wins)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    logging = getattr(getattr(cv2, "utils", None), "logging", None)
    level = logging.getLogLevel() if logging else None
    if logging:
        logging.setLogLevel(logging.LOG_LEVEL_ERROR)
    try:
        return cv2.VideoCapture(target, api)
    finally:
        if logging:
            logging.setLogLevel(level)


def _log(message):
    print(message, file=sys.stderr, flush=True)


def _usable(frame) -> bool:
    return frame is not None and getattr(frame, "size", 0) > 0 and frame.ndim == 3 and frame.shape[2] == 3


class FrameSource:
    """Iterator of BGR frames (H, W, 3) uint8 with `info`, `frames_read` and `dropped`."""

    def __init__(self, info, frames_iter, close=None):
        self.info = info
        self._frames = frames_iter
        self._close = close
        self._stopped = False
        self.frames_read = 0
        self.dropped = 0

    def stop(self):
        """End the iteration before the next read (safe to call from a signal handler)."""
        self._stopped = True

    @property
    def stopped(self) -> bool:
        return self._stopped

    def __iter__(self):
        try:
            for frame in self._frames(self):
                if self._stopped:
                    break
                self.frames_read += 1
                yield frame
                if self._stopped:
                    break
        finally:
            self.close()

    def close(self):
        if self._close is not None:
            close, self._close = self._close, None
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# ----------------------------------------------------------------------------------------------
# capture-based sources (file, camera, GStreamer, network)

class _Capture:
    """An OpenCV capture that can be (re)opened; `factory(target, api)` is injectable for tests."""

    def __init__(self, target, api, factory):
        self.target, self.api, self.factory = target, api, factory
        self.cap = None

    def open(self) -> bool:
        self.release()
        try:
            self.cap = self.factory(self.target, self.api)
        except cv2.error:
            self.cap = None
            return False
        if self.cap is None or not self.cap.isOpened():
            self.release()
            return False
        return True

    def read(self):
        try:
            return self.cap.read()
        except cv2.error:
            return False, None

    def get(self, prop):
        try:
            return float(self.cap.get(prop))
        except (cv2.error, TypeError, ValueError):
            return 0.0

    def release(self):
        if self.cap is not None:
            try:
                self.cap.release()
            except cv2.error:
                pass
            self.cap = None


def _fps(value) -> float:
    return float(value) if np.isfinite(value) and 0 < value < 1000 else DEFAULT_FPS


def _open_capture(name, kind, target, api, is_live, factory, max_reconnects, backoff,
                  max_backoff, sleep, not_open_message):
    capture = _Capture(target, api, factory)
    if not capture.open():
        raise UserError(not_open_message)
    # the first frame now: a file that opens but does not decode (or a camera that gives nothing)
    # is reported here, before any output is created
    first = None
    for _ in range(5 if is_live else 1):
        ok, frame = capture.read()
        if ok and _usable(frame):
            first = frame
            break
    if first is None:
        capture.release()
        raise UserError(f"{name}: opened but no frame could be decoded"
                        + ("" if is_live else " (corrupt or unsupported video file?)"))
    fps = _fps(capture.get(cv2.CAP_PROP_FPS))
    count = int(max(capture.get(cv2.CAP_PROP_FRAME_COUNT), 0)) if not is_live else 0
    if kind == "network" and count > 0:
        is_live = False  # an http(s) file: read to its end, no reconnects
    height, width = first.shape[:2]
    info = SourceInfo(name, kind, fps, width, height, is_live, count)

    def frames(source):
        yield first
        attempts = 0
        while not source.stopped:
            ok, frame = capture.read()
            if ok and _usable(frame):
                attempts = 0
                if frame.shape[:2] != (height, width):
                    frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_LINEAR)
                yield frame
                continue
            if ok:  # an empty / malformed frame: skip it
                source.dropped += 1
                continue
            if not is_live:
                return  # end of file
            # live: reconnect with exponential back-off
            while True:
                if source.stopped:
                    return
                if attempts >= max_reconnects:
                    raise UserError(f"{name}: no frames after {max_reconnects} reconnect attempts; "
                                    f"giving up")
                delay = min(backoff * (2 ** attempts), max_backoff)
                attempts += 1
                _log(f"source {name}: read failed; reconnecting in {delay:.1f}s "
                     f"(attempt {attempts}/{max_reconnects})")
                sleep(delay)
                if source.stopped:
                    return
                if capture.open():
                    _log(f"source {name}: reconnected")
                    break

    return FrameSource(info, frames, capture.release)


# ----------------------------------------------------------------------------------------------
# image folders

def _image_files(folder):
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n)))


def _read_or_skip(spec, path):
    """An image of a folder source, or None (logged: the frame is skipped, as a dropped frame)."""
    try:
        return read_image(path)
    except UserError as e:
        _log(f"source {spec}: {e}; skipped")
        return None


def _open_images(spec, files, kind, fps):
    first = None
    skipped = 0
    for path in files:
        first = _read_or_skip(spec, path)
        if first is not None:
            break
        skipped += 1
    if first is None:
        raise UserError(f"{spec}: none of its {len(files)} image(s) can be read")
    height, width = first.shape[:2]
    info = SourceInfo(spec, kind, float(fps), width, height, False, len(files) - skipped)

    def frames(source):
        source.dropped += skipped
        yield first
        for path in files[skipped + 1:]:
            if source.stopped:
                return
            frame = _read_or_skip(spec, path)
            if frame is None:
                source.dropped += 1
                continue
            if frame.shape[:2] != (height, width):
                raise UserError(f"{path}: image is {frame.shape[1]}x{frame.shape[0]}, the first image "
                                f"of {spec} is {width}x{height}; a folder must hold frames of one size")
            yield frame

    return FrameSource(info, frames)


# ----------------------------------------------------------------------------------------------

def open_source(spec, *, fps=None, capture_factory=None, max_reconnects=5, backoff=0.5,
                max_backoff=8.0, sleep=time.sleep, build_information=None):
    """A FrameSource for `spec` (see the module docstring). `fps` overrides the frame rate of image
    folders (default 30) and of sources that report none. `capture_factory(target, api)` replaces
    cv2.VideoCapture (tests); `build_information` replaces cv2.getBuildInformation() (tests)."""
    spec = str(spec).strip()
    if not spec:
        raise UserError("--source is empty")
    factory = capture_factory or _default_capture
    live = dict(factory=factory, max_reconnects=max_reconnects, backoff=backoff,
                max_backoff=max_backoff, sleep=sleep)

    csi = re.fullmatch(r"csi://(\d+)", spec)
    if csi or ("!" in spec and not os.path.exists(spec)):  # an existing file named "a!b.mp4" is a file
        pipeline = csi_pipeline(int(csi.group(1))) if csi else spec
        if not gstreamer_available(build_information):
            raise UserError(f"{spec}: a GStreamer source needs OpenCV built with GStreamer, and this "
                            f"OpenCV ({cv2.__version__}) was built without it (cv2.getBuildInformation() "
                            f"shows 'GStreamer: NO'); on a Jetson use JetPack's OpenCV (apt python3-opencv, "
                            f"not the pip opencv-python wheels), or give a camera index / video file")
        source = _open_capture(spec, "gstreamer", pipeline, cv2.CAP_GSTREAMER, True, **live,
                               not_open_message=f"{spec}: GStreamer pipeline did not open (check the "
                               f"pipeline with gst-launch-1.0; it must end in appsink)")
    elif re.fullmatch(r"\d+", spec) or re.fullmatch(r"/dev/video\d+", spec):
        target = int(spec) if spec.isdigit() else spec
        device = f"/dev/video{spec}" if spec.isdigit() else spec
        if capture_factory is None and sys.platform.startswith("linux") and not os.path.exists(device):
            raise UserError(f"camera {spec} is not there ({device} does not exist; list cameras with "
                            f"`v4l2-ctl --list-devices`)")
        api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
        source = _open_capture(f"camera {spec}", "camera", target, api, True, **live,
                               not_open_message=f"camera {spec} does not open (no such V4L2 device, or "
                               f"it is busy; list cameras with `v4l2-ctl --list-devices`)")
    elif spec.lower().startswith(NETWORK_SCHEMES):
        source = _open_capture(spec, "network", spec, cv2.CAP_FFMPEG, True, **live,
                               not_open_message=f"{spec}: stream does not open (unreachable, wrong URL "
                               f"or credentials, or a format FFmpeg cannot read)")
    elif os.path.isdir(spec):
        files = _image_files(spec)
        if not files:
            raise UserError(f"{spec}: folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
        source = _open_images(spec, files, "folder", fps or DEFAULT_FPS)
    elif os.path.isfile(spec):
        if spec.lower().endswith(IMAGE_EXTENSIONS):
            source = _open_images(spec, [spec], "image", fps or DEFAULT_FPS)
        else:
            source = _open_capture(spec, "file", spec, cv2.CAP_FFMPEG, False, **live,
                                   not_open_message=f"{spec}: cannot open as a video (corrupt or "
                                   f"unsupported file)")
    else:
        raise UserError(f"source not found: {spec} (expected a video file, an image folder, a "
                        f"camera index, csi://N, a GStreamer pipeline or an rtsp/http URL)")
    if fps and source.info.kind not in ("folder", "image"):
        source.info.fps = float(fps)
    return source
