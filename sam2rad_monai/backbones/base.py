"""The interface every frozen SAM-family backbone offers to the prompt predictor and the model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

Features = dict[str, Tensor]


class CheckpointError(RuntimeError):
    """A backbone checkpoint is missing, unreadable or does not match the architecture."""


class Backbone(nn.Module):
    """A frozen SAM-family model split into the parts Sam2Rad uses.

    Subclasses set ``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` and implement :meth:`encode`.
    Every parameter is frozen: Sam2Rad never trains the backbone (LoRA on the decoder is added by the model).

    Attributes:
        name: family name (``litemedsam``, ``sam``, ``sam2``).
        variant: size or version (``vit_b``, ``sam2.1_hiera_t``...).
        image_size: side of the square, padded model input in pixels.
        pixel_mean, pixel_std: per-channel normalisation for 0..255 inputs (applied by the transforms).
        level_channels: channels of the feature levels the PPN sees, coarse to fine.
    """

    name: str = ""
    variant: str = ""
    image_size: int = 1024
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    level_channels: tuple[int, ...] = (256,)
    feature_keys: tuple[str, ...] = ("embed",)

    def __init__(self) -> None:
        super().__init__()
        self.weights_digest = "random"

    # -- construction helpers -------------------------------------------------------------------------------
    def freeze(self) -> None:
        """Freeze every parameter and put the backbone in eval mode for good."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        # The backbone stays in eval mode (batch-norm statistics, dropout) whatever the model does.
        return super().train(False)

    def load_checkpoint(self, path: str | Path, state: dict[str, Tensor] | None = None) -> None:
        """Load ``path`` strictly into this backbone; any missing or unexpected key is an error naming the file."""
        path = Path(path)
        if state is None:
            state = read_state_dict(path)
        target = self.checkpoint_target()
        expected = set(target.state_dict().keys())
        state = {k: v for k, v in state.items() if k not in self.ignored_checkpoint_keys()}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: does not match the {self.name} {self.variant} architecture "
                f"({len(missing)} missing keys, e.g. {missing[:3]}; {len(unexpected)} unexpected keys, "
                f"e.g. {unexpected[:3]})"
            )
        try:
            target.load_state_dict(state, strict=True)
        except RuntimeError as err:  # shape mismatches
            first = str(err).strip().splitlines()
            raise CheckpointError(f"{path}: does not fit the {self.name} {self.variant} architecture: "
                                  f"{' '.join(first[:3])}") from err
        self.weights_digest = file_digest(path)

    def checkpoint_target(self) -> nn.Module:
        """The module whose state_dict the checkpoint file holds."""
        return self

    def ignored_checkpoint_keys(self) -> set[str]:
        return set()

    # -- what the model calls -----------------------------------------------------------------------------
    @property
    def embedding_size(self) -> int:
        return self.prompt_encoder.image_embedding_size[0]

    @property
    def mask_prompt_size(self) -> int:
        """Side of the mask prompt the prompt encoder embeds (4x the embedding grid)."""
        return 4 * self.embedding_size

    def identity(self) -> str:
        """A string that changes whenever the features this backbone computes can change (cache keys)."""
        return f"{self.name}:{self.variant}:{self.image_size}:{self.weights_digest}"

    @torch.no_grad()
    def encode(self, images: Tensor) -> Features:
        """Encode normalised, padded images (B, 3, S, S) into features (``embed`` and any high-res levels)."""
        raise NotImplementedError

    def levels(self, features: Features) -> list[Tensor]:
        """The feature maps the PPN attends to, coarse to fine."""
        return [features[k] for k in self.feature_keys]

    def dense_pe(self) -> Tensor:
        """SAM's dense positional encoding of the embedding grid, (1, 256, h, w)."""
        return self.prompt_encoder.get_dense_pe()

    def grid_pe(self, size: tuple[int, int]) -> Tensor:
        """SAM's random-Fourier positional encoding at any grid size, (1, 256, h, w)."""
        return self.prompt_encoder.pe_layer(size).unsqueeze(0)

    def embed_boxes(self, boxes: Tensor) -> Tensor:
        """Embed boxes (R, 4) in input pixels (x1, y1, x2, y2) into 2 sparse tokens each, (R, 2, 256)."""
        return self.prompt_encoder._embed_boxes(boxes)

    def embed_points(self, coords: Tensor, labels: Tensor, pad: bool) -> Tensor:
        """Embed points (R, P, 2) with labels (R, P) (1 positive, 0 negative, -1 padding) into (R, P[+1], 256)."""
        return self.prompt_encoder._embed_points(coords, labels, pad=pad)

    def embed_masks(self, masks: Tensor) -> Tensor:
        """Embed mask-prompt logits (R, 1, m, m) into dense prompts (R, 256, h, w)."""
        return self.prompt_encoder._embed_masks(masks)

    def no_mask_dense(self, rows: int) -> Tensor:
        """The dense prompt SAM uses when there is no mask prompt, (rows, 256, h, w)."""
        h = w = self.embedding_size
        return self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(rows, -1, h, w)

    def not_a_point(self) -> Tensor:
        """The embedding of a padding prompt token, (256,)."""
        return self.prompt_encoder.not_a_point_embed.weight[0]

    def decode(self, features: Features, sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
        """Run the mask decoder on one row per (image, class).

        Args:
            features: row-aligned features (each tensor has R rows).
            sparse: (R, T, 256) prompt tokens.
            dense: (R, 256, h, w) dense prompt.

        Returns:
            mask logits (R, 1, 4h, 4w) and SAM's IoU estimate (R, 1).
        """
        return decode_sam1(self.mask_decoder, features["embed"], self.dense_pe(), sparse, dense)


def decode_sam1(decoder: nn.Module, embed: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor
                ) -> tuple[Tensor, Tensor]:
    """Segment-anything's mask decoder, with one image embedding per prompt row.

    The upstream ``MaskDecoder.predict_masks`` repeats each image embedding for every prompt (one image, many
    prompts); Sam2Rad has one (image, class) row per prompt set, so this runs the same frozen modules row-aligned.
    """
    rows = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(rows, -1, -1), sparse), dim=1)
    src = embed + dense
    pos_src = torch.repeat_interleave(image_pe, rows, dim=0)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    src = src.transpose(1, 2).view(b, c, h, w)
    upscaled = decoder.output_upscaling(src)
    # all mask tokens, then the first (multimask_output=False), exactly as upstream: same kernels, same bits
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                           dim=1)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)[:, :1]
    iou_pred = decoder.iou_prediction_head(iou_token_out)[:, :1]
    return masks, iou_pred


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint file safely (``weights_only``) and return its flat state_dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, pickled objects
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from err
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state_dict checkpoint")
    return obj


def file_digest(path: str | Path, length: int = 16) -> str:
    """Short SHA-256 of a file, to key caches on the exact weights."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]
