"""Glue between Sam2Rad and MONAI's Ignite engines: batch preparation, metric inputs, checkpoint state, handlers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch import Tensor, nn

from ..backbones import read_state_dict
from ..io.atomic import atomic_write_path
from ..model import Sam2Rad, current_layout

logger = logging.getLogger(__name__)
TARGET_KEYS = ("masks", "boxes", "present")


def unwrap(network: nn.Module) -> Sam2Rad:
    """The Sam2Rad model inside a DistributedDataParallel / DataParallel wrapper."""
    return network.module if hasattr(network, "module") else network


def prepare_batch(batchdata: dict[str, Any], device: str | torch.device | None = None, non_blocking: bool = False,
                  **kwargs: Any) -> tuple[Any, dict[str, Tensor]]:
    """SupervisedTrainer / SupervisedEvaluator ``prepare_batch``: (features or images, target dict) on ``device``."""
    def move(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return torch.as_tensor(x).to(device=device, non_blocking=non_blocking)

    inputs = batchdata["features"] if "features" in batchdata else batchdata["image"]
    return move(inputs), {k: move(batchdata[k]) for k in TARGET_KEYS}


def dice_inputs(output: dict[str, Any], objectness_threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """(y_pred, y) for MONAI's MeanDice / MeanIoU handlers at the decoder's resolution, one channel per class.

    A class whose objectness is below the threshold predicts nothing, so a false positive on an image without the
    class counts (use the metrics with ``ignore_empty=False``).
    """
    pred, target = output["pred"], output["label"]
    masks = pred["logits"] > 0
    if "objectness" in pred:
        masks &= (pred["objectness"] >= objectness_threshold)[..., None, None]
    y = target["masks"].float()
    if y.shape[-1] != masks.shape[-1]:
        y = F.interpolate(y, size=masks.shape[-2:], mode="nearest-exact")
    return masks.float(), y


class TrainableState:
    """What a Sam2Rad checkpoint holds: the PPN (and LoRA) weights only, never the frozen backbone.

    It has ``state_dict`` / ``load_state_dict``, so Ignite's ``Checkpoint`` and MONAI's ``CheckpointSaver`` /
    ``CheckpointLoader`` can save and load it like a module.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def state_dict(self) -> dict[str, Tensor]:
        return unwrap(self.network).ppn_state_dict()

    def load_state_dict(self, state: dict[str, Tensor], strict: bool = True) -> None:
        unwrap(self.network).load_ppn_state_dict(state)


class InitialWeights:
    """Start training from a trained Sam2Rad file (``model.pt``) instead of a fresh PPN: fine-tuning, or a warm start
    after a change of PPN heads.

    Tensors whose name and shape match the model are loaded; the others are listed in the log and keep their fresh
    values. A file that shares no tensor with the model is an error naming it. Attach it before
    :class:`ResumeCheckpoint`, so a resumed run still continues from its own ``last.pt``. Not MONAI's
    ``CheckpointLoader(strict_shape=False)``: that one loads into a module, where a checkpoint here is the PPN only
    (:class:`TrainableState`), and it says nothing when no tensor matches.

    Args:
        path: the trained model file; ``None`` or ``""`` does nothing.
        network: the (possibly DDP-wrapped) Sam2Rad network.
    """

    def __init__(self, path: str | Path | None, network: nn.Module) -> None:
        self.path = Path(path) if path else None
        self.network = network

    def attach(self, engine: Engine) -> None:
        if self.path is not None:
            engine.add_event_handler(Events.STARTED, self.load)

    def load(self, engine: Engine | None = None) -> list[str]:
        """Load the matching tensors; return the names of those that were not loaded."""
        if not self.path.is_file():
            raise FileNotFoundError(f"initial model {self.path}: no such file")
        # weights_only; also takes a last.pt, whose weights sit under "model"; older files' names are brought up to date
        state = current_layout(read_state_dict(self.path))
        model = unwrap(self.network)
        own = model.ppn_state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not usable:
            raise ValueError(f"initial model {self.path}: no tensor matches this model (check num_classes)")
        model.load_state_dict(usable, strict=False)
        skipped = sorted((set(own) | set(state)) - set(usable))
        logger.info("initial weights from %s: %d tensors loaded, %d left fresh or unused%s", self.path, len(usable),
                    len(skipped), f" ({', '.join(skipped[:6])}{', ...' if len(skipped) > 6 else ''})" if skipped else "")
        return skipped


class ResumeCheckpoint:
    """Keep ``last.pt`` (trainable weights, optimiser and trainer state) after every epoch; resume from it at start.

    The file is written atomically, so a run killed at any point resumes from its last complete epoch. Not MONAI's
    ``CheckpointSaver`` + ``CheckpointLoader``: the loader has no "only if the file exists" option, where a run here
    resumes only if a previous one left ``last.pt``, with the same command.

    Args:
        path: the checkpoint file.
        network: the (possibly DDP-wrapped) Sam2Rad network.
        optimizer: the optimiser.
        enabled: ``False`` on ranks other than 0 (only rank 0 writes; every rank loads).
        lr_scheduler: saved and restored too, so a resumed run continues the same schedule.
    """

    def __init__(self, path: str | Path, network: nn.Module, optimizer: torch.optim.Optimizer,
                 enabled: bool = True, lr_scheduler: Any = None) -> None:
        self.path = Path(path)
        self.state = TrainableState(network)
        self.optimizer = optimizer
        self.enabled = enabled
        self.lr_scheduler = lr_scheduler

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        if self.enabled:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def save(self, engine: Engine) -> None:
        state = {"model": self.state.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "epoch": engine.state.epoch, "iteration": engine.state.iteration}
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        with atomic_write_path(self.path) as tmp:
            torch.save(state, tmp)

    def load(self, engine: Engine) -> None:
        if not self.path.is_file():
            return
        ckpt = torch.load(self.path, map_location="cpu", weights_only=True)
        self.state.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in ckpt:
            self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ckpt["epoch"] >= engine.state.max_epochs:
            logger.warning("%s is at epoch %d, max_epochs is %d: nothing left to train", self.path, ckpt["epoch"],
                           engine.state.max_epochs)
        engine.state.epoch, engine.state.iteration = ckpt["epoch"], ckpt["iteration"]
        logger.info("resumed from %s at epoch %d", self.path, ckpt["epoch"])


class PrepareCache:
    """Fill the feature cache of a dataset when the engine first starts (no-op for online augmentation)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.done = False

    def attach(self, engine: Engine) -> None:
        if hasattr(self.dataset, "prepare"):
            engine.add_event_handler(Events.STARTED, self._prepare)

    def _prepare(self, engine: Engine) -> None:
        # once: an evaluator run by ValidationHandler starts again at every validation
        if not self.done:
            self.dataset.prepare()
            self.done = True


class SetPrototypes:
    """Set a dense PPN's class prototypes and neighbour bank
    (:meth:`~sam2rad_monai.ppn.DensePromptPredictor.set_prototypes`) from the un-augmented view of every training
    image when training starts, then the neighbour maps of every cached training view with its own frame left out
    (computed once here, where a step would pay for them each time); nothing for the attention PPN.

    Attach it after :class:`PrepareCache` (it reads the cache) and before :class:`ResumeCheckpoint`.

    Args:
        dataset: the training :class:`~sam2rad_monai.engine.cache.CachedFeatureDataset`.
        network: the (possibly DDP-wrapped) Sam2Rad network.
        batch_size: cache entries read at a time.
    """

    def __init__(self, dataset: Any, network: nn.Module, batch_size: int = 16) -> None:
        self.dataset = dataset
        self.network = network
        self.batch_size = batch_size

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        ppn = unwrap(self.network).ppn
        if not hasattr(ppn, "set_prototypes") or not hasattr(self.dataset, "cache"):
            return
        cache, classes = self.dataset.cache, self.dataset.cache.num_classes

        def batches():
            items = self.dataset.data
            for start in range(0, len(items), self.batch_size):
                entries = [cache.load(item, 0) for item in items[start:start + self.batch_size]]
                embeds = torch.stack([e["features"]["embed"] for e in entries])
                masks = torch.stack([torch.stack([e["label"] == k for k in range(1, classes + 1)]) for e in entries])
                yield embeds.to(ppn.prototypes.device), masks.to(ppn.prototypes.device)

        ppn.set_prototypes(batches())
        ppn.presence_offset.zero_()  # a presence calibration belongs to the weights it was chosen for
        ppn.presence_min_region.zero_()
        logger.info("dense PPN prototypes set from %d training images", len(self.dataset.data))
        if not getattr(ppn, "neighbours", 0):
            return
        device = ppn.prototypes.device
        with torch.no_grad():
            for index, item in enumerate(self.dataset.data):
                for member, view in self.dataset.views():
                    embed = self.dataset.load(item, member, view)["features"]["embed"][None].to(device).float()
                    maps = ppn.neighbour_similarity(F.normalize(embed, dim=1), torch.tensor([index], device=device))
                    self.dataset.view_maps[(index, member, view)] = maps[0].to(torch.float16).cpu()
        logger.info("dense PPN neighbour maps set for %d cached views", len(self.dataset.view_maps))


class ProgressBarHandler:
    """One progress bar over the whole run, in optimiser steps, with the time left (tqdm), the epoch and the loss."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar = None

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self._open)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._step)
            engine.add_event_handler(Events.COMPLETED, self._close)

    def _open(self, engine: Engine) -> None:
        from tqdm import tqdm

        total = engine.state.max_epochs * engine.state.epoch_length
        self.bar = tqdm(total=total, initial=engine.state.iteration, desc="training", unit="step")

    def _step(self, engine: Engine) -> None:
        self.bar.update(1)
        self.bar.set_postfix(epoch=f"{engine.state.epoch}/{engine.state.max_epochs}",
                             loss=f"{engine.state.output['loss'].item():.4f}", refresh=False)

    def _close(self, engine: Engine) -> None:
        if self.bar is not None:
            self.bar.close()
