"""Frame results of one video -> per-track masks and class probabilities -> YouTube-VIS results."""

import numpy as np

from efficientvis.ytvis.format import encode
from efficientvis.ytvis.results import video_results


class TrackCollector:
    """Accumulates the FrameResults of one video; masks are RLE-encoded as they arrive."""

    def __init__(self, length, num_classes):
        self.length, self.num_classes = length, num_classes
        self.rles = {}  # track id -> [RLE or None] * length
        self.probs = {}  # track id -> (length, K)

    def add(self, frame_result):
        t = frame_result.index
        if t >= self.length:
            raise ValueError(f"frame {t} beyond the video length {self.length}")
        for inst in frame_result.instances:
            if inst.track_id not in self.rles:
                self.rles[inst.track_id] = [None] * self.length
                self.probs[inst.track_id] = np.zeros((self.length, self.num_classes), np.float32)
            self.rles[inst.track_id][t] = encode(inst.mask)
            self.probs[inst.track_id][t] = inst.class_probs

    def results(self, video_id, category_ids, top_k=10):
        ids = sorted(self.rles)
        if not ids:
            return []
        probs = np.stack([self.probs[i] for i in ids])
        return video_results(video_id, [self.rles[i] for i in ids], probs, category_ids, top_k)
