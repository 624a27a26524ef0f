"""Every registered mixer (with and without TokenLearner), the references, the profiler."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ablate.cli import app
from ablate.cost import METRICS, count_gmacs, count_params, profile
from ablate.errors import ModelError
from ablate.models import MIXERS, REFERENCES, create_model
from ablate.models.backbone import Backbone

SMALL = dict(image_size=16, in_chans=3, num_classes=7, dim=16, depth=4, patch_size=4, heads=2,
             window_size=2)


def cases():
    for name, cls in MIXERS.items():
        yield name, None
        if not cls.needs_grid:
            yield name, "1.1"
            yield name, "1.0"
        # mixers that need the grid may still take a TokenLearner after the last block
        yield name, "end"


@pytest.mark.parametrize(("mixer", "tl"), list(cases()))
def test_mixer_forward_backward(mixer, tl):
    torch.manual_seed(0)
    kw = dict(SMALL, mixer=mixer)
    if tl == "end":
        kw.update(tokens=4, token_learner_at=SMALL["depth"])
    elif tl is not None:
        kw.update(tokens=4, token_learner_version=tl)
    model = create_model(**kw)
    x = torch.randn(3, 3, 16, 16)
    y = model(x)
    assert y.shape == (3, 7)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    n = (16 // 4) ** 2
    if tl in ("1.1", "1.0"):
        at = SMALL["depth"] // 2
        assert model.token_counts == [n] * at + [4] * (SMALL["depth"] - at)
    else:
        assert model.token_counts == [n] * SMALL["depth"]


@pytest.mark.parametrize("mixer", [m for m, c in MIXERS.items() if not c.needs_grid])
def test_token_mlp_is_sized_for_learned_tokens_and_fuser_restores_grid(mixer):
    model = create_model(**dict(SMALL, mixer=mixer, tokens=3, token_fuser=True))
    out = model.forward_features(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 16)
    assert model.token_counts[-1] == 3
    if mixer == "mlp":
        assert model.blocks[-1].mixer.fc1.in_features == 3
        assert model.blocks[0].mixer.fc1.in_features == 16


def test_mixers_differ_only_in_token_mixing():
    """Two models that differ only in `mixer` (position information held fixed) have identical
    parameters outside the mixer branch (norm1 -> mixer; identity has no branch)."""
    shapes = {}
    for name in MIXERS:
        m = create_model(**dict(SMALL, mixer=name, pos_embed="none"))
        shapes[name] = {k: v.shape for k, v in m.state_dict().items()
                        if ".mixer." not in k and ".norm1." not in k}
    first = next(iter(shapes.values()))
    assert all(s == first for s in shapes.values())


def test_mixers_really_mix_tokens():
    """Changing one patch changes other patches' features, except with identity mixing."""
    torch.manual_seed(0)
    for name in MIXERS:
        m = create_model(**dict(SMALL, mixer=name, depth=2)).eval()
        x = torch.randn(1, 3, 16, 16)
        x2 = x.clone()
        x2[..., :4, :4] += 3.0  # only patch 0 changes
        feats = []
        for inp in (x, x2):
            t = m.patch_embed(inp).flatten(2).transpose(1, 2)
            if m.pos_embed is not None:
                t = t + m.pos_embed
            for blk in m.blocks:
                t = blk(t, m.grid)
            feats.append(t)
        others = (feats[0][:, 1:] - feats[1][:, 1:]).abs().max().item()
        if name == "identity":
            assert others < 1e-6
        else:
            assert others > 1e-4, name


def test_backbone_rejects_impossible_configs():
    with pytest.raises(ValueError, match="does not divide"):
        Backbone(**dict(SMALL, patch_size=5))
    with pytest.raises(ValueError, match="exceed"):
        Backbone(**dict(SMALL, tokens=17))
    with pytest.raises(ValueError, match="needs the patch grid"):
        Backbone(**dict(SMALL, mixer="conv", tokens=4))
    with pytest.raises(ValueError, match="pairs"):
        Backbone(**dict(SMALL, mixer="dual", depth=3))


@pytest.mark.parametrize("name", list(REFERENCES))
def test_reference_trains_at_another_size(name):
    """References take another image size and class count (their parameters, MACs and outputs
    against timm's: tests/test_equivalence.py)."""
    small = create_model(name, image_size=32, num_classes=5)
    y = small(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    y.sum().backward()


def test_timm_arch_builds_for_the_dataset():
    pytest.importorskip("timm")
    via = create_model("timm:vit_tiny_patch16_224", num_classes=10, image_size=32)
    assert via(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_sdpa_macs_are_counted():
    """FlopCounterMode alone misses CPU SDPA; ours adds the exact QK^T and AV products."""
    from torch.nn import functional as F

    class Att(torch.nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Att()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, img):
            q = img.reshape(1, 3, 16 * 16 // 8, 8)  # (B, H=3, L=32, E=8)
            return self.a(q)

    g = count_gmacs(M(), 16)
    assert g * 1e9 == pytest.approx(3 * 32 * 32 * (8 + 8))


def test_profile_reports_every_metric():
    model = create_model(**SMALL)
    p = profile(model, 16, num_classes=7, batch_size=4, min_seconds=0.05, warmup=1)
    d = p.metrics()
    assert set(d) == set(METRICS) - {"compile_s"}  # only a compiled profile compiles
    assert d["params"] == count_params(model)
    assert all(v > 0 for k, v in d.items() if not k.endswith("_iqr"))
    assert all(v >= 0 for k, v in d.items() if k.endswith("_iqr"))
    assert p.device == "cpu" and p.batch_size == 4 and p.repeats >= 5


def test_profile_cli_json():
    runner = CliRunner()
    res = runner.invoke(app, ["profile", "convmixer_256_8_cifar", "--no-timing", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert set(METRICS) <= set(d)
    assert d["params"] == 594_186 and abs(d["gmacs"] - 0.148) < 0.0015
    assert d["throughput_img_s"] is None
    res = runner.invoke(app, ["profile", "--mixer", "conv", "--dim", "32", "--depth", "2",
                              "--patch-size", "2", "--kernel-size", "5", "--image-size", "8",
                              "--num-classes", "10", "--batch-size", "2", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["params"] == count_params(create_model(mixer="conv", dim=32, depth=2, patch_size=2,
                                                    kernel_size=5, image_size=8,
                                                    num_classes=10))
    assert d["train_img_s"] > 0
    bad = runner.invoke(app, ["profile", "no_such_model", "--no-timing"])
    assert bad.exit_code == 2 and "unknown architecture" in bad.output
    listing = runner.invoke(app, ["models"])
    assert listing.exit_code == 0 and "davit_tiny" in listing.output


@pytest.mark.parametrize(("dim", "heads"), [(192, 3), (384, 6), (768, 12), (64, 1), (32, 1)])
def test_default_heads_are_64_dimensional(dim, heads):
    """`heads: null` follows ViT (Ti/S/B: 3/6/12 heads of 64 dims), at least one head."""
    for mixer in ("attention", "dual"):
        m = create_model(**dict(SMALL, mixer=mixer, dim=dim, heads=None))
        att = m.blocks[0].mixer
        assert (att.heads if mixer == "attention" else att.attn.heads) == heads


def test_profile_attention_at_dim_64():
    res = CliRunner().invoke(app, ["profile", "--mixer", "attention", "--dim", "64", "--depth",
                                   "1", "--image-size", "16", "--no-timing", "--json"])
    assert res.exit_code == 0, res.output


def test_pos_embed_choices_and_paper_defaults():
    def kinds(m):
        return (m.pos_embed is not None, all(b.cpe is not None for b in m.blocks))

    expected = {"attention": (True, False), "dual": (False, True)}
    for name in MIXERS:
        assert kinds(create_model(**dict(SMALL, mixer=name))) == expected.get(name, (False, False))
    assert kinds(create_model(**dict(SMALL, mixer="attention", pos_embed="cpe"))) == (False, True)
    assert kinds(create_model(**dict(SMALL, mixer="attention", pos_embed="none"))) == (False,
                                                                                      False)
    assert kinds(create_model(**dict(SMALL, mixer="mlp", pos_embed="learned"))) == (True, False)
    with pytest.raises(ModelError, match="identity"):
        create_model(**dict(SMALL, mixer="identity", pos_embed="cpe"))
    with pytest.raises(ModelError, match="TokenLearner"):
        create_model(**dict(SMALL, mixer="attention", pos_embed="cpe", tokens=4))


def _shuffle_patches(x: torch.Tensor, patch: int, perm: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    g = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    g = g.reshape(b, -1, c, patch, patch)[:, perm]
    g = g.reshape(b, h // patch, w // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return g.reshape(b, c, h, w)


def test_dual_with_cpe_sees_patch_order():
    """Without position information, DaViT's pair (one window covering the grid) cannot tell
    a shuffled image from the original; with the conditional position encoding it can."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    perm = torch.randperm(16)
    for pos, blind in (("none", True), ("cpe", False)):
        m = create_model(**dict(SMALL, mixer="dual", window_size=4, pos_embed=pos)).eval()
        with torch.no_grad():
            diff = (m(x) - m(_shuffle_patches(x, 4, perm))).abs().max().item()
        assert (diff < 1e-5) == blind, (pos, diff)


def test_token_fuser_runs_at_every_block_after_the_token_learner():
    """TokenLearner -> block on S tokens -> TokenFuser back onto the N positions + the grid,
    at every block from `token_learner_at` on: perturbing one learned token's output of any
    such block changes that block's output grid."""
    torch.manual_seed(0)
    depth, at, s = 4, 1, 3
    model = create_model(**dict(SMALL, depth=depth, tokens=s, token_learner_at=at,
                                token_fuser=True)).eval()
    assert len(model.token_fusers) == depth - at
    # the reference initialises the fuser's token mixing to zero: at first each block after
    # the TokenLearner leaves the grid unchanged; give it trained-like weights
    assert all(f.mix.weight.abs().sum() == 0 for f in model.token_fusers)
    for f in model.token_fusers:
        torch.nn.init.normal_(f.mix.weight, std=0.5)
    x = torch.randn(2, 3, 16, 16)
    n = (16 // 4) ** 2
    push = torch.randn(SMALL["dim"]) * (torch.arange(s) == 0)[:, None]  # token 0 only
    for i in range(at, depth):
        grids = []
        for delta in (0.0, 1.0):
            hooks = [model.blocks[i].register_forward_hook(
                lambda _m, _inp, out, d=delta: out + d * push),
                model.token_fusers[i - at].register_forward_hook(
                lambda _m, inp, out, g=grids: g.append(out + inp[1]))]
            with torch.no_grad():
                model.forward_features(x)
            for h in hooks:
                h.remove()
        assert grids[0].shape == (2, n, SMALL["dim"])
        assert (grids[0] - grids[1]).abs().max() > 1e-4, i
    assert model.token_counts == [n] * at + [s] * (depth - at)


def test_token_fuser_vit_s16_parameter_count():
    """ViT-S/16 (global pooling) with TokenLearner 1.1 + TokenFuser at blocks 6..11, 8 tokens:
    the parameter count of the reference implementation (scenic's EncoderModFuser), written
    out: one TokenLearner and one TokenFuser per block from layer 6 on."""
    c, depth, s, b, n, classes = 384, 12, 8, 64, 196, 1000
    ln = 2 * c
    block = 2 * ln + (3 * c * c + 3 * c) + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c)
    learner = ln + (c * b + b) + (b * s + s)
    fuser = ln + (s * s + s) + ln + ln + (c * b + b) + (b * s + s)
    stem = 3 * 16 * 16 * c + c + n * c  # patch embedding + learned position embedding
    expected = stem + depth * block + (depth - 6) * (learner + fuser) + ln + c * classes + classes
    model = create_model(dim=c, depth=depth, patch_size=16, heads=6, tokens=s,
                         token_learner_at=6, token_fuser=True)
    assert count_params(model) == expected


def test_token_learner_v10_convolutions_have_no_bias():
    model = create_model(**dict(SMALL, tokens=4, token_learner_version="1.0"))
    convs = [m for m in model.token_learners.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.bias is None for c in convs)


def test_torch_free_registry_matches_the_models():
    """ablate.archs states, without torch, what the modules are: the backbone's signature,
    each mixer's traits and the reference table must say the same."""
    import inspect

    from ablate import archs

    sig = {n: p.default for n, p in inspect.signature(Backbone.__init__).parameters.items()
           if n != "self"}
    assert archs.BACKBONE_DEFAULTS == sig
    assert set(archs.REFERENCE_NAMES) == set(REFERENCES)
    assert list(MIXERS) == list(archs.MIXER_TRAITS)
    for name, cls in MIXERS.items():
        t = archs.MIXER_TRAITS[name]
        assert (cls.uses, cls.pairs, cls.needs_grid, cls.mixes, cls.default_kernel,
                cls.default_pos_embed) == (t.uses, t.pairs, t.needs_grid, t.mixes,
                                           t.default_kernel, t.default_pos_embed)
    assert MIXERS["pool"].kernel_problem(4) and MIXERS["pool"].kernel_problem(3) is None
