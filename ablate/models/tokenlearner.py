"""TokenLearner and TokenFuser (Ryoo et al., 2021), as in the reference implementation
(google-research/scenic, projects/token_learner/model.py): a few learned tokens stand in for
the patch grid, and the fuser maps them back onto it."""

from __future__ import annotations

import torch
from torch import nn


def _mlp(dim: int, hidden: int, out: int) -> nn.Sequential:
    """Scenic's MlpBlock: Dense -> GELU (JAX's default tanh approximation) -> Dense."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"),
                         nn.Linear(hidden, out))


class TokenLearner(nn.Module):
    """Reduce (B, N, C) tokens to (B, S, C) learned tokens.

    Version "1.1" (default): LN -> MLP (bottleneck 64) -> softmax over positions -> weighted
    sum. Version "1.0": LN -> 3 x (3x3 conv -> GELU) -> 3x3 conv -> sigmoid -> sum pooling,
    the convolutions without bias.
    """

    def __init__(self, dim: int, tokens: int, version: str = "1.1", bottleneck: int = 64) -> None:
        super().__init__()
        if version not in ("1.0", "1.1"):
            raise ValueError(f"token_learner_version must be '1.0' or '1.1', not {version!r}")
        self.version, self.tokens = version, tokens
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # Flax's LayerNorm epsilon
        if version == "1.1":
            self.attn = _mlp(dim, bottleneck, tokens)
        else:
            layers: list[nn.Module] = []
            in_ch = dim
            for _ in range(3):
                layers += [nn.Conv2d(in_ch, tokens, 3, padding=1, bias=False),
                           nn.GELU(approximate="tanh")]
                in_ch = tokens
            layers.append(nn.Conv2d(tokens, tokens, 3, padding=1, bias=False))
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
    """Map S processed tokens back onto the N grid positions (the caller adds the grid).

    LN -> linear mixing across the S tokens (zero-initialised) -> LN, then each grid position
    takes a sigmoid-weighted sum of those tokens, its weights an MLP of the normalised grid.
    """

    def __init__(self, dim: int, tokens: int, bottleneck: int = 64) -> None:
        super().__init__()
        self.mix_norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mix = nn.Linear(tokens, tokens)
        self.mix_norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.norm_grid = nn.LayerNorm(dim, eps=1e-6)
        self.weights = _mlp(dim, bottleneck, tokens)
        self.reset_mix()

    def reset_mix(self) -> None:
        """The reference initialises the token-mixing layer to zero (weights and bias)."""
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def forward(self, tokens: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        t = self.mix(self.mix_norm1(tokens).transpose(1, 2)).transpose(1, 2)  # (B, S, C)
        t = self.mix_norm2(t)
        w = torch.sigmoid(self.weights(self.norm_grid(grid)))  # (B, N, S)
        return w @ t  # (B, N, C)
