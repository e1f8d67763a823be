"""QueryInst-style dynamic mask head, applied per frame of every tracklet.

A dynamic filter (no final projection) driven by the query after self-attention is applied to the
S x S mask RoI feature (S = model.mask_pooler_size, 14 in QueryInst), then `num_convs` 3x3 convs
(four in QueryInst), a 2x deconvolution to 2S x 2S and a 1x1 conv to class-agnostic mask logits.
"""

import torch.nn.functional as F
from torch import nn

from efficientvis.training.dynamic_conv import DynamicFilter


class DynamicMaskHead(nn.Module):
    def __init__(self, dim, dynamic_dim, num_convs=4, conv_dim=None):
        super().__init__()
        conv_dim = conv_dim or dim
        self.filter = DynamicFilter(dim, dynamic_dim)
        convs, in_dim = [], dim
        for _ in range(num_convs):
            convs += [nn.Conv2d(in_dim, conv_dim, 3, padding=1), nn.ReLU(inplace=True)]
            in_dim = conv_dim
        self.convs = nn.Sequential(*convs)
        self.upsample = nn.ConvTranspose2d(conv_dim, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, 1, 1)

    def forward(self, queries, roi_features):
        # queries (B, N, T, C); roi_features (B, N, T, S*S, C), S = 14 -> logits (B, N, T, 2S, 2S)
        B, N, T, L, C = roi_features.shape
        S = int(round(L ** 0.5))
        w1, w2 = self.filter.filters(queries)
        x = self.filter.apply(roi_features, w1, w2)  # (B, N, T, L, C)
        x = x.reshape(B * N * T, S, S, C).permute(0, 3, 1, 2)
        x = F.relu(self.upsample(self.convs(x)))
        return self.predictor(x).reshape(B, N, T, 2 * S, 2 * S)
