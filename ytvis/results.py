"""Per-video model outputs -> a YouTube-VIS results file. Torch-free (numpy + pycocotools only).

Used by the PyTorch inference (`evis infer`) and by the torch-free runtime alike, so both write the
same results for the same model outputs.

Scoring rule (`video_results`), the query-based rule of QueryInst-style VIS models:
  For one video, every track k (a query slot / track id) has per-frame class probabilities
  `class_probs[k]` of shape (T, C) and per-frame masks at the ORIGINAL video resolution.
  1. A frame where the track's mask is empty counts as absent: its segmentation is null.
  2. The track's class scores are its class probabilities averaged over the frames where the track is
     visible. A track that is never visible is skipped.
  3. All (track, class) pairs of the video are ranked by that score (ties: lower track index first,
     then lower class index) and the top `top_k` (default 10) become results, each with that
     track's masks: one track can be reported under several categories.
  4. Class index c -> `category_ids[c]`.
  Every result has exactly T segmentations (compressed RLE with `counts` as str and `size` =
  [H, W], or None), as the format requires.

Writing (`ResultsWriter`): each finished video is appended as one JSON line
`{"video_id": ..., "results": [...]}` to `<path>.partial` and flushed to disk at once; `close()`
turns the partial file into the final JSON list at `path` (temporary file + os.replace, so `path` is
either absent or complete) and removes the partial file. If the process dies, `recover(partial)`
turns what the partial file holds (every finished video) into a valid results file.
"""

import contextlib
import json
import os
import tempfile

import numpy as np
from pycocotools import mask as mask_utils

from efficientvis.errors import UserError

PARTIAL_SUFFIX = ".partial"
_UMASK = os.umask(0)  # read once, at import (setting it is the only way to read it)
os.umask(_UMASK)


def _rle_json(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def _encode_track(masks_k: np.ndarray) -> list:
    """(T, H, W) bool/uint8 -> T compressed RLEs (str counts), None where the mask is empty."""
    frames = np.asarray(masks_k)
    visible = frames.reshape(len(frames), -1).any(axis=1)
    out = [None] * len(frames)
    idx = np.flatnonzero(visible)
    if len(idx):
        stacked = np.asfortranarray(frames[idx].astype(np.uint8, copy=False).transpose(1, 2, 0))
        for t, rle in zip(idx, mask_utils.encode(stacked)):
            out[t] = _rle_json(rle)
    return out


def _rle_visible(rle) -> bool:
    if not rle:
        return False
    counts = rle["counts"]
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    return float(mask_utils.area({"size": list(rle["size"]), "counts": counts})) > 0


def video_results(video_id, masks, class_probs, category_ids, top_k: int = 10) -> list:
    """Results of one video by the scoring rule of the module docstring.

    masks: (K, T, H, W) bool array at the original video size, or a list of K tracks, each a list of
    T per-frame RLEs (compressed, `size` = [H, W]) or None. class_probs: (K, T, C).
    category_ids: C category ids (class index -> category_id). Returns up to `top_k` result dicts
    {video_id, category_id, score, segmentations}, best first.
    """
    probs = np.asarray(class_probs, dtype=np.float64)
    if probs.ndim != 3:
        raise ValueError(f"class_probs must be (K, T, C), got shape {probs.shape}")
    n_tracks, length, n_classes = probs.shape
    if len(category_ids) != n_classes:
        raise ValueError(f"{len(category_ids)} category ids for {n_classes} classes")
    if not isinstance(masks, (list, tuple)):
        masks = np.asarray(masks)  # e.g. a CPU tensor
    if isinstance(masks, np.ndarray):
        if masks.ndim != 4 or masks.shape[:2] != (n_tracks, length):
            raise ValueError(f"masks must be (K={n_tracks}, T={length}, H, W), got {masks.shape}")
        visible = masks.reshape(n_tracks, length, -1).any(axis=2)
        rles = None  # encoded below, only for the tracks that make it into the results
    else:
        if len(masks) != n_tracks or any(len(track) != length for track in masks):
            raise ValueError(f"masks must be {n_tracks} tracks of {length} per-frame RLEs or None")
        rles = [[_rle_json(r) if _rle_visible(r) else None for r in track] for track in masks]
        visible = np.array([[r is not None for r in track] for track in rles], bool).reshape(
            n_tracks, length)

    shown = np.flatnonzero(visible.any(axis=1))
    if len(shown) == 0:
        return []
    # the mean over visible frames as a sequential sum / count, frame after frame like
    # runtime/collect.py (the same float64 rounding; numpy's sum would add pairwise for C = 1)
    scores = np.stack([np.cumsum(probs[k][visible[k]], axis=0)[-1] / visible[k].sum() for k in shown])
    encoded = {}
    out = []
    for row, c in rank_tracks(scores, top_k):
        k = int(shown[row])
        if k not in encoded:
            encoded[k] = _encode_track(masks[k]) if rles is None else rles[k]
        out.append({"video_id": video_id, "category_id": int(category_ids[c]),
                    "score": float(scores[row, c]), "segmentations": list(encoded[k])})
    return out


def rank_tracks(scores, top_k: int = 10) -> list:
    """(tracks, C) class scores -> the top_k (track row, class index) pairs by score, best first;
    ties: lower track row first, then lower class index (steps 3 of the scoring rule)."""
    scores = np.asarray(scores)
    if scores.size == 0 or top_k <= 0:
        return []
    order = np.argsort(-scores.ravel(), kind="stable")[:top_k]
    return [divmod(int(flat), scores.shape[1]) for flat in order]


def check_output_file(path: str, what: str = "output file") -> None:
    """Fail before any work when a file cannot be written at `path` (a folder there, or a file
    where its folder should be), instead of after a whole run."""
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder; give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if folder and not os.path.isdir(folder):
        raise UserError(f"{what} {path}: {folder} is a file, not a folder")


@contextlib.contextmanager
def atomic_file(path: str):
    """A text file to write at `path` through a temporary file in the same folder + fsync +
    os.replace: `path` is either left as it was or complete, never half written."""
    check_output_file(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file 0600: keep the mode of the file replaced, or the one open() gives
        os.chmod(tmp, os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj, indent=None) -> None:
    """Write JSON to `path` atomically (atomic_file)."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=indent)


_LINE_START = '{"video_id": '
_RESULTS_START = ', "results": ['
_LINE_END = "]}\n"


def _video_lines(partial_path: str):
    """Yield (video_id, the text of its results list without the brackets) for every complete line
    of a partial file, one line in memory at a time; a torn last line (the write the crash cut off:
    no newline) is dropped."""
    if not os.path.isfile(partial_path):
        raise UserError(f"partial results file not found: {partial_path}")
    with open(partial_path) as f:
        for n, line in enumerate(f, 1):
            if not line.endswith("\n"):
                return  # the write of the last video was cut off: that video is lost
            if not line.strip():
                continue
            split = line.find(_RESULTS_START)
            # one video per line: a half line left by a failed write and spliced with the next
            # line would hold two results lists (entries never contain this text)
            if not (line.startswith(_LINE_START) and split > 0 and line.endswith(_LINE_END)
                    and line.count(_RESULTS_START) == 1):
                raise UserError(f"{partial_path}: line {n} is not a video's results")
            try:
                video_id = json.loads(line[len(_LINE_START):split])
            except json.JSONDecodeError:
                raise UserError(f"{partial_path}: line {n} is not a video's results") from None
            yield video_id, line[split + len(_RESULTS_START):-len(_LINE_END)]


def read_partial(partial_path: str):
    """A partial file -> (ids of its finished videos, their results as one list)."""
    video_ids, results = [], []
    for video_id, text in _video_lines(partial_path):
        video_ids.append(video_id)
        results += json.loads("[" + text + "]")
    return video_ids, results


def recover(partial_path: str, path: str = None, remove: bool = True) -> str:
    """Turn a partial file into a results JSON list at `path` (default: the partial path without
    '.partial'), written atomically and streamed (one video's results in memory at a time).
    Returns `path`."""
    if path is None:
        if not partial_path.endswith(PARTIAL_SUFFIX):
            raise UserError(f"{partial_path}: give the output path (name does not end in "
                            f"{PARTIAL_SUFFIX})")
        path = partial_path[:-len(PARTIAL_SUFFIX)]
    with atomic_file(path) as f:
        f.write("[")
        first = True
        for _, text in _video_lines(partial_path):
            if text:
                f.write(text if first else ", " + text)
                first = False
        f.write("]")
    if remove:
        os.remove(partial_path)
    return path


class ResultsWriter:
    """Incremental, crash-safe results file: `add()` one video at a time, then `close()`.

    As a context manager, an exception inside the block leaves the partial file (every finished
    video) in place for `recover()` and writes no final file.
    """

    def __init__(self, path: str):
        self.path = path
        self.partial_path = path + PARTIAL_SUFFIX
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(self.partial_path, "w")
        self.videos = 0
        self.results = 0

    def add(self, video_id, results) -> None:
        """Append the results of one finished video (a list or an iterator of entries, written one
        by one as they come; possibly none) and flush them to disk. The video's line is complete,
        and so part of the results, only once its last entry is written."""
        start = self._file.tell()
        count = 0
        try:
            self._file.write(_LINE_START + json.dumps(video_id) + _RESULTS_START)
            for entry in results:
                self._file.write((", " if count else "") + json.dumps(entry))
                entry = None  # noqa: F841 - released before the next entry is made (long videos)
                count += 1
            self._file.write(_LINE_END)
        except BaseException:  # no half line: the file ends with the last complete video
            self._file.seek(start)
            self._file.truncate()
            raise
        self._file.flush()
        os.fsync(self._file.fileno())
        self.videos += 1
        self.results += count

    def close(self) -> str:
        """Write the final results JSON list to `path` and remove the partial file."""
        if not self._file.closed:
            self._file.close()
        return recover(self.partial_path, self.path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._file.close()
        return False
