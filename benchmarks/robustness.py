"""Robustness to heavy augmentation (Sam2Rad paper 4.8, Fig. 5): test frames under the training augmentation.

    uv run python benchmarks/robustness.py --dataset_dir ../shared/datasets/usgra_nerve \\
        --model_path bundle/models/model.pt --unet_model unet_full.pt \\
        --output benchmarks/results/robustness_usgra_0.7.0.json --figure docs/robustness_usgra.png \\
        --overlays docs/robustness_overlays_usgra.png

Every usgra test frame is perturbed at its own resolution (frame bilinear, mask nearest; uncovered pixels zero) by
one seeded draw per (frame, setting) -- the same perturbed frames for every model -- and each model is scored on the
perturbed frame against the perturbed mask (per-class Dice, empty-mask policy, :mod:`sam2rad_monai.metrics`):

- ``clean``; each step of the paper's augmentation alone: ``hflip``, ``vflip``, ``translate`` (up to 20 % of each
  side, uniform per axis), ``rotate`` (uniform in [-90, 90] degrees), ``crop`` (a random crop of area uniform in
  [0.8, 1] of the frame, same aspect, resized back to the frame); ``all`` (the five in that order);
- strength curves: rotation by exactly +-a degrees (sign drawn) for a in ``--angles``, translation by exactly
  +-t of each side for t in ``--shifts``.

Models: Sam2Rad ``lp`` (learned prompts only) and ``box`` (the frozen backbone prompted with the perturbed mask's
box: the zero-shot baseline) with the given model file; the UNet baseline (benchmarks/unet_baseline.py
``--save_model``) when ``--unet_model`` is given. Results are written after every setting, and a rerun skips the
settings already in ``--output`` (resumable).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Affine, Flip, Resize, SpatialCrop
from PIL import Image

from sam2rad_monai.data import build_datalist
from sam2rad_monai.engine.evaluation import gt_box_prompts, load_frame, overlay
from sam2rad_monai.inference import Sam2RadPredictor
from sam2rad_monai.metrics import SegmentationScores
from sam2rad_monai.transforms import preprocessing_transforms

CLASS_NAMES = ("nerve", "vessel")
STEPS = ("hflip", "vflip", "translate", "rotate", "crop")


def perturb(image: np.ndarray, label: np.ndarray, steps: list[tuple[str, float | None]], rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``steps`` ((name, fixed strength or None for the paper's random range)) to a frame (H, W, 3) float
    and its label map (H, W); returns both at the frame's size."""
    img = torch.as_tensor(image.transpose(2, 0, 1).copy(), dtype=torch.float32)
    lab = torch.as_tensor(label[None].astype(np.float32))
    h, w = label.shape
    for name, strength in steps:
        if name in ("hflip", "vflip"):
            flip = Flip(spatial_axis=1 if name == "hflip" else 0)
            img, lab = flip(img), flip(lab)
        elif name == "translate":
            frac = rng.uniform(-0.2, 0.2, 2) if strength is None else strength * rng.choice([-1, 1], 2)
            params = (float(frac[0] * h), float(frac[1] * w))
            img = Affine(translate_params=params, padding_mode="zeros", image_only=True)(img, mode="bilinear")
            lab = Affine(translate_params=params, padding_mode="zeros", image_only=True)(lab, mode="nearest")
        elif name == "rotate":
            degrees = rng.uniform(-90, 90) if strength is None else strength * rng.choice([-1, 1])
            rot = math.radians(float(degrees))
            img = Affine(rotate_params=rot, padding_mode="zeros", image_only=True)(img, mode="bilinear")
            lab = Affine(rotate_params=rot, padding_mode="zeros", image_only=True)(lab, mode="nearest")
        elif name == "crop":
            side = math.sqrt(rng.uniform(0.8, 1.0))
            ch, cw = max(1, round(h * side)), max(1, round(w * side))
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crop = SpatialCrop(roi_start=(y0, x0), roi_end=(y0 + ch, x0 + cw))
            img = Resize((h, w), mode="bilinear", anti_aliasing=False)(crop(img))
            lab = Resize((h, w), mode="nearest")(crop(lab))
        else:
            raise ValueError(f"unknown perturbation {name!r}")
    image_out = np.clip(np.asarray(img).transpose(1, 2, 0), 0, 255)
    return image_out, np.asarray(lab)[0].round().astype(np.uint8)


def settings(angles: list[float], shifts: list[float]) -> dict[str, list[tuple[str, float | None]]]:
    out: dict[str, list[tuple[str, float | None]]] = {"clean": []}
    out.update({step: [(step, None)] for step in STEPS})
    out["all"] = [(step, None) for step in STEPS]
    out.update({f"rotate_{a:g}deg": [("rotate", a)] for a in angles})
    out.update({f"translate_{t:g}": [("translate", t)] for t in shifts})
    return out


class UNetScorer:
    """The UNet baseline on an in-memory frame, as benchmarks/unet_baseline.py scores it (predict at 256, crop the
    padding, resize the logits to the frame, argmax)."""

    def __init__(self, path: str, arch: str = "unet") -> None:
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from unet_baseline import SIZE, build_unet

        self.net = build_unet(arch)
        self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.net.eval()
        self.pre = preprocessing_transforms(SIZE, [0.0] * 3, [255.0] * 3, len(CLASS_NAMES), label_key=None, load=False)

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        data = self.pre({"image": torch.as_tensor(image.transpose(2, 0, 1).copy(), dtype=torch.float32)})
        h, w = (int(v) for v in data["input_size"])
        logits = self.net(torch.as_tensor(data["image"])[None].float())[:, :, :h, :w]
        return F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)[0].argmax(0).numpy()


def run(args: argparse.Namespace) -> dict[str, Any]:
    out_path = Path(args.output)
    result: dict[str, Any] = json.loads(out_path.read_text()) if out_path.is_file() else {}
    result.setdefault("settings", {})
    test = build_datalist(args.dataset_dir, split="test")[:args.num_frames]
    if result.get("n_test", len(test)) != len(test):
        raise ValueError(f"{out_path} scored {result['n_test']} test frames, this run {len(test)}: use another "
                         "--output to resume")
    predictor = Sam2RadPredictor.from_checkpoint(args.model_path, len(CLASS_NAMES))
    unet = UNetScorer(args.unet_model, args.unet_arch) if args.unet_model else None
    frames = [load_frame(item) for item in test]
    for name, steps in settings(args.angles, args.shifts).items():
        if name in result["settings"]:
            continue
        t0 = time.perf_counter()
        scores = {m: SegmentationScores(len(CLASS_NAMES), list(CLASS_NAMES)) for m in ("lp", "box", "unet")}
        for index, (item, (image, label)) in enumerate(zip(test, frames)):
            rng = np.random.default_rng([args.seed, index, sum(map(ord, name))])
            img, lab = perturb(image, label, steps, rng)
            features, _ = predictor.encode([img])
            lp = predictor.predict([img], "autonomous", features=features)[0].label_map
            box = predictor.predict([img], "manual", [gt_box_prompts(lab, len(CLASS_NAMES))], features=features)[0]
            scores["lp"].add(item["id"], lp, lab)
            scores["box"].add(item["id"], box.label_map, lab)
            if unet is not None:
                scores["unet"].add(item["id"], unet(img), lab)
        result["settings"][name] = {
            model: {CLASS_NAMES[k - 1]: round(v["dice"], 2) for k, v in s.summary().items()}
            for model, s in scores.items() if len(s)}
        result["settings"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        result.update({"model_path": str(args.model_path), "unet_model": args.unet_model, "seed": args.seed,
                       "n_test": len(test), "units": "Dice %, per class over the test frames, empty-mask policy",
                       "machine": args.machine or platform.processor() or platform.machine()})
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out_path)
        print(name, json.dumps(result["settings"][name]), flush=True)
    if args.overlays:
        write_overlays(args, predictor, unet, test, frames)
    return result


def write_overlays(args: argparse.Namespace, predictor: Sam2RadPredictor, unet: UNetScorer | None,
                   test: list[dict[str, Any]], frames: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Rows of (ground truth | lp) and (ground truth | UNet) overlays of the first frames under ``all``."""
    rows = []
    steps = settings(args.angles, args.shifts)["all"]
    for index in range(args.num_overlays):
        image, label = frames[index]
        img, lab = perturb(image, label, steps, np.random.default_rng([args.seed, index, sum(map(ord, "all"))]))
        lp = predictor.predict([img])[0].label_map
        panels = [overlay(img, lab, lp, len(CLASS_NAMES))]
        if unet is not None:
            panels.append(overlay(img, lab, unet(img), len(CLASS_NAMES))[:, img.shape[1]:])
        row = np.concatenate(panels, axis=1)
        rows.append(np.asarray(Image.fromarray(row).resize((768 * row.shape[1] // (2 * img.shape[1]), 384))))
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    Image.fromarray(grid).save(args.overlays)


def figure(result: dict[str, Any], path: str) -> None:
    """Dice against rotation angle and against translation, per model and class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, prefix, unit, scale in ((axes[0], "rotate_", "deg", 1.0), (axes[1], "translate_", "", 100.0)):
        keys = sorted((k for k in s if k.startswith(prefix) and k != "translate" and k != "rotate"),
                      key=lambda k: float(k[len(prefix):].replace("deg", "")))
        xs = [0.0] + [float(k[len(prefix):].replace("deg", "")) * scale for k in keys]
        for model, style in (("lp", "-"), ("box", ":"), ("unet", "--")):
            if model not in s["clean"]:
                continue
            for name, colour in zip(CLASS_NAMES, ("tab:blue", "tab:red")):
                ys = [s["clean"][model][name]] + [s[k][model][name] for k in keys]
                ax.plot(xs, ys, style, color=colour, marker="o", label=f"{model} {name}")
        ax.set_xlabel("rotation (degrees)" if unit else "translation (% of the side)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice % (usgra test, 40 frames)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--model_path", default="bundle/models/model.pt")
    p.add_argument("--unet_model", default=None, help="state_dict from unet_baseline.py --save_model")
    p.add_argument("--unet_arch", choices=("unet", "unetpp"), default="unet", help="the --arch it was trained with")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_frames", type=int, default=None, help="score only the first N test frames (a smoke run)")
    p.add_argument("--angles", type=float, nargs="*", default=[30.0, 60.0, 90.0])
    p.add_argument("--shifts", type=float, nargs="*", default=[0.1, 0.2])
    p.add_argument("--output", required=True)
    p.add_argument("--figure", default=None)
    p.add_argument("--overlays", default=None)
    p.add_argument("--num_overlays", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--machine", default=None)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    if args.figure:
        figure(result, args.figure)


if __name__ == "__main__":
    main()
