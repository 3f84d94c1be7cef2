"""Datalists for an ``images/`` + ``masks/`` folder, in MONAI's list-of-dicts convention.

Layout::

    dataset_dir/
        images/<id>.png|.jpg|.jpeg|.bmp|.tif|.tiff|.nii|.nii.gz|.dcm|.dicom   # DICOM: one ultrasound frame per file
        masks/<id>.<same kinds>          # uint8 label map, same stem as the image
        metadata.csv                     # optional: id, split (train/val/test), subject_id

Each entry is ``{"image": path, "label": path, "id": stem}`` with absolute paths. Splits come from the
``split`` column of ``metadata.csv`` (all images are ``train`` without it). When no ``val`` rows exist, a
validation subset is carved out of ``train``: by subject when a ``subject_id`` column exists (no subject on both
sides), else by image; ``num_images`` then draws a few-shot subset of what remains of ``train``. Both draws are
deterministic functions of ``seed`` and of the sorted ids, and a smaller few-shot draw is a subset of a larger
one with the same seed.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import overload

import numpy as np

from .io.atomic import atomic_write_bytes
from .io.dicom import DICOM_SUFFIXES
from .io.nifti import NIFTI_SUFFIXES

__all__ = ["IMAGE_SUFFIXES", "PICTURE_SUFFIXES", "SPLITS", "build_datalist", "write_datalist_json"]

SPLITS = ("train", "val", "test")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # 2D pictures, read through PIL
IMAGE_SUFFIXES = NIFTI_SUFFIXES + PICTURE_SUFFIXES + DICOM_SUFFIXES  # the file kinds of a dataset folder
_VAL_STREAM, _FEW_SHOT_STREAM = 0, 1  # independent random streams per purpose, both derived from the seed

Entry = dict[str, str]


def _stem_and_suffix(path: Path) -> tuple[str, str] | None:
    name = path.name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return path.name[: -len(suffix)], suffix
    return None


def _scan(folder: Path) -> dict[str, Path]:
    """Map stem -> file for the supported image files of a folder (hidden and other files are ignored)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        parsed = None if path.name.startswith(".") or not path.is_file() else _stem_and_suffix(path)
        if parsed is None:
            continue
        stem = parsed[0]
        if stem in found:
            raise ValueError(f"two files share the id '{stem}': {found[stem]} and {path}")
        found[stem] = path
    return found


def _pair_files(dataset_dir: Path, require_labels: bool) -> dict[str, Entry]:
    images_dir, masks_dir = dataset_dir / "images", dataset_dir / "masks"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"no images/ folder in {dataset_dir}")
    images = _scan(images_dir)
    if not images:
        raise FileNotFoundError(f"{images_dir} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    if not masks_dir.is_dir():
        if require_labels:
            raise FileNotFoundError(f"no masks/ folder in {dataset_dir}")
        return {stem: {"image": str(p.resolve()), "id": stem} for stem, p in images.items()}
    masks = _scan(masks_dir)
    if require_labels:
        for stem, path in images.items():
            if stem not in masks:
                raise FileNotFoundError(f"image {path} has no mask in {masks_dir} (same file stem expected)")
    for stem, path in masks.items():
        if stem not in images:
            raise FileNotFoundError(f"mask {path} has no image in {images_dir} (same file stem expected)")
    entries: dict[str, Entry] = {}
    for stem, path in images.items():
        entries[stem] = {"image": str(path.resolve()), "id": stem}
        if stem in masks:
            entries[stem]["label"] = str(masks[stem].resolve())
    return entries


def _read_metadata(path: Path, ids: Sequence[str]) -> tuple[dict[str, str], dict[str, str] | None]:
    """Split and (if there is a ``subject_id`` column) subject per image id; rows without an image are ignored."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if "id" not in columns:
        raise ValueError(f"{path} has no 'id' column (columns: {columns})")
    by_id: dict[str, dict[str, str]] = {}
    for row in rows:
        if row["id"] in by_id:
            raise ValueError(f"{path}: id '{row['id']}' appears twice")
        by_id[row["id"]] = row
    for image_id in ids:
        if image_id not in by_id:
            raise ValueError(f"{path} has no row for image id '{image_id}'")
    splits = {}
    for image_id in ids:
        value = by_id[image_id].get("split", "train").lower() if "split" in columns else "train"
        if value not in SPLITS:
            raise ValueError(f"{path}: unknown split '{value}' for id '{image_id}' (expected one of {SPLITS})")
        splits[image_id] = value
    subjects = None
    if "subject_id" in columns:
        # an image without a subject is its own subject, so it cannot leak across the split
        subjects = {i: by_id[i]["subject_id"] or f"__image__{i}" for i in ids}
    return splits, subjects


def _carve_validation(
    train_ids: list[str], subjects: Mapping[str, str] | None, val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Move about ``val_fraction`` of the train units (subjects, else images) to validation."""
    units = sorted({subjects[i] for i in train_ids}) if subjects is not None else sorted(train_ids)
    n_val = min(max(round(val_fraction * len(units)), 1), len(units) - 1) if val_fraction > 0 else 0
    if n_val <= 0:
        return train_ids, []
    order = np.random.default_rng([seed, _VAL_STREAM]).permutation(len(units))
    val_units = {units[j] for j in order[:n_val]}
    unit_of = (lambda i: subjects[i]) if subjects is not None else (lambda i: i)
    return [i for i in train_ids if unit_of(i) not in val_units], [i for i in train_ids if unit_of(i) in val_units]


def _few_shot(train_ids: list[str], num_images: int, seed: int, where: Path) -> list[str]:
    if num_images < 1 or num_images > len(train_ids):
        raise ValueError(f"num_images={num_images} but {where} has {len(train_ids)} training images")
    # a permutation prefix, so a smaller draw is a subset of a larger one with the same seed
    order = np.random.default_rng([seed, _FEW_SHOT_STREAM]).permutation(len(train_ids))
    return sorted(train_ids[j] for j in order[:num_images])


@overload
def build_datalist(
    dataset_dir: str | Path,
    split: None = None,
    num_images: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    require_labels: bool = True,
) -> dict[str, list[Entry]]: ...


@overload
def build_datalist(
    dataset_dir: str | Path,
    split: str,
    num_images: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    require_labels: bool = True,
) -> list[Entry]: ...


def build_datalist(
    dataset_dir: str | Path,
    split: str | None = None,
    num_images: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    require_labels: bool = True,
) -> list[Entry] | dict[str, list[Entry]]:
    """Build MONAI datalists from ``dataset_dir/images`` + ``dataset_dir/masks`` (+ optional ``metadata.csv``).

    Args:
        dataset_dir: the dataset folder.
        split: ``"train"``, ``"val"`` or ``"test"`` for one list; ``None`` for a dict of all three.
        num_images: draw this many training images (few-shot); ``None`` keeps them all.
        seed: seed of the validation carve-out and of the few-shot draw.
        val_fraction: fraction of train subjects (or images) moved to ``val`` when metadata has no ``val`` rows.
        require_labels: if False, images without masks are allowed (entries then have no ``"label"``).

    Returns:
        A list of ``{"image", "label", "id"}`` dicts sorted by id, or ``{"train": [...], "val": [...],
        "test": [...]}`` when ``split`` is None.

    Raises:
        FileNotFoundError: a missing or empty folder, an image without a mask, a mask without an image.
        ValueError: a bad ``metadata.csv`` (missing id column or row, unknown split value), a bad ``split``,
            ``val_fraction`` or ``num_images``.
    """
    dataset_dir = Path(dataset_dir)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got '{split}'")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder {dataset_dir} does not exist")
    entries = _pair_files(dataset_dir, require_labels)
    ids = sorted(entries)
    metadata = dataset_dir / "metadata.csv"
    if metadata.is_file():
        splits, subjects = _read_metadata(metadata, ids)
    else:
        splits, subjects = {i: "train" for i in ids}, None
    groups = {name: [i for i in ids if splits[i] == name] for name in SPLITS}
    if not groups["val"]:
        groups["train"], groups["val"] = _carve_validation(groups["train"], subjects, val_fraction, seed)
    if num_images is not None:
        groups["train"] = _few_shot(groups["train"], num_images, seed, dataset_dir)
    lists = {name: [entries[i] for i in group] for name, group in groups.items()}
    return lists if split is None else lists[split]


def write_datalist_json(datalists: Mapping[str, Sequence[Entry]], path: str | Path) -> Path:
    """Write ``{"training", "validation", "testing"}`` JSON readable by ``monai.data.load_decathlon_datalist``."""
    names = {"train": "training", "val": "validation", "test": "testing"}
    payload = {names.get(k, k): list(v) for k, v in datalists.items()}
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(payload, indent=4) + "\n").encode())  # a crash leaves no half datalist
    return path
