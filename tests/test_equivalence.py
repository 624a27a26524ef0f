"""Output equivalence with timm: timm's weights copied into ours, the same outputs (fp32).

Equal parameter counts only say the shapes agree; these say the computation does. Weights are
timm's initialisation plus noise, so that zero-initialised heads and biases, unit norms and
BatchNorm statistics cannot hide a difference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ablate.cost import count_gmacs, count_params
from ablate.models import REFERENCES, create_model
from ablate.models.backbone import Block
from ablate.models.mixers import Attention, Pooling, TokenMLP
from ablate.models.reference import (
    ConvMixer,
    ConvMixerBlock,
    DaViT,
    DaViTBlock,
    MlpMixer,
    VisionTransformer,
    from_timm,
)

timm = pytest.importorskip("timm")
ATOL = 1e-5


@torch.no_grad()
def perturb(module: nn.Module, seed: int = 0) -> nn.Module:
    """Add noise to every parameter and BatchNorm statistic; eval mode."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.02)
    for name, b in module.named_buffers():
        if name.endswith("running_mean"):
            b.add_(torch.randn(b.shape, generator=g) * 0.1)
        elif name.endswith("running_var"):
            b.mul_(1 + torch.rand(b.shape, generator=g))
    return module.eval()


def copy_from(theirs: nn.Module, ours: nn.Module, family: type[nn.Module]) -> nn.Module:
    ours.load_state_dict(from_timm(theirs.state_dict(), family), strict=True)
    return ours.eval()


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def test_vit_attention_block():
    from timm.models.vision_transformer import Block as TimmBlock

    theirs = perturb(TimmBlock(64, num_heads=4, qkv_bias=True))
    ours = copy_from(theirs, Block(64, Attention(64, heads=4), 4.0, 0.0), VisionTransformer)
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        same(ours(x, None), theirs(x))


def test_mixer_block():
    from timm.models.mlp_mixer import MixerBlock

    theirs = perturb(MixerBlock(32, seq_len=16))
    ours = copy_from(theirs, Block(32, TokenMLP(32, num_tokens=16, token_mlp_ratio=0.5), 4.0,
                                   0.0), MlpMixer)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        same(ours(x, None), theirs(x))


@pytest.mark.parametrize("act", [nn.GELU, nn.ReLU])
def test_convmixer_block(act):
    from timm.models.convmixer import ConvMixer as TimmConvMixer

    theirs = perturb(TimmConvMixer(32, 1, kernel_size=5, patch_size=2, act_layer=act).blocks[0])
    ours = copy_from(theirs, ConvMixerBlock(32, 5, act), ConvMixer)
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        same(ours(x), theirs(x))


@pytest.mark.parametrize("k", [3, 5, 7])
def test_poolformer_pooling(k):
    from timm.models.metaformer import Pooling as TimmPooling

    x = torch.randn(2, 24, 6, 6)
    same(Pooling(24, kernel_size=k)(tokens(x), (6, 6)), tokens(TimmPooling(pool_size=k)(x)))


@pytest.mark.parametrize("size", [8, 6])  # 6: windows padded as timm pads them
def test_davit_spatial_window_block(size):
    from timm.models.davit import SpatialBlock

    theirs = perturb(SpatialBlock(32, num_heads=2, window_size=4, qkv_bias=True))
    ours = copy_from(theirs, DaViTBlock(32, 2, True, 4, 4.0, 0.0), DaViT)
    x = torch.randn(2, 32, size, size)
    with torch.no_grad():
        same(ours(x), theirs(x))


def test_davit_channel_attention_block():
    from timm.models.davit import ChannelBlock

    theirs = perturb(ChannelBlock(32, num_heads=4, qkv_bias=True))
    ours = copy_from(theirs, DaViTBlock(32, 4, False, 7, 4.0, 0.0), DaViT)
    x = torch.randn(2, 32, 5, 5)
    with torch.no_grad():
        same(ours(x), theirs(x))


def timm_model(name: str) -> nn.Module:
    """timm's model of a reference's name; the CIFAR ConvMixer, which timm does not register,
    from timm's ConvMixer class with the paper's CIFAR-10 settings."""
    if name == "convmixer_256_8_cifar":
        from timm.models.convmixer import ConvMixer as TimmConvMixer

        return TimmConvMixer(256, 8, kernel_size=5, patch_size=2, num_classes=10)
    return timm.create_model(name, pretrained=False)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_reference_model_computes_what_timm_computes(name):
    """Whole model, weights copied by the name map: the same logits, the same parameter count
    and forward MACs as timm (and as the published table)."""
    ref = REFERENCES[name]
    torch.manual_seed(0)
    theirs = perturb(timm_model(name))
    ours = copy_from(theirs, create_model(name), ref.build)
    assert count_params(ours) == count_params(theirs) == ref.params
    x = torch.randn(1, 3, ref.image_size, ref.image_size)
    with torch.no_grad():
        same(ours(x), theirs(x))
    g = count_gmacs(ours, ref.image_size)
    assert g == pytest.approx(count_gmacs(theirs, ref.image_size), rel=1e-9)
    assert abs(g / ref.gmacs - 1) < 0.01, (g, ref.gmacs)
