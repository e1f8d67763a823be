"""Self-attention among tracklet queries (paper Eq. 1-2) and the ablation schemes of Table 1a.

Queries are (B, N, T, C): N tracklet queries with one embedding per frame. No positional encoding:
the embeddings are told apart by their RoI content, which keeps any clip length T' <= T valid.
"""

from torch import nn

SCHEMES = ("factorised", "spatial", "temporal", "joint")


class _Attention(nn.Module):
    """Multi-head self-attention + residual + LayerNorm over the middle axis of (batch, L, C)."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # (batch, L, C)
        return self.norm(x + self.dropout(self.attn(x, x, x, need_weights=False)[0]))


class TrackletSelfAttention(nn.Module):
    """factorised: temporal MSA inside each query across its T embeddings (Eq. 1), then spatial MSA
    across the N queries inside each frame (Eq. 2). spatial / temporal: only one of them.
    joint: one MSA across all T*N embeddings."""

    def __init__(self, dim, heads, scheme="factorised", dropout=0.0):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"attention scheme must be one of {SCHEMES}, got {scheme!r}")
        self.scheme = scheme
        self.temporal = _Attention(dim, heads, dropout) if scheme in ("factorised", "temporal") else None
        self.spatial = _Attention(dim, heads, dropout) if scheme in ("factorised", "spatial", "joint") else None

    def forward(self, q):  # (B, N, T, C)
        B, N, T, C = q.shape
        if self.scheme == "joint":
            return self.spatial(q.reshape(B, N * T, C)).reshape(B, N, T, C)
        if self.temporal is not None:  # Eq. 1: within each query, across time
            q = self.temporal(q.reshape(B * N, T, C)).reshape(B, N, T, C)
        if self.spatial is not None:  # Eq. 2: within each frame, across queries
            q = q.transpose(1, 2).reshape(B * T, N, C)
            q = self.spatial(q).reshape(B, T, N, C).transpose(1, 2)
        return q
