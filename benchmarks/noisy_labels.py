"""Noisy ground truth (Sam2Rad paper 4.9, Fig. 7): a copy of a dataset with a stated fraction of its training masks
corrupted, to train Sam2Rad and the UNet baseline on and score on the untouched test split.

    uv run python benchmarks/noisy_labels.py --dataset_dir ../shared/datasets/usgra_nerve --fraction 0.25 \\
        --seed 0 --output_dir bundle/runs/noisy/data0.25
    uv run python benchmarks/noisy_labels.py --summarise --sam2rad 0=bundle/runs/full050/eval/metrics.json \\
        0.25=bundle/runs/noisy/s2r_0.25/eval/metrics.json --unet 0=benchmarks/results/unet_full_rerun_amd.json \\
        0.25=bundle/runs/noisy/unet_0.25.json --output benchmarks/results/noisy_labels_usgra.json

The copy has the same ``images/`` (byte for byte), ``metadata.csv`` and test masks; of the labelled frames whose
split is ``train`` or ``val`` (validation labels are as noisy as training ones, as they would be for a user; where
the metadata has no ``val`` rows the carve-out is drawn from ``train``), ``round(fraction * N)`` are drawn by one
seeded permutation (the frames of a smaller fraction are a subset of those of a larger one), and every class
present in a drawn frame gets one of three corruptions, drawn uniformly, at a strength relative to that
structure's own size (``r``: the radius of a disc of its area, so no constant depends on the dataset's pixel
scale):

- ``erode``: binary erosion by ``u * r`` pixels, u uniform in [0.15, 0.35] (an under-drawn outline; a structure
  thinner than that vanishes, a missed label);
- ``cut``: the part beyond a random line through the structure removed, the line placed so that a share uniform in
  [0.25, 0.5] of its pixels goes (a partial mask, the paper's Fig. 7);
- ``shift``: the whole structure moved by ``u * r`` pixels, u uniform in [0.3, 0.6], in a uniform direction
  (pixels moved out of the frame are lost).

Classes are painted back in label order (a shifted structure may cover part of a lower one). ``corruption.json``
next to the copy lists each corrupted frame, the kind per class and the Dice of the corrupted mask against the
clean one, so the noise level is stated as a number. Masks are written as 8-bit greyscale PNG label maps.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from sam2rad_monai.metrics import per_class_scores

KINDS = ("erode", "cut", "shift")


def corrupt_structure(mask: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One binary structure (H, W) bool -> its corrupted version (H, W) bool, by ``kind`` (see the module doc)."""
    area = int(mask.sum())
    if area == 0:
        return mask.copy()
    radius = math.sqrt(area / math.pi)
    if kind == "erode":
        steps = max(1, round(rng.uniform(0.15, 0.35) * radius))
        return ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), iterations=steps)
    if kind == "cut":
        angle = rng.uniform(0.0, 2.0 * math.pi)
        ys, xs = np.nonzero(mask)
        projection = xs * math.cos(angle) + ys * math.sin(angle)
        limit = np.quantile(projection, 1.0 - rng.uniform(0.25, 0.5))
        out = mask.copy()
        out[ys[projection > limit], xs[projection > limit]] = False
        return out
    if kind == "shift":
        angle = rng.uniform(0.0, 2.0 * math.pi)
        distance = rng.uniform(0.3, 0.6) * radius
        dy, dx = round(distance * math.sin(angle)), round(distance * math.cos(angle))
        height, width = mask.shape
        out = np.zeros_like(mask)
        out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
            mask[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
        return out
    raise ValueError(f"unknown corruption '{kind}', expected one of {KINDS}")


def corrupt_label(label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[int, str]]:
    """A label map (H, W) of class indices -> (corrupted label map, {class: kind}) for every class present."""
    out = np.zeros_like(label)
    kinds: dict[int, str] = {}
    for cls in (int(c) for c in np.unique(label) if c > 0):
        kinds[cls] = KINDS[int(rng.integers(len(KINDS)))]
        out[corrupt_structure(label == cls, kinds[cls], rng)] = cls
    return out, kinds


def make_noisy_dataset(dataset_dir: str | Path, output_dir: str | Path, fraction: float, seed: int = 0
                       ) -> dict[str, Any]:
    """Write the noisy copy of ``dataset_dir`` (``images/``, ``masks/``, ``metadata.csv``) to ``output_dir``.

    Returns the manifest also written to ``output_dir/corruption.json``: the settings, the ids drawn, per corrupted
    frame the kind and the Dice against the clean mask per class, and the mean of those Dice per class.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    src, dst = Path(dataset_dir), Path(output_dir)
    metadata = src / "metadata.csv"
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} is missing: the noisy copy needs the split of every frame")
    with metadata.open(newline="") as f:
        rows = list(csv.DictReader(f))
    train_ids = sorted(r["id"] for r in rows if r["split"] in ("train", "val"))
    order = np.random.default_rng(seed).permutation(len(train_ids))
    drawn = sorted(train_ids[i] for i in order[:round(fraction * len(train_ids))])

    for folder in ("images", "masks"):  # a rerun into the same folder keeps nothing of the last one
        if (dst / folder).exists():
            shutil.rmtree(dst / folder)
    (dst / "masks").mkdir(parents=True)
    shutil.copytree(src / "images", dst / "images")
    shutil.copyfile(metadata, dst / "metadata.csv")
    frames: dict[str, Any] = {}
    for path in sorted((src / "masks").iterdir()):
        if path.stem not in drawn:
            shutil.copyfile(path, dst / "masks" / path.name)
            continue
        label = np.array(Image.open(path))  # writable: the metrics turn it into a tensor
        # one generator per frame, so a frame's corruption does not depend on which other frames were drawn
        rng = np.random.default_rng([seed, int(path.stem) if path.stem.isdigit() else zlib.crc32(path.stem.encode())])
        noisy, kinds = corrupt_label(label, rng)
        Image.fromarray(noisy.astype(np.uint8), mode="L").save(dst / "masks" / f"{path.stem}.png")
        scores = per_class_scores(noisy, label, int(label.max()))
        frames[path.stem] = {"kinds": {str(c): k for c, k in kinds.items()},
                             "dice": {str(c): round(scores[c]["dice"], 4) for c in kinds}}
    classes = sorted({c for frame in frames.values() for c in frame["dice"]})
    manifest = {"source": src.name, "fraction": fraction, "seed": seed, "train_frames": len(train_ids),
                "corrupted": len(drawn), "frames": frames,
                "mean_dice_of_corrupted_masks": {c: round(float(np.mean([f["dice"][c] for f in frames.values()
                                                                         if c in f["dice"]])), 4)
                                                 for c in classes}}
    (dst / "corruption.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def summarise(sam2rad: dict[str, str], unet: dict[str, str]) -> dict[str, Any]:
    """Test Dice per class against the noise fraction: ``{fraction: path}`` of Sam2Rad ``metrics.json`` files
    (evaluate.json, mode ``lp``) and of UNet result files (benchmarks/unet_baseline.py)."""
    rows: dict[str, Any] = {"sam2rad_lp": {}, "unet": {}}
    for fraction, path in sam2rad.items():
        metrics = json.loads(Path(path).read_text())["lp"]
        rows["sam2rad_lp"][fraction] = {c: v["dice"] for c, v in metrics.items()}
    for fraction, path in unet.items():
        result = json.loads(Path(path).read_text())
        rows["unet"][fraction] = {c: round(result[c]["dice"], 2) for c in ("nerve", "vessel")}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset_dir", help="folder with images/, masks/ and metadata.csv")
    p.add_argument("--fraction", type=float, help="share of the train / val masks to corrupt")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw of frames and of each corruption")
    p.add_argument("--output_dir", help="where the noisy copy goes")
    p.add_argument("--summarise", action="store_true", help="tabulate finished runs instead (--sam2rad, --unet)")
    p.add_argument("--sam2rad", nargs="*", default=[], help="FRACTION=metrics.json of evaluate.json (lp)")
    p.add_argument("--unet", nargs="*", default=[], help="FRACTION=result JSON of unet_baseline.py")
    p.add_argument("--output", help="summary JSON to write")
    args = p.parse_args()
    if args.summarise:
        rows = summarise(*(dict(v.split("=", 1) for v in pairs) for pairs in (args.sam2rad, args.unet)))
        for model, by_fraction in rows.items():
            for fraction, dice in sorted(by_fraction.items(), key=lambda kv: float(kv[0])):
                print(f"{model:10s} fraction {fraction:>5s}: nerve {dice['nerve']:6.2f}  vessel {dice['vessel']:6.2f}")
        if args.output:
            Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")
        return
    if args.dataset_dir is None or args.fraction is None or args.output_dir is None:
        p.error("--dataset_dir, --fraction and --output_dir make a noisy copy (or --summarise)")
    manifest = make_noisy_dataset(args.dataset_dir, args.output_dir, args.fraction, args.seed)
    print(json.dumps({k: v for k, v in manifest.items() if k != "frames"}))


if __name__ == "__main__":
    main()
