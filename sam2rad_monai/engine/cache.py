"""Frozen-encoder feature cache: encode each (image, augmentation view) once, train the PPN on the stored features.

An entry holds the backbone features (fp16) of one augmented view of one image together with that view's label map
and targets, so a cached epoch needs neither the encoder nor the augmentation. Entries are keyed by the image and
label file contents, the view index, the seed, the backbone identity (family, variant, input size, weights digest)
and the preprocessing / augmentation settings: a change to any of them is a miss, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from ..backbones import Backbone, Features
from ..io.atomic import atomic_write_path
from ..transforms import augment_view, augmentation_transforms, preprocessing_transforms

logger = logging.getLogger(__name__)
CACHE_FORMAT = 1


class FeatureCache:
    """On-disk store of backbone features per (image, view).

    Args:
        cache_dir: folder of the cache (entries go in a sub-folder per backbone identity).
        backbone: the frozen backbone that computes the features.
        num_classes: foreground classes of the label maps.
        seed: base seed of the augmentation views (view 0 is the un-augmented image).
        aug_prob: probability of each augmentation step in views > 0.
        batch_size: images per encoder batch when filling the cache; ``None``: decided when filling, 1 where the
            backbone is on a CPU (LiteMedSAM's encoder there runs an image alone faster than in a batch,
            docs/BENCHMARKS.md "Encoder runtimes"), else 8.
        rotate_degrees, vertical_flip: the augmentation's rotation range and vertical flip
            (:func:`~sam2rad_monai.transforms.augmentation_transforms`).
        encoder: what encodes images (B, 3, S, S) into features; default ``backbone.encode``. An exported runtime's
            ``encode`` (:func:`~sam2rad_monai.runtime.cache_encoder`) computes the same fp32 features to well within
            the fp16 the entries are stored in, so its entries share the PyTorch ones' keys.
    """

    def __init__(self, cache_dir: str | Path, backbone: Backbone, num_classes: int, seed: int = 0,
                 aug_prob: float = 0.5, batch_size: int | None = None, rotate_degrees: float = 90.0,
                 vertical_flip: bool = True, encoder: Callable[[torch.Tensor], Features] | None = None) -> None:
        self.backbone = backbone
        self.encoder = encoder or backbone.encode
        self.num_classes = num_classes
        self.seed = seed
        self.aug_prob = aug_prob
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        size = backbone.image_size
        self.preprocess = preprocessing_transforms(size, backbone.pixel_mean, backbone.pixel_std, num_classes)
        self.augment = augmentation_transforms(size, prob=aug_prob, num_classes=num_classes,
                                               rotate_degrees=rotate_degrees, vertical_flip=vertical_flip)
        settings = {"format": CACHE_FORMAT, "backbone": backbone.identity(), "mean": backbone.pixel_mean,
                    "std": backbone.pixel_std, "classes": num_classes, "seed": seed, "aug_prob": aug_prob}
        if (rotate_degrees, vertical_flip) != (90.0, True):  # the paper's augmentation keeps its existing keys
            settings.update(rotate_degrees=float(rotate_degrees), vertical_flip=bool(vertical_flip))
        self.signature = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        self.root = Path(cache_dir) / f"{backbone.name}-{backbone.variant}-{backbone.image_size}"
        self._content: dict[str, str] = {}

    # -- keys -------------------------------------------------------------------------------------------------
    def content_digest(self, item: dict[str, Any]) -> str:
        """SHA-256 of the image and label file bytes (memoised per path pair)."""
        memo = f"{item['image']}|{item.get('label')}"
        if memo not in self._content:
            digest = hashlib.sha256()
            for key in ("image", "label"):
                if item.get(key) is not None:
                    digest.update(Path(item[key]).read_bytes())
            self._content[memo] = digest.hexdigest()
        return self._content[memo]

    def path(self, item: dict[str, Any], view: int) -> Path:
        key = hashlib.sha256(f"{self.content_digest(item)}/{view}/{self.signature}".encode()).hexdigest()
        return self.root / key[:2] / f"{key}.pt"

    # -- read / fill ------------------------------------------------------------------------------------------
    def load(self, item: dict[str, Any], view: int) -> dict[str, Any]:
        """The cached entry of (item, view); encodes and stores it first on a miss."""
        path = self.path(item, view)
        if path.is_file():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # a corrupt entry (disk full, edited by hand): rebuild it
                logger.warning("rebuilding unreadable cache entry %s (%s)", path, str(err).splitlines()[0])
                path.unlink(missing_ok=True)
        self.fill([(item, view)])
        return self.load(item, view)

    def fill(self, pairs: Sequence[tuple[dict[str, Any], int]], progress: Callable[[int], None] | None = None) -> int:
        """Encode and store every (item, view) not in the cache yet, in encoder batches. Returns the count encoded."""
        todo = [(item, view) for item, view in pairs if not self.path(item, view).is_file()]
        base: dict[str, dict[str, Any]] = {}
        batch = self.batch_size
        if batch is None:  # the backbone may have moved to its device after this cache was built
            on_cpu = all(p.device.type == "cpu" for p in self.backbone.parameters())
            batch = 1 if on_cpu or self.encoder != self.backbone.encode else 8
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            samples = []
            for item, view in chunk:
                key = str(item["image"])
                if key not in base:
                    try:
                        base[key] = self.preprocess(dict(item))
                    except Exception as err:
                        while err.__cause__ is not None:  # MONAI wraps the reader's own message
                            err = err.__cause__
                        raise RuntimeError(f"{item['image']}: cannot be loaded for training ({err})") from err
                samples.append(augment_view(base[key], view, self.seed, image_key=self.content_digest(item),
                                            num_classes=self.num_classes, transform=self.augment))
            # plain tensors: MetaTensor metadata must not reach the encoder outputs or the cache files
            images = torch.stack([convert_to_tensor(s["image"], track_meta=False).float() for s in samples])
            if self.encoder == self.backbone.encode:
                images = images.to(next(self.backbone.parameters()).device)
            features = self.encoder(images)
            for i, ((item, view), sample) in enumerate(zip(chunk, samples)):
                entry = {
                    "features": {k: v[i].to(torch.float16).clone() for k, v in features.items()},
                    "label": convert_to_tensor(sample["label"], track_meta=False)[0].to(torch.uint8).clone(),
                    "boxes": convert_to_tensor(sample["boxes"], track_meta=False).float(),
                    "present": convert_to_tensor(sample["present"], track_meta=False).float(),
                }
                with atomic_write_path(self.path(item, view)) as tmp:
                    torch.save(entry, tmp)
            if progress is not None:
                progress(len(chunk))
        return len(todo)


class CachedFeatureDataset(Dataset):
    """Training samples read from a :class:`FeatureCache`: each access picks one of the image's cached views.

    Items are ``{"features": {name: fp16 tensor}, "masks": (C, S, S), "boxes": (C, 4), "present": (C,), "id"}``.
    Per-view maps set in :attr:`view_maps` (``{(index, view): (K, h, w)}``, a dense PPN's neighbour similarities,
    which depend on the training set and not on the image alone) join the features under ``"neighbours"``.

    Args:
        data: MONAI datalist entries ``{"image", "label", "id"}``.
        cache: the feature cache.
        num_views: views per image (view 0 = no augmentation); 1 disables augmentation.
        random_view: draw a view per access (training); ``False`` always serves view 0 (validation).
        flip_prob: probability of mirroring a served view left-right in feature space (features, masks and boxes
            together): a second view for free, where another cached view costs an encoder pass. SAM encoders are
            not exactly mirror-equivariant, so this is an augmentation of the features, not a copy of an encoded
            flip.
    """

    def __init__(self, data: Sequence[dict[str, Any]], cache: FeatureCache, num_views: int = 4,
                 random_view: bool = True, flip_prob: float = 0.0) -> None:
        if num_views < 1:
            raise ValueError(f"num_views must be at least 1, got {num_views}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.data = list(data)
        self.cache = cache
        self.num_views = num_views
        self.random_view = random_view
        self.flip_prob = flip_prob if random_view else 0.0
        self.view_maps: dict[tuple[int, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.data)

    def views(self) -> list[int]:
        return list(range(self.num_views)) if self.random_view else [0]

    def prepare(self) -> int:
        """Fill the cache for every (image, view) before training; under torch.distributed each rank fills its share.

        Returns the number of entries this process encoded.
        """
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        pairs = [(item, v) for item in self.data for v in self.views()][rank::world]
        from tqdm import tqdm

        with tqdm(total=len(pairs), desc="feature cache", unit="view", disable=rank > 0) as bar:
            done = self.cache.fill(pairs, progress=bar.update)
        if dist.is_initialized():
            dist.barrier()
        logger.info("feature cache %s: %d of %d views encoded now", self.cache.root, done, len(pairs))
        return done

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.data[index]
        view = int(torch.randint(self.num_views, ()).item()) if self.random_view else 0
        entry = self.cache.load(item, view)
        label = entry["label"]
        masks = torch.stack([label == k for k in range(1, self.cache.num_classes + 1)]).float()
        features, boxes = entry["features"], entry["boxes"]
        if (index, view) in self.view_maps:
            features = {**features, "neighbours": self.view_maps[(index, view)]}
        if self.flip_prob and torch.rand(()) < self.flip_prob:
            features = {k: v.flip(-1) for k, v in features.items()}
            masks = masks.flip(-1)
            # inclusive pixel corners: x -> S - 1 - x swaps the two x edges; absent classes keep their zero box
            width = masks.shape[-1] - 1
            flipped = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            boxes = torch.where(entry["present"][:, None] > 0.5, flipped, boxes)
        return {"features": features, "masks": masks, "boxes": boxes, "present": entry["present"],
                "id": str(item.get("id", index))}


