"""The bundle's standard network: an image tensor in, per-class probabilities with background out.

MONAI's bundle tools (``verify_net_in_out``, ``ckpt_export``), its workflows and MONAI Label's generic bundle app
expect ``network_def`` to map a tensor to a tensor, as the model zoo's segmentation bundles do. :class:`Sam2Rad`
returns a dict of logits, objectness and prompts in three modes; this wraps its autonomous mode.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from torch import Tensor, nn

from .io.nifti import NIFTI_SUFFIXES
from .model import Mode, Sam2Rad


class Sam2RadSegmenter(nn.Module):
    """Autonomous Sam2Rad as ``(B, 3, S, S) -> (B, 1 + C, S, S)`` probabilities, channel 0 the background.

    The input is what :func:`~sam2rad_monai.transforms.preprocessing_transforms` gives: the frame resized to
    longest side ``S``, normalised with the backbone's statistics and zero-padded bottom / right. Channel ``k`` of the
    output is class ``k``'s sigmoid of the model's output logits at the input resolution (upscaled bilinearly, as
    SAM does), set to 0 where the model does not call the class present (:meth:`Sam2Rad.present`: objectness logit
    below ``objectness_threshold``, or a calibrated minimum region not reached); the background is
    1 - the largest class probability. So ``argmax`` over channels is the label map of
    :class:`~sam2rad_monai.inference.Sam2RadPredictor`: a pixel is class ``k`` where that class's logit is positive
    and the highest of the kept classes.

    Its own ``state_dict`` / ``load_state_dict`` are the trained model file's (the PPN and any LoRA weights,
    :meth:`Sam2Rad.ppn_state_dict`): the frozen backbone is built from its own weights, so MONAI's checkpoint tools
    load ``models/model.pt`` into it directly. Inside a parent module it gives and takes its full state, as any module.

    Args:
        model: the Sam2Rad model (frozen backbone and PPN).
        objectness_threshold: objectness logit below which a class is absent.
    """

    def __init__(self, model: Sam2Rad, objectness_threshold: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.objectness_threshold = objectness_threshold

    def forward(self, image: Tensor) -> Tensor:
        out = self.model(image, mode=Mode.AUTONOMOUS)
        keep = self.model.present(out["logits"], out["objectness"], self.objectness_threshold)
        logits = F.interpolate(out["logits"].float(), size=image.shape[-2:], mode="bilinear", align_corners=False)
        keep = keep.to(logits.dtype)
        probs = torch.sigmoid(logits) * keep[..., None, None]
        return torch.cat([1.0 - probs.amax(dim=1, keepdim=True), probs], dim=1)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):  # type: ignore[override]
        if destination is not None or prefix:  # inside a parent module: its full state, as any module gives
            return super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        return self.model.ppn_state_dict()

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Load a trained model file's tensors (strict whatever ``strict`` says: a partial PPN is no model)."""
        self.model.load_ppn_state_dict(dict(state_dict))
        return nn.modules.module._IncompatibleKeys([], [])


class AsLabelMapd(MapTransform):
    """Class indices ``(1, H, W)`` (``argmax`` of :class:`Sam2RadSegmenter`'s output, inverted to the frame) to a
    uint8 label map in the array layout MONAI's writers give its source: ``(W, H)`` for a picture or DICOM frame
    (MONAI reads and writes 2D images x first, where the project reads them rows first), ``(H, W)`` for NIfTI (read
    as stored, :mod:`sam2rad_monai.transforms`). That is the layout ``SaveImaged`` and MONAI Label's writer take for
    a channel-less 2D image, and the one bundle inference's NIfTI has.

    Written by hand: no MONAI transform undoes the project's reading convention, and the metadata the label map
    inherits describes its source frame, whose ``original_channel_dim`` (-1 for an RGB picture) would make
    ``SaveImaged`` treat it as channels-last; it is set to ``"no_channel"`` here.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if label.ndim != 3 or label.shape[0] != 1:
                raise ValueError(f"'{key}': expected class indices (1, H, W), got shape {tuple(label.shape)}")
            label = torch.as_tensor(label)[0].to(torch.uint8)
            source = str(label.meta.get("filename_or_obj", "")) if isinstance(label, MetaTensor) else ""
            out = label if source.lower().endswith(NIFTI_SUFFIXES) else label.T.contiguous()
            if isinstance(out, MetaTensor):
                out.meta["original_channel_dim"] = "no_channel"
            d[key] = out
        return d
