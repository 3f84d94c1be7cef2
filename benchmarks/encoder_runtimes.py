"""The frozen LiteMedSAM image encoder under each CPU runtime: seconds per image and agreement with PyTorch.

    uv sync --frozen --all-extras
    uv run python benchmarks/encoder_runtimes.py --output benchmarks/results/encoder_runtimes.json

Runtimes (each one skipped, with the reason printed, when its package is missing): PyTorch eager fp32 at batch 1
and at the feature cache's batch of 8, PyTorch with bf16 autocast, ONNX Runtime fp32, and OpenVINO at fp32 and at
its CPU default precision (bf16 where the CPU has it). The ONNX graph is exported once from the packaged weights
(TorchScript exporter, opset 17, batch 1: TinyViT's patch merging bakes the batch into a reshape). Every runtime
encodes the same random images; ``max_abs_diff`` is against PyTorch fp32 on the same image. Timings are the mean
of ``--repeats`` calls after one warm-up, with ``--threads`` threads; ratios are against PyTorch fp32 at batch 8 and
at batch 1 (the CPU default). For scale, the result also holds the encoder's floating-point operations per image
(``torch.utils.flop_counter``) and the machine's dense matrix-multiply rate in fp32 and bf16 (PyTorch, 4096 x 4096,
same threads): the ceiling a runtime of that precision could approach.

    uv run python benchmarks/encoder_runtimes.py --device cuda --repeats 50 --model_path bundle/models/model.pt

``--device cuda`` times PyTorch eager alone (fp32 and bf16 autocast, batch 1 and 8) on the GPU, whose name goes
into the result; the exported runtimes run on the CPU and are skipped. Inputs are already on the GPU; each call is
timed with CUDA events after ``--warmup`` calls, and the rows give the mean and the median over the repeats.
``--model_path`` (a trained PPN) adds the prompt path at batch 1 and 8 on the encoder's features of the bundle's
sample frames (as the feature cache holds them): ``prompt path`` is the Sam2Rad autonomous forward (PPN, and the
decoder unless the PPN is dense), ``prompt path + postprocess`` is :meth:`Sam2RadPredictor.predict` on those
features (the same forward, then the masks resized to each frame and copied to host memory).
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

SAMPLE = Path(__file__).resolve().parents[1] / "bundle" / "data" / "usgra_sample" / "images"


def timed(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    """Mean seconds per image of ``run`` over ``repeats`` calls (after one warm-up), and its first output."""
    out = run(images)
    start = time.perf_counter()
    for _ in range(repeats):
        run(images)
    return (time.perf_counter() - start) / repeats / len(images), out


def timed_cuda(run: Callable, inputs, frames: int, repeats: int, warmup: int) -> tuple[dict[str, float], object]:
    """Seconds per frame of ``run(inputs)`` on the GPU (CUDA events around each of ``repeats`` calls, after
    ``warmup`` calls): mean and median, and the first output."""
    out = run(inputs)
    for _ in range(warmup - 1):
        run(inputs)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, stop in events:
        start.record()
        run(inputs)
        stop.record()
    torch.cuda.synchronize()
    seconds = np.array([start.elapsed_time(stop) / 1000 / frames for start, stop in events])
    return {"mean": float(seconds.mean()), "median": float(np.median(seconds)), "min": float(seconds.min())}, out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def encoder_gflop(encoder: torch.nn.Module, image: np.ndarray) -> float:
    """Floating-point operations (10^9, a multiply-add counted as two) of one encoder pass."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(torch.from_numpy(image))
    return counter.get_total_flops() / 1e9


def matmul_rate(dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of a dense ``size`` x ``size`` matrix product in ``dtype`` (after one warm-up)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def sample_frames(count: int) -> list[np.ndarray]:
    """The bundle's sample frames (grey, full size, CC BY 4.0), the first ``count`` in name order."""
    from PIL import Image

    frames = []
    for path in sorted(SAMPLE.glob("*.png"))[:count]:
        with Image.open(path) as img:
            frames.append(np.asarray(img.convert("L"), dtype=np.uint8))
    return frames


def cuda_main(args: argparse.Namespace) -> None:
    """``--device cuda``: PyTorch eager on the GPU (encoder; prompt path with ``--model_path``)."""
    device = torch.device(args.device)
    encoder = build_backbone("litemedsam").eval().image_encoder.to(device)
    rng = np.random.default_rng(0)
    one = rng.random((1, 3, 256, 256), dtype=np.float32)
    eight = torch.from_numpy(np.concatenate([one, rng.random((7, 3, 256, 256), dtype=np.float32)])).to(device)
    one = torch.from_numpy(one).to(device)

    def torch_run(images: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return encoder(images)

    rows: dict[str, dict] = {}
    reference = torch_run(one).float().cpu().numpy()

    def record(name: str, seconds: dict[str, float], frames: int, diff: float | None = None) -> None:
        rows[name] = {"batch_size": frames, "s_per_image": round(seconds["mean"], 6),
                      "s_per_image_median": round(seconds["median"], 6), "s_per_image_min": round(seconds["min"], 6),
                      "frames_per_s": round(1 / seconds["mean"], 1)}
        if diff is not None:
            rows[name]["max_abs_diff"] = diff
        print(name, rows[name], flush=True)

    for bf16 in (False, True):
        for images in (eight, one):
            seconds, out = timed_cuda(lambda x, b=bf16: torch_run(x, b), images, len(images), args.repeats,
                                      args.warmup)
            diff = float(np.abs(out[:1].float().cpu().numpy() - reference).max())
            record(f"torch {'bf16 autocast' if bf16 else 'fp32'} batch {len(images)}", seconds, len(images), diff)
    if args.model_path:
        from sam2rad_monai.inference import Sam2RadPredictor
        from sam2rad_monai.model import Mode

        predictor = Sam2RadPredictor.from_checkpoint(args.model_path, 2, device=device)
        frames = sample_frames(8)
        features, _ = predictor.encode(frames)
        model = predictor.model
        rows_ppn = {"ppn_kind": model.ppn_kind, "frames": "bundle sample (usgra_sample/images), full size",
                    "num_classes": 2}

        def forward(feats: dict) -> dict:
            with torch.no_grad():
                return model(feats, None, Mode.AUTONOMOUS)

        def predict(count: int) -> list:
            predictor.batch_size = count
            return predictor.predict(frames[:count], features={k: v[:count] for k, v in features.items()})

        for count in (8, 1):
            feats = {k: v[:count] for k, v in features.items()}
            record(f"prompt path fp32 batch {count}", timed_cuda(forward, feats, count, args.repeats, args.warmup)[0],
                   count)
            record(f"prompt path + postprocess fp32 batch {count}",
                   timed_cuda(predict, count, count, args.repeats, args.warmup)[0], count)
    else:
        rows_ppn = None
    base = rows["torch fp32 batch 8"]["s_per_image"]
    for row in rows.values():
        row["speed_vs_torch_batch8"] = round(base / row["s_per_image"], 2)
    props = torch.cuda.get_device_properties(device)
    result = {"device": "cuda", "gpu": torch.cuda.get_device_name(device),
              "gpu_memory_gib": round(props.total_memory / 2**30, 1),
              "machine": platform.processor() or platform.machine(),
              "threads": args.threads, "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn_tf32": torch.backends.cudnn.allow_tf32, "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
              "timing": f"CUDA events around each of {args.repeats} calls after {args.warmup} warm-up calls; inputs "
                        "already on the GPU; s_per_image = mean over the calls / frames per call",
              "encoder": "LiteMedSAM TinyViT image encoder, 256 x 256, random images",
              "prompt_path": rows_ppn, "model_path": args.model_path, "rows": rows,
              "time": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default=None, help="result JSON path")
    p.add_argument("--device", default="cpu", help="cpu (every runtime) or cuda (PyTorch eager on the GPU)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up calls before timing (cuda only)")
    p.add_argument("--model_path", default=None, help="trained PPN: also time the prompt path (cuda only)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        cuda_main(args)
        return
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
    base, batch1 = rows["torch fp32 batch 8"]["s_per_image"], rows["torch fp32 batch 1"]["s_per_image"]
    gflop = encoder_gflop(encoder, one)
    for row in rows.values():
        row["speed_vs_torch_batch8"] = round(base / row["s_per_image"], 2)
        row["speed_vs_torch_batch1"] = round(batch1 / row["s_per_image"], 2)
        row["gflop_per_s"] = round(gflop / row["s_per_image"], 1)
    result = {"machine": cpu_model(), "threads": args.threads, "torch": torch.__version__,
              "encoder_gflop_per_image": round(gflop, 2),
              "matmul_gflop_per_s": {name: round(matmul_rate(dtype), 1)
                                     for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))},
              "rows": rows}
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
