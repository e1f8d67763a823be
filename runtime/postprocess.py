"""Model outputs -> masks at the original frame resolution (numpy + OpenCV only).

Each mask probability map (28x28, or the manifest's mask_size) is resized bilinearly into its box (in original-frame pixels) and
thresholded at 0.5. PyTorch inference and the runtime both use this, so their masks agree.
"""

import cv2
import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def scale_boxes(boxes, input_size, original_size):
    """boxes (..., 4) xyxy in model-input pixels -> original-frame pixels."""
    (hi, wi), (ho, wo) = input_size, original_size
    return boxes * np.array([wo / wi, ho / hi, wo / wi, ho / hi], dtype=boxes.dtype)


def pixel_box(box, height, width):
    """box xyxy (float pixels) -> the integer x0, y0, x1, y1 of the pixels a pasted mask can cover."""
    x0, y0 = int(np.floor(max(box[0], 0))), int(np.floor(max(box[1], 0)))
    x1, y1 = int(np.ceil(min(box[2], width))), int(np.ceil(min(box[3], height)))
    return x0, y0, x1, y1


def paste_mask(prob, box, height, width, threshold=0.5):
    """prob (S, S) in [0, 1]; box xyxy (original pixels) -> (height, width) bool mask."""
    mask = np.zeros((height, width), bool)
    x0, y0, x1, y1 = pixel_box(box, height, width)
    if x1 <= x0 or y1 <= y0:
        return mask
    bw, bh = max(box[2] - box[0], 1e-3), max(box[3] - box[1], 1e-3)
    S = prob.shape[0]
    # pixel centre (x + 0.5) -> mask coordinate ((x + 0.5 - box_x0) / bw * S - 0.5)
    xs = (np.arange(x0, x1) + 0.5 - box[0]) / bw * S - 0.5
    ys = (np.arange(y0, y1) + 0.5 - box[1]) / bh * S - 0.5
    map_x = np.broadcast_to(xs[None, :], (y1 - y0, x1 - x0)).astype(np.float32)
    map_y = np.broadcast_to(ys[:, None], (y1 - y0, x1 - x0)).astype(np.float32)
    sampled = cv2.remap(prob.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    mask[y0:y1, x0:x1] = sampled >= threshold
    return mask
