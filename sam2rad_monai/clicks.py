"""Corrective clicks from the error between a prediction and the ground truth (simulated annotator).

A click on a missed pixel (false negative) is positive, a click on a wrongly segmented pixel (false positive) is
negative. The benchmark annotator clicks the deepest point of the largest error region (farthest from its border,
as in the interactive-segmentation literature); training draws the click at random inside the error, weighted by
the distance to the region's border, as SAM's iterative training does.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def error_click(pred: np.ndarray, target: np.ndarray, rng: np.random.Generator | None = None
                ) -> tuple[float, float, int] | None:
    """One corrective click ``(x, y, label)`` for a (H, W) boolean prediction against its (H, W) target.

    Args:
        pred: predicted mask.
        target: ground-truth mask.
        rng: ``None`` clicks the deepest point of the largest connected error region (deterministic); a generator
            samples a pixel of the whole error, with probability proportional to its distance to the border.

    Returns:
        ``(x, y, 1)`` on a missed pixel, ``(x, y, 0)`` on a false-positive pixel, ``None`` when there is no error.
    """
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    error = pred ^ target
    if not error.any():
        return None
    if rng is None:
        regions, count = ndimage.label(error)
        sizes = ndimage.sum_labels(error, regions, index=np.arange(1, count + 1))
        region = regions == (int(np.argmax(sizes)) + 1)
        # pad so that the image border counts as a region border
        depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    else:
        depth = ndimage.distance_transform_edt(np.pad(error, 1))[1:-1, 1:-1].ravel()
        index = rng.choice(depth.size, p=depth / depth.sum())
        y, x = np.unravel_index(int(index), error.shape)
    return float(x), float(y), int(target[y, x])
