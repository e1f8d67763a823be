"""EfficientVIS (paper Sec. 3.1): backbone + FPN, tracklet queries and proposals, M iterations.

One forward call processes one clip of T frames. The clip recurrence is explicit: `init_queries`
(B, N, C) are the previous clip's time-averaged output queries (None: the learned q*), and the
output `next_queries` start the next clip. Initial proposals are the learned boxes for every clip.
"""

import torch
from torch import nn

from efficientvis.training.backbone import build_backbone
from efficientvis.training.box_ops import cxcywh_to_xyxy
from efficientvis.training.iteration import QueryVideoIteration


class EfficientVIS(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone, width=cfg.backbone_width,
                                       fpn_channels=cfg.hidden_dim, freeze_at=cfg.freeze_at,
                                       norm=cfg.norm)
        # q*: one learned embedding per tracklet query, repeated T times (paper footnote 1)
        self.init_queries = nn.Embedding(cfg.num_queries, cfg.hidden_dim)
        # learned initial proposals, normalised cx, cy, w, h; start as the whole image
        self.init_boxes = nn.Embedding(cfg.num_queries, 4)
        nn.init.constant_(self.init_boxes.weight[:, :2], 0.5)
        nn.init.constant_(self.init_boxes.weight[:, 2:], 1.0)
        self.iterations = nn.ModuleList(QueryVideoIteration(cfg) for _ in range(cfg.num_iterations))

    def features(self, frames):
        """frames (B, T, 3, H, W) uint8/float RGB 0..255 -> FPN maps P2..P5, each (B*T, C, h, w)."""
        B, T = frames.shape[:2]
        return self.backbone(frames.flatten(0, 1))

    def initial_proposals(self, image_sizes, T):
        """image_sizes (B, 2) = (height, width) -> (B, N, T, 4) xyxy pixels."""
        h, w = image_sizes[:, 0], image_sizes[:, 1]
        scale = torch.stack([w, h, w, h], -1)[:, None, :]  # (B, 1, 4)
        boxes = cxcywh_to_xyxy(self.init_boxes.weight)[None] * scale  # (B, N, 4)
        return boxes[:, :, None, :].expand(-1, -1, T, -1)

    def initial_queries(self, B, T, init_queries=None):
        """(B, N, C) clip-start queries (default q*) repeated over T -> (B, N, T, C)."""
        if init_queries is None:
            init_queries = self.init_queries.weight[None].expand(B, -1, -1)
        return init_queries[:, :, None, :].expand(-1, -1, T, -1)

    def forward(self, frames, image_sizes=None, init_queries=None, num_iterations=None):
        """frames (B, T, 3, H, W); image_sizes (B, 2) un-padded (h, w), default the frame size.

        Returns {"stages": [per-iteration outputs], "next_queries": (B, N, C)} where each stage has
        class_logits (B, N, T, K), boxes (B, N, T, 4) xyxy pixels, mask_logits (B, N, T, 28, 28),
        queries (B, N, T, C). Fewer iterations than M give anytime inference.
        """
        B, T, _, H, W = frames.shape
        if image_sizes is None:
            image_sizes = frames.new_tensor([[H, W]], dtype=torch.float32).expand(B, 2)
        features = self.features(frames)
        queries = self.initial_queries(B, T, init_queries)
        boxes = self.initial_proposals(image_sizes.float(), T)
        stages = []
        for iteration in self.iterations[: num_iterations or len(self.iterations)]:
            out = iteration(features, queries, boxes)
            # proposals are not back-propagated through between iterations (Sparse R-CNN); the
            # learned initial boxes get their gradient from the first iteration's box loss
            queries, boxes = out["queries"], out["boxes"].detach()
            stages.append(out)
        return {"stages": stages, "next_queries": queries.mean(2)}


def build_model(cfg):
    return EfficientVIS(cfg)
