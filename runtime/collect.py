"""Frame results of one video -> YouTube-VIS results, with memory that does not grow with the video.

A results entry holds a track's mask on every frame of the video, so a long recording would keep
megabytes of masks in memory until its end. The collector writes each visible mask (compressed
RLE) to a spool file as it arrives (`tempfile.SpooledTemporaryFile`: in memory up to 1 MB, then an
anonymous file on disk) and keeps in memory, per track, only what the scoring rule of
ytvis/results.py needs: the sum of its class probabilities over the frames where it is visible and
their count. The results are produced one entry at a time (`results()` is a generator; the spool is
read again for each entry), so writing them is flat too.
"""

import tempfile

import numpy as np

from efficientvis.ytvis.format import encode
from efficientvis.ytvis.results import rank_tracks

SPOOL_IN_MEMORY = 1 << 20  # bytes of RLE text kept in memory before the spool moves to disk


class TrackCollector:
    """Accumulates the FrameResults of one video (frames in increasing order).

    length: the video's frame count, or None when it is not known in advance (a stream, a run that
    may be interrupted): the results then cover the frames seen so far. An instance that already
    carries its RLE (attribute `rle`, set by the runtime's outputs) is not encoded again; an
    instance with an empty mask counts as absent on that frame (scoring rule, ytvis/results.py).
    """

    def __init__(self, length, num_classes, spool_in_memory=SPOOL_IN_MEMORY):
        self.length, self.num_classes = length, num_classes
        self.frames = 0  # frames seen: 1 + the highest frame index added
        self.size = None  # [H, W] of the masks
        self.prob_sums = {}  # track id -> (K,) float64 sum over its visible frames
        self.visible_frames = {}  # track id -> number of visible frames
        self._spool = tempfile.SpooledTemporaryFile(max_size=spool_in_memory, mode="w+")  # "t id counts"

    def add(self, frame_result):
        t = frame_result.index
        if self.length is not None and t >= self.length:
            raise ValueError(f"frame {t} beyond the video length {self.length}")
        self.frames = max(self.frames, t + 1)
        for inst in frame_result.instances:
            if not inst.mask.any():
                continue
            rle = getattr(inst, "rle", None) or encode(inst.mask)
            if self.size is None:
                self.size = [int(rle["size"][0]), int(rle["size"][1])]
            elif list(rle["size"]) != self.size:
                raise ValueError(f"frame {t}: mask size {list(rle['size'])} differs from {self.size}")
            self._spool.write(f"{t} {inst.track_id} {rle['counts']}\n")  # str counts (format.encode)
            k = inst.track_id
            self.prob_sums[k] = self.prob_sums.get(k, 0.0) + np.asarray(inst.class_probs, np.float64)
            self.visible_frames[k] = self.visible_frames.get(k, 0) + 1

    def track_masks(self, track_id):
        """{frame: RLE (str counts)} of one track, read back from the spool."""
        self._spool.seek(0)
        wanted = str(track_id)
        out = {}
        try:
            for line in self._spool:
                t, k, counts = line.split(" ", 2)
                if k == wanted:
                    out[int(t)] = {"size": self.size, "counts": counts[:-1]}
        finally:
            self._spool.seek(0, 2)  # back to the end for further add()
        return out

    def _segmentations(self, track_id, length):
        masks = self.track_masks(track_id)
        return [masks.get(t) for t in range(length)]

    def track_scores(self):
        """(track ids, (tracks, K) class scores: probabilities averaged over the visible frames)."""
        ids = sorted(self.prob_sums)
        scores = np.stack([self.prob_sums[k] / self.visible_frames[k] for k in ids]) if ids else \
            np.zeros((0, self.num_classes))
        return ids, scores

    def results(self, video_id, category_ids, top_k=10):
        """Yield the video's results entries, best first (scoring rule of ytvis/results.py)."""
        if len(category_ids) != self.num_classes:
            raise ValueError(f"{len(category_ids)} category ids for {self.num_classes} classes")
        length = self.length if self.length is not None else self.frames
        ids, scores = self.track_scores()
        for row, c in rank_tracks(scores, top_k):  # the generator keeps no entry between yields
            yield {"video_id": video_id, "category_id": int(category_ids[c]), "score": float(scores[row, c]),
                   "segmentations": self._segmentations(ids[row], length)}

    def close(self):
        self._spool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
