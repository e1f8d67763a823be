"""Frame preprocessing shared by PyTorch inference and the runtime (numpy + OpenCV only).

Frames are resized so the shortest side is `size` and the longest at most `max_size` (aspect kept,
bilinear), converted BGR -> RGB and laid out as uint8 (T, 3, H, W). Normalisation happens inside the
model graph (manifest: input_normalisation), so nothing else is done here.
"""

import cv2
import numpy as np

from efficientvis.ytvis.clips import resized_shape


def preprocess_frames(frames_bgr, size, max_size):
    """list of (H, W, 3) uint8 BGR -> (T, 3, h, w) uint8 RGB, resized by the shortest-side rule."""
    h0, w0 = frames_bgr[0].shape[:2]
    h, w = resized_shape(h0, w0, size, max_size)
    out = np.empty((len(frames_bgr), 3, h, w), np.uint8)
    for t, frame in enumerate(frames_bgr):
        if frame.shape[:2] != (h0, w0):
            raise ValueError(f"frame {t} has size {frame.shape[1]}x{frame.shape[0]}, "
                             f"the clip started at {w0}x{h0}")
        resized = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR) if (h, w) != (h0, w0) else frame
        out[t] = resized[:, :, ::-1].transpose(2, 0, 1)
    return out
