"""Real usgra frames for tests, from the bundle's embedded sample (CC BY 4.0, Timm M. Kandaouroff, usgra-seg 2025;
``bundle/data/usgra_sample``), so a clone without ``../shared`` runs them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE = Path(__file__).resolve().parents[1] / "bundle" / "data" / "usgra_sample"
GREY_IDS = ("0015", "0017", "0018")  # 512 x 512 frames stored as L, each with nerve and vessel
WIDE_RGB = "0126"  # 761 x 632 RGB frame: non-square, so a transposed load would show
TWO_PART_NERVE = "0015"  # its nerve is two separate regions (779 and 540 px at 256)


def usgra_frame(stem: str, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A frame resized (longest side) and zero-padded to ``size``: (size, size, 3) uint8 image, (size, size) labels."""
    img = Image.open(SAMPLE / "images" / f"{stem}.png").convert("RGB")
    lab = Image.open(SAMPLE / "masks" / f"{stem}.png")
    scale = size / max(img.size)
    new = (round(img.width * scale), round(img.height * scale))
    image = np.zeros((size, size, 3), np.uint8)
    label = np.zeros((size, size), np.uint8)
    image[: new[1], : new[0]] = np.asarray(img.resize(new, Image.BILINEAR))
    label[: new[1], : new[0]] = np.asarray(lab.resize(new, Image.NEAREST))
    return image, label


def boxes_of(label: np.ndarray, num_classes: int = 2) -> np.ndarray:
    """Inclusive (x1, y1, x2, y2) box of each class in a label map (zeros when absent)."""
    out = np.zeros((num_classes, 4), np.float32)
    for k in range(1, num_classes + 1):
        ys, xs = np.nonzero(label == k)
        if len(xs):
            out[k - 1] = (xs.min(), ys.min(), xs.max(), ys.max())
    return out
