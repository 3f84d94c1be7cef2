"""Frozen SAM-family backbones behind one interface (:class:`Backbone`)."""

from __future__ import annotations

from pathlib import Path

from .base import Backbone, CheckpointError, Features, read_state_dict
from .litemedsam import LiteMedSAMBackbone
from .mobilesam import MobileSamBackbone
from .sam import MEDSAM, SAM_VARIANTS, SamBackbone
from .sam2 import SAM2_SIZES, SAM2_VERSIONS, Sam2Backbone

BACKBONES = ("litemedsam", "mobilesam", "sam", "sam2")


def build_backbone(name: str = "litemedsam", variant: str | None = None, checkpoint: str | Path | None = None,
                   image_size: int | None = None, pretrained: bool = True) -> Backbone:
    """Build a frozen backbone by family name.

    Args:
        name: ``litemedsam`` (default, weights packaged), ``mobilesam``, ``sam`` or ``sam2``.
        variant: ``vit_b|vit_l|vit_h`` or ``medsam`` (MedSAM's ViT-B) for sam;
            ``[sam2|sam2.1_]tiny|small|base_plus|large`` for sam2 (``sam2.1`` when no version is given).
        checkpoint: weights file; required for mobilesam / sam / sam2 unless ``pretrained`` is False.
        image_size: input side (sam / sam2 only; default 1024; mobilesam is 1024 only).
        pretrained: ``False`` keeps random weights (tests).
    """
    if isinstance(checkpoint, str) and checkpoint.strip() in ("", "None", "null"):
        checkpoint = None  # bundle configs pass an empty override as a string
    if name == "litemedsam":
        return LiteMedSAMBackbone(checkpoint=checkpoint, pretrained=pretrained)
    if name == "mobilesam":
        if image_size not in (None, 1024):
            raise ValueError(f"mobilesam takes 1024 x 1024 input only (its encoder is built for it), got {image_size}")
        return MobileSamBackbone(checkpoint, pretrained)
    if name == "sam":
        return SamBackbone(variant or "vit_b", checkpoint, image_size or 1024, pretrained)
    if name == "sam2":
        version, size = "sam2.1", variant or "tiny"
        for v in SAM2_VERSIONS[::-1]:
            if size.startswith(v + "_"):
                version, size = v, size[len(v) + 1:]
                break
        size = size.removeprefix("hiera_")
        return Sam2Backbone(size, version, checkpoint, image_size or 1024, pretrained)
    raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")


__all__ = ["BACKBONES", "Backbone", "CheckpointError", "Features", "LiteMedSAMBackbone", "MEDSAM", "MobileSamBackbone",
           "SAM2_SIZES", "SAM2_VERSIONS", "SAM_VARIANTS", "Sam2Backbone", "SamBackbone", "build_backbone", "read_state_dict"]
