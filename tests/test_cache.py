"""The frozen-encoder feature cache: hits, misses, invalidation, and a cached epoch that never runs the encoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sam2rad_monai.backbones import LiteMedSAMBackbone
from sam2rad_monai.engine.cache import ULTRASOUND_GEOMETRY, CachedFeatureDataset, FeatureCache

SAMPLE = Path(__file__).resolve().parents[1] / "bundle" / "data" / "usgra_sample"


@pytest.fixture(scope="module")
def backbone() -> LiteMedSAMBackbone:
    return LiteMedSAMBackbone()


@pytest.fixture()
def items(tmp_path: Path) -> list[dict[str, str]]:
    out = []
    for stem in ("0197", "0015"):  # 0197 has no vessel
        for sub in ("images", "masks"):
            (tmp_path / sub).mkdir(exist_ok=True)
            shutil.copy(SAMPLE / sub / f"{stem}.png", tmp_path / sub / f"{stem}.png")
        out.append({"image": str(tmp_path / "images" / f"{stem}.png"), "label": str(tmp_path / "masks" / f"{stem}.png"),
                    "id": stem})
    return out


class CountingEncoder:
    """Counts encoder passes of a backbone (wraps ``encode``)."""

    def __init__(self, backbone: LiteMedSAMBackbone) -> None:
        self.calls = 0
        self._encode = backbone.encode

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += images.shape[0]
        return self._encode(images)


def test_hit_miss_and_cached_epoch_runs_no_encoder(backbone, items, tmp_path, monkeypatch):
    counter = CountingEncoder(backbone)
    monkeypatch.setattr(backbone, "encode", counter)
    cache = FeatureCache(tmp_path / "cache", backbone, num_classes=2, seed=0)
    dataset = CachedFeatureDataset(items, cache, num_views=2)
    assert dataset.prepare() == 4 and counter.calls == 4  # 2 images x 2 views, encoded once
    assert dataset.prepare() == 0 and counter.calls == 4  # all hits
    for _ in range(2):  # two "epochs"
        for i in range(len(dataset)):
            sample = dataset[i]
    assert counter.calls == 4, "a cached epoch must not run the encoder"
    assert sample["features"]["embed"].dtype == torch.float16 and sample["features"]["embed"].shape == (256, 64, 64)
    assert sample["masks"].shape == (2, 256, 256) and sample["boxes"].shape == (2, 4)
    # the cached features are the encoder's own output for view 0
    entry = cache.load(items[1], 0)
    image = cache.preprocess(dict(items[1]))["image"]
    expected = counter._encode(torch.as_tensor(image)[None].float())["embed"][0].half()
    assert torch.equal(entry["features"]["embed"], expected)
    # the absent class of 0197 is absent in every view; 0015 has both classes in view 0
    assert cache.load(items[0], 1)["present"].tolist() == [1.0, 0.0]
    assert cache.load(items[1], 0)["present"].tolist() == [1.0, 1.0]


def test_views_differ_and_boxes_follow_them(backbone, items, tmp_path):
    cache = FeatureCache(tmp_path / "cache", backbone, num_classes=2, seed=0)
    cache.fill([(items[1], v) for v in range(4)])
    entries = [cache.load(items[1], v) for v in range(4)]
    assert any(not torch.equal(entries[0]["label"], e["label"]) for e in entries[1:])
    for e in entries:
        for c in range(2):
            ys, xs = torch.nonzero(e["label"] == c + 1, as_tuple=True)
            if len(xs):
                assert e["boxes"][c].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]


def test_invalidation_on_content_view_seed_and_backbone(backbone, items, tmp_path):
    cache = FeatureCache(tmp_path / "cache", backbone, num_classes=2, seed=0)
    first = cache.path(items[0], 0)
    assert cache.path(items[0], 1) != first  # view
    assert FeatureCache(tmp_path / "cache", backbone, 2, seed=1).path(items[0], 0) != first  # seed
    assert FeatureCache(tmp_path / "cache", backbone, 2, aug_prob=0.3).path(items[0], 0) != first  # augmentation
    assert FeatureCache(tmp_path / "cache", backbone, 2, vertical_flip=False).path(items[0], 0) != first
    assert FeatureCache(tmp_path / "cache", backbone, 2, rotate_degrees=15.0).path(items[0], 0) != first
    original = backbone.weights_digest
    try:
        backbone.weights_digest = "other-weights"  # what a different checkpoint file gives
        assert FeatureCache(tmp_path / "cache", backbone, 2).path(items[0], 0) != first
    finally:
        backbone.weights_digest = original
    cache.fill([(items[0], 0)])
    assert first.is_file()
    # editing the label file (same name) is a miss: the key follows the content, not the path
    from PIL import Image
    import numpy as np

    label = np.array(Image.open(items[0]["label"]))
    label[:5, :5] = 1
    Image.fromarray(label).save(items[0]["label"])
    fresh = FeatureCache(tmp_path / "cache", backbone, num_classes=2, seed=0)
    assert fresh.path(items[0], 0) != first
    assert fresh.fill([(items[0], 0)]) == 1


def test_corrupt_entry_is_rebuilt(backbone, items, tmp_path):
    cache = FeatureCache(tmp_path / "cache", backbone, num_classes=2)
    cache.fill([(items[0], 0)])
    path = cache.path(items[0], 0)
    path.write_bytes(path.read_bytes()[:100])
    entry = cache.load(items[0], 0)
    assert entry["features"]["embed"].shape == (256, 64, 64)


def test_ensemble_members_read_their_own_views_and_share_view_0(backbone, items, tmp_path, monkeypatch):
    counter = CountingEncoder(backbone)
    monkeypatch.setattr(backbone, "encode", counter)
    cache = FeatureCache(tmp_path / "cache", backbone, num_classes=2, seed=0)
    recipe = json.loads((SAMPLE.parents[1] / "configs" / "few_shot.json").read_text())["member_augmentations"]
    assert recipe == [list(ULTRASOUND_GEOMETRY)], "the MONAI Label trainer's default is the few-shot recipe's"
    geometry = cache.variants([ULTRASOUND_GEOMETRY])
    assert len(geometry) == 1 and geometry[0].signature != cache.signature
    with pytest.raises(ValueError, match="rotate_degrees, vertical_flip"):
        cache.variants([(15.0, "false")])  # what a command line's lower-case false becomes
    assert geometry[0].signature == FeatureCache(tmp_path / "cache", backbone, 2, rotate_degrees=15.0,
                                                 vertical_flip=False).signature
    dataset = CachedFeatureDataset(items, cache, num_views=2, member_caches=geometry)
    assert dataset.views() == [(0, 0), (0, 1), (1, 1)]
    assert dataset.prepare() == 6 and counter.calls == 6  # 2 images x (view 0, member 0's view 1, member 1's view 1)
    assert not geometry[0].path(items[0], 0).exists(), "member 1's view 0 is member 0's"
    assert torch.equal(dataset.load(items[0], 1, 0)["features"]["embed"], cache.load(items[0], 0)["features"]["embed"])
    assert not torch.equal(dataset.load(items[1], 1, 1)["label"], dataset.load(items[1], 0, 1)["label"])
    dataset.view_maps = {(i, m, v): torch.full((3, 64, 64), float(10 * m + v)) for i in range(2) for m, v in
                         dataset.views()}  # what SetPrototypes computes for each served (member, view)
    torch.manual_seed(0)
    samples = [dataset[i % 2]["features"] for i in range(24)]
    assert {int(f["member"]) for f in samples} == {0, 1} and counter.calls == 6
    assert {float(f["neighbours"][0, 0, 0]) for f in samples} == {0.0, 1.0, 11.0}, "every served view has its maps"
    assert "member" not in CachedFeatureDataset(items, cache, num_views=2)[0]["features"], "one member: no index"
