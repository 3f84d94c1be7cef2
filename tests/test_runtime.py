"""The exported CPU runtimes (ONNX Runtime, OpenVINO): same masks as PyTorch, stale exports caught, clear errors.

Runs on the bundle's embedded sample frames (usgra-seg, CC BY 4.0) with the shipped model and the real LiteMedSAM
weights. Needs the 'onnx' extra (CI installs it); the OpenVINO case also the 'openvino' extra; each case skips,
saying which package is missing, without it.
"""

from __future__ import annotations

import builtins
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam2rad_monai.backbones import read_state_dict
from sam2rad_monai.inference import Sam2RadPredictor
from sam2rad_monai.runtime import StaleExportError, check_runtime, export_dir

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
SAMPLE = BUNDLE / "data" / "usgra_sample"


def _frames(count: int) -> list[np.ndarray]:
    paths = sorted((SAMPLE / "images").glob("*.png"))[:count]
    return [np.asarray(Image.open(p).convert("L")) for p in paths]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Sam2RadPredictor]:
    """The shipped model copied to a temporary folder, exported there once, and its PyTorch predictor."""
    pytest.importorskip("onnxruntime", reason="the 'onnx' extra (onnxruntime) is not installed")
    model_path = tmp_path_factory.mktemp("model") / "model.pt"
    shutil.copy(BUNDLE / "models" / "model.pt", model_path)
    torch.manual_seed(0)
    return model_path, Sam2RadPredictor.from_checkpoint(model_path, 2)


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_exported_runtime_gives_pytorch_label_maps(exported, runtime):
    pytest.importorskip({"onnx": "onnxruntime", "openvino": "openvino"}[runtime],
                        reason=f"the {runtime!r} extra is not installed")
    model_path, torch_predictor = exported
    fast = Sam2RadPredictor(torch_predictor.model, runtime=runtime, model_path=model_path)
    assert (export_dir(model_path) / "manifest.json").is_file()
    frames = _frames(3)
    features, _ = torch_predictor.encode(frames)
    exported_features, _ = fast.encode(frames)
    # features agree far inside the fp16 the feature cache stores them in
    assert torch.allclose(features["embed"], exported_features["embed"], atol=1e-4)
    reference, candidate = torch_predictor.predict(frames), fast.predict(frames)
    assert any(p.label_map.any() for p in reference)  # the shipped model finds structures in the sample
    for ref, got in zip(reference, candidate):
        np.testing.assert_array_equal(got.label_map, ref.label_map)
        np.testing.assert_allclose(got.logits, ref.logits, atol=1e-3)
        np.testing.assert_allclose(got.objectness, ref.objectness, atol=1e-4)
    # refine mode runs the PyTorch prompt path on the exported encoder's features: the same answer as PyTorch's
    from sam2rad_monai.inference import FramePrompts

    prompts = [FramePrompts(boxes={0: (100, 80, 220, 200)})]
    np.testing.assert_array_equal(fast.predict(frames[:1], "refine", prompts)[0].label_map,
                                  torch_predictor.predict(frames[:1], "refine", prompts)[0].label_map)


def test_a_dense_ppn_with_its_neighbour_bank_exports_to_the_same_label_maps(exported, tmp_path):
    """The few-shot PPN (two trunks, the self-support term and the neighbour search over the labelled frames' bank,
    all inside the graph) on ONNX Runtime."""
    from sam2rad_monai.model import Sam2Rad

    backbone = exported[1].model.backbone
    torch.manual_seed(0)
    model = Sam2Rad(backbone, num_classes=2, ppn="dense", trunks=2, self_support=20.0).eval()
    with torch.no_grad():  # logits of both signs before the peak rule, so the self-support term acts
        for trunk in model.ppn.trunks:
            trunk.head.bias.zero_()
    labelled = sorted((SAMPLE / "masks").glob("*.png"))[:4]
    predictor = Sam2RadPredictor(model)
    features, sizes = predictor.encode(_frames(4))
    side = backbone.image_size
    masks = torch.zeros(4, 2, side, side)
    for i, (path, (h, w)) in enumerate(zip(labelled, sizes)):  # resized like its frame, padded bottom-right
        label = torch.as_tensor(np.asarray(Image.open(path)).astype(np.int64))
        masks[i, :, :h, :w] = torch.nn.functional.interpolate(
            torch.stack([label == 1, label == 2])[None].float(), size=(h, w), mode="nearest")[0]
    assert masks.sum((2, 3)).gt(0).any(0).all(), "both classes are in the bank's frames"
    model.ppn.set_prototypes([(features["embed"], masks)])
    assert model.ppn.bank.shape[0] > 0
    model_path = tmp_path / "dense.pt"
    torch.save(model.ppn_state_dict(), model_path)
    reference = Sam2RadPredictor.from_checkpoint(model_path, 2, backbone=backbone)
    fast = Sam2RadPredictor(reference.model, runtime="onnx", model_path=model_path)
    frames = _frames(6)[4:]  # frames outside the bank
    for ref, got in zip(reference.predict(frames), fast.predict(frames)):
        assert ref.label_map.any()
        np.testing.assert_array_equal(got.label_map, ref.label_map)
        np.testing.assert_allclose(got.logits, ref.logits, atol=1e-3)


def test_openvino_bf16_is_a_close_reduced_precision_option(exported):
    """bf16 moves the embedding by a few percent of its range (fp32 on a CPU without bf16 units), so its masks are
    close to PyTorch's but not equal; the same export serves it."""
    pytest.importorskip("openvino", reason="the 'openvino' extra is not installed")
    model_path, torch_predictor = exported
    fast = Sam2RadPredictor(torch_predictor.model, runtime="openvino-bf16", model_path=model_path)
    frames = _frames(3)
    overlaps = []
    for ref, got in zip(torch_predictor.predict(frames), fast.predict(frames)):
        for label in (1, 2):
            a, b = ref.label_map == label, got.label_map == label
            if a.any() or b.any():
                overlaps.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert overlaps and np.mean(overlaps) > 0.8


def test_stale_export_is_refused_or_rebuilt(exported, tmp_path):
    from sam2rad_monai.runtime import ExportedRuntime

    model_path, torch_predictor = exported
    model = torch_predictor.model
    ExportedRuntime.load(model, model_path)  # a current export (the first test may have written it)
    # another PPN in the same file: the export no longer belongs to it
    state = read_state_dict(model_path)
    bias = next(k for k in state if "objectness_head." in k and k.endswith(".bias"))  # any PPN kind
    state[bias] = state[bias] + 5.0
    changed = tmp_path / "model.pt"
    torch.save(state, changed)
    shutil.copytree(export_dir(model_path), export_dir(changed))
    model.load_ppn_state_dict(state)
    try:
        with pytest.raises(StaleExportError, match=r"model_onnx/manifest.json: model_digest"):
            ExportedRuntime.load(model, changed, rebuild=False)
        runtime = ExportedRuntime.load(model, changed)  # rebuilt from the model at hand
        record = json.loads((export_dir(changed) / "manifest.json").read_text())
        assert record["model_digest"] != json.loads((export_dir(model_path) / "manifest.json").read_text())[
            "model_digest"]
        features, _ = torch_predictor.encode(_frames(1))
        with torch.no_grad():
            expected = model(features)["objectness"]
        assert torch.allclose(runtime(features)["objectness"], expected, atol=1e-4)
        # a graph changed by hand after export is caught too
        with (export_dir(changed) / "ppn.onnx").open("ab") as handle:
            handle.write(b"\0")
        with pytest.raises(StaleExportError, match=r"ppn.onnx: missing or changed since export"):
            ExportedRuntime.load(model, changed, rebuild=False)
    finally:
        model.load_ppn_state_dict(read_state_dict(model_path))


def test_missing_runtime_package_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_engines(name, *args, **kwargs):
        if name in ("onnxruntime", "openvino"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_engines)
    with pytest.raises(ImportError, match=r"pip install 'sam2rad-monai\[onnx\]'"):
        check_runtime("onnx")
    with pytest.raises(ImportError, match=r"uv sync --extra openvino"):
        check_runtime("openvino")
    with pytest.raises(ValueError, match="runtime must be one of"):
        check_runtime("tensorrt")
    assert check_runtime("torch") == "torch"


def test_feature_cache_fills_through_the_exported_encoder(exported, tmp_path):
    from sam2rad_monai.engine.cache import FeatureCache
    from sam2rad_monai.runtime import cache_encoder

    _, torch_predictor = exported
    backbone = torch_predictor.model.backbone
    image = sorted((SAMPLE / "images").glob("*.png"))[0]
    item = {"image": str(image), "label": str(SAMPLE / "masks" / image.name)}
    plain = FeatureCache(tmp_path / "torch", backbone, 2, seed=0)
    fast = FeatureCache(tmp_path / "onnx", backbone, 2, seed=0, encoder=cache_encoder(backbone, "onnx", tmp_path / "onnx"))
    assert fast.path(item, 1).relative_to(tmp_path / "onnx") == plain.path(item, 1).relative_to(tmp_path / "torch")
    reference, entry = plain.load(item, 1), fast.load(item, 1)  # an augmented view
    assert torch.equal(reference["label"], entry["label"])
    # the same fp16 entry, up to one fp16 step where the fp32 values straddle a rounding boundary
    difference = (reference["features"]["embed"].float() - entry["features"]["embed"].float()).abs()
    assert difference.max() <= 1e-3 and (difference > 0).float().mean() < 0.05
    assert len(list((tmp_path / "onnx").glob("litemedsam-encoder-*/encoder.onnx"))) == 1


@pytest.mark.slow
def test_bundle_export_run_then_dicom_to_seg_on_the_onnx_runtime(exported, tmp_path):
    """The documented commands: ``monai.bundle run export``, then inference with ``--runtime onnx`` on a DICOM
    series; the SEG holds the label maps the PyTorch predictor gives for the same frames."""
    from sam2rad_monai.inputs import read_frames
    from sam2rad_monai.io import png_frames_to_dicom_series, read_dicom_seg_labelmap

    _, torch_predictor = exported
    model_path = tmp_path / "models" / "model.pt"
    model_path.parent.mkdir()
    shutil.copy(BUNDLE / "models" / "model.pt", model_path)
    series, pngs = tmp_path / "series", sorted((SAMPLE / "images").glob("*.png"))[:2]
    png_frames_to_dicom_series(pngs, series)

    def bundle(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args, "--config_file",
                               "configs/inference.json", "--model_path", str(model_path)],
                              cwd=BUNDLE, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done

    assert f"exported to {export_dir(model_path)}" in bundle("export").stdout
    digest = json.loads((export_dir(model_path) / "manifest.json").read_text())["files"]["encoder"]["sha256"]
    bundle("--runtime", "onnx", "--input", str(series), "--output_format", "dicomseg", "--output_dir",
           str(tmp_path / "out"))
    # inference used the export as it was (not rebuilt), and segmented as PyTorch does
    assert json.loads((export_dir(model_path) / "manifest.json").read_text())["files"]["encoder"]["sha256"] == digest
    seg = read_dicom_seg_labelmap(tmp_path / "out" / "series_seg.dcm", 2)
    expected = [p.label_map for p in torch_predictor.predict([read_frames(png)[0] for png in pngs])]
    np.testing.assert_array_equal(seg, np.stack(expected))
