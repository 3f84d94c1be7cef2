"""Learning curves of few-shot runs: validation Dice against optimiser steps and against wall-clock minutes.

    uv run python benchmarks/learning_curve.py --sam2rad s0=runs/fewshot_s0 s1=runs/fewshot_s1 \\
        --unet benchmarks/results/unet_10img_seed0.json benchmarks/results/unet_10img_seed1.json \\
        --output benchmarks/results/learning_curves_10shot.json

Sam2Rad points come from a bundle run's TensorBoard events (``val_mean_dice`` of the validation evaluator, logged
every ``val_interval`` steps; the step is the trainer's epoch times ``--val_interval``). Minutes count from the
creation of the run's TensorBoard writer, which the bundle builds while parsing its config, before the feature
cache is filled: cache building is inside the curve. UNet points come from
``benchmarks/unet_baseline.py``'s ``history`` (``elapsed_s`` from the start of its training loop; its data are
decoded into memory first, a few seconds not counted). Both Dice are the mean of the two classes' per-image Dice
over the validation frames at 256 x 256 with empty-mask policy (an absent class predicted empty scores 1).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def sam2rad_curve(run_dir: Path, val_interval: int) -> list[dict]:
    """Points ``{step, minutes, val_mean_dice}`` (Dice in percent) of one bundle run directory."""
    tb = run_dir / "tensorboard"
    events = sorted(tb.glob("events.out.tfevents.*"))
    if not events:
        raise FileNotFoundError(f"{tb}: no TensorBoard event file")
    # the file name carries the writer's creation time: ``events.out.tfevents.<unix seconds>.<host>...``
    start = min(float(p.name.split(".")[3]) for p in events)
    acc = EventAccumulator(str(tb))
    acc.Reload()
    if "val_mean_dice" not in acc.Tags()["scalars"]:
        raise KeyError(f"{tb}: no val_mean_dice scalar (tags: {acc.Tags()['scalars']})")
    return [{"step": e.step * val_interval, "minutes": round((e.wall_time - start) / 60, 2),
             "val_mean_dice": round(100 * e.value, 2)} for e in acc.Scalars("val_mean_dice")]


def unet_curve(result_json: Path, steps_per_epoch: int) -> list[dict]:
    """Validated epochs of a ``unet_baseline.py`` result as ``{step, minutes, val_mean_dice}``."""
    history = json.loads(result_json.read_text())["history"]
    return [{"step": h["epoch"] * steps_per_epoch, "minutes": round(h["elapsed_s"] / 60, 2),
             "val_mean_dice": h["val_mean_dice"]} for h in history if "val_mean_dice" in h]


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Mean (and spread) over runs at the steps every run logged."""
    common = set.intersection(*({p["step"] for p in c} for c in curves))
    out = []
    for step in sorted(common):
        pts = [next(p for p in c if p["step"] == step) for c in curves]
        dice = [p["val_mean_dice"] for p in pts]
        out.append({"step": step, "minutes": round(statistics.mean(p["minutes"] for p in pts), 2),
                    "val_mean_dice": round(statistics.mean(dice), 2),
                    "sd": round(statistics.stdev(dice), 2) if len(dice) > 1 else 0.0})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sam2rad", nargs="+", required=True, help="name=bundle_output_dir")
    parser.add_argument("--val_interval", type=int, default=100, help="steps between the runs' validations")
    parser.add_argument("--unet", nargs="*", type=Path, default=[], help="unet_baseline.py result files")
    parser.add_argument("--num_images", type=int, default=10, help="UNet training images (batch 8: steps/epoch)")
    parser.add_argument("--output", type=Path, required=True)
    ns = parser.parse_args()

    sam = {name: sam2rad_curve(Path(d), ns.val_interval) for name, d in (a.split("=", 1) for a in ns.sam2rad)}
    unet = {p.stem: unet_curve(p, math.ceil(ns.num_images / 8)) for p in ns.unet}
    result = {"sam2rad": sam, "sam2rad_mean": mean_curve(list(sam.values())), "unet": unet,
              "unet_mean": mean_curve(list(unet.values())) if unet else [],
              "units": "val_mean_dice: percent, mean of the classes; minutes: wall-clock from the run's start"}
    ns.output.parent.mkdir(parents=True, exist_ok=True)
    ns.output.write_text(json.dumps(result, indent=2) + "\n")
    print("| model | step | minutes | val mean Dice % (sd) |\n|---|---|---|---|")
    for name, curve in (("Sam2Rad dense PPN", result["sam2rad_mean"]), ("UNet", result["unet_mean"])):
        for p in curve:
            if name == "UNet" and p["step"] % ns.val_interval:
                continue  # the table samples the UNet's dense log at the Sam2Rad validation steps
            print(f"| {name} | {p['step']} | {p['minutes']} | {p['val_mean_dice']} ({p['sd']}) |")


if __name__ == "__main__":
    main()
