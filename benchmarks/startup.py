"""Where bundle inference's start-up goes: imports, building the model, loading the PPN, the runtime's sessions.

    uv run python benchmarks/startup.py [--model_path bundle/models/model.pt] [--runtime onnx]

Each step is timed in a fresh Python process (so nothing is imported yet), in the order
``configs/inference.json`` runs them; the whole bundle command (``python -m monai.bundle run --config_file
configs/inference.json`` on one sample frame) is timed apart, end to end, for the same runtime.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = """
import time, json, sys
t = {{}}
s = time.perf_counter(); import torch; t["import torch"] = time.perf_counter() - s
s = time.perf_counter(); import monai; t["import monai"] = time.perf_counter() - s
s = time.perf_counter(); import sam2rad_monai.batch_inference; t["import sam2rad_monai (inference, io)"] = time.perf_counter() - s
s = time.perf_counter(); import highdicom; t["import highdicom"] = time.perf_counter() - s
from sam2rad_monai.backbones import build_backbone, read_state_dict
from sam2rad_monai.inference import Sam2RadPredictor
from sam2rad_monai.model import Sam2Rad
s = time.perf_counter(); bb = build_backbone("litemedsam"); t["build backbone (LiteMedSAM weights)"] = time.perf_counter() - s
s = time.perf_counter(); m = Sam2Rad(bb, 2); m.load_ppn_state_dict(read_state_dict({model!r})); t["build PPN, load model file"] = time.perf_counter() - s
s = time.perf_counter(); p = Sam2RadPredictor(m, runtime={runtime!r}, model_path={model!r}); t["predictor ({runtime}: check export, start sessions)"] = time.perf_counter() - s
print(json.dumps(t))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=str(ROOT / "bundle" / "models" / "model.pt"))
    parser.add_argument("--runtime", default="torch")
    args = parser.parse_args()
    out = subprocess.run([sys.executable, "-c", STEPS.format(model=args.model_path, runtime=args.runtime)],
                         capture_output=True, text=True, check=True)
    steps = json.loads(out.stdout.strip().splitlines()[-1])
    frame = sorted((ROOT / "bundle" / "data" / "usgra_sample" / "images").glob("*.png"))[0]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                        "--input", str(frame), "--output_dir", tmp, "--model_path", args.model_path,
                        "--runtime", args.runtime], cwd=ROOT / "bundle", capture_output=True, check=True)
        steps["bundle command, one frame, end to end"] = time.perf_counter() - start
    for name, seconds in steps.items():
        print(f"| {name} | {seconds:.2f} |")
    print(json.dumps({k: round(v, 2) for k, v in steps.items()}))


if __name__ == "__main__":
    main()
