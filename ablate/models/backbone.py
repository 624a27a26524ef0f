"""The isotropic ablation backbone: patch embedding -> blocks -> norm -> pool -> head.

A block is `x + mixer(norm(x))`, then `x + mlp(norm(x))` (MetaFormer), so two models that
differ only in `mixer` differ only in token mixing. Defaults are ViT-Tiny/16 at 224.
"""

from __future__ import annotations

import torch
from torch import nn

from ablate.archs import (  # noqa: F401 - re-exported
    BACKBONE_DEFAULTS,
    TOKEN_FIELDS,
    default_heads,
    resolve_args,
)
from ablate.models.mixers import MIXERS, POS_EMBEDS, ConvPosEnc, TokenMixer
from ablate.models.tokenlearner import TokenFuser, TokenLearner


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample while training. Draws from
    `generator` when one is set (the trainer gives each seed its own), else the global RNG;
    compiled, always the global RNG, which is the seed's own while it trains (the trainer's
    SeedRNG): dynamo cannot trace a draw from a torch.Generator and would break the graph at
    every block."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        gen = None if torch.compiler.is_compiling() else self.generator
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p,
                                                                       generator=gen)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    """Channel MLP: Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """[cpe ->] norm -> token mixer -> residual; norm -> channel MLP -> residual."""

    def __init__(self, dim: int, mixer: TokenMixer, mlp_ratio: float, drop_path: float,
                 cpe: bool = False) -> None:
        super().__init__()
        self.cpe = ConvPosEnc(dim) if cpe else None  # DaViT: position by a conv before attention
        # the mixer branch's pre-norm belongs to the branch: no branch, no norm
        self.norm1 = nn.LayerNorm(dim, eps=1e-6) if mixer.mixes else None
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
        if self.cpe is not None:
            assert hw is not None, "the conditional position encoding needs the patch grid"
            x = self.cpe(x, hw)
        if self.norm1 is not None:
            x = x + self.drop_path(self.mixer(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Backbone(nn.Module):
    """Isotropic vision backbone whose token mixer and tokenization are ablation factors."""

    def __init__(
        self,
        image_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        dim: int = 192,
        depth: int = 12,
        patch_size: int = 16,
        mixer: str = "attention",
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        token_mlp_ratio: float = 0.5,
        kernel_size: int | None = None,
        window_size: int = 7,
        drop_path: float = 0.0,
        tokens: int | None = None,
        token_learner_at: int | None = None,
        token_learner_version: str = "1.1",
        token_fuser: bool = False,
        pos_embed: str | None = None,
    ) -> None:
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"unknown mixer {mixer!r}; choose one of {sorted(MIXERS)}")
        cls = MIXERS[mixer]
        if image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide image_size {image_size}")
        if cls.pairs and depth % 2:
            raise ValueError(f"mixer {mixer!r} runs blocks in pairs: depth {depth} must be even")
        if kernel_size is not None and "kernel_size" not in cls.uses:
            raise ValueError(f"mixer {mixer!r} has no kernel_size")
        k = cls.default_kernel if kernel_size is None else kernel_size
        if k is not None and cls.kernel_problem(k):
            raise ValueError(f"kernel_size: {cls.kernel_problem(k)}")
        heads = default_heads(dim) if heads is None else heads
        pos_embed = cls.default_pos_embed if pos_embed is None else pos_embed
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, not {pos_embed!r}")
        self.grid = (image_size // patch_size, image_size // patch_size)
        n = self.grid[0] * self.grid[1]
        self.tl_at = None
        if tokens is not None:
            self.tl_at = depth // 2 if token_learner_at is None else token_learner_at
            if not 0 <= self.tl_at <= depth:
                raise ValueError(f"token_learner_at {self.tl_at} is outside 0..{depth}")
            if tokens > n:
                raise ValueError(f"tokens {tokens} exceed the {n} patches")
            if cls.needs_grid and self.tl_at < depth:
                raise ValueError(f"mixer {mixer!r} needs the patch grid after the TokenLearner")
            if token_fuser and self.tl_at == depth:
                raise ValueError("token_fuser needs blocks after token_learner_at: with "
                                 f"token_learner_at = depth = {depth} it would fuse nothing")
        if pos_embed == "cpe" and self.tl_at is not None and self.tl_at < depth:
            raise ValueError("pos_embed 'cpe' needs the patch grid after the TokenLearner")
        if pos_embed == "cpe" and not cls.mixes:
            raise ValueError(f"pos_embed 'cpe' mixes tokens, which mixer {mixer!r} must not")
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        learned = pos_embed == "learned"
        self.pos_embed = nn.Parameter(torch.zeros(1, n, dim)) if learned else None
        # on the CPU whatever the default device: cost matching builds models on the meta device
        rates = torch.linspace(0, drop_path, depth, device="cpu").tolist() if depth else []
        blocks = []
        for i in range(depth):
            n_i = tokens if self.tl_at is not None and i >= self.tl_at else n
            m = cls(dim, heads=heads, num_tokens=n_i, token_mlp_ratio=token_mlp_ratio,
                    kernel_size=k, window_size=window_size, index=i)
            blocks.append(Block(dim, m, mlp_ratio, rates[i], cpe=pos_embed == "cpe"))
        self.blocks = nn.ModuleList(blocks)
        # TokenLearner alone: one learner at `tl_at`, the later blocks run on its tokens.
        # With TokenFuser (the paper's Fig. 3): every later block gets its own learner and
        # fuser, runs on the learned tokens, and the fuser maps them back onto the grid.
        n_tl = 0 if tokens is None else (depth - self.tl_at if token_fuser else 1)
        self.token_learners = nn.ModuleList(
            TokenLearner(dim, tokens, token_learner_version) for _ in range(n_tl))
        self.token_fusers = nn.ModuleList(
            TokenFuser(dim, tokens) for _ in range(n_tl if token_fuser else 0))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.token_counts: list[int] = []  # tokens entering each block, filled by forward
        self._init_weights()

    def _init_weights(self) -> None:
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for f in self.token_fusers:
            f.reset_mix()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        hw: tuple[int, int] | None = self.grid
        counts = []
        for i, blk in enumerate(self.blocks):
            if self.token_fusers and i >= self.tl_at:
                j = i - self.tl_at
                tokens = self.token_learners[j](x, hw)
                counts.append(tokens.shape[1])
                x = x + self.token_fusers[j](blk(tokens, None), x)
                continue
            if self.token_learners and i == self.tl_at:
                x, hw = self.token_learners[0](x, hw), None
            counts.append(x.shape[1])
            x = blk(x, hw)
        if self.token_learners and not self.token_fusers and self.tl_at == len(self.blocks):
            x = self.token_learners[0](x, hw)
        self.token_counts = counts
        return self.norm(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
