"""What each architecture takes, without torch: the backbone's arguments and defaults, each
token mixer's traits, the reference models' names, and how a config resolves.

Validating a study file (`ablate validate`, `ablate report`, the dashboard) needs only these
facts, and importing torch costs 2 to 4 s, so they live here and `ablate.models` builds its
modules from them: a mixer class takes its traits from `MIXER_TRAITS` by name, and the tests
check that `BACKBONE_DEFAULTS` is the backbone's signature and `REFERENCE_NAMES` its
reference table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

POS_EMBEDS = ("learned", "cpe", "none")


def _odd_kernel(kernel_size: int) -> str | None:
    if kernel_size % 2 == 0:
        return (f"pooling keeps the grid's size only with an odd kernel, not {kernel_size}: "
                "use 3, 5, 7, ...")
    return None


@dataclass(frozen=True)
class MixerTraits:
    """What a token mixer takes and can run on (the study validator and the backbone read it)."""

    uses: frozenset[str] = frozenset()  # mixer-specific backbone arguments it honours
    needs_grid: bool = False  # needs the (H, W) patch grid (no TokenLearner before it)
    default_kernel: int | None = None
    pairs: bool = False  # blocks come in pairs: `depth` must be even
    default_pos_embed: str = "none"  # the paper's position information: POS_EMBEDS
    mixes: bool = True  # False: the block skips the mixer branch (and its norm)
    kernel_check: Callable[[int], str | None] | None = None

    def kernel_problem(self, kernel_size: int) -> str | None:
        """Why this mixer cannot take `kernel_size`, or None when it can."""
        return self.kernel_check(kernel_size) if self.kernel_check else None


MIXER_TRAITS: dict[str, MixerTraits] = {
    "attention": MixerTraits(frozenset({"heads"}),
                             default_pos_embed="learned"),
    "mlp": MixerTraits(frozenset({"token_mlp_ratio"})),
    "conv": MixerTraits(frozenset({"kernel_size"}), needs_grid=True, default_kernel=9),
    "dual": MixerTraits(frozenset({"heads", "window_size"}), needs_grid=True, pairs=True,
                        default_pos_embed="cpe"),
    "pool": MixerTraits(frozenset({"kernel_size"}), needs_grid=True, default_kernel=3,
                        kernel_check=_odd_kernel),
    "identity": MixerTraits(mixes=False),
}
# every mixer-specific argument some mixer honours: the others ignore it
MIXER_FIELDS: frozenset[str] = frozenset().union(*(c.uses for c in MIXER_TRAITS.values()))

# `ablate.models.backbone.Backbone`'s keyword arguments and defaults (a test compares them)
BACKBONE_DEFAULTS: dict[str, Any] = {
    "image_size": 224, "in_chans": 3, "num_classes": 1000, "dim": 192, "depth": 12,
    "patch_size": 16, "mixer": "attention", "heads": None, "mlp_ratio": 4.0,
    "token_mlp_ratio": 0.5, "kernel_size": None, "window_size": 7, "drop_path": 0.0,
    "tokens": None, "token_learner_at": None, "token_learner_version": "1.1",
    "token_fuser": False, "pos_embed": None,
}
TOKEN_FIELDS = ("token_learner_at", "token_learner_version", "token_fuser")

# the keys of `ablate.models.reference.REFERENCES` (a test compares them)
REFERENCE_NAMES: tuple[str, ...] = (
    "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "mixer_s16_224",
    "mixer_b16_224", "convmixer_768_32", "convmixer_1536_20", "convmixer_256_8_cifar",
    "davit_tiny", "davit_small", "davit_base",
)


def default_heads(dim: int) -> int:
    """ViT's convention of 64-dimensional heads (ViT-Ti/S/B: 3/6/12), at least one head."""
    return max(1, dim // 64)


def resolve_args(**kwargs: Any) -> dict[str, Any]:
    """The backbone's arguments as the model resolves them: defaults filled in, and what the
    model ignores (another mixer's arguments, TokenLearner's without tokens) set to None.
    A trial id hashes this, so two trials differ exactly where their models differ."""
    args = {**BACKBONE_DEFAULTS, **{k: v for k, v in kwargs.items() if v is not None}}
    traits = MIXER_TRAITS.get(args["mixer"])
    if traits is None:
        return args
    for name in MIXER_FIELDS - traits.uses:
        args[name] = None
    if "heads" in traits.uses and args["heads"] is None:
        args["heads"] = default_heads(args["dim"])
    if "kernel_size" in traits.uses and args["kernel_size"] is None:
        args["kernel_size"] = traits.default_kernel
    if args["pos_embed"] is None:
        args["pos_embed"] = traits.default_pos_embed
    if args["tokens"] is None:
        args.update(dict.fromkeys(TOKEN_FIELDS))
    elif args["token_learner_at"] is None:
        args["token_learner_at"] = args["depth"] // 2
    return args
