"""The frozen LiteMedSAM image encoder under each CPU runtime: seconds per image and agreement with PyTorch.

    uv sync --frozen --all-extras
    uv run python benchmarks/encoder_runtimes.py --output benchmarks/results/encoder_runtimes.json

Runtimes (each one skipped, with the reason printed, when its package is missing): PyTorch eager fp32 at batch 1
and at the feature cache's batch of 8, PyTorch with bf16 autocast, ONNX Runtime fp32, and OpenVINO at fp32 and at
its CPU default precision (bf16 where the CPU has it). The ONNX graph is exported once from the packaged weights
(TorchScript exporter, opset 17, batch 1: TinyViT's patch merging bakes the batch into a reshape). Every runtime
encodes the same random images; ``max_abs_diff`` is against PyTorch fp32 on the same image. Timings are the mean
of ``--repeats`` calls after one warm-up, with ``--threads`` threads; ratios are against PyTorch fp32 at batch 8.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sam2rad_monai.backbones import build_backbone


def timed(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    """Mean seconds per image of ``run`` over ``repeats`` calls (after one warm-up), and its first output."""
    out = run(images)
    start = time.perf_counter()
    for _ in range(repeats):
        run(images)
    return (time.perf_counter() - start) / repeats / len(images), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default=None, help="result JSON path")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    encoder = build_backbone("litemedsam").eval().image_encoder
    rng = np.random.default_rng(0)
    one = rng.random((1, 3, 256, 256), dtype=np.float32)
    eight = np.concatenate([one, rng.random((7, 3, 256, 256), dtype=np.float32)])  # image 0 is the same

    def torch_run(images: np.ndarray, bf16: bool = False) -> np.ndarray:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return encoder(torch.from_numpy(images)).float().numpy()

    rows: dict[str, dict] = {}
    reference = torch_run(one)

    def record(name: str, seconds: float, out: np.ndarray) -> None:
        rows[name] = {"s_per_image": round(seconds, 3), "max_abs_diff": float(np.abs(out[:1] - reference).max())}
        print(name, rows[name], flush=True)

    record("torch fp32 batch 8", *timed(torch_run, eight, max(1, args.repeats // 2)))
    record("torch fp32 batch 1", *timed(torch_run, one, args.repeats))
    record("torch bf16 autocast batch 1", *timed(lambda x: torch_run(x, bf16=True), one, args.repeats))
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "encoder.onnx"
        torch.onnx.export(encoder, (torch.from_numpy(one),), str(onnx_path), input_names=["image"],
                          output_names=["embed"], opset_version=17, dynamo=False)
        try:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            record("onnxruntime fp32 batch 1", *timed(lambda x: session.run(None, {"image": x})[0], one, args.repeats))
        except ImportError as err:
            print("onnxruntime skipped:", err)
        try:
            import openvino as ov

            core = ov.Core()
            for label, config in (("fp32", {"INFERENCE_PRECISION_HINT": "f32"}), ("default precision", {})):
                compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU",
                                              {"INFERENCE_NUM_THREADS": args.threads, **config})
                precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
                record(f"openvino {label} ({precision}) batch 1",
                       *timed(lambda x, c=compiled: c(x)[0], one, args.repeats))
        except ImportError as err:
            print("openvino skipped:", err)
    base = rows["torch fp32 batch 8"]["s_per_image"]
    for row in rows.values():
        row["speed_vs_torch_batch8"] = round(base / row["s_per_image"], 2)
    result = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "rows": rows}
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
