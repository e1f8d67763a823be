"""Query-slot bookkeeping across clips: stable track ids without any data association.

A query slot keeps its identity from clip to clip because its output queries start the next clip.
The tracker only decides when a slot holds an object (any frame with max class probability
>= background_threshold) and when a slot that has been background for `reset_after` consecutive
clips is reset to the learned initial query q* (paper Sec. 3.3, Inference): its next object gets a
new track id.
"""

import numpy as np


class SlotTracker:
    def __init__(self, num_slots, background_threshold=0.2, reset_after=3):
        self.num_slots = num_slots
        self.background_threshold = background_threshold
        self.reset_after = reset_after
        self.next_id = 1
        self.slot_ids = np.zeros(num_slots, np.int64)  # 0: no track in this slot
        self.background_clips = np.zeros(num_slots, np.int64)

    def update(self, class_probs):
        """class_probs (N, T, K) of one clip -> (track ids (N,), 0 = none; slots to reset (N,) bool)."""
        foreground = class_probs.max(axis=(1, 2)) >= self.background_threshold
        for n in np.nonzero(foreground & (self.slot_ids == 0))[0]:
            self.slot_ids[n] = self.next_id
            self.next_id += 1
        self.background_clips = np.where(foreground, 0, self.background_clips + 1)
        ids = np.where(foreground, self.slot_ids, 0)
        reset = self.background_clips >= self.reset_after
        self.slot_ids[reset] = 0
        self.background_clips[reset] = 0
        return ids, reset
