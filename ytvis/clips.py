"""Clip geometry shared by training and the runtime: which frames form a clip, and at what size.

Torch-free (numpy only) so the deployed runtime applies exactly the rules that training used.

Training (`sample_clip`, `sample_clip_chain`)
    A training clip always has exactly T frames so clips can be batched. A clip takes every
    `stride`-th frame (stride k simulates a video recorded at 1/k of the frame rate, paper Table 1h)
    from a random start, so it spans `(T - 1) * stride + 1` frames of the video. When the video is
    too short for that span, the clip takes every frame it can reach with that stride (from a random
    offset in the first `stride` frames) and is padded to T by REPEATING THE LAST SAMPLED FRAME
    INDEX. Padded positions are marked False in the returned `valid` mask (the dataset's
    `frame_valid`): a padded frame is a real, truthfully annotated image (a copy of the last one),
    but the loss and the matching cost should ignore it so short videos are not over-weighted.

Correspondence learning (`sample_clip_chain`, paper Sec. 3.3)
    k >= 2 different clips of one video (the paper pairs k = 2; longer chains train the query
    feedback over as many hops as inference makes), in time order or reversed with probability 1/2
    (for a pair: random order, paper footnote 2):
    - video long enough for k disjoint clips (length >= k * span): k non-overlapping clips at
      random positions (every non-overlapping placement equally likely), or with
      `consecutive=True` each clip continues right where the previous one stops, as at inference;
    - span < length < k * span: k full clips at different random starts (they overlap);
    - length <= span (one clip reaches every sampled frame): the n sampled frames are split into k
      consecutive parts of at least one frame, each padded to T (a 1-frame video gives the same
      frame k times).

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


def sample_clip_chain(length: int, T: int, stride: int, rng: np.random.Generator, clips: int = 2,
                      consecutive: bool = False) -> list:
    """`clips` different clips of one video for correspondence learning: [Clip, ...] in time order
    or, with probability 1/2, reversed (for two clips: random order, paper footnote 2).

    See the module docstring for the placement rule (non-overlapping when the video is long enough).
    """
    _check(length, T, stride)
    if int(clips) < 2:
        raise ValueError(f"a correspondence chain needs at least 2 clips, got {clips}")
    k = int(clips)
    span = clip_span(T, stride)
    steps = stride * np.arange(T, dtype=np.int64)
    full = np.ones(T, bool)
    if consecutive and length >= clip_span(k * T, stride):
        start = int(rng.integers(0, length - clip_span(k * T, stride) + 1))
        chain = [Clip(start + i * T * stride + steps, full.copy()) for i in range(k)]
    elif length >= k * span:
        # Non-overlapping placements <-> x_1 <= ... <= x_k in [0, slack]: clip i starts at x_i + i*span.
        slack = length - k * span
        starts = sorted(int(v) for v in rng.integers(0, slack + 1, size=k))
        chain = [Clip(x + i * span + steps, full.copy()) for i, x in enumerate(starts)]
    elif length > span:
        positions = length - span + 1
        starts = sorted(int(v) for v in rng.choice(positions, size=k, replace=positions < k))
        chain = [Clip(a + steps, full.copy()) for a in starts]
    else:
        frames = _reachable(length, stride, rng)
        n = len(frames)
        # k consecutive parts of the sampled frames, each at least one frame long
        chain = [_pad(frames[(i * n) // k:max((i * n) // k + 1, ((i + 1) * n) // k)], T) for i in range(k)]
    if rng.random() < 0.5:
        chain.reverse()
    return chain


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
