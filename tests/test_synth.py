"""evis synth: synthetic YouTube-VIS clips and the long mp4 video (small sizes: the whole file runs fast)."""

import json
import os

import cv2
import numpy as np
import pytest

from efficientvis import cli
from efficientvis.errors import UserError
from efficientvis.ytvis import format as ytvis_format
from efficientvis.ytvis import synth

SMALL = dict(frames=10, height=64, width=96)


def _files(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """12 train + 3 valid videos of 16 frames, max 4 objects, with a preview."""
    root = tmp_path_factory.mktemp("synth")
    preview = root / "preview.png"
    path = synth.generate(str(root / "data"), 12, frames=16, height=96, width=160, seed=0,
                          max_objects=4, workers=1, valid_videos=3, preview=str(preview))
    return root, path, ytvis_format.load(path)


def test_layout_and_loads(dataset):
    root, path, data = dataset
    assert path == str(root / "data" / "train" / "annotations.json")
    assert [c["name"] for c in data.categories] == ["disc", "square", "triangle", "star", "ring", "cross"]
    assert [c["id"] for c in data.categories] == [1, 2, 3, 4, 5, 6]
    assert len(data.videos) == 12
    ytvis_format.check_images(data, str(root / "data" / "train" / "JPEGImages"))
    raw = json.loads((root / "data" / "train" / "annotations.json").read_text())
    assert set(raw) >= {"videos", "annotations", "categories"}
    assert [a["id"] for a in raw["annotations"]] == list(range(1, len(raw["annotations"]) + 1))
    for v in raw["videos"]:
        assert v["length"] == len(v["file_names"]) == 16
        assert (v["height"], v["width"]) == (96, 160)
        assert v["file_names"][3] == f"train_{v['id'] - 1:05d}/00003.jpg"
    image = cv2.imread(str(root / "data" / "train" / "JPEGImages" / raw["videos"][0]["file_names"][0]))
    assert image.shape == (96, 160, 3)
    for a in raw["annotations"]:
        assert a["iscrowd"] == 0
        assert len(a["segmentations"]) == len(a["areas"]) == len(a["bboxes"]) == 16
        for seg, area, box in zip(a["segmentations"], a["areas"], a["bboxes"]):
            assert (seg is None) == (area is None) == (box is None)
            if seg is not None:
                assert isinstance(seg["counts"], str) and seg["size"] == [96, 160]
                mask = ytvis_format.decode(seg, 96, 160)
                assert mask.shape == (96, 160) and mask.sum() == area > 0
                ys, xs = np.nonzero(mask)
                assert box == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_visible_parts_never_overlap(dataset):
    _, _, data = dataset
    overlaps_possible = 0
    for vid, video in data.videos.items():
        for t in range(video.length):
            masks = [ytvis_format.decode(tr.segmentations[t], video.height, video.width)
                     for tr in data.tracks[vid] if tr.segmentations[t] is not None]
            if len(masks) > 1:
                overlaps_possible += 1
                assert np.stack(masks).sum(0).max() == 1, f"video {vid} frame {t}: masks overlap"
    assert overlaps_possible > 0


def test_occlusion_is_annotated_as_visible_part():
    """Where an object is drawn over another, the lower one's mask loses exactly those pixels."""
    found = False
    for index in range(30):
        for frame in synth.iter_video_frames(12, 96, 160, seed=0, long_term=False, video_index=index):
            if len(frame.masks) < 2:
                continue
            union = np.stack(list(frame.masks.values())).sum(0)
            assert union.max() == 1
            found = True
        if found:
            break
    assert found


def test_enter_leave_nulls_and_same_class_pairs(dataset):
    _, _, data = dataset
    tracks = [t for ts in data.tracks.values() for t in ts]
    assert all(t.present().any() for t in tracks)  # never-visible instances are left out
    assert any(not t.present().all() for t in tracks)  # null frames exist
    starts_late = any(not t.present()[0] and t.present().any() for t in tracks)
    ends_early = any(t.present().any() and not t.present()[-1] for t in tracks)
    assert starts_late and ends_early
    same_class = [vid for vid, ts in data.tracks.items()
                  if len({t.category_id for t in ts}) < len(ts)]
    assert same_class
    assert len({t.category_id for t in tracks}) == 6


def test_deterministic_independent_of_workers_and_seed_dependent(tmp_path):
    a = synth.generate(str(tmp_path / "a"), 3, seed=5, workers=1, **SMALL)
    b = synth.generate(str(tmp_path / "b"), 3, seed=5, workers=2, **SMALL)
    c = synth.generate(str(tmp_path / "c"), 3, seed=6, workers=1, **SMALL)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb  # byte-identical JSON and JPEGs, one or two processes
    assert fa.keys() == fc.keys()
    assert open(a, "rb").read() != open(c, "rb").read()
    assert fa["train/JPEGImages/train_00000/00000.jpg"] != fc["train/JPEGImages/train_00000/00000.jpg"]
    assert open(a, "rb").read() == open(b, "rb").read()


def test_stride_is_subsampling_of_longer_video(tmp_path):
    strided = synth.generate(str(tmp_path / "s2"), 2, frames=6, height=64, width=96, seed=1, stride=2,
                             workers=1)
    full = synth.generate(str(tmp_path / "s1"), 2, frames=12, height=64, width=96, seed=1, workers=1)
    plain = synth.generate(str(tmp_path / "p"), 2, frames=6, height=64, width=96, seed=1, workers=1)
    s, f, p = (json.load(open(x)) for x in (strided, full, plain))
    assert s["videos"][0]["file_names"] == [f"train_00000/{u:05d}.jpg" for u in range(0, 12, 2)]
    # every strided track is the every-other-frame subsample of a track of the 2x longer video
    for a in s["annotations"]:
        candidates = [b["segmentations"][::2] for b in f["annotations"] if b["video_id"] == a["video_id"]]
        assert a["segmentations"] in candidates
    for name in s["videos"][0]["file_names"]:
        assert (tmp_path / "s2/train/JPEGImages" / name).read_bytes() == \
            (tmp_path / "s1/train/JPEGImages" / name).read_bytes()
    # and the motion per output frame differs from the stride-1 clip of the same length
    assert [a["segmentations"] for a in s["annotations"]] != [a["segmentations"] for a in p["annotations"]]


def test_valid_split_differs_from_train(dataset):
    root, _, train = dataset
    valid = ytvis_format.load(str(root / "data" / "valid" / "annotations.json"))
    assert len(valid.videos) == 3
    assert valid.videos[1].file_names[0] == "valid_00000/00000.jpg"
    ytvis_format.check_images(valid, str(root / "data" / "valid" / "JPEGImages"))
    for vid in valid.videos:
        a = (root / "data/valid/JPEGImages" / valid.videos[vid].file_names[0]).read_bytes()
        b = (root / "data/train/JPEGImages" / train.videos[vid].file_names[0]).read_bytes()
        assert a != b
        assert [t.segmentations for t in valid.tracks[vid]] != [t.segmentations for t in train.tracks[vid]]


def test_preview_png(dataset):
    root, _, _ = dataset
    image = cv2.imread(str(root / "preview.png"))
    assert image is not None
    assert image.shape[0] >= 5 * 96 and image.shape[1] >= 6 * 160  # 5 videos x 6 frames


def test_long_video_mp4_and_annotations(tmp_path):
    path = tmp_path / "long.mp4"
    json_path = synth.write_video(str(path), frames=60, height=96, width=160, seed=2,
                                  preview=str(tmp_path / "long.png"))
    assert json_path == str(tmp_path / "long.json")
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened()
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 60
    decoded = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        decoded.append(image)
    capture.release()
    assert len(decoded) == 60 and decoded[0].shape == (96, 160, 3)
    data = ytvis_format.load(json_path)
    (video,) = data.videos.values()
    assert video.length == 60 and (video.height, video.width) == (96, 160)
    assert video.file_names[:2] == ["long/00000.jpg", "long/00001.jpg"]
    # the mp4 frames are the rendered frames (lossy codec), and the masks match them
    rendered = list(synth.iter_video_frames(60, 96, 160, seed=2, long_term=True, name="long"))
    for t in (0, 30, 59):
        diff = np.abs(decoded[t].astype(int) - rendered[t].image.astype(int)).mean()
        assert diff < 8, f"frame {t}: mean abs difference {diff}"
    tracks = data.tracks[video.id]
    for t in (0, 30, 59):
        annotated = sorted((tr.category_id, tr.segmentations[t]["counts"]) for tr in tracks
                           if tr.segmentations[t] is not None)
        drawn = sorted((rendered[t].categories[k], ytvis_format.encode(m)["counts"])
                       for k, m in rendered[t].masks.items())
        assert annotated == drawn
    assert any(t.present().all() for t in tracks)  # objects stay in view in this mode
    assert cv2.imread(str(tmp_path / "long.png")) is not None


def test_long_video_bad_path_is_user_error(tmp_path):
    with pytest.raises(UserError, match="VideoWriter"):
        synth.write_video(str(tmp_path / "x.unknownext"), frames=2, height=64, width=96)
    assert not list(tmp_path.iterdir())


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli.main(["synth", "--out", str(out), "--videos", "2", "--valid-videos", "1", "--frames", "4",
                     "--height", "64", "--width", "96", "--workers", "1", "--stride", "3"])
    assert code == 0
    data = ytvis_format.load(str(out / "train" / "annotations.json"))
    assert len(data.videos) == 2 and data.videos[1].file_names[1] == "train_00000/00003.jpg"
    assert (out / "valid" / "annotations.json").is_file()
    assert cli.main(["synth", "--out", str(out), "--frames", "0"]) == 1
    assert "--frames" in capsys.readouterr().err
    assert cli.main(["synth"]) == 1
    assert cli.main(["synth", "--out", str(out), "--min-objects", "5", "--max-objects", "3"]) == 1
