"""EfficientVIS (paper Sec. 3.1): backbone + FPN, tracklet queries and proposals, M iterations.

One forward call processes one clip of T frames. The clip recurrence is explicit: `init_queries`
(B, N, C) are the previous clip's time-averaged output queries (None: the learned q*), and the
output `next_queries` start the next clip. Initial proposals are the learned boxes for every clip,
or with model.init_boxes=dense the peaks of a dense objectness head (training/dense_proposals.py).
"""

import math

import torch
from torch import nn

from efficientvis.errors import UserError
from efficientvis.training.backbone import build_backbone
from efficientvis.training.box_ops import cxcywh_to_xyxy, image_scale, usable_carried_boxes
from efficientvis.training.dense_proposals import DenseProposalHead, select_proposals
from efficientvis.training.iteration import QueryVideoIteration


def initial_box_layout(n, layout="image"):
    """(n, 4) normalised cx, cy, w, h the learned initial proposals start from.

    image: every box is the whole image (Sparse R-CNN, the paper). grid: the image cut into about
    n cells (rows x cols, 1.5x enlarged so neighbours overlap): each query starts on its own region,
    which breaks the symmetry between queries early and speeds up short trainings.
    """
    if layout == "image":
        return torch.tensor([[0.5, 0.5, 1.0, 1.0]]).repeat(n, 1)
    if layout != "grid":
        raise ValueError(f"init_boxes must be image, grid or dense, got {layout!r}")
    rows = max(1, int(math.floor(math.sqrt(n))))
    cols = math.ceil(n / rows)
    boxes = [[(c + 0.5) / cols, (r + 0.5) / rows, min(1.0, 1.5 / cols), min(1.0, 1.5 / rows)]
             for r in range(rows) for c in range(cols)]
    return torch.tensor(boxes[:n])


class EfficientVIS(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone, width=cfg.backbone_width,
                                       fpn_channels=cfg.hidden_dim, freeze_at=cfg.freeze_at,
                                       norm=cfg.norm)
        # q*: one learned embedding per tracklet query, repeated T times (paper footnote 1)
        self.init_queries = nn.Embedding(cfg.num_queries, cfg.hidden_dim)
        self.init_boxes = self.dense_proposals = None
        if cfg.init_boxes == "dense":
            if not 0 <= cfg.dense_level <= 3:
                raise ValueError(f"model.dense_level must be an FPN level 0..3 (P2..P5), got {cfg.dense_level}")
            self.dense_proposals = DenseProposalHead(cfg.hidden_dim, cfg.dense_level, prior_prob=cfg.prior_prob)
        else:  # learned initial proposals, normalised cx, cy, w, h
            self.init_boxes = nn.Embedding(cfg.num_queries, 4)
            with torch.no_grad():
                self.init_boxes.weight.copy_(initial_box_layout(cfg.num_queries, cfg.init_boxes))
        self.iterations = nn.ModuleList(QueryVideoIteration(cfg) for _ in range(cfg.num_iterations))
        self.semantic_head = None
        if cfg.semantic_head:  # training only (see ModelConfig.semantic_head)
            C = cfg.hidden_dim
            self.semantic_head = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.ReLU(inplace=True),
                                               nn.Conv2d(C, cfg.num_classes, 1))
            nn.init.constant_(self.semantic_head[-1].bias, -math.log((1 - cfg.prior_prob) / cfg.prior_prob))

    def features(self, frames):
        """frames (B, T, 3, H, W) uint8/float RGB 0..255 -> FPN maps P2..P5, each (B*T, C, h, w)."""
        frames = frames.flatten(0, 1)
        if not torch.compiler.is_compiling():
            # channels-last in eager runs: oneDNN's convolutions prefer it, and RoIAlign reads the
            # FPN maps channels-last, a free view instead of a copy of every map for every call
            frames = frames.contiguous(memory_format=torch.channels_last)
        return self.backbone(frames)

    def initial_proposals(self, image_sizes, T, carried=None):
        """image_sizes (B, 2) = (height, width) -> (B, N, T, 4) xyxy pixels: the learned boxes, or
        for the slots `carried` marks, their box from the previous clip (model.carry_proposals)
        clipped to the image; one that is not at least a pixel wide and high inside the image
        starts from the learned box (boxes would otherwise drift off the image clip after clip).
        carried: (active (B, N) bool, last-frame boxes (B, N, 4) xyxy pixels) or None."""
        scale = image_scale(image_sizes)[:, None, :]  # (B, 1, 4)
        boxes = cxcywh_to_xyxy(self.init_boxes.weight)[None] * scale  # (B, N, 4)
        if carried is not None:
            active, last = usable_carried_boxes(carried, scale)
            boxes = torch.where(active[:, :, None], last, boxes)
        return boxes[:, :, None, :].expand(-1, -1, T, -1)

    def clip_start_proposals(self, features, image_sizes, T, carried=None):
        """(B, N, T, 4) proposals a clip starts from, and the dense head's (objectness, sides) or
        None: the learned boxes (`initial_proposals`) or, with model.init_boxes=dense, the peaks of
        the dense head (training/dense_proposals.py); carried slots keep their box either way."""
        if self.dense_proposals is None:
            return self.initial_proposals(image_sizes, T, carried), None
        objectness, sides = self.dense_proposals(features)
        boxes = select_proposals(objectness, sides, self.dense_proposals.stride, self.cfg.num_queries,
                                 image_sizes, carried)
        return boxes, (objectness, sides)

    def initial_queries(self, B, T, init_queries=None):
        """(B, N, C) clip-start queries (default q*) repeated over T -> (B, N, T, C)."""
        if init_queries is None:
            init_queries = self.init_queries.weight[None].expand(B, -1, -1)
        return init_queries[:, :, None, :].expand(-1, -1, T, -1)

    def forward(self, frames, image_sizes=None, init_queries=None, num_iterations=None, denoise_boxes=None,
                masks=None, carried=None):
        """frames (B, T, 3, H, W); image_sizes (B, 2) un-padded (h, w), default the frame size.

        Returns {"stages": [per-iteration outputs], "next_queries": (B, N, C)} where each stage has
        class_logits (B, N, T, K), boxes (B, N, T, 4) xyxy pixels, mask_logits (B, N, T, 2S, 2S),
        queries (B, N, T, C), attended (B, N, T, C) (the mask head's input). Fewer iterations than M
        give anytime inference. In eval mode only the last iteration run has mask_logits (the mask
        head is the most expensive part of an iteration; training supervises every iteration's).
        `denoise_boxes` (training): per clip, (G_b, T, 4) noised ground-truth tracklet boxes; their
        iterations' outputs come back under "denoise" (one list of stages per clip, or None).
        `masks` overrides which iterations run the mask head: "all", "last" or "none" (only the
        queries are wanted, e.g. training's lead clips; queries never depend on the masks).
        `carried`: see `initial_proposals`. With model.carry_proposals the output's "carried" is the
        next clip's: slots whose class probability reached carry_threshold in some frame and class
        of the last iteration, with that iteration's last-frame boxes (the runtime's clip loop
        applies the same rule to the exported graphs' outputs).
        """
        B, T, _, H, W = frames.shape
        if image_sizes is None:
            image_sizes = frames.new_tensor([[H, W]], dtype=torch.float32).expand(B, 2)
        features = self.features(frames)
        queries = self.initial_queries(B, T, init_queries)
        boxes, dense = self.clip_start_proposals(features, image_sizes.float(), T, carried)
        stages = self.iterate(features, queries, boxes, num_iterations, masks or ("all" if self.training else "last"))
        out = {"stages": stages, "next_queries": stages[-1]["queries"].mean(2)}
        if self.cfg.carry_proposals:
            last = stages[-1]
            active = last["class_logits"].sigmoid().amax((2, 3)) >= self.cfg.carry_threshold
            out["carried"] = (active.detach(), last["boxes"][:, :, -1].detach())
        if self.training and self.semantic_head is not None and torch.is_grad_enabled():  # not lead clips
            out["semantic_logits"] = self.semantic_head(features[0])
        if self.training and self.dense_proposals is not None and torch.is_grad_enabled():
            out["dense"] = (*dense, self.dense_proposals.stride)
        if denoise_boxes is not None:  # training only (training/denoising.py)
            start = self.init_queries.weight.mean(0)  # (C,)
            out["denoise"] = []
            for b, noised in enumerate(denoise_boxes):  # (G_b, T, 4) per clip
                if len(noised) == 0:
                    out["denoise"].append(None)
                    continue
                clip_features = [f[b * T:(b + 1) * T] for f in features]
                q = start.expand(1, len(noised), T, -1)
                out["denoise"].append(self.iterate(clip_features, q, noised[None], num_iterations))
        return out

    def iterate(self, features, queries, boxes, num_iterations=None, masks="all"):
        """The M query-video iterations; returns the list of per-iteration outputs with the mask
        logits of every iteration ("all"), of the last one ("last") or of none ("none")."""
        stages = []
        run = self.iterations[: num_iterations or len(self.iterations)]
        for k, iteration in enumerate(run):
            out = iteration(features, queries, boxes,
                            with_masks=masks == "all" or (masks == "last" and k == len(run) - 1))
            # proposals are not back-propagated through between iterations (Sparse R-CNN); the
            # learned initial boxes get their gradient from the first iteration's box loss
            queries, boxes = out["queries"], out["boxes"].detach()
            stages.append(out)
        return stages


def build_model(cfg):
    """cfg: ModelConfig. A value the model does not know (`--set model.attention=...`) is one line."""
    try:
        return EfficientVIS(cfg)
    except ValueError as e:
        raise UserError(f"model config: {e}") from None
