"""Carried proposals (model.carry_proposals, not in the paper): which slots start the next clip
from their own last box instead of the learned proposals, and the graph inputs that say so.

numpy only: the clip loop decides them (`carried_proposals`), and every backend turns them into
stage_0's `carried` / `carried_boxes` inputs (`clip_start_inputs`), the TensorRT backend and the
engine builder included, which must not need OpenCV. The boxes are clipped to the image inside
the graph (`EfficientVIS.initial_proposals`).
"""

import numpy as np


def carried_proposals(probs, boxes, threshold, reset):
    """The next clip's `carried` argument (the backend interface in runtime/clip_loop.py) for a
    model trained with model.carry_proposals (`EfficientVIS.forward`'s rule): the slots whose class
    probability reached `threshold` in some frame of this clip start the next one from their
    last-frame box, except slots reset before it. probs (N, T, K), boxes (N, T, 4) input pixels,
    reset (N,) bool."""
    active = (probs.max(axis=(1, 2)) >= threshold) & ~np.asarray(reset, bool)
    return active, np.ascontiguousarray(boxes[:, -1], np.float32)


def clip_start_inputs(image_size, carried, num_queries):
    """stage_0's per-clip inputs besides the recurrent queries, float32: image_size (2,) = (H, W)
    of the model input, and from a backend's `carried` argument carried (N,) and carried_boxes
    (N, 4); `carried` None: no slot carries (the learned proposals everywhere, the paper's rule)."""
    if carried is None:
        active, boxes = np.zeros(num_queries), np.zeros((num_queries, 4))
    else:
        active, boxes = carried
    return {"image_size": np.array(image_size, np.float32), "carried": np.asarray(active, np.float32),
            "carried_boxes": np.ascontiguousarray(boxes, np.float32)}
