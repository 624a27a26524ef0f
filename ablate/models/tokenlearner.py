"""TokenLearner (Ryoo et al., 2021): a few learned tokens stand in for the patch grid."""

from __future__ import annotations

import torch
from torch import nn


class TokenLearner(nn.Module):
    """Reduce (B, N, C) tokens to (B, S, C) learned tokens.

    Version "1.1" (default): LN -> MLP (bottleneck 64) -> softmax over positions -> weighted
    sum. Version "1.0": LN -> 3 x (3x3 conv -> GELU) -> 3x3 conv -> sigmoid -> sum pooling.
    """

    def __init__(self, dim: int, tokens: int, version: str = "1.1", bottleneck: int = 64) -> None:
        super().__init__()
        if version not in ("1.0", "1.1"):
            raise ValueError(f"token_learner_version must be '1.0' or '1.1', not {version!r}")
        self.version, self.tokens = version, tokens
        self.norm = nn.LayerNorm(dim)
        if version == "1.1":
            self.attn = nn.Sequential(
                nn.Linear(dim, bottleneck), nn.GELU(), nn.Linear(bottleneck, tokens)
            )
        else:
            layers: list[nn.Module] = []
            in_ch = dim
            for _ in range(3):
                layers += [nn.Conv2d(in_ch, tokens, 3, padding=1), nn.GELU()]
                in_ch = tokens
            layers.append(nn.Conv2d(tokens, tokens, 3, padding=1))
            self.attn = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
        b, n, c = x.shape
        y = self.norm(x)
        if self.version == "1.1":
            weights = self.attn(y).transpose(1, 2).softmax(dim=-1)  # (B, S, N)
        else:
            if hw is None:
                raise ValueError("TokenLearner 1.0 needs the patch grid")
            grid = y.transpose(1, 2).reshape(b, c, hw[0], hw[1])
            weights = torch.sigmoid(self.attn(grid)).flatten(2)  # (B, S, N)
        return weights @ x  # (B, S, C): weighted sum over positions


class TokenFuser(nn.Module):
    """TokenFuser: map S processed tokens back onto the N grid positions."""

    def __init__(self, dim: int, tokens: int, bottleneck: int = 64) -> None:
        super().__init__()
        self.norm_tokens = nn.LayerNorm(dim)
        self.mix_tokens = nn.Linear(tokens, tokens)
        self.norm_grid = nn.LayerNorm(dim)
        self.weights = nn.Sequential(
            nn.Linear(dim, bottleneck), nn.GELU(), nn.Linear(bottleneck, tokens)
        )

    def forward(self, tokens: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        t = self.mix_tokens(self.norm_tokens(tokens).transpose(1, 2)).transpose(1, 2)
        w = torch.sigmoid(self.weights(self.norm_grid(grid)))  # (B, N, S)
        return w @ t + grid
