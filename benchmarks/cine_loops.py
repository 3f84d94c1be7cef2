"""Cine loops: per-frame against temporal mode on synthetic labelled loops (and real multi-frame DICOMs).

    uv run python benchmarks/cine_loops.py --dataset_dir ../shared/datasets/usgra_nerve --split val --loops 4 \
        --model_path bundle/models/model.pt --modes 1:1 0.7:0.7 1:0.5 0.85:0.5 0.7:0.4 \
        --output benchmarks/results/cine_val_usgra.json
    uv run python benchmarks/cine_loops.py --dataset_dir ../shared/datasets/usgra_nerve --split test --loops 6 \
        --model_path bundle/models/model.pt --modes 1:1 0.85:0.5 --dicom ../shared/datasets/dicom_us \
        --output benchmarks/results/cine_test_usgra.json

A loop is one labelled frame moved smoothly over ``--length`` frames (seeded per loop): translation up to 6 % of
each side, rotation up to 8 degrees and scale 0.92-1.08 on slow sinusoids, a gain drift of +-15 %, and fresh
multiplicative speckle (gamma, mean 1, sd 0.15) on every frame; the same geometric motion moves the mask (nearest).
Each loop's frames are encoded once; every ``--modes`` entry (``1:1`` = per-frame mode, ``a:p`` a temporal blend,
``memory`` SAM2's memory for a ``sam2`` backbone, :mod:`sam2rad_monai.memory`) then segments the same features, so
the modes differ only in how a frame uses the loop's earlier ones. ``--backbone sam2 --checkpoint FILE`` runs a
sam2 model; ``--random_weights`` (with no ``--model_path``) builds the backbone and an untrained PPN on random
weights, for speed only (its Dice means nothing). Reported per class:
mean Dice over all frames of all loops (empty-mask policy), the worst frame's Dice, and flicker = mean over
consecutive frame pairs of 1 - Dice(prediction t-1, prediction t), beside the same on the ground truth (the motion's
own flicker); and frames per second of the PPN path (the encoder, shared by both modes, apart).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Affine

from sam2rad_monai.data import build_datalist
from sam2rad_monai.engine.evaluation import load_frame
from sam2rad_monai.inference import Sam2RadPredictor
from sam2rad_monai.memory import has_memory
from sam2rad_monai.metrics import per_class_scores
from sam2rad_monai.temporal import LoopState


def synthetic_loop(image: np.ndarray, label: np.ndarray, length: int, rng: np.random.Generator
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``length`` frames (H, W, 3) float and label maps (H, W) of one frame under smooth seeded motion."""
    h, w = label.shape
    phase = rng.uniform(0, 2 * math.pi, 5)
    period = rng.uniform(0.6, 1.2, 5) * length  # slow: at most about one and a half cycles per loop
    amp = np.array([0.06 * h, 0.06 * w, math.radians(8.0), 0.08, 0.15]) * rng.uniform(0.5, 1.0, 5)
    frames, labels = [], []
    img = torch.as_tensor(image.transpose(2, 0, 1).copy(), dtype=torch.float32)
    lab = torch.as_tensor(label[None].astype(np.float32))
    for t in range(length):
        ty, tx, rot, scale, gain = amp * np.sin(2 * math.pi * t / period + phase)
        affine = Affine(rotate_params=float(rot), translate_params=(float(ty), float(tx)),
                        scale_params=(1.0 + float(scale),) * 2, padding_mode="zeros", image_only=True)
        moved = np.asarray(affine(img, mode="bilinear")).transpose(1, 2, 0)
        speckle = rng.gamma(1 / 0.15 ** 2, 0.15 ** 2, size=(h, w, 1))
        frames.append(np.clip(moved * (1.0 + gain) * speckle, 0, 255).astype(np.float32))
        labels.append(np.asarray(affine(lab, mode="nearest"))[0].round().astype(np.uint8))
    return frames, labels


def class_dice(a: np.ndarray, b: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class Dice (C,) of two label maps, empty-mask policy (both empty: 1)."""
    scores = per_class_scores(a, b, num_classes)
    return np.array([scores[k]["dice"] for k in range(1, num_classes + 1)])


def flicker(maps: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Mean over consecutive pairs of 1 - Dice (C,)."""
    return np.mean([1.0 - class_dice(maps[t], maps[t - 1], num_classes) for t in range(1, len(maps))], axis=0)


def run_loop(predictor: Sam2RadPredictor, frames: list[np.ndarray], features: dict[str, torch.Tensor],
             mode: str) -> tuple[list[np.ndarray], float]:
    """Label maps of a loop in ``mode`` ("alpha:presence_alpha"; "1:1" is per-frame mode) and the PPN path's
    seconds."""
    t0 = time.perf_counter()
    if mode == "memory":
        preds = predictor.predict(frames, features=features, loop=LoopState(use_memory=True))
    else:
        alpha, presence = (float(v) for v in mode.split(":"))
        if alpha >= 1.0 and presence >= 1.0:
            preds = predictor.predict(frames, features=features)
        else:
            preds = predictor.predict(frames, features=features, loop=LoopState(use_memory=False), alpha=alpha,
                                      presence_alpha=presence)
    return [p.label_map for p in preds], time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--model_path", default=None, help="the trained model file (required unless --random_weights)")
    parser.add_argument("--backbone", default="litemedsam")
    parser.add_argument("--backbone_variant", default=None)
    parser.add_argument("--checkpoint", default=None, help="backbone weights (sam / sam2 families)")
    parser.add_argument("--image_size", type=int, default=None, help="backbone input side (random weights only)")
    parser.add_argument("--random_weights", action="store_true", help="random backbone and PPN: speed only")
    parser.add_argument("--loops", type=int, default=6)
    parser.add_argument("--length", type=int, default=30)
    parser.add_argument("--modes", nargs="+", default=["1:1", "0.5:0.5"],
                        help="temporal weights 'alpha:presence_alpha' of the new frame (1:1 is per-frame mode), or "
                        "'memory' (sam2 backbone)")
    parser.add_argument("--feature_dir", default=None, help="keep each loop's encoded features here (reruns reuse)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runtime", default="torch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dicom", default=None, help="a folder of (multi-frame) DICOMs: flicker and speed only")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = ("nerve", "vessel")
    if args.random_weights:
        from sam2rad_monai.backbones import build_backbone
        from sam2rad_monai.model import Sam2Rad

        torch.manual_seed(args.seed)
        size = {"image_size": args.image_size} if args.image_size else {}
        backbone = build_backbone(args.backbone, args.backbone_variant, pretrained=False, **size)
        predictor = Sam2RadPredictor(Sam2Rad(backbone, len(names)).eval())
    elif args.model_path is None:
        parser.error("--model_path is required (or --random_weights for a speed-only run)")
    else:
        predictor = Sam2RadPredictor.from_checkpoint(args.model_path, len(names), args.backbone,
                                                     args.backbone_variant, args.checkpoint)
    if args.runtime != "torch":
        predictor.set_runtime(args.runtime, args.model_path)
    items = build_datalist(args.dataset_dir, split=args.split, seed=0)
    rng = np.random.default_rng(args.seed)
    chosen = sorted(rng.choice(len(items), size=min(args.loops, len(items)), replace=False).tolist())
    if "memory" in args.modes and not has_memory(predictor.model.backbone):  # the predictor would blend instead
        raise ValueError(f"mode 'memory' needs a backbone with SAM2's memory (sam2), not {predictor.model.backbone.name}")
    per_mode = {a: {"dice": [], "flicker": [], "ppn_s": 0.0} for a in args.modes}
    gt_flicker, encode_s, n_frames = [], 0.0, 0
    for n, index in enumerate(chosen):
        image, label = load_frame(items[index])
        frames, labels = synthetic_loop(image, label, args.length, np.random.default_rng([args.seed, index]))
        cached = Path(args.feature_dir) / f"{args.split}_{items[index]['id']}_{args.length}_{args.seed}.pt" \
            if args.feature_dir else None
        t0 = time.perf_counter()
        if cached is not None and cached.is_file():
            features = torch.load(cached, weights_only=True)
        else:
            features, _ = predictor.encode(frames)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save(features, cached)
        encode_s += time.perf_counter() - t0
        n_frames += len(frames)
        gt_flicker.append(flicker(labels, len(names)))
        for mode in args.modes:
            maps, seconds = run_loop(predictor, frames, features, mode)
            per_mode[mode]["dice"].append([class_dice(m, g, len(names)) for m, g in zip(maps, labels)])
            per_mode[mode]["flicker"].append(flicker(maps, len(names)))
            per_mode[mode]["ppn_s"] += seconds
        print(f"loop {n + 1}/{len(chosen)} (frame {items[index]['id']}) done", flush=True)
    result = {"split": args.split, "loops": [items[i]["id"] for i in chosen], "length": args.length,
              "seed": args.seed, "runtime": args.runtime, "backbone": predictor.model.backbone.identity(),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
              "encoder_s_per_frame": encode_s / n_frames,
              "gt_flicker": dict(zip(names, (100 * np.mean(gt_flicker, axis=0)).round(2).tolist())), "modes": {}}
    for mode, acc in per_mode.items():
        dice = np.array(acc["dice"])  # (loops, frames, C)
        result["modes"][mode] = {
            "mean_dice": dict(zip(names, (100 * dice.mean((0, 1))).round(2).tolist())),
            "worst_frame_dice": dict(zip(names, (100 * dice.min((0, 1))).round(2).tolist())),
            "flicker": dict(zip(names, (100 * np.mean(acc["flicker"], axis=0)).round(2).tolist())),
            "ppn_frames_per_s": n_frames / acc["ppn_s"]}
        print(f"mode {mode}: {result['modes'][mode]}", flush=True)
    if args.dicom:
        result["dicom"] = dicom_loops(predictor, Path(args.dicom), args.modes, len(names))
    print(f"ground-truth flicker {result['gt_flicker']}; encoder {result['encoder_s_per_frame']:.2f} s/frame")
    Path(args.output).write_text(json.dumps(result, indent=1))


def dicom_loops(predictor: Sam2RadPredictor, folder: Path, modes: list[str], num_classes: int) -> dict:
    """Flicker and seconds per frame of every multi-frame DICOM in ``folder`` (no labels: no Dice)."""
    from sam2rad_monai.inputs import discover_inputs, read_input

    out = {}
    for item in discover_inputs(folder):
        if item.error:
            continue
        frames = read_input(item).frames
        if len(frames) < 2:
            continue
        t0 = time.perf_counter()
        features, _ = predictor.encode(frames)
        encode = (time.perf_counter() - t0) / len(frames)
        out[item.name] = {"frames": len(frames), "encoder_s_per_frame": encode}
        for mode in modes:
            maps, seconds = run_loop(predictor, frames, features, mode)
            out[item.name][mode] = {"flicker": (100 * flicker(maps, num_classes)).round(2).tolist(),
                                                  "ppn_s_per_frame": seconds / len(frames)}
    return out


if __name__ == "__main__":
    main()
