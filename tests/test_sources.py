"""Frame sources of `evis run` (runtime/sources.py): files, folders, errors, GStreamer, reconnects."""

import os

import cv2
import numpy as np
import pytest

from efficientvis.errors import UserError
from efficientvis.runtime import sources
from efficientvis.runtime.sources import csi_pipeline, gstreamer_available, open_source


def _frames(n, h=48, w=64):
    return [np.full((h, w, 3), 10 * i, np.uint8) for i in range(n)]


def _write_video(path, frames, fps=10.0):
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(f)
    writer.release()


def test_video_file(tmp_path):
    path = tmp_path / "v.mp4"
    _write_video(path, _frames(12))
    src = open_source(str(path))
    assert (src.info.kind, src.info.is_live, src.info.size) == ("file", False, (64, 48))
    assert src.info.fps == pytest.approx(10.0)
    frames = list(src)
    assert len(frames) == 12 and src.frames_read == 12 and src.dropped == 0
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)
    means = [float(f.mean()) for f in frames]
    assert means == sorted(means) and abs(means[5] - 50) < 8  # frames in order (lossy codec)


def test_a_file_whose_name_has_a_bang_is_a_file_not_a_pipeline(tmp_path):
    path = tmp_path / "take!2.mp4"  # "!" separates GStreamer elements, but this file exists
    _write_video(path, _frames(3))
    src = open_source(str(path))
    assert src.info.kind == "file" and len(list(src)) == 3


def test_image_folder_sorted_and_unreadable_skipped(tmp_path):
    for i in (2, 0, 1, 3):
        cv2.imwrite(str(tmp_path / f"{i:05d}.png"), np.full((20, 30, 3), 40 * i, np.uint8))
    (tmp_path / "00004.jpg").write_bytes(b"not a jpeg")
    # a JPEG cut off halfway: cv2.imread would decode it with grey where the data stops
    jpeg = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8))[1].tobytes()
    (tmp_path / "00005.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (tmp_path / "notes.txt").write_text("x")
    src = open_source(str(tmp_path), fps=5)
    assert (src.info.kind, src.info.is_live, src.info.fps, src.info.size) == ("folder", False, 5.0, (30, 20))
    frames = list(src)
    assert [int(f[0, 0, 0]) for f in frames] == [0, 40, 80, 120]
    assert src.dropped == 2


def test_image_folder_of_mixed_sizes_is_an_error(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((20, 30, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((21, 30, 3), np.uint8))
    with pytest.raises(UserError, match="b.png.*30x21.*30x20"):
        list(open_source(str(tmp_path)))


@pytest.mark.parametrize("make, match", [
    (lambda d: str(d / "missing.mp4"), "source not found"),
    (lambda d: (d / "corrupt.mp4").write_bytes(os.urandom(5000)) and str(d / "corrupt.mp4"),
     "corrupt.mp4: cannot open as a video|no frame could be decoded"),
    (lambda d: (d / "empty").mkdir() or str(d / "empty"), "folder has no images"),
    (lambda d: "97", "camera 97"),
    (lambda d: "", "empty"),
])
def test_bad_sources_are_one_line_user_errors(tmp_path, make, match):
    spec = make(tmp_path)
    with pytest.raises(UserError, match=match) as info:
        open_source(spec)
    assert "\n" not in str(info.value)


def test_gstreamer_spec_without_gstreamer_build():
    pipeline = "videotestsrc ! videoconvert ! appsink"
    with pytest.raises(UserError, match="without it.*JetPack"):
        open_source(pipeline, build_information="  Video I/O:\n    GStreamer:   NO\n")
    if not gstreamer_available():  # this machine's OpenCV (PyPI wheels have no GStreamer)
        with pytest.raises(UserError, match="GStreamer"):
            open_source("csi://0")


def test_gstreamer_detection():
    assert gstreamer_available("    GStreamer:                   YES (1.22.0)\n")
    assert not gstreamer_available("    GStreamer:                   NO\n")
    assert not gstreamer_available("nothing about it")


def test_csi_pipeline_string_and_csi_spec():
    p = csi_pipeline(sensor_id=1, width=1280, height=720, fps=60, flip=2)
    assert p.startswith("nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM)")
    for part in ("width=(int)1280", "height=(int)720", "framerate=(fraction)60/1", "format=(string)NV12",
                 "nvvidconv flip-method=2", "format=(string)BGRx", "videoconvert", "format=(string)BGR",
                 "appsink drop=1"):
        assert part in p
    assert p.count("!") == 6 and p.rstrip().endswith("max-buffers=1")
    opened = []

    def factory(target, api):
        opened.append((target, api))
        return FakeCapture([np.zeros((8, 8, 3), np.uint8)])

    src = open_source("csi://0", capture_factory=factory, build_information="GStreamer: YES")
    assert opened == [(csi_pipeline(0), cv2.CAP_GSTREAMER)]
    assert src.info.kind == "gstreamer" and src.info.is_live


class FakeCapture:
    """cv2.VideoCapture stand-in: `script` items are frames, None (read fails) or "empty"."""

    def __init__(self, script, opened=True, fps=25.0):
        self.script, self.opened, self.fps = list(script), opened, fps
        self.released = False

    def isOpened(self):
        return self.opened

    def read(self):
        if not self.script:
            return False, None
        item = self.script.pop(0)
        if item is None:
            return False, None
        if isinstance(item, str):
            return True, np.zeros((0, 0, 3), np.uint8)
        return True, item

    def get(self, prop):
        return self.fps if prop == cv2.CAP_PROP_FPS else 0.0

    def release(self):
        self.released = True


def _scripted(opens):
    """A capture factory returning the next FakeCapture of `opens` per (re)open."""
    made = []

    def factory(target, api):
        cap = opens.pop(0) if opens else FakeCapture([], opened=False)
        made.append(cap)
        return cap

    return factory, made


def test_live_reconnect_with_exponential_backoff(capsys):
    f = _frames(6, 8, 8)
    factory, made = _scripted([
        FakeCapture([f[0], f[1], "empty", f[2], None]),     # fails after 3 frames (+1 empty)
        FakeCapture([], opened=False),                       # reconnect 1: does not open
        FakeCapture([f[3], f[4], None]),                     # reconnect 2: 2 frames, then fails
        FakeCapture([], opened=False), FakeCapture([], opened=False), FakeCapture([], opened=False),
    ])
    sleeps = []
    src = open_source("rtsp://camera/stream", capture_factory=factory, sleep=sleeps.append,
                      max_reconnects=3, backoff=0.5, max_backoff=1.5)
    assert src.info.is_live and src.info.kind == "network" and src.info.fps == 25.0
    got = []
    with pytest.raises(UserError, match="no frames after 3 reconnect attempts"):
        for frame in src:
            got.append(frame)
    assert [int(g[0, 0, 0]) for g in got] == [0, 10, 20, 30, 40]
    assert src.dropped == 1
    # back-off doubles, capped; the count restarts after the source came back
    assert sleeps == [0.5, 1.0, 0.5, 1.0, 1.5]
    err = capsys.readouterr().err
    assert err.count("reconnecting") == 5 and "reconnected" in err
    assert all(c.released for c in made if c.opened)


def test_file_read_failure_is_end_of_stream_and_stop(tmp_path):
    f = _frames(4, 8, 8)
    factory, _ = _scripted([FakeCapture([f[0], None, f[1]])])
    (tmp_path / "v.mp4").write_bytes(b"x")
    src = open_source(str(tmp_path / "v.mp4"), capture_factory=factory, sleep=lambda s: pytest.fail("slept"))
    assert len(list(src)) == 1
    factory, _ = _scripted([FakeCapture(f)])
    src = open_source("0", capture_factory=factory)
    out = []
    for frame in src:
        out.append(frame)
        src.stop()
    assert len(out) == 1


def test_live_frames_of_another_size_are_resized():
    factory, _ = _scripted([FakeCapture([np.zeros((8, 8, 3), np.uint8), np.zeros((16, 12, 3), np.uint8)])])
    src = open_source("0", capture_factory=factory, max_reconnects=0)
    frames = []
    with pytest.raises(UserError):
        for frame in src:
            frames.append(frame)
    assert [fr.shape for fr in frames] == [(8, 8, 3), (8, 8, 3)]


def test_camera_that_gives_no_frame():
    factory, _ = _scripted([FakeCapture([None] * 5)])
    with pytest.raises(UserError, match="camera 0: opened but no frame"):
        open_source("0", capture_factory=factory)
    factory, _ = _scripted([FakeCapture([], opened=False)])
    with pytest.raises(UserError, match="camera 0 does not open"):
        open_source("0", capture_factory=factory)


def test_module_is_torch_free():
    assert "torch" not in open(sources.__file__).read().split('"""')[2]
