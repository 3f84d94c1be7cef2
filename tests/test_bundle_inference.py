"""Bundle inference (configs/inference.json + sam2rad_monai.batch_inference): DICOM in, DICOM-SEG out, bad input.

The model is an untrained PPN (seeded) on the real LiteMedSAM encoder: what matters here is that every input path
gives the same answer for the same pixels, not how good the answer is. Frames come from the bundle's embedded usgra
sample (CC BY 4.0, Timm M. Kandaouroff, usgra-seg 2025) and are wrapped as DICOM in temp folders, so every test here
runs on a fresh clone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from sam2rad_monai.backbones import build_backbone
from sam2rad_monai.batch_inference import InferenceRunner
from sam2rad_monai.inputs import discover_inputs
from sam2rad_monai.prompt_file import load_prompts
from sam2rad_monai.inference import FramePrompts, Sam2RadPredictor
from sam2rad_monai.io import (
    png_frames_to_dicom_series,
    png_frames_to_multiframe_dicom,
    read_dicom_seg_labelmap,
    read_nifti_labelmap,
)
from sam2rad_monai.metrics import per_class_scores
from sam2rad_monai.model import Sam2Rad
from tests.frames import GREY_IDS, SAMPLE as SAMPLE_DIR

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
SAMPLE = SAMPLE_DIR / "images" / f"{GREY_IDS[0]}.png"
DCIODVFY = Path("/usr/bin/dciodvfy")
CLASSES = ["nerve", "vessel"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(Sam2Rad(build_backbone(), len(CLASSES)).ppn_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def predictor(model_path: Path) -> Sam2RadPredictor:
    return Sam2RadPredictor.from_checkpoint(model_path, len(CLASSES))


def _grey(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8)


def _dice(pred: np.ndarray, gt: np.ndarray) -> list[float]:
    scores = per_class_scores(pred, gt, len(CLASSES))
    return [scores[k]["dice"] for k in sorted(scores)]


# --------------------------------------------------------------------------------------- end to end, bundle CLI


@pytest.mark.slow
def test_bundle_dicomseg_matches_png_nifti(tmp_path: Path, model_path: Path) -> None:
    """One `monai.bundle run` over PNGs + a DICOM series + a multi-frame DICOM: SEG Dice == PNG/NIfTI Dice."""
    ids = GREY_IDS
    pngs = [SAMPLE_DIR / "images" / f"{i}.png" for i in ids]
    gts = [np.asarray(Image.open(SAMPLE_DIR / "masks" / f"{i}.png"), dtype=np.uint8) for i in ids]
    inp, out = tmp_path / "in", tmp_path / "out"
    (inp / "png").mkdir(parents=True)
    for p in pngs:
        shutil.copy(p, inp / "png" / p.name)
    png_frames_to_dicom_series(pngs, inp / "series", spacing_mm=(0.08, 0.08))
    png_frames_to_multiframe_dicom(pngs, inp / "cine.dcm", spacing_mm=(0.08, 0.08))

    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--input", str(inp), "--output_dir", str(out), "--output_format", "dicomseg",
         "--model_path", str(model_path)],
        cwd=BUNDLE, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "3 non-DICOM input(s) written as NIfTI" in done.stderr
    assert "5 of 5 input(s) ok, 0 failed; 9 frame(s)" in done.stdout

    png_labels = np.stack([read_nifti_labelmap(out / "png" / f"{i}_seg.nii.gz") for i in ids])
    png_dice = [_dice(p, g) for p, g in zip(png_labels, gts)]
    for name in ("series_seg.dcm", "cine_seg.dcm"):
        seg_labels = read_dicom_seg_labelmap(out / name, len(CLASSES))
        assert seg_labels.shape == png_labels.shape
        assert [_dice(s, g) for s, g in zip(seg_labels, gts)] == png_dice
        np.testing.assert_array_equal(seg_labels, png_labels)
        ds = pydicom.dcmread(out / name)
        assert ds.Modality == "SEG" and ds.SegmentSequence[0].SegmentLabel == "nerve"
        if DCIODVFY.exists():
            report = subprocess.run([str(DCIODVFY), str(out / name)], capture_output=True, text=True, timeout=120)
            errors = [ln for ln in (report.stdout + report.stderr).splitlines() if ln.startswith("Error")]
            assert not errors, f"{name}: {errors}"
    if not DCIODVFY.exists():
        pytest.skip("dciodvfy (dicom3tools) is not installed; SEGs were not validated")


# --------------------------------------------------------------------------------------- bad input, in process


def _write_dicom(ds: Dataset, path: Path) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def _structured_report(path: Path) -> Path:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR: no pixel data
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SR"
    ds.PatientName = "Test"
    return _write_dicom(ds, path)


def _bad_input_folder(root: Path) -> dict[str, str]:
    """A folder with one good PNG, one good DICOM and bad files; returns {file: expected reason fragment}."""
    root.mkdir()
    frame = _grey(SAMPLE)
    shutil.copy(SAMPLE, root / "good.png")
    nib.save(nib.Nifti1Image(frame, np.diag([0.2, 0.3, 1.0, 1.0])), root / "good_nifti.nii.gz")  # axis 0 = rows
    png_frames_to_dicom_series([frame], root / "tmp_good")
    (root / "tmp_good" / "IM0001.dcm").rename(root / "good.dcm")
    (root / "tmp_good").rmdir()
    cine = png_frames_to_multiframe_dicom([frame[:64, :64], frame[64:128, :64]], root / "cine_src.dcm")
    # multi-frame files are inputs on their own, so their faults are theirs alone
    data = cine.read_bytes()
    (root / "truncated.dcm").write_bytes(data[: len(data) - 3000])
    ds = pydicom.dcmread(cine)
    ds.PhotometricInterpretation = "CMYK"
    ds.SOPInstanceUID = generate_uid()
    _write_dicom(ds, root / "odd_colours.dcm")
    ds = pydicom.dcmread(cine)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: pydicom has no decoder
    ds.PixelData = encapsulate([bytes(64 * 64)] * 2)  # stand-in fragments; only the syntax matters
    ds["PixelData"].VR = "OB"
    ds.save_as(root / "mpeg2.dcm", enforce_file_format=True)
    cine.unlink()
    _structured_report(root / "report.dcm")
    (root / "notes.dcm").write_text("not a dicom file\n")
    (root / "broken.png").write_bytes(SAMPLE.read_bytes()[:400])
    (root / "README.txt").write_text("ignored\n")
    (root / "empty").mkdir()
    mixed = root / "mixed"
    png_frames_to_dicom_series([frame], mixed / "a")
    png_frames_to_dicom_series([frame], mixed / "b")
    (mixed / "a" / "IM0001.dcm").rename(mixed / "one.dcm")
    (mixed / "b" / "IM0001.dcm").rename(mixed / "two.dcm")
    (mixed / "a").rmdir()
    (mixed / "b").rmdir()
    return {
        "truncated.dcm": "truncated",
        "odd_colours.dcm": "unsupported photometric interpretation 'CMYK'",
        "mpeg2.dcm": "MPEG2",
        "report.dcm": "no pixel data",
        "notes.dcm": "not a DICOM file",
        "broken.png": "corrupt or truncated",
        "empty": "folder holds no PNG, JPEG, NIfTI or DICOM files",
        "mixed": "folder mixes 2 series",
    }


def test_bad_inputs_reported_good_ones_written(tmp_path: Path, predictor: Sam2RadPredictor,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _bad_input_folder(tmp_path / "in")
    out = tmp_path / "out"
    # one frame per encoder batch: the three good inputs are compared pixel for pixel below, and a frame's logits
    # move by ~1e-6 with the size of the batch it shares (BLAS blocking), enough to flip a tie of the untrained PPN
    monkeypatch.setattr(predictor, "batch_size", 1)
    runner = InferenceRunner(predictor, CLASSES, out, output_format="nifti")
    summary = runner.run(tmp_path / "in")
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("ERROR ")]

    assert len(errors) == len(expected), err
    for name, reason in expected.items():
        hits = [ln for ln in errors if f"/{name}:" in ln]
        assert len(hits) == 1 and reason in hits[0], (name, errors)
    assert {r.name for r in summary.failed} == set(expected)
    with pytest.raises(SystemExit) as stop:
        summary.exit()
    assert stop.value.code == 1

    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [
        "good_dcm_seg.nii.gz", "good_nifti_seg.nii.gz", "good_seg.nii.gz"]
    png_out = read_nifti_labelmap(out / "good_seg.nii.gz")
    # a NIfTI input's output keeps its array layout and affine, so it overlays voxel for voxel
    nifti_out = nib.load(out / "good_nifti_seg.nii.gz")
    np.testing.assert_array_equal(np.asarray(nifti_out.dataobj), png_out)
    np.testing.assert_allclose(nifti_out.affine, np.diag([0.2, 0.3, 1.0, 1.0]))
    dcm_out = nib.load(out / "good_dcm_seg.nii.gz")
    np.testing.assert_array_equal(png_out, read_nifti_labelmap(out / "good_dcm_seg.nii.gz"))
    assert png_out.shape == _grey(SAMPLE).shape
    # the DICOM's US region calibration (0.1 mm) reaches the NIfTI; the PNG's unknown pixel size stays 1 mm
    np.testing.assert_allclose(dcm_out.header.get_zooms()[:2], (0.1, 0.1), rtol=1e-6)
    np.testing.assert_allclose(nib.load(out / "good_seg.nii.gz").header.get_zooms()[:2], (1.0, 1.0))


def test_writes_are_atomic(tmp_path: Path, predictor: Sam2RadPredictor, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """A write that dies half way leaves neither a partial output nor a temp file, and the next input still runs."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    shutil.copy(SAMPLE, inp / "a.png")
    shutil.copy(SAMPLE, inp / "b.png")
    real_save, calls = nib.save, []

    def dying_save(img: nib.Nifti1Image, filename: str | Path) -> None:
        calls.append(filename)
        if len(calls) == 1:
            Path(filename).write_bytes(b"\x5c\x01\x00\x00" * 100)  # the start of a NIfTI, then the disk is full
            raise OSError("No space left on device")
        real_save(img, filename)

    monkeypatch.setattr(nib, "save", dying_save)
    summary = InferenceRunner(predictor, CLASSES, out).run(inp)
    assert [r.name for r in summary.failed] == ["a.png"]
    assert "cannot write the output (OSError: No space left on device)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["b_seg.nii.gz"]  # no a_seg.nii.gz, no .tmp-* left


# --------------------------------------------------------------------------------------- prompts and inputs


def test_refine_and_manual_need_prompts(tmp_path: Path, predictor: Sam2RadPredictor) -> None:
    for mode in ("refine", "manual"):
        with pytest.raises(ValueError, match=f"--mode {mode} needs user prompts: pass --prompts"):
            InferenceRunner(predictor, CLASSES, tmp_path, mode=mode)
    bad = tmp_path / "bad.json"
    bad.write_text('{"a.png": {"artery": {"box": [0, 0, 5, 5]}}}')
    with pytest.raises(ValueError, match="unknown class 'artery'"):
        load_prompts(bad, CLASSES)
    bad.write_text('{"a.png": {"nerve": {"box": [5, 5, 0, 0]}}}')
    with pytest.raises(ValueError, match="box must be"):
        load_prompts(bad, CLASSES)


def test_manual_mode_segments_only_prompted(tmp_path: Path, predictor: Sam2RadPredictor) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(SAMPLE, inp / "a.png")
    shutil.copy(SAMPLE, inp / "b.png")
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"a.png": {"vessel": {"box": [150, 150, 300, 300], "points": [[220, 220, 1]]}}}')
    summary = InferenceRunner(predictor, CLASSES, tmp_path / "out", mode="manual", prompts=prompts).run(inp)
    assert [r.name for r in summary.failed] == ["b.png"]  # manual mode with nothing prompted is an error
    labels = read_nifti_labelmap(tmp_path / "out" / "a_seg.nii.gz")
    assert set(np.unique(labels)) <= {0, 2} and (labels == 2).any()


def test_autonomous_mode_ignores_user_prompts(predictor: Sam2RadPredictor) -> None:
    # a box must not keep a class the PPN's objectness drops: evaluation's lp mode once leaked ground-truth presence
    frame = _grey(SAMPLE)
    boxes = FramePrompts(boxes={0: (100.0, 100.0, 300.0, 300.0), 1: (150.0, 150.0, 350.0, 350.0)})
    threshold = predictor.objectness_threshold
    try:
        predictor.objectness_threshold = float("-inf")  # every class passes: the decoder paints something
        assert predictor.predict([frame], "autonomous")[0].masks.any()
        predictor.objectness_threshold = float("inf")  # no class passes
        assert not predictor.predict([frame], "autonomous", [boxes])[0].masks.any()
        assert predictor.predict([frame], "refine", [boxes])[0].masks.any()  # a user prompt keeps its class there
    finally:
        predictor.objectness_threshold = threshold


def test_discover_inputs_groups_series_and_names_outputs(tmp_path: Path) -> None:
    frame = _grey(SAMPLE)[:32, :32]
    png_frames_to_dicom_series([frame, frame, frame], tmp_path / "study" / "s1")
    png_frames_to_multiframe_dicom([frame, frame], tmp_path / "study" / "cine")  # no suffix: still DICOM
    Image.fromarray(frame).save(tmp_path / "study" / "s1.png")
    items = discover_inputs(tmp_path / "study")
    got = {(i.kind, i.name, i.output_stem.as_posix(), len(i.paths), i.error) for i in items}
    assert got == {("dicom", "cine", "cine", 1, None), ("image", "s1.png", "s1", 1, None),
                   ("series", "s1", "s1_series", 3, None)}
    series = discover_inputs(tmp_path / "study" / "s1")
    assert [(i.kind, i.name, i.output_stem.as_posix()) for i in series] == [("series", "s1", "s1")]
