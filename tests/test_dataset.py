"""Clip transforms, the training clip dataset, collate and inference frame reading."""

import json
import os

import cv2
import numpy as np
import pytest
import torch

from efficientvis.errors import UserError
from efficientvis.training.dataset import VideoClipDataset, VideoFrames, collate, read_video_frames
from efficientvis.training.transforms import (Compose, RandomCrop, RandomFlip, ResizeShortestEdge,
                                              build_transforms, derive_targets, masks_to_boxes)
from efficientvis.ytvis import format as ytvis_format

# ---------------------------------------------------------------- tiny YouTube-VIS dataset

COLORS = {11: (255, 0, 0), 12: (0, 255, 0), 13: (0, 0, 255), 21: (255, 255, 0)}


def rect(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def make_dataset(root, video_frames=(10, 3)):
    """Video 1: 48x64, `video_frames[0]` frames, track 11 (cat 7) everywhere moving right, track 12
    (cat 3) in frames 0-4 only, crowd track 13. Video 2: 40x40, track 21 (cat 3) in frame 1 only."""
    image_root = os.path.join(root, "JPEGImages")
    videos, annotations = [], []
    specs = [(1, "vid_a", 48, 64, video_frames[0]), (2, "vid_b", 40, 40, video_frames[1])]
    for vid, folder, h, w, n in specs:
        os.makedirs(os.path.join(image_root, folder))
        names = [f"{folder}/{t * 5:05d}.jpg" for t in range(n)]
        videos.append({"id": vid, "width": w, "height": h, "length": n, "file_names": names})
        if vid == 1:
            tracks = {11: (7, 0, [rect(h, w, 10, 2 + 3 * t, 30, 14 + 3 * t) for t in range(n)]),
                      12: (3, 0, [rect(h, w, 34, 40, 46, 60) if t < 5 else None for t in range(n)]),
                      13: (3, 1, [rect(h, w, 0, 50, 8, 64) for t in range(n)])}
        else:
            tracks = {21: (3, 0, [rect(h, w, 5, 5, 20, 25) if t == 1 else None for t in range(n)])}
        for t in range(n):
            img = np.full((h, w, 3), 40, np.uint8)
            for tid, (_, _, masks) in tracks.items():
                if masks[t] is not None:
                    img[masks[t] > 0] = COLORS[tid]
            cv2.imwrite(os.path.join(image_root, names[t]), img[:, :, ::-1],
                        [cv2.IMWRITE_JPEG_QUALITY, 100])
        for tid, (cat, crowd, masks) in tracks.items():
            annotations.append({
                "id": tid, "video_id": vid, "category_id": cat, "iscrowd": crowd,
                "segmentations": [ytvis_format.encode(m) if m is not None else None for m in masks],
                "areas": [float(m.sum()) if m is not None else None for m in masks],
                "bboxes": [None] * n})
    ann_path = os.path.join(root, "train.json")
    with open(ann_path, "w") as f:
        json.dump({"videos": videos, "annotations": annotations,
                   "categories": [{"id": 3, "name": "cat", "supercategory": "animal"},
                                  {"id": 7, "name": "dog", "supercategory": "animal"}]}, f)
    return ann_path, image_root


@pytest.fixture
def tiny(tmp_path):
    return make_dataset(str(tmp_path))


# ---------------------------------------------------------------- transforms

def random_clip(rng, K=3, T=4, H=30, W=50):
    frames = rng.integers(0, 256, (T, H, W, 3), dtype=np.uint8)
    masks = np.zeros((K, T, H, W), np.uint8)
    for k in range(K):
        for t in range(T):
            y0, x0 = rng.integers(0, H - 5), rng.integers(0, W - 5)
            masks[k, t, y0:y0 + rng.integers(1, 6), x0:x0 + rng.integers(1, 6)] = 1
    return frames, masks


def test_masks_to_boxes_pixel_convention():
    m = np.zeros((2, 2, 10, 20), np.uint8)
    m[0, 0, 3, 7] = 1
    m[0, 1, 2:5, 4:9] = 1
    boxes = masks_to_boxes(m)
    assert boxes.dtype == np.float32 and boxes.shape == (2, 2, 4)
    assert boxes[0, 0].tolist() == [7, 3, 8, 4]
    assert boxes[0, 1].tolist() == [4, 2, 9, 5]
    assert (boxes[1] == 0).all()
    assert masks_to_boxes(np.zeros((0, 3, 5, 5), np.uint8)).shape == (0, 3, 4)


def test_flip_twice_is_identity():
    frames, masks = random_clip(np.random.default_rng(0))
    flip = RandomFlip(prob=1.0)
    f1, m1 = flip(frames, masks, np.random.default_rng(1))
    assert not np.array_equal(f1, frames)
    assert np.array_equal(f1, frames[:, :, ::-1]) and np.array_equal(m1, masks[..., ::-1])
    f2, m2 = flip(f1, m1, np.random.default_rng(2))
    assert np.array_equal(f2, frames) and np.array_equal(m2, masks)
    f3, m3 = RandomFlip(prob=0.0)(frames, masks, np.random.default_rng(3))
    assert f3 is frames and m3 is masks


def test_crop_that_removes_an_object_makes_it_absent():
    T, H, W = 3, 40, 40
    masks = np.zeros((2, T, H, W), np.uint8)
    masks[0, :, 0:5, 0:5] = 1        # top-left corner, every frame
    masks[1, :, 18:22, 18:22] = 1    # centre: inside every 30x30 window
    frames = np.zeros((T, H, W, 3), np.uint8)
    frames[..., 0] = np.arange(H)[:, None]  # pixel values encode their coordinates
    frames[..., 1] = np.arange(W)[None, :]
    crop = RandomCrop(relative_range=(0.75, 0.75))
    removed = kept = 0
    for seed in range(40):
        f, m = crop(frames, masks, np.random.default_rng(seed))
        assert f.shape == (T, 30, 30, 3) and m.shape == (2, T, 30, 30)
        y0, x0 = int(f[0, 0, 0, 0]), int(f[0, 0, 0, 1])
        assert (f[:, 0, 0, 0] == y0).all() and (f[:, 0, 0, 1] == x0).all()  # same window per frame
        assert np.array_equal(m, masks[:, :, y0:y0 + 30, x0:x0 + 30])
        present, boxes = derive_targets(m)
        assert present[1].all()
        if y0 >= 5 or x0 >= 5:
            assert not present[0].any() and (boxes[0] == 0).all()
            removed += 1
        else:
            assert present[0].all()
            assert boxes[0, 0].tolist() == [0, 0, 5 - x0, 5 - y0]
            kept += 1
    assert removed > 0 and kept > 0


def test_pipeline_boxes_present_consistent_and_aligned():
    T, H, W = 3, 60, 90
    frames = np.zeros((T, H, W, 3), np.uint8)
    masks = np.zeros((2, T, H, W), np.uint8)
    for t in range(T):
        masks[0, t, 10:30, 5 + 10 * t:25 + 10 * t] = 1
        masks[1, t, 40:55, 60:85] = 1
        frames[t][masks[0, t] > 0] = (255, 0, 0)
        frames[t][masks[1, t] > 0] = (0, 0, 255)
    pipeline = build_transforms(min_size=[32, 48, 64], max_size=100, flip_prob=0.5,
                                crop=dict(relative_range=(0.6, 1.0), prob=0.5))
    assert isinstance(pipeline, Compose)
    shorts = set()
    for seed in range(40):
        f, m = pipeline(frames, masks, np.random.default_rng(seed))
        assert f.dtype == np.uint8 and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
        assert f.shape[:3] == m.shape[1:] and f.shape[0] == T
        assert max(f.shape[1:3]) <= 100
        if max(f.shape[1:3]) < 100:  # not capped by max_size: the short side is a listed scale
            assert min(f.shape[1:3]) in (32, 48, 64)
            shorts.add(min(f.shape[1:3]))
        present, boxes = derive_targets(m)
        assert np.array_equal(present, m.any(axis=(2, 3)))
        assert np.array_equal(boxes, masks_to_boxes(m))
        assert (boxes[~present] == 0).all()
        # pixels under the (nearest-resized) mask keep the object's colour: frames and masks aligned
        inside = f[m[0] > 0]
        if len(inside):
            assert np.median(inside[:, 0]) > 200 and np.median(inside[:, 2]) < 50
    assert len(shorts) > 1


def test_resize_shortest_edge_and_max_size():
    frames = np.zeros((2, 100, 300, 3), np.uint8)
    masks = np.zeros((1, 2, 100, 300), np.uint8)
    masks[0, :, 20:80, 50:250] = 1
    f, m = ResizeShortestEdge(50, max_size=1000)(frames, masks, np.random.default_rng(0))
    assert f.shape == (2, 50, 150, 3) and m.shape == (1, 2, 50, 150)
    f, m = ResizeShortestEdge(50, max_size=120)(frames, masks, np.random.default_rng(0))
    assert f.shape == (2, 40, 120, 3) and m.shape == (1, 2, 40, 120)
    assert masks_to_boxes(m)[0, 0].tolist() == [20, 8, 100, 32]  # exact scale 0.4
    f, m = ResizeShortestEdge(200, max_size=None)(frames, masks, np.random.default_rng(0))
    assert f.shape == (2, 200, 600, 3)


# ---------------------------------------------------------------- dataset

def check_item(item, T):
    K = item["labels"].shape[0]
    H, W = item["image_size"]
    assert item["frames"].dtype == torch.uint8 and item["frames"].shape == (T, 3, H, W)
    assert item["masks"].dtype == torch.uint8 and item["masks"].shape == (K, T, H, W)
    assert item["present"].dtype == torch.bool and item["present"].shape == (K, T)
    assert item["boxes"].dtype == torch.float32 and item["boxes"].shape == (K, T, 4)
    assert item["labels"].dtype == torch.int64
    assert item["track_ids"].dtype == torch.int64 and item["track_ids"].shape == (K,)
    assert item["frame_valid"].dtype == torch.bool and item["frame_valid"].shape == (T,)
    assert item["frame_indices"].dtype == torch.int64 and item["frame_indices"].shape == (T,)
    assert isinstance(item["video_id"], int)
    assert len(item["orig_size"]) == 2
    assert torch.equal(item["present"], item["masks"].flatten(2).any(2))
    assert torch.equal(item["boxes"], torch.from_numpy(masks_to_boxes(item["masks"].numpy())))


def test_dataset_items_shapes_labels_and_content(tiny):
    ann, root = tiny
    ds = VideoClipDataset(ann, root, T=4)
    assert len(ds) == 2 and ds.class_names == ["cat", "dog"] and ds.category_ids == [3, 7]
    assert ds.num_classes == 2 and ds.max_length() == 10
    for i in range(len(ds)):
        for epoch in range(3):
            ds.set_epoch(epoch)
            item = ds[i]
            check_item(item, 4)
            assert 13 not in item["track_ids"].tolist()  # crowd dropped
            assert item["present"].any(1).all()  # only tracks present in the clip
            assert item["image_size"] == item["orig_size"]
    ds.set_epoch(0)
    item = ds[0]
    idx = item["frame_indices"].tolist()
    assert item["video_id"] == 1 and item["frame_valid"].all() and np.all(np.diff(idx) == 1)
    k = item["track_ids"].tolist().index(11)
    assert item["labels"][k] == 1  # category 7 -> class 1
    for j, t in enumerate(idx):  # masks are the annotation of the sampled frames
        assert torch.equal(item["masks"][k, j], torch.from_numpy(rect(48, 64, 10, 2 + 3 * t, 30, 14 + 3 * t)))
        assert item["boxes"][k, j].tolist() == [2 + 3 * t, 10, 14 + 3 * t, 30]
        rgb = item["frames"][j, :, 20, 8 + 3 * t].tolist()  # frames are RGB (red object)
        assert rgb[0] > 200 and rgb[1] < 60 and rgb[2] < 60
    if 12 in item["track_ids"].tolist():
        k12 = item["track_ids"].tolist().index(12)
        assert item["present"][k12].tolist() == [t < 5 for t in idx]


def test_short_video_is_padded(tiny):
    ann, root = tiny
    ds = VideoClipDataset(ann, root, T=5)
    item = ds[1]  # video 2 has 3 frames
    check_item(item, 5)
    assert item["frame_indices"].tolist() == [0, 1, 2, 2, 2]
    assert item["frame_valid"].tolist() == [True, True, True, False, False]
    assert item["track_ids"].tolist() == [21] and item["labels"].tolist() == [0]
    assert item["present"][0].tolist() == [False, True, False, False, False]


def test_reproducible_from_seed_epoch_index(tiny):
    ann, root = tiny
    tf = build_transforms(min_size=[24, 32, 40], max_size=80, flip_prob=0.5,
                          crop=dict(relative_range=(0.5, 1.0), prob=0.5))
    a = VideoClipDataset(ann, root, T=3, transforms=tf, seed=5, samples_per_epoch=6)
    b = VideoClipDataset(ann, root, T=3, transforms=tf, seed=5, samples_per_epoch=6)
    assert len(a) == 6
    a.set_epoch(2)
    b.set_epoch(2)
    for i in range(6):
        x, y = a[i], b[i]
        assert x["video_id"] == [1, 2][i % 2]
        assert torch.equal(x["frames"], y["frames"]) and torch.equal(x["masks"], y["masks"])
        assert torch.equal(x["frame_indices"], y["frame_indices"])
        z = b[(2, i)]  # explicit (epoch, index) gives the same item
        assert torch.equal(x["frames"], z["frames"])
        check_item(x, 3)
    b.set_epoch(3)
    assert any(not torch.equal(a[i]["frames"], b[i]["frames"])
               if a[i]["frames"].shape == b[i]["frames"].shape else True for i in range(6))
    with pytest.raises(IndexError):
        a[6]


def test_pairs_share_instance_order(tmp_path):
    ann, root = make_dataset(str(tmp_path), video_frames=(20, 3))
    tf = build_transforms(min_size=[32, 40], max_size=80, flip_prob=0.5)
    ds = VideoClipDataset(ann, root, T=4, clips_per_sample=2, transforms=tf, samples_per_epoch=10)
    saw_track_absent_in_one_clip = False
    for i in range(10):
        pair = ds[i]
        assert isinstance(pair, list) and len(pair) == 2
        a, b = pair
        check_item(a, 4)
        check_item(b, 4)
        assert torch.equal(a["track_ids"], b["track_ids"]) and torch.equal(a["labels"], b["labels"])
        assert a["video_id"] == b["video_id"] and a["image_size"] == b["image_size"]
        assert not torch.equal(a["frame_indices"], b["frame_indices"])
        assert (a["present"] | b["present"]).any(1).all()
        if a["video_id"] == 1:  # 20 frames >= 2 spans of 4: disjoint clips
            ia, ib = set(a["frame_indices"].tolist()), set(b["frame_indices"].tolist())
            assert not ia & ib
            saw_track_absent_in_one_clip |= bool((~a["present"].any(1) | ~b["present"].any(1)).any())
    assert saw_track_absent_in_one_clip  # track 12 exists only in frames 0-4

    batches = collate([ds[0], ds[1], ds[2]])
    assert isinstance(batches, list) and len(batches) == 2
    for batch in batches:
        assert batch["frames"].shape[:3] == (3, 4, 3)
        assert batch["frames"].shape[3] % 32 == 0 and batch["frames"].shape[4] % 32 == 0
    for t0, t1 in zip(batches[0]["targets"], batches[1]["targets"]):
        assert torch.equal(t0["track_ids"], t1["track_ids"])


def test_collate_pads_to_multiple_of_32(tiny):
    ann, root = tiny
    ds = VideoClipDataset(ann, root, T=3)
    items = [ds[0], ds[1]]  # 48x64 and 40x40
    batch = collate(items)
    assert batch["frames"].shape == (2, 3, 3, 64, 64) and batch["frames"].dtype == torch.uint8
    assert batch["pixel_mask"].shape == (2, 64, 64) and batch["pixel_mask"].dtype == torch.bool
    assert batch["pixel_mask"][0].sum() == 48 * 64 and batch["pixel_mask"][1].sum() == 40 * 40
    assert batch["image_sizes"].tolist() == [[48, 64], [40, 40]]
    assert batch["frame_valid"].shape == (2, 3)
    assert torch.equal(batch["frames"][1, :, :, :40, :40], items[1]["frames"])
    assert batch["frames"][1, :, :, 40:].sum() == 0 and batch["frames"][1, :, :, :, 40:].sum() == 0
    assert len(batch["targets"]) == 2 and "frames" not in batch["targets"][0]
    for target, item in zip(batch["targets"], items):
        K = item["labels"].shape[0]
        H, W = item["image_size"]
        assert target["masks"].shape == (K, 3, 64, 64)
        assert torch.equal(target["masks"][..., :H, :W], item["masks"])
        assert target["masks"][..., H:, :].sum() == 0
        assert torch.equal(target["boxes"], item["boxes"])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    assert next(iter(loader))["frames"].shape == (2, 3, 3, 64, 64)


def test_missing_jpeg_at_read_time_names_video_and_frame(tiny):
    ann, root = tiny
    ds = VideoClipDataset(ann, root, T=10)
    os.remove(os.path.join(root, "vid_a", "00035.jpg"))  # frame 7 of video 1
    with pytest.raises(UserError) as e:
        ds[0]
    msg = str(e.value)
    assert "video 1" in msg and "frame 7" in msg and "vid_a/00035.jpg" in msg and "\n" not in msg


def test_missing_annotation_file_and_image_root(tiny, tmp_path):
    ann, root = tiny
    with pytest.raises(UserError, match="annotation file not found"):
        VideoClipDataset(str(tmp_path / "nope.json"), root, T=4)
    with pytest.raises(UserError, match="image folder not found"):
        VideoClipDataset(ann, str(tmp_path / "no_images"), T=4)
    os.remove(os.path.join(root, "vid_b", "00000.jpg"))
    with pytest.raises(UserError, match=r"video 2 \(vid_b\) frame 0"):
        VideoClipDataset(ann, root, T=4)


def test_wrong_image_size_is_a_user_error(tiny):
    ann, root = tiny
    ds = VideoClipDataset(ann, root, T=3)
    cv2.imwrite(os.path.join(root, "vid_b", "00005.jpg"), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(UserError, match="frame 1"):
        ds[1]


def test_video_frames_for_inference(tiny):
    ann, root = tiny
    data = ytvis_format.load(ann)
    video = data.videos[1]
    vf = VideoFrames(video, root, min_size=24, max_size=100)
    assert len(vf) == 10 and vf.orig_size == (48, 64) and vf.image_size == (24, 32)
    all_frames = vf.read()
    assert all_frames.shape == (10, 3, 24, 32) and all_frames.dtype == torch.uint8
    clips = list(vf.clips(4))
    assert [(s, e) for s, e, _ in clips] == [(0, 4), (4, 8), (8, 10)]
    assert torch.equal(torch.cat([f for _, _, f in clips]), all_frames)
    frames, orig = read_video_frames(video, root, 2, 5, min_size=None)
    assert frames.shape == (3, 3, 48, 64) and orig == (48, 64)
    assert frames[0, 0, 20, 8 + 6] > 200  # RGB: red object of track 11 at frame 2
    with pytest.raises(UserError, match="image folder not found"):
        VideoFrames(video, os.path.join(root, "missing"))


def test_chains_of_three_clips_share_instance_order(tmp_path):
    ann, root = make_dataset(str(tmp_path), video_frames=(20, 3))
    ds = VideoClipDataset(ann, root, T=4, clips_per_sample=3, samples_per_epoch=6)
    for i in range(6):
        chain = ds[i]
        assert isinstance(chain, list) and len(chain) == 3
        for clip in chain:
            check_item(clip, 4)
            assert torch.equal(clip["track_ids"], chain[0]["track_ids"])
        if chain[0]["video_id"] == 1:  # 20 frames >= 3 spans of 4: disjoint, in time order or reversed
            starts = [int(c["frame_indices"][0]) for c in chain]
            assert starts in (sorted(starts), sorted(starts, reverse=True)) and len(set(starts)) == 3
    batches = collate([ds[0], ds[1]])
    assert isinstance(batches, list) and len(batches) == 3
