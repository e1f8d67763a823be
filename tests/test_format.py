"""The YouTube-VIS annotation loader: every segmentation form, and one clear error per bad file."""

import json

import numpy as np
import pytest

from efficientvis.errors import UserError
from efficientvis.ytvis import format as F


def _data(segmentations, height=10, width=12, length=3, category_id=1, iscrowd=0):
    return {"videos": [{"id": 7, "width": width, "height": height, "length": length,
                        "file_names": [f"vid/{t:05d}.jpg" for t in range(length)]}],
            "categories": [{"id": 1, "name": "cat", "supercategory": "animal"}],
            "annotations": [{"id": 3, "video_id": 7, "category_id": category_id, "iscrowd": iscrowd,
                             "segmentations": segmentations}]}


def test_rle_polygon_uncompressed_and_absent_frames():
    mask = np.zeros((10, 12), np.uint8)
    mask[2:6, 3:9] = 1
    rle = F.encode(mask)
    uncompressed = {"size": [10, 12], "counts": [int(c) for c in _runs(mask)]}
    polygon = [[3, 2, 9, 2, 9, 6, 3, 6]]
    for empty in (None, {}, []):
        ds = F.parse(_data([rle, empty, uncompressed]))
        track = ds.tracks[7][0]
        assert track.segmentations[1] is None
        assert track.areas.tolist() == [24.0, 0.0, 24.0]
        np.testing.assert_array_equal(F.decode(track.segmentations[2], 10, 12), mask)
    track = F.parse(_data([polygon, None, None])).tracks[7][0]
    assert 20 <= track.areas[0] <= 35  # rasterised polygon around the same rectangle
    assert track.present().tolist() == [True, False, False]
    assert track.mean_area() == track.areas[0]
    assert F.parse(_data([rle, None, None], iscrowd=1)).tracks[7][0].iscrowd == 1


def _runs(mask):
    """Column-major run lengths starting with zeros (uncompressed COCO RLE)."""
    flat = mask.flatten(order="F")
    runs, value, count = [], 0, 0
    for v in flat:
        if v == value:
            count += 1
        else:
            runs.append(count)
            value, count = v, 1
    runs.append(count)
    return runs


@pytest.mark.parametrize("data, message", [
    (_data([None, None]), r"video 7 \(vid\) annotation 3: 2 segmentations for 3 frames"),
    (_data([{"size": [11, 12], "counts": "PX1"}, None, None]),
     r"video 7 \(vid\) frame 0 \(vid/00000.jpg\) annotation 3: RLE size \[11, 12\] differs from the video size \[10, 12\]"),
    (_data([None, None, None], category_id=9), r"annotation 3: unknown category_id 9"),
    (_data([None, None, None], length=4), r"has length 4 but 3 file_names"),
])
def test_bad_annotations_name_video_frame_and_annotation(data, message):
    if "length 4" in message:
        data["videos"][0]["file_names"] = data["videos"][0]["file_names"][:3]
    with pytest.raises(UserError, match=message):
        F.parse(data)


def test_files_missing_invalid_and_missing_images(tmp_path):
    with pytest.raises(UserError, match="annotation file not found"):
        F.load(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        F.load(str(bad))
    good = tmp_path / "ann.json"
    good.write_text(json.dumps(_data([None, None, None])))
    ds = F.load(str(good))
    (tmp_path / "img" / "vid").mkdir(parents=True)
    with pytest.raises(UserError, match=r"video 7 \(vid\) frame 0 \(vid/00000.jpg\): missing image"):
        F.check_images(ds, str(tmp_path / "img"))
    # a truncated JPEG (cv2.imread would fill the rest with grey) and an empty file: one line each
    video = ds.videos[7]
    import cv2
    image = np.random.default_rng(0).integers(0, 255, (video.height, video.width, 3), np.uint8)
    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
    path = tmp_path / "img" / video.file_names[0]
    path.write_bytes(jpeg + b"\0" * 16)  # padding after the end marker is fine
    assert F.read_frame(str(tmp_path / "img"), video, 0).shape == (video.height, video.width, 3)
    path.write_bytes(jpeg[:-200])
    with pytest.raises(UserError, match=r"frame 0 \(vid/00000.jpg\): truncated JPEG .*00000.jpg"):
        F.read_frame(str(tmp_path / "img"), video, 0)
    # the end marker is looked for after the first scan: an EXIF-like thumbnail (a whole JPEG in
    # APP1) does not make a cut-off main image complete, and megabytes of trailer (motion photos)
    # after a complete one are fine
    big = cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 255, (200, 300, 3), np.uint8))[1].tobytes()
    thumbnail = b"Exif\0\0" + jpeg
    app1 = b"\xff\xe1" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail
    with_thumbnail = big[:2] + app1 + big[2:]
    assert F.jpeg_is_complete(with_thumbnail) and F.jpeg_is_complete(big + b"\0" * 100_000)
    assert not F.jpeg_is_complete(with_thumbnail[:-300]) and not F.jpeg_is_complete(with_thumbnail[:100])
    path.write_bytes(b"")
    with pytest.raises(UserError, match=r"frame 0 \(vid/00000.jpg\): cannot decode image"):
        F.read_frame(str(tmp_path / "img"), video, 0)


@pytest.mark.parametrize("change", [
    lambda d: d.update(annotations=None),
    lambda d: d.update(videos={"1": d["videos"][0]}),
    lambda d: d["videos"][0].update(width="wide"),
    lambda d: d.update(categories=[1, 2]),
    lambda d: d["annotations"].append({"id": 9, "video_id": 1, "category_id": [1], "segmentations": [None]}),
    lambda d: d["annotations"].append({"id": 9, "video_id": 1, "category_id": 1, "segmentations": 5}),
])
def test_fields_of_the_wrong_type_are_one_line_naming_the_file(change):
    data = {"videos": [{"id": 1, "width": 5, "height": 4, "file_names": ["a.jpg"]}],
            "categories": [{"id": 1, "name": "x"}], "annotations": []}
    change(data)
    with pytest.raises(UserError, match=r"^x\.json: not a valid YouTube-VIS annotation file \(a field of the wrong type"):
        F.parse(json.loads(json.dumps(data)), "x.json")
