"""Token mixers of the ablation backbone: the one thing a `model.mixer` ablation changes.

Every mixer maps tokens (B, N, C) to (B, N, C), given the patch grid `hw` (None once a
TokenLearner has replaced the grid by learned tokens). A new mixer is its traits in
`ablate.archs.MIXER_TRAITS`, one class here naming it, and one line in `MIXERS`; the model
tests pick it up from the registry.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ablate.archs import MIXER_FIELDS, MIXER_TRAITS, POS_EMBEDS, MixerTraits

__all__ = ["MIXERS", "MIXER_FIELDS", "POS_EMBEDS", "TokenMixer"]


class TokenMixer(nn.Module):
    """Base class. A subclass names its mixer (`class Conv(TokenMixer, mixer="conv")`) and takes
    that mixer's traits from `ablate.archs.MIXER_TRAITS`, the one place they are declared
    (study validation reads them there without importing torch)."""

    traits: ClassVar[MixerTraits] = MixerTraits()
    uses: ClassVar[frozenset[str]] = frozenset()  # mixer-specific backbone arguments it honours
    needs_grid: ClassVar[bool] = False  # needs the (H, W) patch grid (no TokenLearner before it)
    default_kernel: ClassVar[int | None] = None
    pairs: ClassVar[bool] = False  # blocks come in pairs: `depth` must be even
    default_pos_embed: ClassVar[str] = "none"  # the paper's position information: POS_EMBEDS
    mixes: ClassVar[bool] = True  # False: the block skips the mixer branch (and its norm)
    # Subclasses define forward(x: (B, N, C), hw: (H, W) | None) -> (B, N, C).

    def __init_subclass__(cls, mixer: str | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if mixer is not None:
            t = cls.traits = MIXER_TRAITS[mixer]
            cls.uses, cls.needs_grid, cls.default_kernel = t.uses, t.needs_grid, t.default_kernel
            cls.pairs, cls.default_pos_embed, cls.mixes = t.pairs, t.default_pos_embed, t.mixes

    @classmethod
    def kernel_problem(cls, kernel_size: int) -> str | None:
        """Why this mixer cannot take `kernel_size`, or None when it can."""
        return cls.traits.kernel_problem(kernel_size)


def _to_grid(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    b, n, c = x.shape
    return x.transpose(1, 2).reshape(b, c, hw[0], hw[1])


def _from_grid(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


class Attention(TokenMixer, mixer="attention"):
    """Global multi-head self-attention (ViT)."""

    def __init__(self, dim: int, *, heads: int, **_: object) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class TokenMLP(TokenMixer, mixer="mlp"):
    """Token-mixing MLP across the token axis (MLP-Mixer), hidden = token_mlp_ratio x dim."""

    def __init__(self, dim: int, *, num_tokens: int, token_mlp_ratio: float, **_: object) -> None:
        super().__init__()
        hidden = max(1, int(token_mlp_ratio * dim))
        self.fc1 = nn.Linear(num_tokens, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, num_tokens)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x.transpose(1, 2)))).transpose(1, 2)


class DepthwiseConv(TokenMixer, mixer="conv"):
    """Depthwise k x k convolution over the patch grid (ConvMixer's spatial mixing)."""

    def __init__(self, dim: int, *, kernel_size: int, **_: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding="same", groups=dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
        assert hw is not None, "the conv mixer needs the patch grid"
        return _from_grid(self.act(self.conv(_to_grid(x, hw))))


def window_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nW, ws * ws, C), padding H and W up to multiples of ws."""
    b, h, w, c = x.shape
    ph, pw = (-h) % ws, (-w) % ws
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c), (hp, wp)


def window_reverse(x: torch.Tensor, ws: int, hp: int, wp: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `window_partition`, cropping the padding: -> (B, H, W, C)."""
    c = x.shape[-1]
    b = x.shape[0] // ((hp // ws) * (wp // ws))
    x = x.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, c)[:, :h, :w, :]


class WindowAttention(nn.Module):
    """DaViT's spatial-window attention: MHSA inside non-overlapping ws x ws windows."""

    def __init__(self, dim: int, heads: int, window_size: int) -> None:
        super().__init__()
        self.heads, self.window_size = heads, window_size
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        h, w = hw
        ws = min(self.window_size, max(h, w))
        win, (hp, wp) = window_partition(x.view(b, h, w, c), ws)
        bw, m, _ = win.shape
        qkv = self.qkv(win).reshape(bw, m, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        out = self.proj(out.transpose(1, 2).reshape(bw, m, c))
        return window_reverse(out, ws, hp, wp, h, w).reshape(b, n, c)


class ChannelAttention(nn.Module):
    """DaViT's channel-group attention: channels attend to channels within `heads` groups."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1] * self.scale, qkv[2]  # (B, G, N, C/G)
        attn = (k.transpose(-1, -2) @ v).softmax(dim=-1)  # (B, G, C/G, C/G), as in DaViT
        out = (attn @ q.transpose(-1, -2)).transpose(-1, -2)  # (B, G, N, C/G)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DualAttention(TokenMixer, mixer="dual"):
    """DaViT's pair: even blocks spatial-window attention, odd blocks channel-group attention."""

    def __init__(self, dim: int, *, heads: int, window_size: int, index: int, **_: object) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.spatial = index % 2 == 0
        self.attn = WindowAttention(dim, heads, window_size) if self.spatial else ChannelAttention(
            dim, heads
        )

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
        if self.spatial:
            assert hw is not None, "spatial-window attention needs the patch grid"
            return self.attn(x, hw)
        return self.attn(x)


class Pooling(TokenMixer, mixer="pool"):
    """Average pooling minus identity (PoolFormer): mixing with no learned weights."""

    def __init__(self, dim: int, *, kernel_size: int, **_: object) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(kernel_size, 1, kernel_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
        assert hw is not None, "the pool mixer needs the patch grid"
        g = _to_grid(x, hw)
        return _from_grid(self.pool(g) - g)


class NoMixing(TokenMixer, mixer="identity"):
    """No token mixing at all: the patches-only lower bound."""

    def __init__(self, dim: int, **_: object) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
        return torch.zeros_like(x)


class ConvPosEnc(nn.Module):
    """DaViT's conditional position encoding: x + depthwise 3x3 conv(x) over the patch grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return x + _from_grid(self.proj(_to_grid(x, hw)))


MIXERS: dict[str, type[TokenMixer]] = {
    "attention": Attention,
    "mlp": TokenMLP,
    "conv": DepthwiseConv,
    "dual": DualAttention,
    "pool": Pooling,
    "identity": NoMixing,
}
