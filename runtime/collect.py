"""Frame results of one video -> per-track masks and class probabilities -> YouTube-VIS results."""

import numpy as np

from efficientvis.ytvis.format import encode
from efficientvis.ytvis.results import video_results


class TrackCollector:
    """Accumulates the FrameResults of one video; masks are RLE-encoded as they arrive.

    length: the video's frame count, or None when it is not known in advance (a stream, a run that
    may be interrupted): the results then cover the frames seen so far. An instance that already
    carries its RLE (attribute `rle`, set by the runtime's outputs) is not encoded again.
    """

    def __init__(self, length, num_classes):
        self.length, self.num_classes = length, num_classes
        self.frames = 0  # frames seen: 1 + the highest frame index added
        self.rles = {}  # track id -> {frame: RLE}
        self.probs = {}  # track id -> {frame: (K,)}

    def add(self, frame_result):
        t = frame_result.index
        if self.length is not None and t >= self.length:
            raise ValueError(f"frame {t} beyond the video length {self.length}")
        self.frames = max(self.frames, t + 1)
        for inst in frame_result.instances:
            rle = getattr(inst, "rle", None)
            self.rles.setdefault(inst.track_id, {})[t] = rle if rle is not None else encode(inst.mask)
            self.probs.setdefault(inst.track_id, {})[t] = np.asarray(inst.class_probs, np.float32)

    def results(self, video_id, category_ids, top_k=10):
        ids = sorted(self.rles)
        if not ids:
            return []
        length = self.length if self.length is not None else self.frames
        probs = np.zeros((len(ids), length, self.num_classes), np.float32)
        rles = []
        for k, track in enumerate(ids):
            rles.append([self.rles[track].get(t) for t in range(length)])
            for t, p in self.probs[track].items():
                probs[k, t] = p
        return video_results(video_id, rles, probs, category_ids, top_k)
