"""Trainable blocks of INP-Former: bottleneck MLP, INP extractor and INP-guided decoder.

Written from the method spec (§4 extractor, §5 bottleneck, §6 decoder, §7 initialisation), which
paraphrases the official INP-Former code. Module and parameter names follow the official state
dict (``attn.q``, ``attn.kv``, ``attn.proj``, ``attn.learn_scale``, ``mlp.fc1``/``fc2``) so released
checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AggregationAttention", "AggregationBlock", "Mlp", "PrototypeAttention", "PrototypeBlock"]


class Mlp(nn.Module):
    """Linear(C→hidden) → GELU (exact) → dropout → Linear(hidden→C) → dropout (spec §5)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B×N×C → B×N×C."""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _split_heads(t: torch.Tensor, parts: int, heads: int) -> torch.Tensor:
    """B×N×(parts·C) → parts×B×heads×N×(C/heads), channels split in order (spec §4)."""
    b, n, c = t.shape
    return t.reshape(b, n, parts, heads, c // (parts * heads)).permute(2, 0, 3, 1, 4)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """B×heads×N×d → B×N×(heads·d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class AggregationAttention(nn.Module):
    """Cross-attention of M prototype tokens (queries) over N image tokens (keys/values), spec §4."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attention = "explicit"  # explicit | sdpa | auto (SDPA on CUDA): set by InpFormer

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """tokens: B×M×C, features: B×N×C → B×M×C."""
        q = _split_heads(self.q(tokens), 1, self.num_heads)[0]  # B×h×M×d
        k, v = _split_heads(self.kv(features), 2, self.num_heads)  # B×h×N×d each
        if self.attention == "sdpa" or (self.attention == "auto" and q.is_cuda):
            return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v, scale=self.scale)))
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # B×h×M×N
        return self.proj(_merge_heads(attn @ v))


class AggregationBlock(nn.Module):
    """INP extractor block: T' = T + Attn(LN1(T), LN1(F)); P = T' + MLP(LN2(T')) (spec §4).

    One and the same LayerNorm (``norm1``) normalises the tokens and the image features.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, norm_eps: float = 1e-8
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = AggregationAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """tokens: B×M×C, features: B×N×C → INPs B×M×C."""
        x = tokens + self.attn(self.norm1(tokens), self.norm1(features))
        return x + self.mlp(self.norm2(x))


class PrototypeAttention(nn.Module):
    """INP-guided attention (spec §6): patch queries over the M INPs as keys and values.

    q and k are L2-normalised per head, multiplied by a learnable per-head scale (init 1), passed
    through ReLU; no softmax, so the output is a non-negative, unnormalised mix of the INP values.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.learn_scale = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: B×N×C, prototypes: B×M×C → (B×N×C output, B×heads×N×M attention)."""
        q = F.normalize(_split_heads(self.q(x), 1, self.num_heads)[0], dim=-1)
        k, v = _split_heads(self.kv(prototypes), 2, self.num_heads)
        k = F.normalize(k, dim=-1)
        attn = F.relu((q @ k.transpose(-2, -1)) * self.learn_scale)
        return self.proj(_merge_heads(attn @ v)), attn


class PrototypeBlock(nn.Module):
    """INP-guided decoder block: x ← Attn(LN1(x), LN1(P)) (first residual removed); x ← x + MLP(LN2(x))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, norm_eps: float = 1e-8
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = PrototypeAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self, x: torch.Tensor, prototypes: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: B×N×C, prototypes: B×M×C → B×N×C (and the B×heads×N×M attention if asked)."""
        y, attn = self.attn(self.norm1(x), self.norm1(prototypes))
        x = y + self.mlp(self.norm2(y))
        return (x, attn) if return_attention else x
