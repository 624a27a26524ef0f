"""Models: the ablation backbone, its token mixers, TokenLearner and paper-exact references."""

from __future__ import annotations

from typing import Any

from torch import nn

from ablate.errors import ModelError
from ablate.models.backbone import BACKBONE_DEFAULTS, Backbone, resolve_args
from ablate.models.mixers import MIXER_FIELDS, MIXERS, POS_EMBEDS, TokenMixer
from ablate.models.reference import REFERENCES, build_reference


def create_model(arch: str = "backbone", **kwargs: Any) -> nn.Module:
    """Build a model: `backbone` (the ablation backbone), a reference name, or `timm:<name>`.

    Keyword arguments left out or None take the model's default (the paper's baseline).
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if arch == "backbone":
        unknown = set(kwargs) - set(BACKBONE_DEFAULTS)
        if unknown:
            raise ModelError(f"backbone has no argument(s) {sorted(unknown)}")
        try:
            return Backbone(**kwargs)
        except ValueError as e:
            raise ModelError(f"model: {e}") from e
    if arch in REFERENCES:
        return build_reference(arch, num_classes=kwargs.get("num_classes"),
                               image_size=kwargs.get("image_size"),
                               in_chans=kwargs.get("in_chans", 3))
    if arch.startswith("timm:"):
        import timm

        name = arch.split(":", 1)[1]
        if name not in timm.list_models():
            raise ModelError(f"model.arch: timm has no model {name!r} (see timm.list_models())")
        extra = {k: kwargs[k] for k in ("num_classes", "in_chans") if k in kwargs}
        if "image_size" in kwargs:
            extra["img_size"] = kwargs["image_size"]
        try:
            return timm.create_model(name, pretrained=False, **extra)
        except TypeError:
            extra.pop("img_size", None)
            return timm.create_model(name, pretrained=False, **extra)
    raise ModelError(
        f"model.arch: unknown architecture {arch!r}; use 'backbone', a reference name "
        f"({', '.join(REFERENCES)}) or 'timm:<name>'"
    )


__all__ = ["BACKBONE_DEFAULTS", "MIXERS", "MIXER_FIELDS", "POS_EMBEDS", "REFERENCES", "Backbone",
           "TokenMixer", "create_model", "resolve_args"]
