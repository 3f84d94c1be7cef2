"""Tests for sam2rad_monai.transforms: orientation, resize-longest + pad, targets, augmentation and views."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import ImageReader, MetaTensor
from monai.transforms import Compose, Invertd, RandFlipd
from PIL import Image

from sam2rad_monai.transforms import (
    EnsureChannelsd,
    LabelToTargetsd,
    ResizeLongestSided,
    augment_view,
    augmentation_transforms,
    load_transforms,
    preprocessing_transforms,
    view_seed,
)
from tests.frames import GREY_IDS, SAMPLE, WIDE_RGB

SAM_MEAN = [123.675, 116.28, 103.53]
SAM_STD = [58.395, 57.12, 57.375]
RGB_WIDE = WIDE_RGB  # 761 x 632 RGB
GREY = GREY_IDS[0]  # 512 x 512 stored as L


def _real(stem: str) -> dict[str, str]:
    image, label = SAMPLE / "images" / f"{stem}.png", SAMPLE / "masks" / f"{stem}.png"
    return {"image": str(image), "label": str(label), "id": stem}


@pytest.fixture(scope="module")
def pre_256() -> Compose:
    return preprocessing_transforms(256, SAM_MEAN, SAM_STD, num_classes=2)


@pytest.fixture(scope="module")
def real_256(pre_256: Compose) -> dict:
    """The wide RGB frame preprocessed to 256 with SAM normalisation."""
    return pre_256(_real(RGB_WIDE))


def _check_targets(d: dict, num_classes: int) -> None:
    """masks are the one-hot label, boxes the min/max of the masks, present the non-empty masks."""
    lab = torch.as_tensor(d["label"])[0].long()
    for k in range(num_classes):
        mask = lab == k + 1
        assert torch.equal(d["masks"][k], mask.float())
        assert d["present"][k].item() == float(mask.any())
        if mask.any():
            rows, cols = torch.nonzero(mask, as_tuple=True)
            expected = [cols.min(), rows.min(), cols.max(), rows.max()]
            assert d["boxes"][k].tolist() == [float(v) for v in expected]
        else:
            assert d["boxes"][k].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_load_keeps_rows_and_columns_of_real_frames() -> None:
    load = Compose(load_transforms())
    for stem in (RGB_WIDE, GREY):
        sample = _real(stem)
        d = load(sample)
        pil = np.asarray(Image.open(sample["image"]))
        expected = np.repeat(pil[None], 3, axis=0) if pil.ndim == 2 else pil.transpose(2, 0, 1)
        assert d["image"].shape == expected.shape
        assert d["image"].dtype == torch.float32
        np.testing.assert_array_equal(d["image"].numpy(), expected.astype(np.float32))
        np.testing.assert_array_equal(d["label"].numpy()[0], np.asarray(Image.open(sample["label"])))
    assert d["image"].shape[1:] == (512, 512)
    wide = load(_real(RGB_WIDE))
    assert wide["image"].shape == (3, 632, 761)  # (C, rows, columns)


def test_preprocessing_real_frame_resizes_longest_side_and_pads_bottom_right(real_256: dict) -> None:
    d = real_256
    assert d["image"].shape == (3, 256, 256) and d["image"].dtype == torch.float32
    assert d["label"].shape == (1, 256, 256) and d["label"].dtype == torch.uint8
    assert d["original_size"].tolist() == [632, 761]
    assert d["input_size"].tolist() == [round(632 * 256 / 761), 256]  # 213: aspect ratio kept
    h = int(d["input_size"][0])
    assert torch.count_nonzero(d["image"][:, h:, :]) == 0  # pad is 0 in normalised space
    assert torch.count_nonzero(d["label"][:, h:, :]) == 0
    raw = d["image"][:, :h] * torch.tensor(SAM_STD).view(3, 1, 1) + torch.tensor(SAM_MEAN).view(3, 1, 1)
    assert raw.min() > -1.0 and raw.max() < 256.0 and raw.std() > 10.0  # real, de-normalisable content
    assert set(torch.unique(d["label"]).tolist()) == {0, 1, 2}
    assert d["masks"].shape == (2, 256, 256) and d["boxes"].shape == (2, 4) and d["present"].tolist() == [1.0, 1.0]
    _check_targets(d, 2)


def test_invertd_maps_predictions_back_to_the_original_frame(pre_256: Compose, real_256: dict) -> None:
    d = dict(real_256, pred=MetaTensor(real_256["masks"].clone()))
    out = Invertd(keys="pred", transform=pre_256, orig_keys="image", nearest_interp=False)(d)
    assert out["pred"].shape == (2, 632, 761)
    gt = np.asarray(Image.open(_real(RGB_WIDE)["label"]))
    for k in (1, 2):
        pred, ref = out["pred"][k - 1].numpy() > 0.5, gt == k
        assert 2 * (pred & ref).sum() / (pred.sum() + ref.sum()) > 0.97  # only the 256-px round trip is lost


def test_resize_longest_side_on_portrait_and_pad_after_normalise() -> None:
    image = torch.zeros(1, 40, 20)  # black pixels: normalised to -mean/std, unlike the padding
    label = torch.zeros(1, 40, 20, dtype=torch.uint8)
    label[0, 8:16, 4:12] = 2
    out = Compose(
        [
            EnsureChannelsd("image", channels=3),
            ResizeLongestSided(["image", "label"], size=16),
        ]
    )({"image": image, "label": label})
    assert out["image"].shape == (3, 16, 8) and out["label"].shape == (1, 16, 8)
    assert out["original_size"].tolist() == [40, 20] and out["input_size"].tolist() == [16, 8]
    assert set(torch.unique(out["label"]).tolist()) == {0, 2}
    full = preprocessing_transforms(16, [10.0, 20.0, 30.0], [2.0, 4.0, 5.0], num_classes=2, load=False)
    d = full({"image": image, "label": label})
    assert torch.allclose(d["image"][:, :, :8], torch.tensor([-5.0, -5.0, -6.0]).view(3, 1, 1).expand(3, 16, 8))
    assert torch.count_nonzero(d["image"][:, :, 8:]) == 0
    assert d["boxes"][1].tolist() == [2.0, 3.0, 4.0, 5.0] and d["present"].tolist() == [0.0, 1.0]


def test_resize_longest_side_rejects_image_and_label_of_different_sizes() -> None:
    image = MetaTensor(torch.zeros(3, 10, 12), meta={"filename_or_obj": "frame_07.png"})
    with pytest.raises(ValueError, match="frame_07.png"):
        ResizeLongestSided(["image", "label"], size=8)({"image": image, "label": torch.zeros(1, 10, 10)})


def test_label_to_targets_boxes_presence_and_errors() -> None:
    label = torch.zeros(1, 12, 16, dtype=torch.uint8)
    label[0, 2:6, 3:10] = 1  # rows 2..5, columns 3..9
    label[0, 11, 15] = 3  # a 1-pixel class in the corner
    d = LabelToTargetsd("label", num_classes=3)({"label": label})
    assert d["boxes"].tolist() == [[3.0, 2.0, 9.0, 5.0], [0.0] * 4, [15.0, 11.0, 15.0, 11.0]]
    assert d["present"].tolist() == [1.0, 0.0, 1.0] and d["masks"].dtype == torch.float32
    _check_targets(d, 3)
    d = LabelToTargetsd("label", num_classes=3, min_pixels=2)({"label": label})
    assert d["present"].tolist() == [1.0, 0.0, 0.0] and d["masks"][2].sum() == 0 and d["boxes"][2].sum() == 0
    bad = MetaTensor(label * 85, meta={"filename_or_obj": "mask_0255.png"})
    with pytest.raises(ValueError, match="mask_0255.png"):
        LabelToTargetsd("label", num_classes=3)({"label": bad})
    with pytest.raises(ValueError, match="non-integer"):
        LabelToTargetsd("label", num_classes=3)({"label": label.float() + 0.5})


def test_ensure_channels_repeats_grey_and_rejects_colour_labels() -> None:
    grey = torch.arange(6.0).view(1, 2, 3)
    assert torch.equal(EnsureChannelsd("image")({"image": grey})["image"], grey.repeat(3, 1, 1))
    rgba = torch.rand(4, 2, 3)
    assert torch.equal(EnsureChannelsd("image")({"image": rgba})["image"], rgba[:3])
    assert EnsureChannelsd("label", channels=1)({"label": grey.repeat(3, 1, 1)})["label"].shape == (1, 2, 3)
    colour = MetaTensor(torch.rand(3, 2, 3), meta={"filename_or_obj": "rgb_mask.png"})
    with pytest.raises(ValueError, match="rgb_mask.png"):
        EnsureChannelsd("label", channels=1)({"label": colour})


def _synthetic(size: int = 64) -> dict:
    """A square S x S sample with a small class-1 square at the centre and a class-2 bar near the top."""
    label = torch.zeros(1, size, size, dtype=torch.uint8)
    c = size // 2
    label[0, c - 4 : c + 4, c - 4 : c + 4] = 1
    label[0, 4:8, 10:30] = 2
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    return LabelToTargetsd("label", num_classes=2)({"image": image, "label": label, "id": "synthetic"})


@pytest.mark.parametrize("axis", [0, 1])
def test_flips_map_boxes_exactly(axis: int) -> None:
    size = 64
    aug = augmentation_transforms(size, prob=1.0, num_classes=2)
    flip = aug.transforms[1 - axis]  # 0 = horizontal (columns), 1 = vertical (rows)
    assert isinstance(flip, RandFlipd)
    d = _synthetic(size)
    out = aug.transforms[-1](flip(d))
    before, after = d["boxes"], out["boxes"]
    lo, hi = (0, 2) if axis == 1 else (1, 3)  # x for the horizontal flip, y for the vertical one
    assert torch.equal(after[:, lo], size - 1 - before[:, hi])
    assert torch.equal(after[:, hi], size - 1 - before[:, lo])
    other = [1, 3] if axis == 1 else [0, 2]
    assert torch.equal(after[:, other], before[:, other])


def test_random_views_keep_labels_integral_and_boxes_on_masks() -> None:
    d = _synthetic(64)
    for k in range(1, 9):
        v = augment_view(d, k, seed=3, prob=0.5)
        assert v["image"].shape == (3, 64, 64) and v["label"].shape == (1, 64, 64)
        assert v["label"].dtype == torch.uint8
        assert set(torch.unique(v["label"]).tolist()) <= {0, 1, 2}
        assert v["present"][0] == 1.0  # the centre square cannot leave the frame
        _check_targets(v, 2)


def test_every_step_at_once_on_a_real_frame(real_256: dict) -> None:
    values = set(torch.unique(real_256["label"]).tolist())
    for k in (1, 2):
        v = augment_view(real_256, k, seed=0, prob=1.0)
        assert set(torch.unique(v["label"]).tolist()) <= values
        assert not torch.equal(v["label"], real_256["label"])
        _check_targets(v, 2)
        assert v["present"].sum() >= 1  # rotation keeps the centred anatomy in view


def test_views_are_reproducible_and_distinct(real_256: dict) -> None:
    ops_before = len(real_256["image"].applied_operations)
    label_before = real_256["label"].clone()
    v0 = augment_view(real_256, 0, seed=0)
    assert torch.equal(v0["image"], real_256["image"]) and torch.equal(v0["boxes"], real_256["boxes"])
    views = [augment_view(real_256, k, seed=0) for k in range(1, 5)]
    again = [augment_view(real_256, k, seed=0) for k in range(1, 5)]
    for a, b in zip(views, again):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["boxes"], b["boxes"])
    for i in range(len(views)):
        for j in range(i + 1, len(views)):
            assert not torch.equal(views[i]["image"], views[j]["image"]), (i + 1, j + 1)
    other_seed = augment_view(real_256, 1, seed=1)
    other_image = augment_view(real_256, 1, seed=0, image_key="another-image")
    assert not torch.equal(other_seed["image"], views[0]["image"])
    assert not torch.equal(other_image["image"], views[0]["image"])
    assert len(real_256["image"].applied_operations) == ops_before  # input left untouched
    assert torch.equal(real_256["label"], label_before)


def test_view_seed_is_stable_and_prob_zero_is_identity() -> None:
    assert view_seed(0, 1, "a") == view_seed(0, 1, "a") != view_seed(0, 2, "a")
    assert 0 <= view_seed(123, 7, "x") < 2**32
    d = _synthetic(32)
    v = augment_view(d, 5, seed=0, prob=0.0)
    assert torch.equal(v["image"], d["image"]) and torch.equal(v["label"], d["label"])
    with pytest.raises(ValueError):
        augment_view(d, -1)


def test_augmentation_ranges_match_the_paper() -> None:
    aug = augmentation_transforms(100, prob=0.5)
    hflip, vflip, shift, rotate, crop = aug.transforms[:5]
    assert (hflip.flipper.spatial_axis, vflip.flipper.spatial_axis) == (1, 0)
    assert all(t.prob == 0.5 for t in (hflip, vflip, shift, rotate))
    assert list(shift.rand_affine.rand_affine_grid.translate_range) == [20.0, 20.0]  # uniform in (-x, x) pixels
    assert rotate.rand_rotate.range_x == pytest.approx((-math.pi / 2, math.pi / 2))
    assert list(crop.weights) == [0.5, 0.5]
    roi = crop.transforms[0].cropper
    assert roi.roi_scale == pytest.approx(math.sqrt(0.8)) and roi.max_roi_scale == 1.0


def test_ultrasound_geometry_option_keeps_depth_down() -> None:
    aug = augmentation_transforms(100, prob=0.5, rotate_degrees=15.0, vertical_flip=False)
    _, vflip, _, rotate = aug.transforms[:4]
    assert vflip.prob == 0.0 and rotate.rand_rotate.range_x == pytest.approx((-math.radians(15), math.radians(15)))
    d = _synthetic(64)
    for k in range(1, 17):  # the class-2 bar near the top never moves to the bottom half
        v = augment_view(d, k, seed=0, transform=augmentation_transforms(64, rotate_degrees=15.0,
                                                                         vertical_flip=False, num_classes=2))
        ys = torch.nonzero(v["label"][0] == 2, as_tuple=True)[0]
        assert len(ys) == 0 or ys.float().mean() < 32
    with pytest.raises(TypeError, match="vertical_flip"):
        augmentation_transforms(64, vertical_flip="false")
    with pytest.raises(ValueError, match="rotate_degrees"):
        augmentation_transforms(64, rotate_degrees=270.0)


class _RowsReader(ImageReader):
    """A stand-in for a project reader: '.rows' files hold a (rows, columns) text array."""

    def verify_suffix(self, filename) -> bool:
        return str(filename).endswith(".rows")

    def read(self, data, **kwargs):
        name = str(data[0] if isinstance(data, (list, tuple)) else data)
        if not self.verify_suffix(name):  # LoadImage tries user readers by read(), not by suffix
            raise ValueError(f"not a .rows file: {name}")
        return np.loadtxt(name, dtype=np.float32, ndmin=2)

    def get_data(self, img):
        meta = {"original_channel_dim": float("nan"), "spatial_shape": np.asarray(img.shape), "affine": np.eye(3)}
        return img, meta


def test_extra_readers_take_priority(tmp_path: Path) -> None:
    path = tmp_path / "frame.rows"
    np.savetxt(path, np.arange(6.0).reshape(2, 3))
    load = Compose(load_transforms(extra_readers=[_RowsReader()]))
    d = load({"image": str(path), "label": _real(GREY)["label"]})  # PNGs still go to PIL
    assert d["image"].shape == (3, 2, 3) and d["image"][0, 1, 2] == 5.0
    assert d["label"].shape == (1, 512, 512)


def test_nifti_frames_keep_their_array_axes(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    rows_cols = np.arange(12, dtype=np.uint8).reshape(3, 4)
    nib.save(nib.Nifti1Image(rows_cols, np.eye(4)), tmp_path / "frame.nii.gz")
    one_slice = (rows_cols > 6).astype(np.uint8)[:, :, None]  # 2D masks are often saved as (H, W, 1)
    nib.save(nib.Nifti1Image(one_slice, np.eye(4)), tmp_path / "mask.nii.gz")
    d = Compose(load_transforms())({"image": str(tmp_path / "frame.nii.gz"), "label": str(tmp_path / "mask.nii.gz")})
    assert d["image"].shape == (3, 3, 4) and torch.equal(d["image"][1], torch.from_numpy(rows_cols).float())
    assert d["label"].shape == (1, 3, 4) and d["label"][0, 2, 3] == 1


def test_sixteen_bit_frame_reaches_the_model_as_in_inference(tmp_path: Path) -> None:
    """One intensity rule: a 16-bit PNG is scaled onto 0..255 by its own range in training and in inference alike."""
    from sam2rad_monai.inputs import read_frames

    deep = (np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 20 + 1000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    loaded = Compose(load_transforms(label_key=None))({"image": str(tmp_path / "deep.png")})["image"]
    assert loaded.shape == (3, 40, 50) and float(loaded.min()) == 0.0 and float(loaded.max()) == pytest.approx(255.0)
    inferred = read_frames(tmp_path / "deep.png")[0]  # (H, W, 3)
    np.testing.assert_allclose(np.asarray(loaded).transpose(1, 2, 0), inferred, atol=1e-4)
    eight = np.asarray(Image.open(SAMPLE / "images" / f"{GREY}.png"))  # 8-bit frames are left as they are
    same = Compose(load_transforms(label_key=None))({"image": str(SAMPLE / "images" / f"{GREY}.png")})["image"]
    assert torch.equal(same[0], torch.from_numpy(eight).float())
