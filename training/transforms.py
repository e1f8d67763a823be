"""Clip-consistent augmentations (numpy + OpenCV, no torch).

A clip is `frames` (T, H, W, 3) uint8 RGB and `masks` (K, T, H, W) uint8 (one row per instance
track, 0/1). Every transform is a callable `t(frames, masks, rng) -> (frames, masks)` that draws its
random parameters ONCE per clip from the numpy Generator `rng` and applies the same geometry to every
frame and every mask, so a track stays coherent through time. Masks are resized with nearest
interpolation (cv2.INTER_NEAREST_EXACT, half-pixel aligned like the bilinear frame resize).

Boxes are never transformed: after all transforms, `derive_targets(masks)` re-derives the
"present" flags (mask non-empty: an object cropped out of a frame becomes absent there) and the
boxes (`masks_to_boxes`). This keeps masks, boxes and presence consistent by construction.

No normalisation here: frames stay uint8 RGB. The model normalises (mean/std) inside the network,
and the exported ONNX graph takes uint8 RGB too, so training, PyTorch inference and the deployed
runtime all feed the same pixels.

Transforms:
- `ResizeShortestEdge(short_edge_length, max_size)`: detectron2's rule (ytvis.clips.resized_shape);
  a list of lengths = multi-scale training, one length drawn per clip.
- `RandomFlip(prob=0.5)`: horizontal flip of the whole clip.
- `RandomCrop(relative_range=(0.5, 1.0), prob=1.0)`: one crop window (height and width fractions
  drawn independently from the range) for every frame; put it BEFORE the final resize, as DETR does.
- `Compose([...])`, `build_transforms(...)` for the usual train/test pipelines.
"""

import cv2
import numpy as np

from efficientvis.ytvis.clips import resized_shape


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(K, T, H, W) masks -> (K, T, 4) float32 xyxy pixel boxes, zeros where a mask is empty.

    x1/y1 = first column/row that has a mask pixel, x2/y2 = last column/row + 1 (so a single pixel
    at (x, y) gives [x, y, x + 1, y + 1] and the box width equals the mask's column extent).
    """
    masks = np.asarray(masks)
    K, T, H, W = masks.shape
    boxes = np.zeros((K, T, 4), np.float32)
    if masks.size == 0:
        return boxes
    cols = masks.any(axis=2)  # (K, T, W)
    rows = masks.any(axis=3)  # (K, T, H)
    present = cols.any(axis=2)
    x1 = cols.argmax(axis=2)
    x2 = W - cols[..., ::-1].argmax(axis=2)
    y1 = rows.argmax(axis=2)
    y2 = H - rows[..., ::-1].argmax(axis=2)
    boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3] = x1, y1, x2, y2
    boxes[~present] = 0
    return boxes


def derive_targets(masks: np.ndarray) -> tuple:
    """(K, T, H, W) masks -> (present (K, T) bool, boxes (K, T, 4) float32 xyxy)."""
    masks = np.asarray(masks)
    return masks.any(axis=(2, 3)), masks_to_boxes(masks)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, height, width, 3) bilinear (also used for inference frames)."""
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((frames.shape[0], height, width, frames.shape[3]), frames.dtype)
    for t in range(frames.shape[0]):
        out[t] = cv2.resize(frames[t], (width, height), interpolation=cv2.INTER_LINEAR)
    return out


def resize_masks(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., H, W) uint8 masks -> (..., height, width), nearest neighbour."""
    if masks.dtype == bool:
        masks = masks.view(np.uint8)
    if masks.shape[-2:] == (height, width):
        return masks
    lead = masks.shape[:-2]
    flat = masks.reshape((-1,) + masks.shape[-2:])
    out = np.empty((flat.shape[0], height, width), masks.dtype)
    # Resize masks as channels of one image, 64 at a time (OpenCV 4 allows 512 channels, 5 only 128).
    for i in range(0, flat.shape[0], 64):
        chunk = np.ascontiguousarray(flat[i:i + 64].transpose(1, 2, 0))
        resized = cv2.resize(chunk, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
        out[i:i + 64] = resized.reshape(height, width, -1).transpose(2, 0, 1)
    return out.reshape(lead + (height, width))


class ResizeShortestEdge:
    """Resize the shortest side to `short_edge_length` (one int, or a list: one drawn per clip),
    capping the longer side at `max_size` (None: no cap)."""

    def __init__(self, short_edge_length, max_size=None):
        if isinstance(short_edge_length, (int, np.integer)):
            short_edge_length = [int(short_edge_length)]
        self.short_edge_length = [int(s) for s in short_edge_length]
        if not self.short_edge_length or min(self.short_edge_length) < 1:
            raise ValueError(f"invalid short_edge_length {short_edge_length}")
        self.max_size = max_size

    def __call__(self, frames, masks, rng):
        if len(self.short_edge_length) == 1:
            short = self.short_edge_length[0]
        else:
            short = self.short_edge_length[int(rng.integers(len(self.short_edge_length)))]
        height, width = resized_shape(frames.shape[1], frames.shape[2], short, self.max_size)
        return resize_frames(frames, height, width), resize_masks(masks, height, width)

    def __repr__(self):
        return f"ResizeShortestEdge({self.short_edge_length}, max_size={self.max_size})"


class RandomFlip:
    """Horizontal flip of every frame and mask of the clip with probability `prob`."""

    def __init__(self, prob: float = 0.5):
        self.prob = float(prob)

    def __call__(self, frames, masks, rng):
        if rng.random() >= self.prob:
            return frames, masks
        return (np.ascontiguousarray(frames[:, :, ::-1]), np.ascontiguousarray(masks[..., ::-1]))

    def __repr__(self):
        return f"RandomFlip(prob={self.prob})"


class RandomCrop:
    """With probability `prob`, crop one window out of every frame of the clip.

    The window's height and width are fractions of the frame's, each drawn uniformly from
    `relative_range` = (lo, hi), 0 < lo <= hi <= 1 (detectron2's "relative_range"); its position
    is uniform. Objects cut out of a frame become absent there (see `derive_targets`).
    """

    def __init__(self, relative_range=(0.5, 1.0), prob: float = 1.0):
        lo, hi = (float(v) for v in relative_range)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"relative_range must satisfy 0 < lo <= hi <= 1, got {relative_range}")
        self.relative_range = (lo, hi)
        self.prob = float(prob)

    def window(self, height: int, width: int, rng) -> tuple:
        """(y0, x0, crop_h, crop_w) for a frame of height x width."""
        lo, hi = self.relative_range
        rh, rw = rng.uniform(lo, hi, size=2)
        ch = min(height, max(1, int(height * rh + 0.5)))
        cw = min(width, max(1, int(width * rw + 0.5)))
        y0 = int(rng.integers(0, height - ch + 1))
        x0 = int(rng.integers(0, width - cw + 1))
        return y0, x0, ch, cw

    def __call__(self, frames, masks, rng):
        if rng.random() >= self.prob:
            return frames, masks
        y0, x0, ch, cw = self.window(frames.shape[1], frames.shape[2], rng)
        return (np.ascontiguousarray(frames[:, y0:y0 + ch, x0:x0 + cw]),
                np.ascontiguousarray(masks[..., y0:y0 + ch, x0:x0 + cw]))

    def __repr__(self):
        return f"RandomCrop(relative_range={self.relative_range}, prob={self.prob})"


class Compose:
    """Apply transforms in order with one shared Generator."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, frames, masks, rng):
        for t in self.transforms:
            frames, masks = t(frames, masks, rng)
        return frames, masks

    def __repr__(self):
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


def build_transforms(min_size=360, max_size=640, flip_prob=0.0, crop=None) -> Compose:
    """The standard pipeline: [RandomCrop] -> ResizeShortestEdge -> [RandomFlip].

    `min_size` an int (fixed scale; use this for evaluation) or a list (multi-scale training);
    `crop` None or dict(relative_range=(lo, hi), prob=p); `flip_prob` 0 disables flipping.
    The paper trains without augmentation by default; "multi-scale training" is its variant.
    """
    transforms = []
    if crop:
        transforms.append(RandomCrop(**crop))
    transforms.append(ResizeShortestEdge(min_size, max_size))
    if flip_prob and flip_prob > 0:
        transforms.append(RandomFlip(flip_prob))
    return Compose(transforms)
