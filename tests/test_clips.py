"""Clip sampling (training), clip pairs and chains (correspondence learning), inference clipping, frame size."""

import subprocess
import sys

import numpy as np
import pytest

from efficientvis.ytvis.clips import (Clip, clip_span, inference_clips, resized_shape, sample_clip,
                                      sample_clip_chain)


def rngs(n=200):
    return [np.random.default_rng(i) for i in range(n)]


@pytest.mark.parametrize("length,T,stride", [(40, 8, 1), (40, 8, 3), (36, 36, 1), (100, 9, 4)])
def test_sample_clip_full_bounds_and_stride(length, T, stride):
    starts = set()
    for rng in rngs(1000):
        clip = sample_clip(length, T, stride, rng)
        assert isinstance(clip, Clip)
        assert clip.indices.shape == (T,) and clip.indices.dtype == np.int64
        assert clip.valid.shape == (T,) and clip.valid.dtype == bool and clip.valid.all()
        assert clip.indices.min() >= 0 and clip.indices.max() < length
        assert (np.diff(clip.indices) == stride).all()
        starts.add(int(clip.indices[0]))
    # every start position is reachable, including both ends
    assert starts == set(range(length - clip_span(T, stride) + 1))


def test_sample_clip_short_video_pads_with_last_index():
    clip = sample_clip(5, 8, 1, np.random.default_rng(0))
    assert clip.indices.tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    assert clip.valid.tolist() == [True] * 5 + [False] * 3


def test_sample_clip_short_video_with_stride():
    # length 11, stride 3: 4 frames reachable from offset 0 or 1 (0,3,6,9 / 1,4,7,10), padded to 6
    seen = set()
    for rng in rngs(50):
        clip = sample_clip(11, 6, 3, rng)
        real = clip.indices[clip.valid]
        assert len(real) == 4 and (np.diff(real) == 3).all() and real.max() < 11
        assert (clip.indices[~clip.valid] == real[-1]).all()
        seen.add(int(real[0]))
    assert seen == {0, 1}
    one = sample_clip(1, 4, 2, np.random.default_rng(0))
    assert one.indices.tolist() == [0, 0, 0, 0] and one.valid.tolist() == [True, False, False, False]


def test_sample_clip_deterministic_and_invalid_args():
    a = sample_clip(100, 8, 2, np.random.default_rng((3, 1, 7)))
    b = sample_clip(100, 8, 2, np.random.default_rng((3, 1, 7)))
    assert (a.indices == b.indices).all()
    for args in [(0, 4, 1), (10, 0, 1), (10, 4, 0)]:
        with pytest.raises(ValueError):
            sample_clip(*args, np.random.default_rng(0))


def test_pair_long_video_non_overlapping_random_order():
    firsts_earlier = 0
    for rng in rngs():
        a, b = sample_clip_chain(50, 8, 2, rng)  # span 15, 50 >= 30
        for c in (a, b):
            assert c.valid.all() and (np.diff(c.indices) == 2).all()
            assert c.indices.min() >= 0 and c.indices.max() < 50
        lo, hi = sorted([a, b], key=lambda c: c.indices[0])
        assert hi.indices[0] > lo.indices[-1]  # disjoint frame ranges
        firsts_earlier += a.indices[0] < b.indices[0]
    assert 0 < firsts_earlier < 200  # order randomised


def test_pair_consecutive_mode():
    for rng in rngs(50):
        a, b = sample_clip_chain(40, 5, 2, rng, consecutive=True)
        lo, hi = sorted([a, b], key=lambda c: c.indices[0])
        assert hi.indices[0] == lo.indices[-1] + 2
        both = np.concatenate([lo.indices, hi.indices])
        assert (np.diff(both) == 2).all() and both.max() < 40


def test_pair_medium_video_two_different_full_clips():
    for rng in rngs(100):
        a, b = sample_clip_chain(12, 8, 1, rng)  # span 8 < 12 < 16
        assert a.valid.all() and b.valid.all()
        assert a.indices[0] != b.indices[0]
        assert max(a.indices.max(), b.indices.max()) < 12


def test_pair_short_video_splits_frames():
    for rng in rngs(50):
        a, b = sample_clip_chain(7, 8, 1, rng)
        real = sorted([a.indices[a.valid].tolist(), b.indices[b.valid].tolist()])
        assert real == [[0, 1, 2], [3, 4, 5, 6]]
        assert a.indices.shape == b.indices.shape == (8,)
    a, b = sample_clip_chain(1, 4, 1, np.random.default_rng(0))
    assert a.indices.tolist() == b.indices.tolist() == [0, 0, 0, 0]


def test_chain_long_video_in_time_order_or_reversed():
    forward = 0
    for rng in rngs():
        chain = sample_clip_chain(60, 6, 1, rng, clips=3)  # 60 >= 3 spans of 6
        assert len(chain) == 3 and all(c.valid.all() for c in chain)
        starts = [int(c.indices[0]) for c in chain]
        ordered = sorted(chain, key=lambda c: c.indices[0])
        for lo, hi in zip(ordered, ordered[1:]):
            assert hi.indices[0] > lo.indices[-1]  # disjoint
        assert starts in (sorted(starts), sorted(starts, reverse=True))  # never shuffled
        forward += starts == sorted(starts)
    assert 0 < forward < 200
    for rng in rngs(20):
        chain = sample_clip_chain(36, 6, 1, rng, clips=3, consecutive=True)
        both = np.concatenate([c.indices for c in sorted(chain, key=lambda c: c.indices[0])])
        assert (np.diff(both) == 1).all() and both.max() < 36


def test_chain_shorter_videos_still_give_k_clips():
    for rng in rngs(50):
        chain = sample_clip_chain(14, 6, 1, rng, clips=3)  # 6 < 14 < 18: overlapping full clips
        assert len({int(c.indices[0]) for c in chain}) == 3 and all(c.valid.all() for c in chain)
        chain = sample_clip_chain(2, 6, 1, rng, clips=3)  # fewer frames than clips
        assert [c.indices[c.valid].tolist() for c in sorted(chain, key=lambda c: c.indices[0])] in (
            [[0], [0], [1]], [[0], [1], [1]])
    with pytest.raises(ValueError, match="at least 2 clips"):
        sample_clip_chain(36, 6, 1, np.random.default_rng(0), clips=1)


def test_chain_of_two_is_the_pair_sampler():
    """Chains generalise the pairs without changing them: the same draws for k = 2 (the committed
    model's training data) -- pinned on one seed."""
    got = [c.indices.tolist() for c in sample_clip_chain(36, 6, 1, np.random.default_rng(7))]
    x, y = sorted(int(v) for v in np.random.default_rng(7).integers(0, 36 - 12 + 1, size=2))
    expected = [list(range(x, x + 6)), list(range(y + 6, y + 12))]
    assert got in (expected, expected[::-1])


@pytest.mark.parametrize("length,T", [(36, 36), (37, 36), (100, 36), (5, 36), (1, 1), (10, 3)])
def test_inference_clips_cover_once_last_shorter(length, T):
    clips = inference_clips(length, T)
    covered = [t for start, stop in clips for t in range(start, stop)]
    assert covered == list(range(length))
    assert all(stop - start == T for start, stop in clips[:-1])
    assert 1 <= clips[-1][1] - clips[-1][0] <= T
    assert clips[-1][1] - clips[-1][0] == (length % T or T)


def test_inference_clips_empty_and_invalid():
    assert inference_clips(0, 4) == []
    with pytest.raises(ValueError):
        inference_clips(10, 0)


def test_resized_shape_rule():
    assert resized_shape(720, 1280, 360, 640) == (360, 640)
    assert resized_shape(480, 640, 360, 1000) == (360, 480)
    assert resized_shape(640, 480, 360, 1000) == (480, 360)
    assert resized_shape(100, 1000, 360, 640) == (64, 640)  # long side capped
    assert resized_shape(100, 1000, 360, None) == (360, 3600)
    assert resized_shape(333, 500, 360, 1333) == (360, 541)  # 540.54 rounds half up


def test_clips_module_is_torch_free():
    code = "import sys, efficientvis.ytvis.clips; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
