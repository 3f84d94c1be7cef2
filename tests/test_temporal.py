"""Temporal mode for cine loops: the blend, loops through the predictor (LiteMedSAM and sam2 on random weights), a
structure that leaves the view and returns, and a multi-frame DICOM to a DICOM-SEG that dciodvfy accepts and to a
2D+t NIfTI.

Real frames come from the bundle's embedded sample (CC BY 4.0, Timm M. Kandaouroff, usgra-seg 2025)."""

from __future__ import annotations

import io
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from sam2rad_monai.backbones import build_backbone
from sam2rad_monai.batch_inference import InferenceRunner
from sam2rad_monai.inference import Sam2RadPredictor
from sam2rad_monai.io import png_frames_to_multiframe_dicom
from sam2rad_monai.model import Sam2Rad
from sam2rad_monai.temporal import LoopState, blend
from tests.frames import GREY_IDS, SAMPLE, usgra_frame

SHIPPED_MODEL = SAMPLE.parents[1] / "models" / "model.pt"


def test_blend_is_a_moving_average_that_restarts_on_a_new_loop_shape():
    state = LoopState()
    a, b = torch.full((2, 4, 4), 4.0), torch.zeros(2, 4, 4)
    logits, obj = blend(state, a, torch.tensor([2.0, -2.0]), 0.5)
    assert torch.equal(logits, a), "a loop's first frame is its own output"
    logits, obj = blend(state, b, torch.tensor([-2.0, 2.0]), 0.5)
    assert torch.equal(logits, torch.full((2, 4, 4), 2.0)) and torch.equal(obj, torch.zeros(2))
    logits, _ = blend(state, torch.ones(2, 8, 8), torch.zeros(2), 0.5)
    assert torch.equal(logits, torch.ones(2, 8, 8)), "another frame size starts a new loop"
    same = LoopState()
    for x in (a, b):
        assert torch.equal(blend(same, x, torch.zeros(2), 1.0)[0], x), "alpha 1 is per-frame mode"
    with pytest.raises(ValueError, match="alpha must be in"):
        blend(LoopState(), a, torch.zeros(2), 0.0)


def _loop_predictions(predictor: Sam2RadPredictor, frames: list[np.ndarray], order: list[int]):
    """Temporal predictions of the loop ``[frames[i] for i in order]``, each distinct frame encoded once."""
    features, _ = predictor.encode(frames)
    loop = [frames[i] for i in order]
    rows = torch.tensor(order)
    return predictor.predict(loop, features={k: v[rows] for k, v in features.items()}, loop=LoopState())


def test_a_structure_that_leaves_the_view_returns_with_it():
    """A synthetic loop through the predictor's temporal path: class 1 is in view for 4 frames, leaves for 6 (its
    logits and objectness negative, as the PPN gives them for a frame without it), then returns for 6. It vanishes
    while away and is segmented again once back; one frame's drop alone does not remove it. (The network's outputs
    are scripted here: the shipped model calls both structures even on a blank frame, so no real frame is empty.)"""
    torch.manual_seed(0)
    model = Sam2Rad(build_backbone("sam", "vit_b", image_size=64, pretrained=False), num_classes=2, ppn="dense")
    predictor = Sam2RadPredictor(model.eval())
    square = torch.full((16, 16), -8.0)
    square[4:10, 4:10] = 8.0

    def scripted(features, prompts=None, mode="autonomous"):
        present = features["embed"][:, 0, 0, 0]  # 1: class 1 in view, 0: out of view
        sign = (2 * present - 1).reshape(-1, 1, 1)
        logits = torch.stack([torch.where(sign > 0, square, -4.0), torch.full((len(present), 16, 16), -8.0)], 1)
        objectness = torch.stack([torch.where(present > 0, 4.0, -2.0), torch.full_like(present, -4.0)], 1)
        return {"logits": logits, "objectness": objectness, "iou": objectness.sigmoid()}

    model.forward = scripted
    in_view = [1] * 4 + [0] * 6 + [1] * 6
    one_off = [1] * 4 + [0] + [1] * 4
    frames = [np.zeros((64, 64, 3), np.float32)] * len(in_view)
    for flags in (in_view, one_off):
        features = {"embed": torch.tensor(flags, dtype=torch.float32).reshape(-1, 1, 1, 1)}
        preds = predictor.predict(frames[:len(flags)], features=features, loop=LoopState(), alpha=0.5,
                                  presence_alpha=0.5)
        found = [bool((p.label_map == 1).any()) for p in preds]
        assert not any((p.label_map == 2).any() for p in preds)
        if flags is in_view:
            assert found[:4] == [True] * 4 and not any(found[5:10]), "away: gone once the loop has moved on"
            assert all(found[11:]), "back: segmented again"
        else:
            assert all(found), "one frame without it does not drop it (temporal), per-frame mode would"
            assert not (predictor.predict(frames[:1], features={"embed": features["embed"][4:5]})[0].label_map
                        == 1).any()


def test_loops_of_2_and_30_frames_give_one_label_map_per_frame():
    """LiteMedSAM (shipped model, real frames) and sam2 (random weights): a 2-frame and a 30-frame loop give one
    output per frame, and a still loop's temporal output equals per-frame mode's (the blend of equal frames is that
    frame)."""
    lite = Sam2RadPredictor.from_checkpoint(SHIPPED_MODEL, 2)
    frames = [usgra_frame(stem)[0].astype(np.float32) for stem in GREY_IDS]
    torch.manual_seed(0)
    sam2 = Sam2RadPredictor(Sam2Rad(build_backbone("sam2", "sam2.1_tiny", image_size=256, pretrained=False),
                                    num_classes=2).eval())
    for predictor, distinct in ((lite, frames), (sam2, frames[:1])):
        features, _ = predictor.encode(distinct)
        for length in (2, 30):
            rows = torch.tensor([t % len(distinct) for t in range(length)])
            loop = [distinct[i] for i in rows]
            preds = predictor.predict(loop, features={k: v[rows] for k, v in features.items()}, loop=LoopState())
            assert [p.label_map.shape for p in preds] == [(256, 256)] * length
    still = _loop_predictions(lite, frames[:1], [0] * 5)
    alone = lite.predict(frames[:1])[0]
    assert all(np.array_equal(p.label_map, alone.label_map) for p in still)


def test_a_cine_dicom_in_temporal_mode_gives_one_seg_that_dciodvfy_accepts(tmp_path):
    frames = [np.asarray(usgra_frame(stem)[0][..., 0]) for stem in GREY_IDS]
    inp = tmp_path / "in"
    inp.mkdir()
    png_frames_to_multiframe_dicom(frames + frames[::-1], inp / "cine.dcm", spacing_mm=(0.1, 0.1))
    runner = InferenceRunner(Sam2RadPredictor.from_checkpoint(SHIPPED_MODEL, 2), ["nerve", "vessel"],
                             tmp_path / "out", output_format="dicomseg", temporal=True,
                             stdout=io.StringIO(), stderr=io.StringIO())
    summary = runner.run(inp)
    assert not summary.failed and summary.frames == 6
    seg = tmp_path / "out" / "cine_seg.dcm"
    ds = pydicom.dcmread(seg)
    assert ds.Modality == "SEG"
    referenced = {int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
                  for f in ds.PerFrameFunctionalGroupsSequence}
    assert referenced <= set(range(1, 7)) and len(referenced) >= 5
    # NIfTI of a loop: 2D+t, the DICOM's FrameTime as the time step
    (tmp_path / "in2").mkdir()
    png_frames_to_multiframe_dicom(frames[:2], tmp_path / "in2" / "loop.dcm", spacing_mm=(0.1, 0.1),
                                   frame_time_ms=40.0)
    nifti_runner = InferenceRunner(runner.predictor, ["nerve", "vessel"], tmp_path / "out2", temporal=True,
                                   stdout=io.StringIO(), stderr=io.StringIO())
    assert not nifti_runner.run(tmp_path / "in2").failed
    img = nib.load(tmp_path / "out2" / "loop_seg.nii.gz")
    assert img.shape[2:] == (1, 2) and img.header.get_xyzt_units() == ("mm", "sec")
    assert img.header.get_zooms()[3] == pytest.approx(0.04)
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    report = subprocess.run([dciodvfy, str(seg)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors
    with pytest.raises(ValueError, match="--temporal segments loops autonomously"):
        InferenceRunner(runner.predictor, ["nerve", "vessel"], tmp_path / "x", mode="refine", prompts={},
                        temporal=True)


def test_sam2_memory_conditions_on_confident_frames_and_tracks_between():
    """sam2 (random weights, real frame): class 1 is confident on frames 0-4 and 11-14 and not on 5-10, class 2
    never. Confident frames condition SAM2's memory and keep the frame's own mask; the frames between are segmented
    by SAM2 from its memory (its mask decoder's logits, its object score); a class never confident is left as the
    frame gives it; the memory keeps the latest frames only; ``use_memory=False`` blends instead."""
    torch.manual_seed(0)
    model = Sam2Rad(build_backbone("sam2", "sam2.1_tiny", image_size=256, pretrained=False), num_classes=2).eval()
    predictor = Sam2RadPredictor(model, batch_size=4)
    frame = usgra_frame(GREY_IDS[0])[0].astype(np.float32)
    features, _ = predictor.encode([frame])
    confident = [1] * 5 + [0] * 6 + [1] * 4
    square = torch.full((64, 64), -8.0)
    square[20:40, 16:36] = 8.0
    calls = iter(confident)

    def scripted(batch, prompts=None, mode="autonomous"):
        flags = torch.tensor([next(calls) for _ in range(len(batch["embed"]))], dtype=torch.float32)
        logits = torch.stack([torch.where(flags.reshape(-1, 1, 1) > 0, square, -4.0),
                              torch.full((len(flags), 64, 64), -8.0)], 1)
        objectness = torch.stack([torch.where(flags > 0, 4.0, -2.0), torch.full_like(flags, -4.0)], 1)
        return {"logits": logits, "objectness": objectness, "iou": objectness.sigmoid()}

    model.forward = scripted
    rows = torch.zeros(len(confident), dtype=torch.long)
    state = LoopState()
    preds = predictor.predict([frame] * len(confident), features={k: v[rows] for k, v in features.items()},
                              loop=state)
    assert state.frame == len(confident)
    nerve, vessel = state.tracks
    assert sorted(nerve["cond_frame_outputs"]) == [2, 3, 4, 11, 12, 13, 14], "the 7 latest conditioning frames"
    assert sorted(nerve["non_cond_frame_outputs"]) == [5, 6, 7, 8, 9, 10]
    assert not vessel["cond_frame_outputs"] and not vessel["non_cond_frame_outputs"]
    own = (torch.nn.functional.interpolate(square[None, None], size=(256, 256), mode="bilinear") > 0)[0, 0].numpy()
    for t, pred in enumerate(preds):
        assert not (pred.label_map == 2).any()
        if confident[t]:
            np.testing.assert_array_equal(pred.label_map == 1, own)
            np.testing.assert_array_equal(pred.logits[0], square.numpy())
        else:  # SAM2's own decoder output from memory, not the frame's constant -4
            assert not np.allclose(pred.logits[0], -4.0)
            assert pred.objectness[0] == pytest.approx(
                float(nerve["non_cond_frame_outputs"][t]["object_score_logits"].reshape(())))
    calls = iter(confident)
    blended = LoopState(use_memory=False)
    predictor.predict([frame] * len(confident), features={k: v[rows] for k, v in features.items()}, loop=blended)
    assert not blended.tracks and blended.logits is not None


def test_sam2_memory_track_is_sam2s_own_track_step():
    """memory.track on the backbone's features gives what SAM2Base.track_step gives on SAM2's own image path for the
    same loop (random weights, random frames): a conditioning frame with a mask, then frames tracked from memory."""
    from sam2rad_monai.memory import track

    torch.manual_seed(1)
    backbone = build_backbone("sam2", "sam2.1_tiny", image_size=256, pretrained=False)
    sam = backbone.video
    images = torch.randn(4, 3, 256, 256)
    logits = torch.full((1, 64, 64), -8.0)
    logits[0, 20:40, 12:30] = 8.0
    state, reference = LoopState(), {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    with torch.no_grad():
        for t in range(4):
            ours, score = track(backbone, backbone.encode(images[t : t + 1]), logits,
                                torch.tensor([4.0 if t == 0 else -4.0]), state)
            _, feats, pos, sizes = sam._prepare_backbone_features(sam.forward_image(images[t : t + 1]))
            mask = (torch.nn.functional.interpolate(logits[None], size=(256, 256), mode="bilinear") > 0).float()
            out = sam.track_step(t, t == 0, feats, pos, sizes, None, mask if t == 0 else None, reference,
                                 num_frames=16)
            reference["cond_frame_outputs" if t == 0 else "non_cond_frame_outputs"][t] = out
            if t == 0:
                assert torch.equal(ours, logits), "a conditioning frame keeps the model's own mask"
            else:
                torch.testing.assert_close(ours[0], out["pred_masks"][0, 0], atol=1e-3, rtol=1e-3)
                torch.testing.assert_close(score[0], out["object_score_logits"].reshape(()), atol=1e-4, rtol=1e-4)
    assert sorted(state.tracks[0]["non_cond_frame_outputs"]) == [1, 2, 3]
