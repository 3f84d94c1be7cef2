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
# the (rotate_degrees, vertical_flip) views of the few-shot recipe's second trunk (configs/few_shot.json): a scanner
# never shows depth running upwards, and a probe tilts by a few degrees
ULTRASOUND_GEOMETRY: tuple[float, bool] = (15.0, False)


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
        self.cache_dir = cache_dir
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

    def variants(self, augmentations: Sequence[tuple[float, bool]]) -> list[FeatureCache]:
        """Caches with these settings but each (rotate_degrees, vertical_flip) augmentation of ``augmentations``
        instead: the views of an ensemble's further members (:class:`CachedFeatureDataset` ``member_caches``)."""
        for pair in augmentations:  # a command line's "false" would otherwise read as a true string
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[1], bool)
                    and isinstance(pair[0], (int, float)) and not isinstance(pair[0], bool)):
                raise ValueError(f"an augmentation is a (rotate_degrees, vertical_flip) pair such as [15.0, False], "
                                 f"got {pair!r} in {augmentations!r}")
        return [FeatureCache(self.cache_dir, self.backbone, self.num_classes, self.seed, self.aug_prob,
                             self.batch_size, float(degrees), bool(flip), self.encoder)
                for degrees, flip in augmentations]

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
    Per-view maps set in :attr:`view_maps` (``{(index, member, view): (K, h, w)}``, a dense PPN's neighbour
    similarities, which depend on the training set and not on the image alone) join the features under
    ``"neighbours"``. With ``member_caches``, each access first draws an ensemble member (0 reads ``cache``, m > 0
    ``member_caches[m - 1]``), whose index joins the features under ``"member"``: a dense PPN's trunk m then trains
    on views of its own augmentation (:class:`~sam2rad_monai.ppn.DensePromptPredictor`).

    Args:
        data: MONAI datalist entries ``{"image", "label", "id"}``.
        cache: the feature cache.
        num_views: views per image (view 0 = no augmentation); 1 disables augmentation.
        random_view: draw a view per access (training); ``False`` always serves view 0 (validation).
        flip_prob: probability of mirroring a served view left-right in feature space (features, masks and boxes
            together): a second view for free, where another cached view costs an encoder pass. SAM encoders are
            not exactly mirror-equivariant, so this is an augmentation of the features, not a copy of an encoded
            flip.
        member_caches: caches of the further ensemble members' views (their own augmentation settings, the same
            backbone, classes and seed); view 0, the un-augmented image, is read from ``cache`` for every member.
    """

    def __init__(self, data: Sequence[dict[str, Any]], cache: FeatureCache, num_views: int = 4,
                 random_view: bool = True, flip_prob: float = 0.0, member_caches: Sequence[FeatureCache] = ()
                 ) -> None:
        if num_views < 1:
            raise ValueError(f"num_views must be at least 1, got {num_views}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.data = list(data)
        self.cache = cache
        self.caches = [cache, *member_caches] if random_view else [cache]
        self.num_views = num_views
        self.random_view = random_view
        self.flip_prob = flip_prob if random_view else 0.0
        self.view_maps: dict[tuple[int, int, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.data)

    def views(self) -> list[tuple[int, int]]:
        """The (member, view) pairs served; a further member's view 0 is member 0's."""
        if not self.random_view:
            return [(0, 0)]
        return [(m, v) for m in range(len(self.caches)) for v in range(self.num_views) if v or not m]

    def load(self, item: dict[str, Any], member: int, view: int) -> dict[str, Any]:
        """The cache entry of one (member, view) of an item."""
        return self.caches[member if view else 0].load(item, view)

    def prepare(self) -> int:
        """Fill the cache for every (image, view) before training; under torch.distributed each rank fills its share.

        Returns the number of entries this process encoded.
        """
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        pairs = [(item, m, v) for item in self.data for m, v in self.views()][rank::world]
        from tqdm import tqdm

        done = 0
        with tqdm(total=len(pairs), desc="feature cache", unit="view", disable=rank > 0) as bar:
            for member, cache in enumerate(self.caches):
                done += cache.fill([(item, v) for item, m, v in pairs if m == member], progress=bar.update)
        if dist.is_initialized():
            dist.barrier()
        logger.info("feature cache %s: %d of %d views encoded now", self.cache.root, done, len(pairs))
        return done

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.data[index]
        member = int(torch.randint(len(self.caches), ()).item()) if len(self.caches) > 1 else 0
        view = int(torch.randint(self.num_views, ()).item()) if self.random_view else 0
        entry = self.load(item, member, view)
        label = entry["label"]
        masks = torch.stack([label == k for k in range(1, self.cache.num_classes + 1)]).float()
        features, boxes = entry["features"], entry["boxes"]
        key = (index, member if view else 0, view)  # every member's view 0 is member 0's
        if key in self.view_maps:
            features = {**features, "neighbours": self.view_maps[key]}
        if len(self.caches) > 1:
            features = {**features, "member": torch.tensor(member)}
        if self.flip_prob and torch.rand(()) < self.flip_prob:
            features = {k: v.flip(-1) for k, v in features.items()}
            masks = masks.flip(-1)
            # inclusive pixel corners: x -> S - 1 - x swaps the two x edges; absent classes keep their zero box
            width = masks.shape[-1] - 1
            flipped = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            boxes = torch.where(entry["present"][:, None] > 0.5, flipped, boxes)
        return {"features": features, "masks": masks, "boxes": boxes, "present": entry["present"],
                "id": str(item.get("id", index))}


