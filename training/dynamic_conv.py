"""Dynamic convolution (Sparse R-CNN) and the temporal dynamic convolution of paper Eq. 3.

A query embedding generates two parameter matrices (C x D, D x C); the RoI feature (S*S, C) is
multiplied by the first, LayerNorm + ReLU, then by the second, LayerNorm + ReLU ("conv2d(w, .)" of
Eq. 3: a 1x1 dynamic convolution applied at every RoI location).
"""

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("temporal", "still")


def cosine_similarity(x1, x2, eps=1e-6):
    """x1, x2 (..., C) -> (...,): x1.x2 / (max(|x1|, eps) * max(|x2|, eps)), F.cosine_similarity's
    value. Written out: F.cosine_similarity of a stacked (B, N, T, 3, L, C) against a broadcast
    (B, N, T, 1, L, C) is slow on CPU forward and backward; this form makes a tiny step 4 % faster.
    Divided by one norm at a time: under float16 (AMP, FP16 engines) the product of two clamped
    norms of all-zero vectors (a location ReLU zeroed) underflows to 0, and 0 / 0 is NaN."""
    n1 = x1.norm(dim=-1).clamp(min=eps)
    n2 = x2.norm(dim=-1).clamp(min=eps)
    return (x1 * x2).sum(-1) / n1 / n2


class DynamicFilter(nn.Module):
    """conv2d(w_q, x) for query-generated filters w_q: x (P, L, C), q (P, C) -> (P, L, C)."""

    def __init__(self, dim, dynamic_dim):
        super().__init__()
        self.dim, self.dynamic_dim = dim, dynamic_dim
        self.dynamic_layer = nn.Linear(dim, 2 * dim * dynamic_dim)
        self.norm1 = nn.LayerNorm(dynamic_dim)
        self.norm2 = nn.LayerNorm(dim)

    def filters(self, q):  # (..., C) -> (..., C, D), (..., D, C)
        p = self.dynamic_layer(q)
        n = self.dim * self.dynamic_dim
        w1 = p[..., :n].reshape(*q.shape[:-1], self.dim, self.dynamic_dim)
        w2 = p[..., n:].reshape(*q.shape[:-1], self.dynamic_dim, self.dim)
        return w1, w2

    def apply(self, x, w1, w2):  # x (..., L, C), w1 (..., C, D), w2 (..., D, C) -> (..., L, C)
        x = F.relu(self.norm1(torch.matmul(x, w1)))
        return F.relu(self.norm2(torch.matmul(x, w2)))


class TemporalDynamicConv(nn.Module):
    """Eq. 3: o_i^t = sum_{t'=t-1}^{t+1} a_{i,(t,t')} * conv2d(w_i^t, phi(f^{t'}, b_i^{t'})).

    The filter of embedding t is applied to the RoI features of frames t-1, t, t+1 (each cropped
    with its own frame's box); a_{i,(t,t')} is the per-location softmax over t' of the cosine
    similarity between each result and the frame-t result. At the clip's first and last frame only
    the frames that exist take part. mode="still" is the still-image ablation (t' = t only).
    The blended tracklet feature is flattened and projected back to C (Sparse R-CNN's out layer).
    """

    def __init__(self, dim, dynamic_dim, pooler_size, mode="temporal"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"dynamic conv mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.filter = DynamicFilter(dim, dynamic_dim)
        self.out_layer = nn.Linear(dim * pooler_size * pooler_size, dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, queries, roi_features):
        # queries (B, N, T, C); roi_features (B, N, T, L=S*S, C) -> (B, N, T, C)
        B, N, T, L, C = roi_features.shape
        w1, w2 = self.filter.filters(queries)  # (B, N, T, C, D), (B, N, T, D, C)
        current = self.filter.apply(roi_features, w1, w2)  # (B, N, T, L, C)
        if self.mode == "temporal" and T > 1:
            # RoI features of frame t-1 and t+1 aligned with frame t (zeros outside the clip)
            zero = roi_features.new_zeros(B, N, 1, L, C)
            prev_x = torch.cat([zero, roi_features[:, :, :-1]], 2)
            next_x = torch.cat([roi_features[:, :, 1:], zero], 2)
            prev = self.filter.apply(prev_x, w1, w2)
            nxt = self.filter.apply(next_x, w1, w2)
            candidates = (prev, current, nxt)  # each (B, N, T, L, C)
            sim = torch.stack([cosine_similarity(c, current) for c in candidates], -1)  # (B, N, T, L, 3)
            t = torch.arange(T, device=queries.device)
            exists = torch.stack([t > 0, torch.ones_like(t, dtype=torch.bool), t < T - 1], 1)  # (T, 3)
            sim = sim.masked_fill(~exists[:, None, :], -1e4)
            weights = torch.softmax(sim, dim=-1)  # (B, N, T, L, 3)
            current = sum(weights[..., k, None] * c for k, c in enumerate(candidates))
        out = self.out_layer(current.flatten(-2))
        return F.relu(self.norm3(out))
