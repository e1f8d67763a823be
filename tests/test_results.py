"""Results writer: scoring rule, RLE output, incremental/atomic writing, recovery, round trip."""

import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from efficientvis.ytvis import format as fmt
from efficientvis.ytvis.metric import evaluate
from efficientvis.ytvis.results import ResultsWriter, recover, video_results

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def decode(rle):
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def _tracks(T=4, H=6, W=7):
    masks = np.zeros((3, T, H, W), bool)
    masks[0, 0, 1:3, 1:4] = True  # track 0: visible in frames 0 and 1 only
    masks[0, 1, 2:5, 2:6] = True
    masks[1, :, 0:2, 5:7] = True  # track 1: visible in every frame
    # track 2: never visible
    probs = np.zeros((3, T, 3))
    probs[0, 0] = [0.6, 0.3, 0.1]
    probs[0, 1] = [0.2, 0.3, 0.5]
    probs[0, 2:] = [100.0, 100.0, 100.0]  # frames where track 0 is absent: must not count
    probs[1, :] = [0.05, 0.9, 0.05]
    probs[2, :] = [1.0, 1.0, 1.0]  # never visible: skipped whatever its scores
    return masks, probs


def test_scoring_rule_top_k_and_rle_output():
    masks, probs = _tracks()
    out = video_results(12, masks, probs, [5, 7, 9], top_k=4)
    # track 0 over its visible frames 0, 1: [.4, .3, .3]; track 1: [.05, .9, .05]
    # ranked pairs: (1, c7) .9, (0, c5) .4, (0, c7) .3, (0, c9) .3 (tie: lower class first)
    assert [(r["category_id"], round(r["score"], 12)) for r in out] == [
        (7, 0.9), (5, 0.4), (7, 0.3), (9, 0.3)]
    assert all(r["video_id"] == 12 for r in out)
    first, second = out[0]["segmentations"], out[1]["segmentations"]
    assert len(first) == len(second) == 4
    assert second[2] is None and second[3] is None  # empty mask -> absent frame
    for t in range(2):
        assert second[t]["size"] == [6, 7] and isinstance(second[t]["counts"], str)
        assert np.array_equal(decode(second[t]), masks[0, t])
    assert all(np.array_equal(decode(first[t]), masks[1, t]) for t in range(4))
    json.dumps(out)  # JSON-ready


def test_rle_input_gives_the_same_results():
    masks, probs = _tracks()
    rles = [[fmt.encode(m) if m.any() else None for m in track] for track in masks]
    rles[1][0] = fmt.encode(np.zeros((6, 7), bool))  # an empty RLE is absent too
    masks[1, 0] = False
    assert video_results(3, rles, probs, [5, 7, 9]) == video_results(3, masks, probs, [5, 7, 9])


def test_no_visible_track_and_shape_errors():
    masks, probs = _tracks()
    assert video_results(1, np.zeros_like(masks), probs, [1, 2, 3]) == []
    with pytest.raises(ValueError):
        video_results(1, masks, probs, [1, 2])
    with pytest.raises(ValueError):
        video_results(1, masks[:, :3], probs, [1, 2, 3])


def _random_video(rng, vid, n_cats):
    T, H, W = int(rng.integers(2, 6)), int(rng.integers(20, 60)), int(rng.integers(20, 60))
    K = int(rng.integers(1, 4))
    masks = np.zeros((K, T, H, W), bool)
    for k in range(K):
        for t in range(T):
            if rng.random() < 0.2:
                continue  # absent frame
            y, x = rng.integers(0, H - 5), rng.integers(0, W - 5)
            masks[k, t, y:y + rng.integers(2, 6), x:x + rng.integers(2, 6)] = True
        if not masks[k].any():
            masks[k, 0, :2, :2] = True
    cats = rng.integers(1, n_cats + 1, K)
    return T, H, W, masks, cats


def test_round_trip_writer_file_evaluate(tmp_path):
    rng = np.random.default_rng(1)
    n_cats = 3
    videos, anns, outputs = [], [], []
    for vid in range(1, 6):
        T, H, W, masks, cats = _random_video(rng, vid, n_cats)
        videos.append({"id": vid, "height": H, "width": W, "length": T,
                       "file_names": [f"v{vid}/{t}.jpg" for t in range(T)]})
        for k in range(len(masks)):
            anns.append({"id": len(anns) + 1, "video_id": vid, "category_id": int(cats[k]),
                         "iscrowd": 0,
                         "segmentations": [fmt.encode(m) if m.any() else None for m in masks[k]],
                         "areas": [float(m.sum()) or None for m in masks[k]]})
        probs = np.full((len(masks), T, n_cats), 0.05)
        probs[np.arange(len(masks)), :, cats - 1] = 0.9  # the right class, every frame
        outputs.append((vid, masks, probs))
    gt = fmt.parse({"videos": videos, "annotations": anns,
                    "categories": [{"id": c, "name": str(c)} for c in range(1, n_cats + 1)]})
    path = tmp_path / "out" / "results.json"
    with ResultsWriter(str(path)) as writer:
        for vid, masks, probs in outputs:
            writer.add(vid, video_results(vid, masks, probs, list(range(1, n_cats + 1))))
            assert os.path.exists(str(path) + ".partial") and not path.exists()
    assert not os.path.exists(str(path) + ".partial")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600
    results = json.loads(path.read_text())
    for r in results:
        video = gt.videos[r["video_id"]]
        assert len(r["segmentations"]) == video.length
        assert all(s is None or s["size"] == [video.height, video.width]
                   for s in r["segmentations"])
    metrics = evaluate(gt, results)
    assert metrics["AP"] == 1.0 and metrics["AR100"] == 1.0


def test_partial_file_recovery_after_a_crash(tmp_path):
    masks, probs = _tracks()
    path = str(tmp_path / "results.json")
    with pytest.raises(RuntimeError):
        with ResultsWriter(path) as writer:
            writer.add(1, video_results(1, masks, probs, [5, 7, 9], top_k=2))
            writer.add(2, [])
            writer.add(3, video_results(3, masks, probs, [5, 7, 9], top_k=1))
            raise RuntimeError("killed")
    assert not os.path.exists(path)
    with open(path + ".partial", "a") as f:  # a write cut off mid-line by the crash
        f.write('{"video_id": 4, "results": [{"video_')
    assert recover(path + ".partial") == path
    results = json.loads(open(path).read())
    assert [(r["video_id"], r["category_id"]) for r in results] == [(1, 7), (1, 5), (3, 7)]
    assert not os.path.exists(path + ".partial")
