"""Frames per second of bundle inference (InferenceRunner, LiteMedSAM by default), and where the time goes.

    uv run python benchmarks/inference_speed.py [--frames 16] [--batch-sizes 1,8] [--format dicomseg]
        [--model_path bundle/models/model.pt] [--backbone litemedsam] [--device cpu] [--runtimes onnx,openvino]

The bundle's sample frames (bundle/data/usgra_sample/images, CC BY 4.0), centre-cropped to 512 x 512 so that
they fit one series, are wrapped as one ultrasound DICOM series in a temporary folder and segmented in autonomous
mode: what ``python -m monai.bundle run --config_file configs/inference.json --input <series>
--output_format dicomseg`` does after start-up. Without ``--model_path`` the PPN is untrained: the time per
frame does not depend on its weights.

Prints the machine (CPU model, cores, torch threads, GPU), then per encoder batch size: frames/s over the whole
run, and the split per frame between the frozen encoder, the PPN + SAM prompt encoder + mask decoder, and
reading / writing (DICOM decode, SEG or NIfTI encode and atomic write). Start-up (imports, building the model,
about 10-40 s here) is not included; it is paid once per run.

``--runtimes`` adds a row per exported CPU runtime (:mod:`sam2rad_monai.runtime`, batch 1: its graphs take one
frame), needing ``--model_path``; the export (or the check of an existing one) and the sessions' start are timed
apart as ``startup_s``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sam2rad_monai.backbones import build_backbone
from sam2rad_monai.batch_inference import InferenceRunner
from sam2rad_monai.inference import Sam2RadPredictor
from sam2rad_monai.io import png_frames_to_dicom_series
from sam2rad_monai.model import Sam2Rad

SAMPLE = Path(__file__).resolve().parents[1] / "bundle" / "data" / "usgra_sample" / "images"
CLASSES = ["nerve", "vessel"]


def machine() -> dict[str, object]:
    """CPU model (lscpu), usable cores, torch threads, GPU and the load average when the run started."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        model = ""
    return {
        "cpu": model or platform.processor() or "unknown",
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
    }


def _centre_crop(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        grey = np.asarray(img.convert("L"), dtype=np.uint8)
    top, left = (grey.shape[0] - size) // 2, (grey.shape[1] - size) // 2
    return np.ascontiguousarray(grey[top: top + size, left: left + size])


def main() -> None:
    """Parse the arguments, run the benchmark and print the results (markdown rows and JSON)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=16, help="frames to segment (bundle sample, max 17)")
    parser.add_argument("--batch-sizes", default="1,8", help="encoder batch sizes to compare, comma-separated")
    parser.add_argument("--format", choices=("nifti", "dicomseg"), default="dicomseg")
    parser.add_argument("--model_path", default=None, help="trained PPN (default: untrained, same speed)")
    parser.add_argument("--backbone", default="litemedsam")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runtimes", default="", help="exported runtimes to add (onnx, openvino), comma-separated")
    args = parser.parse_args()
    runtimes = [r for r in args.runtimes.split(",") if r]
    if runtimes and not args.model_path:
        parser.error("--runtimes needs --model_path (the graphs are exported next to it)")

    info = machine()
    pngs = sorted(SAMPLE.glob("*.png"))[: args.frames]
    frames = [_centre_crop(p, 512) for p in pngs]
    torch.manual_seed(0)
    model = Sam2Rad(build_backbone(args.backbone), len(CLASSES))
    if args.model_path:
        from sam2rad_monai.backbones import read_state_dict

        model.load_ppn_state_dict(read_state_dict(args.model_path))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        series = Path(tmp) / "series"
        png_frames_to_dicom_series(frames, series)
        runs = [("torch", int(b)) for b in args.batch_sizes.split(",")] + [(r, 1) for r in runtimes]
        for runtime, batch_size in runs:
            start = time.perf_counter()
            predictor = Sam2RadPredictor(model, args.device, batch_size=batch_size, runtime=runtime,
                                         model_path=args.model_path)
            startup = time.perf_counter() - start
            predictor.predict([np.zeros((64, 64, 3), np.float32)])  # warm-up: thread pools, lazy inits
            runner = InferenceRunner(predictor, CLASSES, Path(tmp) / f"out-{runtime}{batch_size}", args.format,
                                     stdout=io.StringIO())
            summary = runner.run(series)
            if summary.failed:
                raise RuntimeError(summary.failed[0].error)
            n = summary.frames
            rows.append({
                "runtime": runtime, "startup_s": round(startup, 1), "batch_size": batch_size, "frames": n, "seconds": round(summary.total_s, 2),
                "fps": round(n / summary.total_s, 3),
                "encoder_s_per_frame": round(summary.encoder_s / n, 3),
                "decoder_s_per_frame": round(summary.decoder_s / n, 3),
                "io_s_per_frame": round(summary.io_s / n, 3),
                "encoder_share": round(summary.encoder_s / summary.total_s, 3),
            })
            print(f"{runtime} batch {batch_size}: {n} frames in {summary.total_s:.1f} s", flush=True)
    print()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} with {info['torch_threads']} "
          f"threads, GPU: {info['gpu']}, 1-min load average at start {info['load_average_1min']}")
    print(f"input: {len(pngs)}-frame DICOM series (bundle sample, {args.backbone}), output {args.format}, "
          f"device {args.device}")
    print()
    base = {r["batch_size"]: r["seconds"] / r["frames"] for r in rows if r["runtime"] == "torch"}
    print("| runtime | encoder batch | frames/s | s/frame | speed vs torch batch " + " / ".join(map(str, base)) +
          " | encoder s/frame | PPN+decoder s/frame | read/write s/frame |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_frame = r["seconds"] / r["frames"]
        ratios = " / ".join(f"{b / per_frame:.2f}" for b in base.values())
        print(f"| {r['runtime']} | {r['batch_size']} | {r['fps']:.2f} | {per_frame:.2f} | {ratios} | "
              f"{r['encoder_s_per_frame']:.2f} ({100 * r['encoder_share']:.0f}%) | {r['decoder_s_per_frame']:.2f} | "
              f"{r['io_s_per_frame']:.2f} |")
    print()
    print(json.dumps({"machine": info, "results": rows, "time": time.strftime("%Y-%m-%d %H:%M")}, indent=1))


if __name__ == "__main__":
    main()
