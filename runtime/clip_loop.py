"""The near-online clip loop: frames -> clips -> backend -> tracks, frame by frame.

A backend holds the recurrent tracklet queries itself (on its device) and exposes:
  start_video()                         queries <- q* for every slot
  run_clip(frames, reset, iterations, carried)
                                        frames uint8 (T, 3, h, w) RGB; reset (N,) bool slots to set
                                        back to q* before this clip; carried None or (active (N,)
                                        bool, boxes (N, 4) input pixels): the slots that start
                                        from their box instead of the learned proposals
                                        (`carried_proposals`); returns numpy
                                        class_logits (N, T, K), boxes (N, T, 4) (input pixels),
                                        mask_probs (N, T, S, S); the clip's time-averaged output
                                        queries become the next clip's input queries.
  num_queries, clip_length
Every clip's frames are emitted as soon as the clip is done (delay: one clip).
"""

from dataclasses import dataclass, field

import numpy as np

from efficientvis.errors import UserError
from efficientvis.runtime.carry import carried_proposals
from efficientvis.runtime.postprocess import paste_mask, pixel_box, scale_boxes, sigmoid
from efficientvis.runtime.preprocess import preprocess_frames
from efficientvis.runtime.tracker import SlotTracker


@dataclass
class Instance:
    track_id: int
    class_probs: np.ndarray  # (K,)
    box: np.ndarray  # (4,) xyxy, original pixels
    mask: np.ndarray  # (H, W) bool, original resolution

    @property
    def label(self) -> int:
        return int(self.class_probs.argmax())

    @property
    def score(self) -> float:
        return float(self.class_probs.max())


@dataclass
class FrameResult:
    index: int
    frame: np.ndarray  # original (H, W, 3) BGR
    instances: list = field(default_factory=list)


@dataclass
class LoopOptions:
    clip_length: int
    size: int
    max_size: int
    num_iterations: int = 0  # 0: all
    background_threshold: float = 0.2
    reset_after: int = 3
    duplicate_iou: float = 0.0  # > 0: hide duplicate tracks within a clip (hidden_duplicates)
    carry_threshold: float = None  # a model trained with model.carry_proposals: its threshold

    def __post_init__(self):
        """Values that would run and silently give wrong results are refused (infer.* names)."""
        checks = [("clip_length", self.clip_length >= 1), ("num_iterations", self.num_iterations >= 0),
                  ("reset_after", self.reset_after >= 1),
                  ("background_threshold", 0.0 <= self.background_threshold <= 1.0),  # False for NaN
                  ("duplicate_iou", 0.0 <= self.duplicate_iou <= 1.0),
                  ("carry_threshold", self.carry_threshold is None or 0.0 <= self.carry_threshold <= 1.0)]
        for name, ok in checks:
            if not ok:
                owner = "model" if name == "carry_threshold" else "infer"
                raise UserError(f"{owner}.{name} = {getattr(self, name)!r} is out of range (clip_length, "
                                f"reset_after >= 1; num_iterations >= 0; background_threshold, "
                                f"duplicate_iou, carry_threshold in [0, 1])")


def clip_frames(frames, clip_length):
    """Group an iterator of frames into lists of clip_length (the last one may be shorter)."""
    clip = []
    for frame in frames:
        clip.append(frame)
        if len(clip) == clip_length:
            yield clip
            clip = []
    if clip:
        yield clip


def hidden_duplicates(slots, probs, masks, boxes, height, width, min_iou):
    """{hidden slot: [the kept slots that hide it]} for one clip: greedy NMS over the visible
    slots by mean score, with the mask IoU of two slots averaged over the clip's frames where both
    have a mask. A hidden slot is still output in a frame where none of its kept slots has a mask.

    Two slots on one object trade being the better match from frame to frame, which shows as id
    flicker (on model O's 3,000-frame run, 411 of 674 id switches happened inside clips). A hidden
    slot keeps its queries and its track id; it is only left out of the outputs. Duplicates are
    extra hypotheses the YouTube-VIS AP rewards, so this is off (0) unless asked for.
    """
    slots = sorted(slots, key=lambda n: -float(probs[n].max(-1).mean()))
    inter = np.zeros((len(slots), len(slots)))
    count = np.zeros((len(slots), len(slots)))
    for t in range(probs.shape[1]):
        pasted = [paste_mask(masks[n, t], boxes[n, t], height, width) for n in slots]
        area = np.array([m.sum() for m in pasted], np.float64)
        pixels = [pixel_box(boxes[n, t], height, width) for n in slots]
        for i in range(len(slots)):
            for j in range(i + 1, len(slots)):
                if area[i] and area[j]:
                    # a pasted mask is empty outside its box: intersect inside both boxes only
                    x0, y0 = max(pixels[i][0], pixels[j][0]), max(pixels[i][1], pixels[j][1])
                    x1, y1 = min(pixels[i][2], pixels[j][2]), min(pixels[i][3], pixels[j][3])
                    both = np.logical_and(pasted[i][y0:y1, x0:x1], pasted[j][y0:y1, x0:x1]).sum() \
                        if x1 > x0 and y1 > y0 else 0
                    inter[i, j] += both / (area[i] + area[j] - both)
                    count[i, j] += 1
    mean_iou = inter / np.maximum(count, 1)
    kept, hidden = [], {}
    for j, n in enumerate(slots):
        by = [slots[i] for i in kept if mean_iou[i, j] >= min_iou]
        if by:
            hidden[n] = by
        else:
            kept.append(j)
    return hidden


def run_clips(backend, frames, options, linker=None):
    """Iterate FrameResults for a stream of BGR frames. `linker` replaces query feedback with
    hand-crafted linking (every clip starts from q*) when given."""
    backend.start_video()
    tracker = linker or SlotTracker(backend.num_queries, options.background_threshold, options.reset_after)
    reset = np.zeros(backend.num_queries, bool)
    carried = None
    index = 0
    for clip in clip_frames(frames, options.clip_length):
        inputs = preprocess_frames(clip, options.size, options.max_size)
        if linker is not None:
            reset = np.ones(backend.num_queries, bool)
        out = backend.run_clip(inputs, reset, options.num_iterations or None, carried)
        probs = sigmoid(out["class_logits"])  # (N, T, K)
        height, width = clip[0].shape[:2]
        boxes = scale_boxes(out["boxes"], inputs.shape[-2:], (height, width))
        masks = out["mask_probs"]
        if linker is not None:
            ids, _ = linker.update(probs, boxes, masks, (height, width))
        else:
            ids, reset = tracker.update(probs)
            if options.carry_threshold is not None:
                carried = carried_proposals(probs, out["boxes"], options.carry_threshold, reset)
        visible = [int(n) for n in np.nonzero(ids)[0]]
        hidden = (hidden_duplicates(visible, probs, masks, boxes, height, width, options.duplicate_iou)
                  if options.duplicate_iou > 0 else {})
        for t, frame in enumerate(clip):
            result = FrameResult(index + t, frame)
            pasted = {n: paste_mask(masks[n, t], boxes[n, t], height, width) for n in visible}
            for n, mask in pasted.items():
                if mask.any() and not any(pasted[k].any() for k in hidden.get(n, ())):
                    result.instances.append(Instance(int(ids[n]), probs[n, t], boxes[n, t], mask))
            yield result
        index += len(clip)
