"""Clip geometry shared by training and the runtime: which frames form a clip, and at what size.

Torch-free (numpy only) so the deployed runtime applies exactly the rules that training used.

Training (`sample_clip`, `sample_clip_pair`)
    A training clip always has exactly T frames so clips can be batched. A clip takes every
    `stride`-th frame (stride k simulates a video recorded at 1/k of the frame rate, paper Table 1h)
    from a random start, so it spans `(T - 1) * stride + 1` frames of the video. When the video is
    too short for that span, the clip takes every frame it can reach with that stride (from a random
    offset in the first `stride` frames) and is padded to T by REPEATING THE LAST SAMPLED FRAME
    INDEX. Padded positions are marked False in the returned `valid` mask (the dataset's
    `frame_valid`): a padded frame is a real, truthfully annotated image (a copy of the last one),
    but the loss and the matching cost should ignore it so short videos are not over-weighted.

Correspondence learning (`sample_clip_pair`, paper Sec. 3.3)
    Two different clips of one video, returned in random order (paper footnote 2):
    - video long enough for two disjoint clips (length >= 2 * span): two non-overlapping clips at
      random positions (every non-overlapping placement equally likely), or with
      `consecutive=True` the second clip continues right where the first one stops, as at inference;
    - span < length < 2 * span: two full clips at two different random starts (they overlap);
    - length <= span (one clip reaches every sampled frame): the n sampled frames are split in two
      consecutive halves, each padded to T (a 1-frame video gives the same frame twice).

Inference (`inference_clips`)
    The video is cut into consecutive, non-overlapping clips [0, T), [T, 2T), ... that cover every
    frame exactly once; the LAST CLIP IS SHORTER (length - k*T frames) and is NOT padded: the model
    accepts any clip length T' <= T. The output queries of one clip, averaged over time, start the
    next clip.

Frame size (`resized_shape`)
    Shortest side resized to `short` unless the longer side would exceed `max_size` (detectron2's
    ResizeShortestEdge rule, rounded half up), used by training transforms and the runtime alike.
"""

from typing import NamedTuple

import numpy as np


class Clip(NamedTuple):
    indices: np.ndarray  # (T,) int64 frame indices into the video (padded positions repeat the last)
    valid: np.ndarray  # (T,) bool, False where the index is padding


def clip_span(T: int, stride: int = 1) -> int:
    """Number of video frames one full clip of T frames at `stride` spans."""
    return (T - 1) * stride + 1


def _check(length: int, T: int, stride: int) -> None:
    if int(T) < 1:
        raise ValueError(f"clip length T must be >= 1, got {T}")
    if int(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if int(length) < 1:
        raise ValueError(f"cannot sample a clip from a video of {length} frames")


def _pad(frames: np.ndarray, T: int) -> Clip:
    """Sampled frame indices (1 <= n <= T) -> Clip of exactly T indices, the last one repeated."""
    n = len(frames)
    indices = np.empty(T, np.int64)
    indices[:n] = frames
    indices[n:] = frames[-1]
    valid = np.zeros(T, bool)
    valid[:n] = True
    return Clip(indices, valid)


def _reachable(length: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    """All frames reachable with `stride` from a random offset that keeps their count maximal."""
    n = (length - 1) // stride + 1
    offset = int(rng.integers(0, (length - 1) - (n - 1) * stride + 1))
    return offset + stride * np.arange(n, dtype=np.int64)


def sample_clip(length: int, T: int, stride: int, rng: np.random.Generator) -> Clip:
    """One training clip: `Clip(indices (T,) int64, valid (T,) bool)`.

    Random start, every `stride`-th frame; a video shorter than the span `(T-1)*stride+1` yields
    all the frames it can at that stride, padded to T by repeating the last index (valid False).
    """
    _check(length, T, stride)
    span = clip_span(T, stride)
    if length >= span:
        start = int(rng.integers(0, length - span + 1))
        return Clip(start + stride * np.arange(T, dtype=np.int64), np.ones(T, bool))
    return _pad(_reachable(length, stride, rng), T)


def sample_clip_pair(length: int, T: int, stride: int, rng: np.random.Generator,
                     consecutive: bool = False) -> list:
    """Two different clips of one video for correspondence learning, in random order: [Clip, Clip].

    See the module docstring for the placement rule (non-overlapping when the video is long enough).
    """
    _check(length, T, stride)
    span = clip_span(T, stride)
    steps = stride * np.arange(T, dtype=np.int64)
    full = np.ones(T, bool)
    if consecutive and length >= clip_span(2 * T, stride):
        start = int(rng.integers(0, length - clip_span(2 * T, stride) + 1))
        pair = [Clip(start + steps, full), Clip(start + T * stride + steps, full.copy())]
    elif length >= 2 * span:
        # Non-overlapping placements <-> x <= y in [0, slack]: first starts at x, second at y + span.
        slack = length - 2 * span
        x, y = sorted(int(v) for v in rng.integers(0, slack + 1, size=2))
        pair = [Clip(x + steps, full), Clip(y + span + steps, full.copy())]
    elif length > span:
        a, b = sorted(int(v) for v in rng.choice(length - span + 1, size=2, replace=False))
        pair = [Clip(a + steps, full), Clip(b + steps, full.copy())]
    else:
        frames = _reachable(length, stride, rng)
        if len(frames) == 1:
            pair = [_pad(frames, T), _pad(frames, T)]
        else:
            half = len(frames) // 2
            pair = [_pad(frames[:half], T), _pad(frames[half:], T)]
    if rng.random() < 0.5:
        pair.reverse()
    return pair


def inference_clips(length: int, T: int) -> list:
    """Consecutive clips covering a whole video: [(start, stop), ...] with stop exclusive.

    [0, T), [T, 2T), ..., [k*T, length): every frame exactly once, in order, no overlap; the last
    clip is shorter when T does not divide the length and is NOT padded (the model accepts any
    clip length T' <= T). A video of 0 frames gives [].
    """
    if int(T) < 1:
        raise ValueError(f"clip length T must be >= 1, got {T}")
    if int(length) < 0:
        raise ValueError(f"video length must be >= 0, got {length}")
    return [(start, min(start + T, length)) for start in range(0, length, T)]


def resized_shape(height: int, width: int, short: int, max_size=None) -> tuple:
    """(new_height, new_width) with the shortest side `short` and the longer side <= max_size.

    detectron2's ResizeShortestEdge.get_output_shape: scale the short side to `short`; if the long
    side then exceeds `max_size` (None or 0: no limit), scale both down so it equals max_size;
    round each side half up.
    """
    if height < 1 or width < 1:
        raise ValueError(f"invalid image size {height}x{width}")
    scale = float(short) / min(height, width)
    if height < width:
        new_h, new_w = float(short), scale * width
    else:
        new_h, new_w = scale * height, float(short)
    if max_size and max(new_h, new_w) > max_size:
        scale = float(max_size) / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)
