"""Paper-exact reference models built from this project's own blocks, named as timm names them.

They pin the blocks of the ablation backbone to the published architectures: the same
parameter counts as timm 1.0.31 and forward MACs within 1% (tests/test_models.py).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ablate.models.backbone import Block, DropPath, Mlp
from ablate.models.mixers import (
    Attention,
    ChannelAttention,
    ConvPosEnc,
    TokenMLP,
    WindowAttention,
)


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al.): class token, learned position embedding, pre-norm blocks."""

    def __init__(self, image_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, dim: int = 768, depth: int = 12, heads: int = 12,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        n = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, Attention(dim, heads=heads), mlp_ratio, rates[i]) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x, None)
        return self.head(self.norm(x)[:, 0])


class MlpMixer(nn.Module):
    """MLP-Mixer (Tolstikhin et al.): token MLP D_S = dim / 2, channel MLP D_C = 4 x dim."""

    def __init__(self, image_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, dim: int = 512, depth: int = 8,
                 token_mlp_ratio: float = 0.5, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        n = (image_size // patch_size) ** 2
        self.stem = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, TokenMLP(dim, num_tokens=n, token_mlp_ratio=token_mlp_ratio), mlp_ratio,
                  rates[i])
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x, None)
        return self.head(self.norm(x).mean(dim=1))


class ConvMixerBlock(nn.Module):
    """Residual(depthwise conv -> act -> BN), then pointwise conv -> act -> BN."""

    def __init__(self, dim: int, kernel_size: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same")
        self.act1, self.bn1 = act(), nn.BatchNorm2d(dim)
        self.pw = nn.Conv2d(dim, dim, 1)
        self.act2, self.bn2 = act(), nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.bn1(self.act1(self.dw(x)))
        return self.bn2(self.act2(self.pw(x)))


class ConvMixer(nn.Module):
    """ConvMixer (Trockman & Kolter, "Patches Are All You Need?")."""

    def __init__(self, dim: int = 768, depth: int = 32, kernel_size: int = 7, patch_size: int = 7,
                 in_chans: int = 3, num_classes: int = 1000, act: str = "gelu",
                 image_size: int = 224) -> None:
        super().__init__()
        act_cls = {"gelu": nn.GELU, "relu": nn.ReLU}[act]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dim, patch_size, patch_size), act_cls(), nn.BatchNorm2d(dim)
        )
        self.blocks = nn.Sequential(*[ConvMixerBlock(dim, kernel_size, act_cls)
                                      for _ in range(depth)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DaViTBlock(nn.Module):
    """One DaViT block (spatial-window or channel-group attention) on an NCHW map:
    cpe -> attention -> residual, cpe -> MLP -> residual."""

    def __init__(self, dim: int, heads: int, spatial: bool, window_size: int,
                 mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.cpe1, self.cpe2 = ConvPosEnc(dim), ConvPosEnc(dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window_size) if spatial else ChannelAttention(
            dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = self.cpe1(x.flatten(2).transpose(1, 2), (h, w))
        x = x + self.drop_path(self.attn(self.norm1(x), (h, w)))
        x = self.cpe2(x, (h, w))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.transpose(1, 2).reshape(b, c, h, w)


class DaViTStage(nn.Module):
    """Downsampling (LayerNorm -> 2x2 stride-2 conv; none in stage 0), then (spatial, channel)
    block pairs."""

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, window_size: int,
                 mlp_ratio: float, rates: list[float]) -> None:
        super().__init__()
        self.downsample = nn.Sequential(OrderedDict(
            norm=LayerNorm2d(in_dim), conv=nn.Conv2d(in_dim, dim, 2, 2))) if in_dim else None
        self.blocks = nn.Sequential(*[
            nn.Sequential(*[DaViTBlock(dim, heads, spatial, window_size, mlp_ratio, rates[j])
                            for spatial in (True, False)])
            for j in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x if self.downsample is None else self.downsample(x))


class DaViT(nn.Module):
    """DaViT (Ding et al.): four stages of (spatial, channel) attention pairs with downsampling."""

    def __init__(self, depths: tuple[int, ...] = (1, 1, 3, 1),
                 dims: tuple[int, ...] = (96, 192, 384, 768),
                 heads: tuple[int, ...] = (3, 6, 12, 24), window_size: int = 7,
                 mlp_ratio: float = 4.0, in_chans: int = 3, num_classes: int = 1000,
                 drop_path: float = 0.0, image_size: int = 224) -> None:
        super().__init__()
        self.stem = nn.Sequential(OrderedDict(conv=nn.Conv2d(in_chans, dims[0], 7, 4, 3),
                                              norm=LayerNorm2d(dims[0])))
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.stages = nn.Sequential(*[
            DaViTStage(dims[i - 1] if i else 0, dims[i], depths[i], heads[i], window_size,
                       mlp_ratio, rates[starts[i]:starts[i] + depths[i]])
            for i in range(len(depths))])
        self.head = nn.Sequential(OrderedDict(norm=nn.LayerNorm(dims[-1]),
                                              fc=nn.Linear(dims[-1], num_classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


@dataclass(frozen=True)
class Reference:
    """A published architecture: how to build it and what the literature says it costs."""

    build: Callable[..., nn.Module]
    kwargs: dict
    params: int | None  # exact parameter count at the default size (timm 1.0.31)
    gmacs: float | None  # forward GMACs per image, depthwise convolutions included
    image_size: int = 224
    num_classes: int = 1000
    paper: str = ""


REFERENCES: dict[str, Reference] = {
    "vit_tiny_patch16_224": Reference(VisionTransformer, dict(dim=192, depth=12, heads=3),
                                      5_717_416, 1.26, paper="ViT (Dosovitskiy et al., 2021)"),
    "vit_small_patch16_224": Reference(VisionTransformer, dict(dim=384, depth=12, heads=6),
                                       22_050_664, 4.61, paper="ViT"),
    "vit_base_patch16_224": Reference(VisionTransformer, dict(dim=768, depth=12, heads=12),
                                      86_567_656, 17.58, paper="ViT"),
    "mixer_s16_224": Reference(MlpMixer, dict(dim=512, depth=8), 18_528_264, 3.79,
                               paper="MLP-Mixer (Tolstikhin et al., 2021)"),
    "mixer_b16_224": Reference(MlpMixer, dict(dim=768, depth=12), 59_880_472, 12.62,
                               paper="MLP-Mixer"),
    "convmixer_768_32": Reference(ConvMixer, dict(dim=768, depth=32, kernel_size=7, patch_size=7,
                                                  act="relu"), 21_110_248, 20.68,
                                  paper="ConvMixer (Trockman & Kolter, 2022)"),
    "convmixer_1536_20": Reference(ConvMixer, dict(dim=1536, depth=20, kernel_size=9,
                                                   patch_size=7), 51_625_960, 51.10,
                                   paper="ConvMixer"),
    "convmixer_256_8_cifar": Reference(ConvMixer, dict(dim=256, depth=8, kernel_size=5,
                                                       patch_size=2, num_classes=10,
                                                       image_size=32),
                                       594_186, 0.148, image_size=32, num_classes=10,
                                       paper="ConvMixer (CIFAR-10 configuration)"),
    "davit_tiny": Reference(DaViT, dict(depths=(1, 1, 3, 1)), 28_360_168, 4.54,
                            paper="DaViT (Ding et al., 2022)"),
    "davit_small": Reference(DaViT, dict(depths=(1, 1, 9, 1)), 49_745_896, 8.80, paper="DaViT"),
    "davit_base": Reference(DaViT, dict(depths=(1, 1, 9, 1), dims=(128, 256, 512, 1024),
                                        heads=(4, 8, 16, 32)), 87_954_408, 15.51, paper="DaViT"),
}


_BLOCK = r"^((?:blocks\.\d+\.)?)"  # a ConvMixer block's keys, in the model or alone
# timm's parameter and buffer names -> ours, per family: (pattern, replacement) in order.
# Loading timm's weights (pretrained ones too) through these is how the tests prove that our
# references compute what timm's models compute.
TIMM_NAMES: dict[type[nn.Module], tuple[tuple[str, str], ...]] = {
    VisionTransformer: ((r"^patch_embed\.proj\.", "patch_embed."), (r"(^|\.)attn\.", r"\1mixer.")),
    MlpMixer: ((r"^stem\.proj\.", "stem."), (r"(^|\.)mlp_tokens\.", r"\1mixer."),
               (r"(^|\.)mlp_channels\.", r"\1mlp.")),
    ConvMixer: ((_BLOCK + r"0\.fn\.0\.", r"\1dw."), (_BLOCK + r"0\.fn\.2\.", r"\1bn1."),
                (_BLOCK + r"1\.", r"\1pw."), (_BLOCK + r"3\.", r"\1bn2.")),
    DaViT: (),  # same names
}


def from_timm(state: dict[str, torch.Tensor], family: type[nn.Module]) -> dict[str, torch.Tensor]:
    """A timm state dict (a whole model's or one block's) renamed to ours for `family`."""
    out = {}
    for key, value in state.items():
        for pattern, repl in TIMM_NAMES[family]:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def build_reference(name: str, num_classes: int | None = None, image_size: int | None = None,
                    in_chans: int = 3) -> nn.Module:
    """Build a reference model by name, optionally for another class count or image size."""
    ref = REFERENCES[name]
    kwargs = dict(ref.kwargs)
    kwargs["num_classes"] = num_classes if num_classes is not None else ref.num_classes
    kwargs["image_size"] = image_size if image_size is not None else ref.image_size
    kwargs["in_chans"] = in_chans
    return ref.build(**kwargs)
