"""YouTube-VIS clips for training (`VideoClipDataset`, `collate`) and frames for inference
(`VideoFrames`, `read_video_frames`).

Clip dict (one training sample; torch tensors unless noted), after all transforms:
    frames         uint8   (T, 3, H, W)  RGB, NOT normalised (the model normalises inside)
    masks          uint8   (K, T, H, W)  0/1 per instance track and frame
    present        bool    (K, T)        mask non-empty in that frame (after transforms)
    boxes          float32 (K, T, 4)     absolute xyxy pixels in the transformed frame, 0 where absent
    labels         int64   (K,)          contiguous class index 0..C-1 (see `class_names`)
    box_noise      float32 (K, T, 4)     uniform in [-1, 1]: the noise of the denoising tracklets
    negative_noise float32 (K, T, 4)     uniform in [-1, 1]: the noise of their negatives
    track_ids      int64   (K,)          annotation id of the track
    frame_valid    bool    (T,)          False for padding frames (a repeat of the last real frame)
    frame_indices  int64   (T,)          frame index in the video of each clip position
    video_id       int
    image_size     (H, W)  ints after transforms
    orig_size      (h, w)  ints of the original video
K counts only the tracks present in at least one frame of the clip (of any clip of a chain).
Crowd tracks are dropped. Padding frames keep the truthful annotation of the frame they repeat;
the loss/matcher should ignore them via `frame_valid`. Frame sampling rules: ytvis.clips.

With `clips_per_sample=k >= 2` an item is a list of k clip dicts of the same video (a pair or a
longer chain, paper Sec. 3.3, ytvis.clips.sample_clip_chain) whose instance rows are in the SAME
order (same `track_ids`), so every later clip can reuse the first clip's assignment; a track absent
from one clip has `present` all False there. All clips get the same transform parameters (same
scale, flip and crop), as consecutive clips do at inference.

Randomness: every item is a pure function of (seed, epoch, index) through
`np.random.default_rng((seed, epoch, index))`; call `set_epoch(epoch)` before each epoch (or index
the dataset with `(epoch, index)` tuples, which also works with persistent DataLoader workers).
Resuming at an epoch therefore reproduces the same clips exactly.
"""

import os

import numpy as np
import torch

from efficientvis.errors import UserError
from efficientvis.training.transforms import derive_targets, resize_frames
from efficientvis.ytvis import format as ytvis_format
from efficientvis.ytvis.format import read_frame
from efficientvis.ytvis.clips import inference_clips, resized_shape, sample_clip, sample_clip_chain


def _to_chw(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))


class VideoClipDataset(torch.utils.data.Dataset):
    """Training clips of a YouTube-VIS dataset (see the module docstring for the item format).

    Args:
        ann_path: YouTube-VIS annotation JSON.
        image_root: folder the videos' `file_names` are relative to (e.g. .../train/JPEGImages).
        T: frames per clip. stride: take every stride-th frame (low frame rate simulation).
        clips_per_sample: 1 for single clips, k >= 2 for chains of k clips of one video
            (correspondence learning; the paper's pairs are k = 2).
        transforms: callable (frames, masks, rng) -> (frames, masks), e.g. transforms.Compose.
        samples_per_epoch: dataset length (default: number of videos); index i uses video
            i % num_videos, so every video is visited evenly.
        seed: base of the per-item random state.
        consecutive: place the clips of a chain back to back when the video allows it.
    """

    def __init__(self, ann_path, image_root, T, stride=1, clips_per_sample=1, transforms=None,
                 samples_per_epoch=None, seed=0, consecutive=False):
        if int(T) < 1 or int(stride) < 1:
            raise UserError(f"clip length T and stride must be >= 1 (got T={T}, stride={stride})")
        if int(clips_per_sample) < 1:
            raise UserError(f"clips per sample must be >= 1, got {clips_per_sample}")
        self.data = ytvis_format.load(str(ann_path))
        self.image_root = str(image_root)
        if not os.path.isdir(self.image_root):
            raise UserError(f"image folder not found: {self.image_root}")
        if not self.data.videos:
            raise UserError(f"{ann_path}: no videos")
        for video in self.data.videos.values():
            if video.length == 0:
                raise UserError(f"{ann_path}: {video.describe()} has no frames")
            path = os.path.join(self.image_root, video.file_names[0])
            if not os.path.isfile(path):
                raise UserError(f"{video.describe(0)}: missing image {path} (is the image folder "
                                f"{self.image_root} the one these annotations refer to?)")
        self.T, self.stride = int(T), int(stride)
        self.clips_per_sample, self.consecutive = int(clips_per_sample), bool(consecutive)
        self.transforms = transforms
        self.seed = int(seed)
        self.epoch = 0
        self.samples_per_epoch = None if samples_per_epoch is None else int(samples_per_epoch)
        self.category_ids = self.data.category_ids  # class index -> dataset category id
        self.class_names = self.data.category_names
        self.label_of = {cid: i for i, cid in enumerate(self.category_ids)}
        self.video_ids = list(self.data.videos)
        self.tracks = {vid: [tr for tr in tracks if not tr.iscrowd]
                       for vid, tracks in self.data.tracks.items()}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def max_length(self) -> int:
        """Longest video in frames (the paper enables correspondence learning when > T)."""
        return self.data.max_length()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch if self.samples_per_epoch is not None else len(self.video_ids)

    def rng(self, index: int, epoch=None) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch if epoch is None else int(epoch),
                                      int(index)))

    def __getitem__(self, index):
        epoch = None
        if isinstance(index, (tuple, list)):
            epoch, index = index
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        rng = self.rng(index, epoch)
        video = self.data.videos[self.video_ids[index % len(self.video_ids)]]
        if self.clips_per_sample > 1:
            clips = sample_clip_chain(video.length, self.T, self.stride, rng, self.clips_per_sample,
                                      consecutive=self.consecutive)
        else:
            clips = [sample_clip(video.length, self.T, self.stride, rng)]
        indices = np.concatenate([c.indices for c in clips])

        unique, inverse = np.unique(indices, return_inverse=True)
        frames = np.stack([read_frame(self.image_root, video, int(t)) for t in unique])[inverse]
        tracks = [tr for tr in self.tracks[video.id] if tr.present()[unique].any()]
        masks = np.zeros((len(tracks), len(unique), video.height, video.width), np.uint8)
        for k, tr in enumerate(tracks):
            for j, t in enumerate(unique):
                if tr.segmentations[t] is not None:
                    masks[k, j] = ytvis_format.decode(tr.segmentations[t], video.height, video.width)
        masks = masks[:, inverse]

        if self.transforms is not None:
            frames, masks = self.transforms(frames, masks, rng)
        present, boxes = derive_targets(masks)
        keep = present.any(axis=1)  # over every frame of the clip (or of every clip of a chain)
        tracks = [tr for tr, k in zip(tracks, keep) if k]
        masks, present, boxes = masks[keep], present[keep], boxes[keep]
        labels = torch.tensor([self.label_of[tr.category_id] for tr in tracks], dtype=torch.int64)
        track_ids = torch.tensor([tr.id for tr in tracks], dtype=torch.int64)
        # drawn last, so the clips and transforms above do not depend on them (training/denoising.py);
        # the negatives' after the positives', so adding them left the positives' draws as they were
        box_noise = rng.uniform(-1.0, 1.0, (len(tracks), len(indices), 4)).astype(np.float32)
        negative_noise = rng.uniform(-1.0, 1.0, (len(tracks), len(indices), 4)).astype(np.float32)

        items = []
        for i, clip in enumerate(clips):
            s = slice(i * self.T, (i + 1) * self.T)
            items.append({
                "frames": _to_chw(frames[s]),
                "masks": torch.from_numpy(np.ascontiguousarray(masks[:, s])),
                "present": torch.from_numpy(np.ascontiguousarray(present[:, s])),
                "boxes": torch.from_numpy(np.ascontiguousarray(boxes[:, s])),
                "labels": labels.clone(),
                "box_noise": torch.from_numpy(np.ascontiguousarray(box_noise[:, s])),
                "negative_noise": torch.from_numpy(np.ascontiguousarray(negative_noise[:, s])),
                "track_ids": track_ids.clone(),
                "frame_valid": torch.from_numpy(clip.valid.copy()),
                "frame_indices": torch.from_numpy(clip.indices.copy()),
                "video_id": int(video.id),
                "image_size": (int(frames.shape[1]), int(frames.shape[2])),
                "orig_size": (int(video.height), int(video.width)),
            })
        return items if self.clips_per_sample > 1 else items[0]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple if multiple > 1 else value


def collate(batch, size_divisibility: int = 32):
    """List of clip dicts -> batch dict; list of chains -> [batch of first clips, of seconds, ...].

    Batch dict:
        frames       uint8 (B, T, 3, Hp, Wp): zero-padded bottom/right; Hp, Wp = max H, W of the
                     batch rounded up to a multiple of `size_divisibility`
        pixel_mask   bool  (B, Hp, Wp): True on real pixels
        image_sizes  int64 (B, 2): (H, W) of each clip before padding
        frame_valid  bool  (B, T)
        targets      list of B clip dicts without `frames`, `masks` zero-padded to (K, T, Hp, Wp)
                     (boxes unchanged: padding is bottom/right only)
    """
    if not batch:
        raise ValueError("empty batch")
    if isinstance(batch[0], (list, tuple)):
        n = len(batch[0])
        return [collate([item[i] for item in batch], size_divisibility) for i in range(n)]
    lengths = {item["frames"].shape[0] for item in batch}
    if len(lengths) != 1:
        raise ValueError(f"clips of different lengths in one batch: {sorted(lengths)}")
    T = lengths.pop()
    Hp = _round_up(max(item["frames"].shape[2] for item in batch), size_divisibility)
    Wp = _round_up(max(item["frames"].shape[3] for item in batch), size_divisibility)
    B = len(batch)
    frames = torch.zeros((B, T, 3, Hp, Wp), dtype=torch.uint8)
    pixel_mask = torch.zeros((B, Hp, Wp), dtype=torch.bool)
    targets = []
    for b, item in enumerate(batch):
        H, W = item["frames"].shape[2:]
        frames[b, :, :, :H, :W] = item["frames"]
        pixel_mask[b, :H, :W] = True
        target = {k: v for k, v in item.items() if k != "frames"}
        masks = item["masks"]
        padded = torch.zeros(masks.shape[:2] + (Hp, Wp), dtype=masks.dtype)
        padded[..., :H, :W] = masks
        target["masks"] = padded
        targets.append(target)
    return {
        "frames": frames,
        "pixel_mask": pixel_mask,
        "image_sizes": torch.tensor([item["image_size"] for item in batch], dtype=torch.int64),
        "frame_valid": torch.stack([item["frame_valid"] for item in batch]),
        "targets": targets,
    }


class VideoFrames:
    """A whole video for inference, read lazily and resized by the shortest-side rule.

    `video` is a format.Video (file_names relative to `image_root`). Frames come back as uint8
    (n, 3, H, W) RGB tensors, H, W = ytvis.clips.resized_shape(h, w, min_size, max_size)
    (min_size None: original size). `clips(T)` walks ytvis.clips.inference_clips.
    """

    def __init__(self, video, image_root, min_size=360, max_size=640):
        if not os.path.isdir(str(image_root)):
            raise UserError(f"image folder not found: {image_root}")
        self.video = video
        self.image_root = str(image_root)
        self.orig_size = (int(video.height), int(video.width))
        if min_size:
            self.image_size = resized_shape(video.height, video.width, min_size, max_size)
        else:
            self.image_size = self.orig_size

    def __len__(self) -> int:
        return self.video.length

    def read(self, start: int = 0, stop=None) -> torch.Tensor:
        """Frames [start, stop) as uint8 (n, 3, H, W)."""
        stop = len(self) if stop is None else min(int(stop), len(self))
        if not 0 <= start <= stop:
            raise ValueError(f"invalid frame range [{start}, {stop}) of {len(self)} frames")
        H, W = self.image_size
        frames = np.empty((stop - start, H, W, 3), np.uint8)
        for i, t in enumerate(range(start, stop)):
            frame = read_frame(self.image_root, self.video, t)
            frames[i] = resize_frames(frame[None], H, W)[0]
        return _to_chw(frames)

    def clips(self, T: int):
        """Yield (start, stop, frames (stop - start, 3, H, W)) over consecutive clips; last shorter."""
        for start, stop in inference_clips(len(self), T):
            yield start, stop, self.read(start, stop)


def read_video_frames(video, image_root, start=0, stop=None, min_size=360, max_size=640):
    """Frames [start, stop) of a format.Video, resized: (uint8 (n, 3, H, W), orig_size (h, w))."""
    frames = VideoFrames(video, image_root, min_size, max_size)
    return frames.read(start, stop), frames.orig_size
