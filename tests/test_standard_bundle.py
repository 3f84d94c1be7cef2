"""The bundle's standard MONAI interface: ``network_def`` maps a tensor to a tensor, MONAI's bundle checks pass
(``verify_net_in_out``, ``check_properties``, ``ckpt_export``), the standard evaluator of ``inference.json`` gives
the label maps of bundle inference's ``run``, and MONAI Label's generic bundle app serves the bundle.

Real LiteMedSAM weights, the shipped model and the bundle's embedded sample (CC BY 4.0, see its README).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_net_in_out
from monai.data import MetaTensor
from monai.utils import set_determinism
from PIL import Image

from tests.frames import GREY_IDS, SAMPLE, WIDE_RGB
from tests.label_server import label_server
from sam2rad_monai.inference import Sam2RadPredictor
from sam2rad_monai.inputs import read_frames
from sam2rad_monai.network import AsLabelMapd, Sam2RadSegmenter

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
CONFIGS = BUNDLE / "configs"
MODEL = BUNDLE / "models" / "model.pt"
NON_SQUARE_GREY_RGB = "0050"  # 534 x 512 RGB-stored frame


def _dice(a: np.ndarray, b: np.ndarray, k: int) -> float:
    x, y = a == k, b == k
    return 1.0 if not (x.any() or y.any()) else float(2 * (x & y).sum() / (x.sum() + y.sum()))


@pytest.fixture(scope="module")
def predictor() -> Sam2RadPredictor:
    return Sam2RadPredictor.from_checkpoint(MODEL, 2)


def test_segmenter_gives_probabilities_whose_argmax_is_the_predictor_label_map(predictor):
    net = Sam2RadSegmenter(predictor.model).eval()
    assert set(net.state_dict()) == set(predictor.model.ppn_state_dict())  # what models/model.pt holds
    parent = torch.nn.Sequential(net)  # inside a parent module: the full state, which loads back strictly
    assert any(k.startswith("0.model.backbone.") for k in parent.state_dict())
    parent.load_state_dict(parent.state_dict())
    frame = read_frames(SAMPLE / "images" / f"{WIDE_RGB}.png")[0]
    x, (h, w) = predictor.preprocess(frame)
    with torch.no_grad():
        prob = net(x[None])
    assert prob.shape == (1, 3, 256, 256) and prob.min() >= 0 and prob.max() <= 1
    torch.testing.assert_close(prob[:, 0], 1 - prob[:, 1:].amax(dim=1))
    label = prob.argmax(1)[0, :h, :w].float()
    label = torch.nn.functional.interpolate(label[None, None], size=frame.shape[:2], mode="nearest")[0, 0].numpy()
    own = predictor.predict([frame])[0].label_map
    for k in (1, 2):
        assert (own == k).any() and _dice(label, own, k) > 0.97  # nearest vs bilinear resize: boundary pixels only

    # objectness gating: a threshold no class passes gives background everywhere
    with torch.no_grad():
        empty = Sam2RadSegmenter(predictor.model, objectness_threshold=1e9)(x[None])
    assert (empty.argmax(1) == 0).all()


def test_as_label_map_gives_monai_2d_layout_and_drops_the_source_channel_record():
    label = MetaTensor(torch.randint(0, 3, (1, 4, 6)).float(),
                       meta={"filename_or_obj": "frame.png", "original_channel_dim": -1})
    out = AsLabelMapd("pred")({"pred": label})["pred"]
    assert out.dtype == torch.uint8 and out.shape == (6, 4)  # pictures: x first, as MONAI writes 2D images
    assert torch.equal(out, label[0].T.to(torch.uint8)) and out.meta["original_channel_dim"] == "no_channel"
    nifti = MetaTensor(label.clone(), meta={"filename_or_obj": "frame.nii.gz", "original_channel_dim": "no_channel"})
    assert AsLabelMapd("pred")({"pred": nifti})["pred"].shape == (4, 6)  # NIfTI: as stored
    with pytest.raises(ValueError, match="expected class indices"):
        AsLabelMapd("pred")({"pred": torch.zeros(3, 4, 6)})


def test_monai_bundle_checks_pass(tmp_path, predictor, monkeypatch):
    monkeypatch.chdir(BUNDLE)
    meta, logging_conf = "configs/metadata.json", "configs/logging.conf"
    for workflow, files in (("train", ["configs/train.json"]), ("infer", ["configs/inference.json"])):
        flow = ConfigWorkflow(config_file=files, meta_file=meta, logging_file=logging_conf, workflow_type=workflow,
                              output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
        flow.initialize()
        assert flow.check_properties() == [], (workflow, flow.check_properties())
    set_determinism(None)  # train.json's initialize seeded the whole process

    verify_net_in_out(net_id="network_def", meta_file=meta, config_file="configs/inference.json")

    ts_path = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts_path), ckpt_file=str(MODEL), meta_file=meta,
                config_file="configs/inference.json", use_trace=True, input_shape=[1, 3, 256, 256])
    traced = torch.jit.load(str(ts_path))
    eager = Sam2RadSegmenter(predictor.model).eval()
    for stem in (GREY_IDS[0], WIDE_RGB):  # traced on a random input: real frames must give the same output
        x, _ = predictor.preprocess(read_frames(SAMPLE / "images" / f"{stem}.png")[0])
        with torch.no_grad():
            torch.testing.assert_close(traced(x[None]), eager(x[None]), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_standard_evaluator_writes_the_label_maps_of_run(tmp_path, predictor):
    frames = tmp_path / "frames"
    frames.mkdir()
    stems = (GREY_IDS[0], f"sub/{WIDE_RGB}", NON_SQUARE_GREY_RGB)  # a subfolder: the output mirrors the tree
    (frames / "sub").mkdir()
    for stem in stems:
        shutil.copy(SAMPLE / "images" / f"{Path(stem).name}.png", frames / f"{stem}.png")
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "run_frames", "--config_file", "configs/inference.json",
                    "--input", str(frames), "--output_dir", str(tmp_path / "standard")],
                   cwd=BUNDLE, check=True, capture_output=True, timeout=600)
    for stem in stems:
        ours = predictor.predict(read_frames(frames / f"{stem}.png"))[0].label_map  # what run writes
        stored = np.asarray(nib.load(tmp_path / "standard" / f"{stem}_seg.nii.gz").dataobj).astype(np.uint8)
        # stored x first, as bundle inference's NIfTI of a picture
        assert stored.T.shape == ours.shape == Image.open(frames / f"{stem}.png").size[::-1]
        for k in (1, 2):
            assert _dice(stored.T, ours, k) > 0.99, (stem, k)


@pytest.mark.slow
def test_monai_label_generic_bundle_app_serves_the_bundle(tmp_path, predictor):
    pytest.importorskip("monailabel")
    requests = pytest.importorskip("requests")
    from sam2rad_monai.monailabel.__main__ import server_env

    app = tmp_path / "app"
    shutil.copytree(Path(__file__).parent / "monaibundle_app", app)
    bundle = app / "model" / "sam2rad"
    shutil.copytree(CONFIGS, bundle / "configs")
    (bundle / "models").mkdir()
    shutil.copy(MODEL, bundle / "models" / "model.pt")
    studies = tmp_path / "studies"
    studies.mkdir()
    stems = (GREY_IDS[1], NON_SQUARE_GREY_RGB)
    for stem in stems:
        shutil.copy(SAMPLE / "images" / f"{stem}.png", studies)
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", "{port}", "--conf", "models", "sam2rad", "--conf", "zoo_source", "github"]
    with label_server(cmd, tmp_path / "server.log", env=server_env()) as url:
        info = requests.get(f"{url}/info/", timeout=30).json()
        assert info["models"]["sam2rad"]["labels"] == {"nerve": 1, "vessel": 2}
        for stem in stems:
            r = requests.post(f"{url}/infer/sam2rad", params={"image": stem, "output": "image"},
                              data={"params": json.dumps({})}, timeout=300)
            assert r.ok, r.text
            served_path = tmp_path / f"{stem}_served.png"
            served_path.write_bytes(r.content)
            served = np.asarray(Image.open(served_path))
            own = predictor.predict(read_frames(studies / f"{stem}.png"))[0].label_map
            assert served.shape == own.shape
            for k in (1, 2):
                assert _dice(served, own, k) > 0.99, (stem, k)


def test_frame_datalist_keeps_single_frame_files(tmp_path):
    from sam2rad_monai.inputs import frame_datalist
    from sam2rad_monai.io.wrap import png_frames_to_dicom_series, png_frames_to_multiframe_dicom

    shutil.copy(SAMPLE / "images" / f"{GREY_IDS[0]}.png", tmp_path)
    nib.save(nib.Nifti1Image(np.zeros((40, 50), np.float32), np.eye(4)), tmp_path / "frame.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((40, 50, 5), np.float32), np.eye(4)), tmp_path / "cine.nii.gz")  # to run
    pngs = [SAMPLE / "images" / f"{stem}.png" for stem in GREY_IDS]
    still = png_frames_to_dicom_series(pngs[:1], tmp_path / "still")  # a lone single-frame instance
    png_frames_to_dicom_series(pngs[1:], tmp_path / "series")  # two instances: one series, left to run
    png_frames_to_multiframe_dicom(pngs, tmp_path / "loop.dcm")  # a cine loop, left to run
    (tmp_path / "notes.txt").write_text("not an image")
    got = sorted(Path(d["image"]).relative_to(tmp_path).as_posix() for d in frame_datalist(tmp_path))
    assert got == sorted([f"{GREY_IDS[0]}.png", "frame.nii.gz", still[0].relative_to(tmp_path).as_posix()])


def test_inference_config_wires_the_standard_ids():
    parser = ConfigParser()
    parser.read_config(CONFIGS / "inference.json")
    for key in ("network_def", "network", "dataset", "preprocessing", "inferer", "postprocessing", "evaluator",
                "handlers", "initialize", "run", "finalize"):
        assert key in parser, key
    assert parser["network_def"]["_target_"] == "sam2rad_monai.network.Sam2RadSegmenter"
    assert parser["evaluator"]["network"] == "@network" and parser["dataset"]["transform"] == "@preprocessing"
