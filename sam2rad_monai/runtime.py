"""Exported CPU runtimes: the frozen image encoder and the prompt-free path of a Sam2Rad model as ONNX graphs.

Three ONNX graphs (batch 1, opset 17, TorchScript exporter) are written into one folder with a manifest:

- ``encoder.onnx``: normalised padded image (1, 3, S, S) -> the backbone's features (``embed`` ...);
- ``ppn.onnx``: features -> the PPN's free tokens, mask prompts and objectness (and a regressed box);
- ``decoder.onnx``: features + learned box, tokens and mask prompt -> output logits and SAM's IoU estimate.

A box read off the mask prompt (the default ``box_source``) needs connected components, which ONNX has no operator
for, so it is computed between the two prompt graphs with the same :func:`~sam2rad_monai.ppn.region_boxes` PyTorch
uses. A dense PPN's autonomous output is its mask prompt, so it has no decoder graph.

The graphs are derived artefacts: ``manifest.json`` records the SHA-256 of the trained model file, the backbone's
identity (family, variant, size and weights digest) and of each graph; a folder whose record does not match the
model at hand is stale and is rebuilt (or refused, naming the file, where it cannot be rewritten). The graphs run under ONNX Runtime (``runtime="onnx"``) or OpenVINO (``"openvino"``, fp32), each an optional extra
(``pip install 'sam2rad-monai[onnx]'`` or ``[openvino]``); docs/BENCHMARKS.md compares them with PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .backbones import Backbone, Features
from .backbones.base import file_digest
from .model import Mode, Sam2Rad
from .ppn import region_boxes

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx", "openvino", "openvino-bf16")
OPSET = 17
FORMAT_VERSION = 1


def install_hint(runtime: str) -> str:
    return (f"install the {runtime!r} extra: pip install 'sam2rad-monai[{runtime}]' (from a checkout: "
            f"uv sync --extra {runtime})")


class StaleExportError(RuntimeError):
    """An exported folder does not belong to the model at hand and cannot be rebuilt where it is."""


def check_runtime(runtime: str) -> str:
    """Validate a ``runtime`` option (``torch``, ``onnx`` or ``openvino``) and that its package is installed."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime != "torch":
        _engine_module(runtime)
    return runtime


def _engine_module(runtime: str):
    extra = runtime.split("-")[0]
    package = {"onnx": "onnxruntime", "openvino": "openvino"}[extra]
    try:
        return __import__(package)
    except ImportError as err:
        raise ImportError(f"runtime {runtime!r} needs the {package} package, which is not installed: "
                          f"{install_hint(extra)}") from err


def _session(runtime: str, path: Path, threads: int) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """A function running the ONNX graph at ``path`` on the CPU: feeds by input name -> outputs in graph order."""
    engine = _engine_module(runtime)
    if runtime == "onnx":
        options = engine.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # warnings about unused constant initialisers are noise
        session = engine.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda feeds: session.run(None, feeds)
    # OpenVINO's CPU default is bf16 where the CPU has it (AMX or AVX-512 BF16), which moves the outputs: fp32 unless
    # asked for; a CPU without bf16 units runs "openvino-bf16" in fp32
    precision = "bf16" if runtime == "openvino-bf16" else "f32"
    compiled = engine.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                              "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    return lambda feeds: [np.array(v) for v in request.infer(feeds).values()]


def export_dir(model_path: str | os.PathLike[str]) -> Path:
    """Where a model file's exported graphs live: ``<folder>/<stem>_onnx`` next to it."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}_onnx")


# -- the exported graphs --------------------------------------------------------------------------------------------
class _EncoderGraph(nn.Module):
    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        features = self.backbone.encode(image)
        return tuple(features[k] for k in self.backbone.feature_keys)


class _PPNGraph(nn.Module):
    def __init__(self, model: Sam2Rad) -> None:
        super().__init__()
        self.model = model

    def forward(self, *levels: Tensor) -> tuple[Tensor, ...]:
        learned = self.model._learned_prompts(dict(zip(self.model.backbone.feature_keys, levels)), region_box=False)
        out = (learned["tokens"], learned["mask_prompts"], learned["objectness"])
        return out + ((learned["boxes"],) if "boxes" in learned else ())


class _DecoderGraph(nn.Module):
    def __init__(self, model: Sam2Rad) -> None:
        super().__init__()
        self.model = model

    def forward(self, boxes: Tensor, tokens: Tensor, mask_prompts: Tensor, *levels: Tensor) -> tuple[Tensor, Tensor]:
        features = dict(zip(self.model.backbone.feature_keys, levels))
        output, _, iou = self.model.decode_learned(features, boxes, tokens, mask_prompts)
        return output, iou


def _manifest(model: Sam2Rad | None, backbone: Backbone, model_path: Path | None) -> dict:
    """What an export folder must record to belong to this model (everything but the graphs' own digests)."""
    record = {"format": FORMAT_VERSION, "opset": OPSET, "backbone": backbone.identity(),
              "feature_keys": list(backbone.feature_keys)}
    if model is not None:
        record.update(model_digest=file_digest(model_path) if model_path is not None else "untrained",
                      num_classes=model.num_classes, ppn=model.ppn_kind, fuse_mask_prompt=model.fuse_mask_prompt)
    return record


def _export_graphs(model: Sam2Rad | None, backbone: Backbone, folder: Path) -> dict[str, str]:
    """Write the graphs into ``folder``; returns their file names by role."""
    size, keys = backbone.image_size, list(backbone.feature_keys)
    image = torch.zeros(1, 3, size, size)
    files = {"encoder": "encoder.onnx"}
    with torch.no_grad():
        levels = tuple(backbone.encode(image)[k] for k in keys)
        _onnx_export(_EncoderGraph(backbone), (image,), folder / files["encoder"], ["image"], keys)
        if model is None:
            return files
        files["ppn"] = "ppn.onnx"
        learned = model._learned_prompts(dict(zip(keys, levels)), region_box=False)
        ppn_out = ["tokens", "mask_prompts", "objectness"] + (["boxes"] if "boxes" in learned else [])
        _onnx_export(_PPNGraph(model), levels, folder / files["ppn"], keys, ppn_out)
        if model.ppn_kind != "dense":
            files["decoder"] = "decoder.onnx"
            boxes = torch.tensor([[0.25, 0.25, 0.75, 0.75]]).repeat(model.num_classes, 1)
            _onnx_export(_DecoderGraph(model), (boxes, learned["tokens"], learned["mask_prompts"], *levels),
                         folder / files["decoder"], ["boxes", "tokens", "mask_prompts", *keys], ["logits", "iou"])
    return files


def _onnx_export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    try:
        import onnx  # noqa: F401  (the exporter serialises through it)
    except ImportError as err:
        raise ImportError("exporting to ONNX needs the onnx package, which is not installed: "
                          f"{install_hint('onnx')}") from err
    # the TorchScript exporter: the dynamo one does not trace TinyViT's attention-bias indexing. Its tracer warnings
    # are about shape checks (TinyViT's ``assert L == H * W``) that hold for the fixed export shape; the others say the
    # legacy exporter is deprecated, which is known and chosen.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, opset_version=OPSET,
                          dynamo=False)


def export_onnx(model: Sam2Rad | None, model_path: str | os.PathLike[str] | None, folder: str | os.PathLike[str] | None
                = None, backbone: Backbone | None = None) -> Path:
    """Export the encoder (and, given a model, its prompt-free path) to ONNX; returns the folder.

    Args:
        model: the Sam2Rad model with its trained PPN loaded; ``None`` exports the backbone's encoder alone.
        model_path: the model file the PPN was loaded from (its hash goes into the manifest); ``None`` for an
            untrained model or the encoder alone.
        folder: where to write; default :func:`export_dir` of ``model_path``.
        backbone: the backbone when ``model`` is None.

    The folder is written whole into a temporary sibling and swapped in, so a reader never sees half an export.
    """
    backbone = model.backbone if model is not None else backbone
    if backbone is None:
        raise ValueError("export_onnx needs a model or a backbone")
    if folder is None:
        if model_path is None:
            raise ValueError("export_onnx needs a folder when there is no model file")
        folder = export_dir(model_path)
    folder = Path(folder)
    model_path = Path(model_path) if model_path is not None else None
    folder.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
        model._set_lora(True)  # the prompt-free path is autonomous mode
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        files = _export_graphs(model, backbone, tmp)
        record = _manifest(model, backbone, model_path)
        record["files"] = {role: {"name": name, "sha256": file_digest(tmp / name)} for role, name in files.items()}
        (tmp / "manifest.json").write_text(json.dumps(record, indent=1))
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if model is not None:
            model.train(was_training)
    return folder


def stale_reason(folder: Path, expected: dict) -> str | None:
    """Why ``folder`` does not hold the export ``expected`` describes (None: it does)."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return f"{manifest}: missing"
    try:
        record = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        return f"{manifest}: unreadable ({err})"
    for key, value in expected.items():
        if record.get(key) != value:
            return f"{manifest}: {key} is {record.get(key)!r}, the model at hand has {value!r}"
    for role, entry in record.get("files", {}).items():
        path = folder / entry["name"]
        if not path.is_file() or file_digest(path) != entry["sha256"]:
            return f"{path}: missing or changed since export"
    return None


class ExportedRuntime:
    """The exported graphs of one model under ONNX Runtime or OpenVINO, on the CPU.

    Build it with :meth:`load`, which checks (and rebuilds) the export first. ``encode`` mirrors
    :meth:`Backbone.encode`; ``__call__`` mirrors :meth:`Sam2Rad.forward` in autonomous mode for the keys inference
    reads (``logits``, ``iou``, ``objectness``, ``boxes``, ``mask_prompts``).
    """

    def __init__(self, folder: Path, num_classes: int, feature_keys: tuple[str, ...], runtime: str = "onnx",
                 threads: int | None = None) -> None:
        if runtime == "torch" or runtime not in RUNTIMES:
            raise ValueError(f"an exported runtime is one of {RUNTIMES[1:]}, got {runtime!r}")
        record = json.loads((folder / "manifest.json").read_text())
        threads = threads or torch.get_num_threads()
        self.sessions = {role: _session(runtime, folder / entry["name"], threads)
                         for role, entry in record["files"].items()}
        self.folder, self.num_classes, self.feature_keys, self.runtime = folder, num_classes, feature_keys, runtime

    @classmethod
    def load(cls, model: Sam2Rad | None, model_path: str | os.PathLike[str] | None, runtime: str = "onnx",
             folder: str | os.PathLike[str] | None = None, backbone: Backbone | None = None, rebuild: bool = True
             ) -> ExportedRuntime:
        """The runtime of ``model`` (or of ``backbone``'s encoder alone), exporting first when the folder is missing or
        stale; with ``rebuild=False`` a stale folder is an error naming it."""
        check_runtime(runtime)
        backbone = model.backbone if model is not None else backbone
        if folder is None and model_path is None:
            raise ValueError("an exported runtime needs the model file (model_path) or an export folder")
        folder = Path(folder) if folder is not None else export_dir(model_path)
        reason = stale_reason(folder, _manifest(model, backbone, Path(model_path) if model_path else None))
        if reason is not None:
            if not rebuild:
                raise StaleExportError(f"{reason}: export again (python -m sam2rad_monai.runtime or the bundle's "
                                       "'export' run)")
            logger.info("exporting ONNX graphs to %s (%s)", folder, reason)
            try:
                export_onnx(model, model_path, folder, backbone)
            except OSError as err:
                raise StaleExportError(f"{reason}, and {folder} cannot be rewritten ({err})") from err
        return cls(folder, model.num_classes if model is not None else 0, tuple(backbone.feature_keys), runtime)

    def _run(self, role: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[role](feeds)

    def encode(self, images: Tensor) -> Features:
        """Features of normalised padded images (B, 3, S, S), one image per call (the graph has batch 1)."""
        parts = [self._run("encoder", {"image": image[None].float().cpu().numpy()}) for image in images]
        return {k: torch.from_numpy(np.concatenate([p[i] for p in parts])) for i, k in enumerate(self.feature_keys)}

    def __call__(self, features: Features, prompts: None = None, mode: Mode | str = Mode.AUTONOMOUS
                 ) -> dict[str, Tensor]:
        """Autonomous-mode outputs of features (B rows each), as :meth:`Sam2Rad.forward` gives them."""
        if Mode(mode) is not Mode.AUTONOMOUS or prompts is not None:
            raise ValueError("the exported runtime serves autonomous mode only; refine and manual run in PyTorch")
        if "ppn" not in self.sessions:
            raise ValueError(f"{self.folder} holds the encoder alone (exported without a trained model)")
        rows: dict[str, list[np.ndarray]] = {}
        for b in range(features[self.feature_keys[0]].shape[0]):
            levels = {k: features[k][b: b + 1].float().cpu().numpy() for k in self.feature_keys}
            tokens, mask_prompts, objectness, *boxes = self._run("ppn", levels)
            if boxes:
                boxes = boxes[0]
            else:
                boxes = region_boxes(torch.from_numpy(mask_prompts > 0)).numpy()
            out = {"mask_prompts": mask_prompts, "objectness": objectness, "boxes": boxes}
            if "decoder" in self.sessions:
                out["logits"], out["iou"] = self._run("decoder", {"boxes": boxes, "tokens": tokens,
                                                                  "mask_prompts": mask_prompts, **levels})
            else:  # a dense PPN's output is its mask prompt, as in PyTorch
                out["logits"], out["iou"] = out["mask_prompts"], 1.0 / (1.0 + np.exp(-objectness))
            for key, value in out.items():
                rows.setdefault(key, []).append(value)
        return {k: torch.from_numpy(np.stack(v).astype(np.float32)) for k, v in rows.items()}


def cache_encoder(backbone: Backbone, runtime: str, cache_dir: str | os.PathLike[str]
                  ) -> Callable[[Tensor], Features] | None:
    """The encoder a feature cache fills with: ``None`` (the backbone's own) for ``torch``, else the exported
    encoder's ``encode``, its graph kept in ``<cache_dir>/<runtime>-encoder-<backbone digest>``."""
    if check_runtime(runtime) == "torch":
        return None
    digest = hashlib.sha256(backbone.identity().encode()).hexdigest()[:16]
    folder = Path(cache_dir) / f"{backbone.name}-encoder-{digest}"
    return ExportedRuntime.load(None, None, runtime, folder, backbone=backbone).encode


def main(argv: list[str] | None = None) -> None:
    """``python -m sam2rad_monai.runtime --model_path bundle/models/model.pt --num_classes 2``: export the graphs."""
    import argparse

    from .inference import Sam2RadPredictor

    parser = argparse.ArgumentParser(description="Export a trained Sam2Rad model's encoder and prompt-free path to "
                                                 "ONNX, next to the model file (<stem>_onnx/).")
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--num_classes", type=int, required=True)
    parser.add_argument("--backbone", default="litemedsam")
    parser.add_argument("--backbone_variant", default=None)
    parser.add_argument("--checkpoint", default=None, help="backbone weights file (sam / sam2)")
    parser.add_argument("--output_dir", default=None, help="default: <model folder>/<model stem>_onnx")
    args = parser.parse_args(argv)
    predictor = Sam2RadPredictor.from_checkpoint(args.model_path, args.num_classes, args.backbone,
                                                 args.backbone_variant, args.checkpoint)
    folder = export_onnx(predictor.model, args.model_path, args.output_dir)
    print(f"exported to {folder}")


if __name__ == "__main__":
    main()
