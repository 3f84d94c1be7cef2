"""MONAI dictionary transforms for Sam2Rad: loading, resize-longest-side + pad, targets and the paper's augmentation.

Conventions (the model code depends on them):

- Images are channel-first ``(C, H, W)`` with ``H`` = rows and ``W`` = columns. PNG/JPEG frames are read with
  ``PILReader(reverse_indexing=False)`` so that the array matches ``numpy.asarray(PIL.Image.open(path))``;
  NIfTI frames are read by ``NibabelReader`` with their array axes as stored (axis 0 = ``H``); ultrasound DICOM
  frames by :class:`~sam2rad_monai.io.reader.UltrasoundDicomReader` as bundle inference reads them.
- Images are 3-channel float32 in [0, 255] before normalisation (grey is repeated to 3 channels, RGB is kept);
  deeper data are brought there by one rule (:func:`to_0_255`) in training, evaluation and inference alike.
- Preprocessing to the ``S x S`` model input: resize the longest side to ``S`` (bilinear with anti-aliasing for
  images, nearest-exact for labels), normalise with per-channel ``pixel_mean`` / ``pixel_std``, then zero-pad
  bottom/right, so the padding is 0 in normalised space as in SAM. The original ``(H, W)`` and the resized,
  unpadded ``(h, w)`` are stored as int64 tensors under ``original_size`` and ``input_size``; MONAI's
  ``applied_operations`` also record the resize and the pad, so ``Invertd`` can undo them.
- Labels (key ``label``) are integral label maps ``(1, H, W)``: 0 = background, ``k`` = class ``k``. Every
  spatial transform uses nearest-neighbour interpolation for them. :class:`LabelToTargetsd` turns the label map
  into ``masks`` (K, S, S), ``boxes`` (K, 4) as inclusive pixel-index ``(x_min, y_min, x_max, y_max)`` and
  ``present`` (K,).
- Augmentation (Sam2Rad paper, section 4.2) runs on the ``S x S`` tensors, after padding and before the
  targets, so boxes follow it. :func:`augment_view` makes augmented view ``k`` of an image reproducible.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ImageReader, NibabelReader, PILReader
from monai.transforms import (
    CastToTyped,
    Compose,
    Identityd,
    InvertibleTransform,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    OneOf,
    RandAffined,
    RandFlipd,
    RandRotated,
    RandScaleCropd,
    Resized,
    SpatialPadd,
)
from monai.utils import ensure_tuple_rep
from torchvision.ops import masks_to_boxes

from .io.reader import UltrasoundDicomReader

__all__ = [
    "EnsureChannelsd",
    "EnsureThreeChannelsd",
    "To0To255d",
    "to_0_255",
    "ResizeLongestSided",
    "LabelToTargetsd",
    "load_transforms",
    "preprocessing_transforms",
    "augmentation_transforms",
    "augment_view",
    "view_seed",
]

NEAREST_MODES = frozenset({"nearest", "nearest-exact"})
TARGET_KEYS = ("masks", "boxes", "present")


def _source_name(value: Any) -> str:
    """The file a tensor was loaded from (MetaTensor meta), for error messages."""
    meta = getattr(value, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return f" ({name})" if name else ""


class EnsureChannelsd(MapTransform):
    """Bring each key to a fixed number of channels (channel-first input).

    A trailing singleton spatial axis ``(C, H, W, 1)`` is dropped. 1 channel is repeated; a trailing alpha
    channel (2 = grey + alpha, 4 = RGBA) is dropped; 3 channels go to 1 only when they are identical (a grey
    frame or mask stored as RGB). Anything else raises ``ValueError`` naming the source file.

    Args:
        keys: keys of the items to convert.
        channels: 1 or 3.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection, channels: int = 3, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels

    def _convert(self, key: Hashable, img: torch.Tensor) -> torch.Tensor:
        if img.ndim == 4 and img.shape[-1] == 1:  # a 2D frame stored as a one-slice volume (NIfTI)
            img = img[..., 0]
        c = img.shape[0]
        if c in (2, 4):  # grey + alpha or RGBA: alpha carries no anatomy
            img, c = img[: c - 1], c - 1
        if c == self.channels:
            return img
        if c == 1:
            return img.repeat(self.channels, *([1] * (img.ndim - 1)))
        if c == 3 and self.channels == 1 and bool((img[1:] == img[:1]).all()):
            return img[:1]
        raise ValueError(
            f"'{key}'{_source_name(img)} has {img.shape[0]} channels (shape {tuple(img.shape)}); "
            f"expected 1 or {self.channels}" + ("; a label map must be single-channel" if self.channels == 1 else "")
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._convert(key, d[key])
        return d


def to_0_255(array: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """The model's intensity scale, one rule for every input: values already within 0..255 (8-bit pictures and
    DICOM, which :meth:`~sam2rad_monai.io.UltrasoundImage.rgb_uint8` scales by its nominal bit depth) are kept;
    deeper data (16-bit PNG, NIfTI of another range) are scaled by their own min..max onto 0..255, in float32.
    Hand-written because MONAI's ``ScaleIntensity`` rescales every image, which would stretch 8-bit frames."""
    values = array.float() if isinstance(array, torch.Tensor) else np.asarray(array, dtype=np.float32)
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0 and hi <= 255:
        return values
    return (values - lo) * (255.0 / max(hi - lo, 1e-6))


class To0To255d(MapTransform):
    """:func:`to_0_255` on each key (an image loaded channel-first, the scale shared by its channels)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = to_0_255(d[key])
        return d


class EnsureThreeChannelsd(EnsureChannelsd):
    """:class:`EnsureChannelsd` with 3 channels: grey frames are repeated, RGB frames kept as they are."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, channels=3, allow_missing_keys=allow_missing_keys)


class ResizeLongestSided(MapTransform, InvertibleTransform):
    """Resize so that the longest side equals ``size``, keeping the aspect ratio, and record the sizes.

    Wraps MONAI's ``Resized(size_mode="longest")`` (so the operation is invertible with ``Invertd``) and adds
    ``original_size`` and ``input_size`` entries: int64 tensors ``(H, W)`` of the first key before and after
    resizing. All keys must share the same spatial size.

    Args:
        keys: keys of the items to resize (e.g. ``("image", "label")``).
        size: target length of the longest side (the backbone input size ``S``).
        mode: interpolation per key; ``"bilinear"`` for images, ``"nearest-exact"`` for labels.
        anti_aliasing: per key; defaults to ``True`` for non-nearest modes only, so labels stay integral.
        original_size_key: where to store the size before resizing.
        input_size_key: where to store the resized, unpadded size.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        size: int,
        mode: Sequence[str] | str = ("bilinear", "nearest-exact"),
        anti_aliasing: Sequence[bool] | bool | None = None,
        original_size_key: str = "original_size",
        input_size_key: str = "input_size",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        modes = ensure_tuple_rep(mode, len(self.keys))
        if anti_aliasing is None:
            anti_aliasing = tuple(str(m) not in NEAREST_MODES for m in modes)
        self.size = int(size)
        self.original_size_key = original_size_key
        self.input_size_key = input_size_key
        self.resizer = Resized(
            self.keys,
            spatial_size=self.size,
            size_mode="longest",
            mode=modes,
            anti_aliasing=anti_aliasing,
            allow_missing_keys=allow_missing_keys,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        shapes = {k: tuple(d[k].shape[1:]) for k in keys}
        if len(set(shapes.values())) > 1:
            detail = ", ".join(f"'{k}'{_source_name(d[k])}: {s}" for k, s in shapes.items())
            raise ValueError(f"spatial sizes differ between keys: {detail}")
        original = shapes[keys[0]]
        d = self.resizer(d)
        d[self.original_size_key] = torch.tensor(original, dtype=torch.int64)
        d[self.input_size_key] = torch.tensor(tuple(d[keys[0]].shape[1:]), dtype=torch.int64)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        # our own key_iterator: Invertd relaxes allow_missing_keys on this transform, not on the wrapped Resized
        for key in self.key_iterator(d):
            d[key] = self.resizer.resizer.inverse(d[key])
        return d


class LabelToTargetsd(MapTransform):
    """Turn a label map ``(1, H, W)`` into per-class ``masks``, ``boxes`` and ``present`` targets.

    A class counts as present when it has at least ``min_pixels`` pixels; for an absent class the mask, the box
    and the presence flag are all zero (so the three targets never disagree). Boxes are
    ``(x_min, y_min, x_max, y_max)`` with inclusive max indices, in the pixel coordinates of the tensor
    (``x`` = column). Outputs are plain float32 tensors; the label map is kept.

    Args:
        keys: the label key (one key).
        num_classes: number of foreground classes ``K``; label values must lie in ``0..K``.
        min_pixels: minimum area for a class to count as present.
        masks_key: output key for the ``(K, H, W)`` masks.
        boxes_key: output key for the ``(K, 4)`` boxes.
        present_key: output key for the ``(K,)`` presence flags.
        allow_missing_keys: don't raise if the label is missing.

    Raises:
        ValueError: the label is not ``(1, H, W)``, not integral, or has values outside ``0..K`` (e.g. a 0/255
            mask); the message names the source file.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        num_classes: int = 1,
        min_pixels: int = 1,
        masks_key: str = "masks",
        boxes_key: str = "boxes",
        present_key: str = "present",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"LabelToTargetsd takes one label key, got {self.keys}")
        if num_classes < 1 or min_pixels < 1:
            raise ValueError(f"num_classes and min_pixels must be >= 1, got {num_classes}, {min_pixels}")
        self.num_classes = num_classes
        self.min_pixels = min_pixels
        self.masks_key, self.boxes_key, self.present_key = masks_key, boxes_key, present_key

    def _label_map(self, key: Hashable, label: Any) -> torch.Tensor:
        lab = torch.as_tensor(label)
        if isinstance(lab, torch.Tensor) and hasattr(lab, "as_tensor"):
            lab = lab.as_tensor()
        where = f"'{key}'{_source_name(label)}"
        if lab.ndim != 3 or lab.shape[0] != 1:
            raise ValueError(f"{where} must be a label map of shape (1, H, W), got {tuple(lab.shape)}")
        if lab.is_floating_point() and not bool(torch.equal(lab, lab.round())):
            raise ValueError(f"{where} has non-integer values; labels need nearest-neighbour interpolation")
        lab = lab[0].long()
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) > self.num_classes):
            raise ValueError(
                f"{where} has values {sorted(torch.unique(lab).tolist())}, expected 0..{self.num_classes} "
                "(0 = background, k = class k)"
            )
        return lab

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = self._label_map(key, d[key])
            classes = torch.arange(1, self.num_classes + 1).view(-1, 1, 1)
            masks = lab.unsqueeze(0) == classes
            present = masks.flatten(1).sum(dim=1) >= self.min_pixels
            masks &= present.view(-1, 1, 1)
            d[self.masks_key] = masks.float()
            d[self.boxes_key] = masks_to_boxes(masks).float()  # inclusive corners, zeros when empty
            d[self.present_key] = present.float()
        return d


def _check_stats(name: str, values: Sequence[float]) -> list[float]:
    values = [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{name} needs 3 per-channel values, got {values}")
    return values


def load_transforms(
    image_key: str = "image",
    label_key: str | None = "label",
    extra_readers: Sequence[ImageReader] = (),
    load: bool = True,
) -> list[Any]:
    """Load a frame (and its label map) channel-first with ``H`` = rows, the image as 3 channels.

    Args:
        image_key: key of the image path.
        label_key: key of the label path, or ``None`` for inference without labels.
        extra_readers: readers tried before the project's (ultrasound DICOM, PIL, nibabel) and MONAI's defaults.
            ``LoadImage`` picks the first reader whose ``read`` does not raise (it does not check suffixes once a
            reader is named), so a reader's ``read`` must raise on files it does not handle.
        load: if False, the keys already hold channel-first tensors and only the channel fix-up runs.

    Returns:
        The transforms, to put in a ``Compose``.
    """
    keys = [image_key] if label_key is None else [image_key, label_key]
    out: list[Any] = []
    if load:
        # LoadImage tries named readers last-to-first by read() (logging each refusal): extra readers, then PIL with
        # reverse_indexing=False (PIL's (rows, columns) order), nibabel (array as stored), ultrasound DICOM (.dcm /
        # .dicom, read as bundle inference reads it), before MONAI's defaults; the common formats come first so that
        # they log nothing. Naming nibabel keeps NIfTI away from the slow-to-import ITK reader.
        readers = [UltrasoundDicomReader(), NibabelReader(), PILReader(reverse_indexing=False), *extra_readers]
        out.append(LoadImaged(keys, reader=readers, ensure_channel_first=True, image_only=True))
    out.append(EnsureChannelsd(image_key, channels=3))
    out.append(To0To255d(image_key))
    if label_key is not None:
        out.append(EnsureChannelsd(label_key, channels=1))
    return out


def preprocessing_transforms(
    size: int,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    num_classes: int,
    image_key: str = "image",
    label_key: str | None = "label",
    min_pixels: int = 1,
    with_targets: bool = True,
    extra_readers: Sequence[ImageReader] = (),
    load: bool = True,
) -> Compose:
    """Deterministic preprocessing: load, 3 channels, resize longest side, normalise, pad bottom/right, targets.

    Args:
        size: backbone input size ``S`` (256 for LiteMedSAM, 1024 for SAM / SAM2).
        pixel_mean: per-channel mean on the 0..255 scale (LiteMedSAM: 0, SAM: ImageNet mean * 255).
        pixel_std: per-channel std on the 0..255 scale (LiteMedSAM: 255, SAM: ImageNet std * 255).
        num_classes: number of foreground classes ``K``.
        image_key: key of the image path.
        label_key: key of the label path, or ``None`` for inference without labels.
        min_pixels: minimum area for a class to count as present.
        with_targets: append :class:`LabelToTargetsd` (skip it when augmentation follows and recomputes them).
        extra_readers: see :func:`load_transforms`.
        load: if False, start from channel-first tensors instead of paths.

    Returns:
        A ``Compose`` producing ``image`` (3, S, S) float32, ``label`` (1, S, S) uint8, ``original_size`` and
        ``input_size`` (int64 ``(H, W)``) and, with targets, ``masks`` (K, S, S), ``boxes`` (K, 4), ``present`` (K,).
    """
    mean, std = _check_stats("pixel_mean", pixel_mean), _check_stats("pixel_std", pixel_std)
    keys = [image_key] if label_key is None else [image_key, label_key]
    modes = ["bilinear", "nearest-exact"][: len(keys)]
    transforms = load_transforms(image_key, label_key, extra_readers, load) + [
        ResizeLongestSided(keys, size=size, mode=modes),
        NormalizeIntensityd(image_key, subtrahend=np.array(mean), divisor=np.array(std), channel_wise=True),
        # pad after normalising so that padding is 0 in normalised space, as SAM does
        SpatialPadd(keys, spatial_size=(size, size), method="end", mode="constant", value=0),
    ]
    if label_key is not None:
        transforms.append(CastToTyped(label_key, dtype=torch.uint8))
        if with_targets:
            transforms.append(LabelToTargetsd(label_key, num_classes=num_classes, min_pixels=min_pixels))
    return Compose(transforms)


def augmentation_transforms(
    size: int,
    prob: float = 0.5,
    image_key: str = "image",
    label_key: str = "label",
    num_classes: int | None = None,
    min_pixels: int = 1,
    rotate_degrees: float = 90.0,
    vertical_flip: bool = True,
) -> Compose:
    """The Sam2Rad paper's augmentation (section 4.2) on ``S x S`` tensors, each step with probability ``prob``.

    Steps, in this order (indices of ``Compose.transforms``): 0 horizontal flip, 1 vertical flip, 2 translation
    up to 20 % of ``S`` per axis, 3 rotation uniform in [-``rotate_degrees``, ``rotate_degrees``] (the paper: 90),
    4 random resized crop (each side uniform in [sqrt(0.8), 1] of ``S``, so the area lies in [0.8, 1]) and 5 resize
    back to ``S x S``. Bilinear for the image, nearest for the label; uncovered areas are 0 (background / normalised
    zero). The label is cast back to uint8, and with ``num_classes`` the targets are recomputed so that boxes follow
    the augmentation.

    An ultrasound frame always has depth running down from the probe at the top, so a vertical flip or a quarter
    turn makes frames no scanner produces: ``vertical_flip=False`` keeps step 1 as a no-op (indices stay put) and a
    small ``rotate_degrees`` keeps only the tilt of a hand-held probe.

    Args:
        size: the tensor size ``S`` (the data must already be ``S x S``).
        prob: probability of each step.
        image_key: image key.
        label_key: label key.
        num_classes: if given, append :class:`LabelToTargetsd`.
        min_pixels: minimum area for a class to count as present.
        rotate_degrees: largest rotation either way, in degrees.
        vertical_flip: whether step 1 flips upside down.

    Returns:
        A ``Compose``; seed it with ``set_random_state`` (see :func:`augment_view`).
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    if not isinstance(vertical_flip, bool):  # the bundle CLI passes "false" on as a (truthy) string
        raise TypeError(f"vertical_flip must be True or False, got {vertical_flip!r}")
    if not 0.0 <= rotate_degrees <= 180.0:
        raise ValueError(f"rotate_degrees must be in [0, 180], got {rotate_degrees}")
    keys = [image_key, label_key]
    mode, pad = ("bilinear", "nearest"), "zeros"
    side = math.sqrt(0.8)
    transforms: list[Any] = [
        RandFlipd(keys, prob=prob, spatial_axis=1),  # axis 1 of (H, W) = columns: horizontal flip
        RandFlipd(keys, prob=prob if vertical_flip else 0.0, spatial_axis=0),
        RandAffined(keys, prob=prob, translate_range=(0.2 * size, 0.2 * size), mode=mode, padding_mode=pad),
        RandRotated(keys, range_x=math.radians(rotate_degrees), prob=prob, keep_size=True, mode=mode,
                    padding_mode=pad),
        OneOf(
            [RandScaleCropd(keys, roi_scale=side, max_roi_scale=1.0, random_size=True), Identityd(keys)],
            weights=(prob, 1.0 - prob),
        ),
        # no-op unless the crop shrank the tensor
        Resized(keys, spatial_size=(size, size), mode=("bilinear", "nearest-exact")),
        CastToTyped(label_key, dtype=torch.uint8),
    ]
    if num_classes is not None:
        transforms.append(LabelToTargetsd(label_key, num_classes=num_classes, min_pixels=min_pixels))
    return Compose(transforms)


def view_seed(seed: int, view_index: int, image_key: str = "") -> int:
    """A stable 32-bit seed for (base seed, image, view), independent of Python's hash randomisation."""
    digest = hashlib.sha256(f"{int(seed)}/{image_key}/{int(view_index)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def augment_view(
    data: Mapping[Hashable, Any],
    view_index: int,
    seed: int = 0,
    image_key: str | None = None,
    prob: float = 0.5,
    num_classes: int | None = None,
    min_pixels: int = 1,
    transform: Compose | None = None,
) -> dict[Hashable, Any]:
    """Augmented view ``view_index`` of one preprocessed sample, reproducible across calls and processes.

    View 0 is the un-augmented sample. View ``k > 0`` seeds a fresh augmentation pipeline with
    :func:`view_seed` ``(seed, k, image_key)``, so the same (seed, image, view) always gives the same tensors and
    different images get different draws. A feature cache must therefore key its entries by the same
    ``image_key`` (default: ``data["id"]``), view index and seed.

    Args:
        data: output of :func:`preprocessing_transforms` (``S x S`` ``image`` and ``label``); not modified.
        view_index: 0 for no augmentation, ``k > 0`` for augmented view ``k``.
        seed: base seed of the run.
        image_key: identity of the image in the seed; defaults to ``str(data["id"])`` (empty if absent).
        prob: probability of each augmentation step.
        num_classes: recompute ``masks``/``boxes``/``present``; inferred from ``data["masks"]`` when present.
        min_pixels: minimum area for a class to count as present.
        transform: an augmentation ``Compose`` to seed and use instead of building one (not thread-safe).

    Returns:
        A new dict with the augmented ``image``/``label`` (and targets).
    """
    if view_index < 0:
        raise ValueError(f"view_index must be >= 0, got {view_index}")
    if num_classes is None and "masks" in data:
        num_classes = int(data["masks"].shape[0])
    if image_key is None:
        image_key = str(data.get("id", ""))
    if view_index == 0:
        if num_classes is None:
            return dict(data)
        return LabelToTargetsd("label", num_classes=num_classes, min_pixels=min_pixels)(data)
    if transform is None:
        size = int(data["image"].shape[-1])
        transform = augmentation_transforms(size, prob=prob, num_classes=num_classes, min_pixels=min_pixels)
    transform.set_random_state(seed=view_seed(seed, view_index, image_key))
    # MONAI random transforms that do not fire return their input and append to its applied_operations;
    # cloning keeps the caller's (possibly cached) tensors untouched
    copied = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    return transform(copied)
