"""One query-video iteration (paper Fig. 2), repeated M times.

Query interaction (tracklet self-attention) -> video interaction (temporal dynamic conv on the
RoI features cut by the tracklet proposals) -> FFN -> heads: per-frame class logits, per-frame box
refinement (the new tracklet proposal), per-frame mask logits and the updated tracklet queries.
"""

import math

from torch import nn

from efficientvis.training.box_ops import apply_deltas
from efficientvis.training.dynamic_conv import TemporalDynamicConv
from efficientvis.training.mask_head import DynamicMaskHead
from efficientvis.training.query_attention import TrackletSelfAttention
from efficientvis.training.roi_align import multilevel_roi_align


def _mlp_stack(dim, depth):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def tracklet_roi_features(features, boxes, output_size, sampling_ratio):
    """features: FPN maps, each (B*T, C, h, w); boxes (B, N, T, 4) -> (B, N, T, S*S, C).

    Frame t of clip b is feature batch b*T + t; its N boxes are RoI-aligned on it.
    """
    B, N, T, _ = boxes.shape
    per_frame = boxes.transpose(1, 2).reshape(B * T, N, 4)
    rois = multilevel_roi_align(features, per_frame, output_size, sampling_ratio)  # (B*T, N, C, S, S)
    C = rois.shape[2]
    rois = rois.reshape(B, T, N, C, output_size * output_size).permute(0, 2, 1, 4, 3)
    return rois  # (B, N, T, S*S, C)


class QueryVideoIteration(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.hidden_dim
        self.cfg = cfg
        self.self_attention = TrackletSelfAttention(dim, cfg.num_heads, cfg.attention, cfg.dropout)
        self.dynamic_conv = TemporalDynamicConv(dim, cfg.dynamic_dim, cfg.pooler_size, cfg.dynamic_conv)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.ReLU(inplace=True),
                                 nn.Dropout(cfg.dropout), nn.Linear(cfg.ffn_dim, dim))
        self.norm3 = nn.LayerNorm(dim)
        self.cls_module = _mlp_stack(dim, 1)
        self.reg_module = _mlp_stack(dim, 3)
        self.class_logits = nn.Linear(dim, cfg.num_classes)
        self.bbox_deltas = nn.Linear(dim, 4)
        self.mask_head = DynamicMaskHead(dim, cfg.dynamic_dim, cfg.mask_convs, cfg.mask_conv_dim or dim)
        self._reset_parameters(cfg.prior_prob)

    def _reset_parameters(self, prior_prob):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.class_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features, queries, boxes, with_masks=True):
        # features: FPN maps (B*T, C, h, w); queries (B, N, T, C); boxes (B, N, T, 4) xyxy pixels
        # with_masks=False leaves the mask head out (the export's stage graphs: export/graphs.py)
        cfg = self.cfg
        roi = tracklet_roi_features(features, boxes, cfg.pooler_size, cfg.sampling_ratio)
        attended = self.self_attention(queries)  # Eq. 1-2
        q = self.norm2(attended + self.dropout(self.dynamic_conv(attended, roi)))  # Eq. 3
        q = self.norm3(q + self.dropout(self.ffn(q)))
        if cfg.time_shared_queries:  # ablation: one embedding per query, shared by all frames
            q = q.mean(2, keepdim=True).expand_as(q)
        class_logits = self.class_logits(self.cls_module(q))  # (B, N, T, K)
        new_boxes = apply_deltas(self.bbox_deltas(self.reg_module(q)), boxes)  # (B, N, T, 4)
        out = {"queries": q, "boxes": new_boxes, "class_logits": class_logits, "attended": attended}
        if with_masks:
            out["mask_logits"] = self.masks(features, attended, new_boxes.detach())
        return out

    def masks(self, features, attended, boxes):
        """QueryInst-style dynamic mask head on RoIs of the refined proposals: attended (B, N, T, C),
        boxes (B, N, T, 4) -> mask logits (B, N, T, 2S, 2S), S = mask_pooler_size."""
        mask_roi = tracklet_roi_features(features, boxes, self.cfg.mask_pooler_size, self.cfg.sampling_ratio)
        return self.mask_head(attended, mask_roi)
