"""Click benchmark: Dice after 0, 1, 3 and 5 simulated corrective clicks, refine mode vs manual mode.

    uv run python benchmarks/click_benchmark.py --model_path bundle/models/model.pt \
        --dataset_dir ../shared/datasets/usgra_nerve --output benchmarks/results/clicks_usgra_test.json

A simulated annotator looks at each class's current mask and clicks the deepest point of the largest error region
(positive on a miss, negative on a false positive; :func:`sam2rad_monai.clicks.error_click`), at the frame's own
resolution. Each mode gets its own annotator: refine mode starts from the learned prompts' mask and adds the clicks
to them; manual mode is plain SAM with the same frozen backbone, starting from nothing (0 clicks = empty mask).
Every click so far is passed again at each step (no previous-mask feedback in either mode). Scores follow the
project's empty-mask policy (:mod:`sam2rad_monai.metrics`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from sam2rad_monai.clicks import error_click
from sam2rad_monai.data import build_datalist
from sam2rad_monai.engine.evaluation import load_frame
from sam2rad_monai.inference import FramePrompts, Sam2RadPredictor
from sam2rad_monai.metrics import SegmentationScores


def run(predictor: Sam2RadPredictor, data: list[dict], class_names: list[str], clicks: list[int]
        ) -> dict[str, dict[int, dict[str, float]]]:
    """``{mode: {clicks: {class name: mean Dice %}}}`` for refine and manual mode."""
    num_classes, most = len(class_names), max(clicks)
    scores = {mode: {n: SegmentationScores(num_classes, class_names) for n in clicks} for mode in ("refine", "manual")}
    for item in data:
        image, label = load_frame(item)
        features, _ = predictor.encode([image])
        for mode in scores:
            prompts = FramePrompts()
            if mode == "refine":
                label_map = predictor.predict([image], "autonomous", features=features)[0].label_map
            else:
                label_map = np.zeros_like(label)
            for n in range(most + 1):
                if n in scores[mode]:
                    scores[mode][n].add(str(item["id"]), label_map, label)
                if n == most:
                    break
                for c in range(num_classes):
                    # the annotator sees the label map (overlaps resolved), as in a viewer
                    click = error_click(label_map == c + 1, label == c + 1)
                    if click is not None:
                        prompts.points.setdefault(c, []).append(click)
                label_map = predictor.predict([image], mode, [prompts], features=features)[0].label_map
    return {mode: {n: {class_names[k - 1]: round(v["dice"], 2) for k, v in s.summary().items()}
                   for n, s in per_n.items()} for mode, per_n in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--dataset_dir", default="../shared/datasets/usgra_nerve")
    parser.add_argument("--split", default="test")
    parser.add_argument("--class_names", nargs="+", default=["nerve", "vessel"])
    parser.add_argument("--clicks", nargs="+", type=int, default=[0, 1, 3, 5])
    parser.add_argument("--limit", type=int, default=None, help="first N images only (a quick look)")
    parser.add_argument("--output", type=Path, default=None)
    ns = parser.parse_args()
    data = build_datalist(ns.dataset_dir)[ns.split][:ns.limit]
    predictor = Sam2RadPredictor.from_checkpoint(ns.model_path, len(ns.class_names))
    start = time.perf_counter()
    result = run(predictor, data, ns.class_names, sorted(ns.clicks))
    elapsed = time.perf_counter() - start
    print(f"{len(data)} images, {elapsed:.0f} s\n\n| clicks | " + " | ".join(
        f"{c} refine | {c} manual" for c in ns.class_names) + " |\n|---|" + "---|---|" * len(ns.class_names))
    for n in sorted(ns.clicks):
        print(f"| {n} | " + " | ".join(f"{result['refine'][n][c]:.2f} | {result['manual'][n][c]:.2f}"
                                        for c in ns.class_names) + " |")
    if ns.output:
        ns.output.parent.mkdir(parents=True, exist_ok=True)
        record = {"model_path": str(ns.model_path), "split": ns.split, "images": len(data), "seconds": elapsed,
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "dice": result}
        ns.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
