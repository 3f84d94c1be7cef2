"""Pieces of the MONAI Label app that need no server: frame reading, label files, settings, the pydicom shim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("monailabel")

from sam2rad_monai.io import png_frames_to_dicom_series, read_nifti_labelmap  # noqa: E402
from sam2rad_monai.monailabel.__main__ import COMPAT_DIR, server_env  # noqa: E402
from sam2rad_monai.monailabel.tasks import AppSettings, read_frame, write_label  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "bundle" / "data" / "usgra_sample"  # CC BY 4.0, see its README


def test_dicom_and_png_frames_read_the_same(tmp_path):
    png = SAMPLE / "images" / "0017.png"
    (dicom,) = png_frames_to_dicom_series([png], tmp_path / "series")
    from_png, from_dicom = read_frame(png), read_frame(dicom)
    assert from_png.shape == from_dicom.shape == (*np.asarray(Image.open(png)).shape[:2], 3)
    assert np.array_equal(from_png, from_dicom)


def test_unreadable_study_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="broken.png"):
        read_frame(bad)


@pytest.mark.parametrize("extension", [".nii.gz", ".png"])
def test_label_files_read_back(extension):
    label_map = np.zeros((30, 40), np.uint8)
    label_map[5:10, 20:35] = 2
    path = Path(write_label(label_map, extension))
    try:
        back = read_nifti_labelmap(path) if extension == ".nii.gz" else np.asarray(Image.open(path))
        assert np.array_equal(back, label_map)
    finally:
        path.unlink()
    with pytest.raises(ValueError, match="result_extension"):
        write_label(label_map, ".jpg")


def test_settings_from_conf(tmp_path):
    s = AppSettings.from_conf({"model_path": str(tmp_path / "m.pt"), "class_names": "nerve, vessel, tendon"},
                              str(tmp_path))
    assert s.labels == {"nerve": 1, "vessel": 2, "tendon": 3}
    assert s.cache_dir == tmp_path / "cache"


def test_monailabel_imports_under_pydicom3_with_the_shim():
    code = "import monailabel.interfaces.app, pydicom_seg; print('ok')"
    env = server_env()
    assert env["PYTHONPATH"].split(":")[0] == str(COMPAT_DIR)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_auto_infer_segments_a_cine_study_as_a_loop(tmp_path):
    """A 3-frame cine DICOM (real sample frames) through the auto task: one 2D+t NIfTI with the DICOM's frame
    time, the temporal predictor's label maps (per-frame ones with ``temporal: false``); a loop cannot be PNG,
    and the interactive task refuses it by name."""
    import nibabel as nib

    from sam2rad_monai.inputs import read_frames
    from sam2rad_monai.io import png_frames_to_multiframe_dicom
    from sam2rad_monai.monailabel.tasks import (
        ModelHolder,
        RequestError,
        Sam2RadAutoInfer,
        Sam2RadInteractiveInfer,
    )
    from sam2rad_monai.temporal import LoopState

    frames = [np.asarray(Image.open(SAMPLE / "images" / f"{i}.png").convert("L")) for i in ("0017", "0031", "0017")]
    cine = png_frames_to_multiframe_dicom(frames, tmp_path / "cine.dcm", spacing_mm=(0.1, 0.1), frame_time_ms=50.0)
    holder = ModelHolder(AppSettings(SAMPLE.parents[1] / "models" / "model.pt", ["nerve", "vessel"]))
    task = Sam2RadAutoInfer(holder)
    study = read_frames(cine)
    features, _ = holder.predictor.encode(study)
    temporal = [p.label_map for p in holder.predictor.predict(study, features=features, loop=LoopState())]
    per_frame = [p.label_map for p in holder.predictor.predict(study, features=features)]
    assert any(not np.array_equal(a, b) for a, b in zip(temporal, per_frame)), "the blend changes a frame"
    for request, expected in (({}, temporal), ({"temporal": "false"}, per_frame)):
        path, info = task({"image": str(cine), **request})
        try:
            img = nib.load(path)
            assert img.shape == (512, 512, 1, 3) and img.header.get_zooms()[3] == pytest.approx(0.05)
            np.testing.assert_array_equal(read_nifti_labelmap(path), np.stack(expected))
        finally:
            Path(path).unlink()
        assert info["frames"] == 3 and info["temporal"] is (request == {})
        assert info["found"] == ["nerve", "vessel"]
        assert info["frames_found"] == {n: sum((m == k).any() for m in expected) for k, n in ((1, "nerve"),
                                                                                           (2, "vessel"))}
    with pytest.raises(RequestError, match="cannot hold a loop of 3 frames"):
        task({"image": str(cine), "result_extension": ".png"})
    with pytest.raises(RequestError, match="has 3 frames; only auto inference labels a loop"):
        Sam2RadInteractiveInfer(holder)({"image": str(cine), "label": "nerve", "roi": [1, 1, 20, 20]})
