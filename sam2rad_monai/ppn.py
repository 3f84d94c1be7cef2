"""The prompt predictor network (PPN): learned class queries that read frozen SAM features and emit prompts.

For every (image, class) row the PPN predicts what SAM would have wanted as prompts (Wahd et al. 2025, §3.1.1):
a box, a mask prompt at the prompt encoder's mask size, ``N - 2`` free 256-d prompt tokens, and an objectness
logit saying whether the class is in the image at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sam2.modeling.sam2_utils import LayerNorm2d
from sam2.modeling.sam.transformer import TwoWayAttentionBlock
from torch import Tensor, nn
from torchvision.ops import MLP, masks_to_boxes

# A dense PPN's mask of a class its objectness calls present keeps every pixel within this logit margin of the peak
# (threshold min(0, peak - margin)): a structure seen with little confidence still gets its most likely region
# instead of nothing; chosen on validation, docs/BENCHMARKS.md
PEAK_MARGIN = 3.0
# Share of the largest connected region a region needs to count in region_boxes; chosen on validation,
# docs/BENCHMARKS.md ("Bundle 0.2.1 changed only how the box is read off the mask prompt")
REGION_MIN_FRACTION = 0.25


@dataclass
class PPNOutput:
    """Per-row predictions of the PPN (R = images x classes, rows ordered image-major)."""

    tokens: Tensor  # (R, N - 2, 256) free prompt tokens
    boxes: Tensor | None  # (R, 4) the box given to SAM, normalised (x1, y1, x2, y2) in [0, 1] of the padded square
    # input; None where it is read off the mask prompt and the caller asked for no region boxes (ONNX export)
    box_fit: Tensor | None  # (R, 4) the differentiable box the loss trains (``boxes`` itself for ``box_source="query"``)
    mask_prompts: Tensor  # (R, 1, m, m) mask-prompt logits
    objectness: Tensor  # (R,) logits


class PromptPredictor(nn.Module):
    """Learned per-class queries + two-way attention over the encoder features, with box, mask and objectness heads.

    Args:
        num_classes: number of foreground classes; each has its own ``num_tokens`` queries.
        num_tokens: tokens per class (N). Tokens 0-1 are box tokens (they predict the box when ``box_source`` is
            ``"query"``), 2..N-1 are free prompt embeddings.
        box_source: where the box comes from. ``"mask"`` (default): the extents of the substantial connected
            regions of the mask prompt (:func:`region_boxes`), trained through the soft extents of the mask-prompt
            probabilities; ``"query"``: regressed from tokens 0-1 by an MLP (the paper's head; DETR-like, it needs
            far more epochs to localise).
        level_channels: channels of the feature levels, coarse to fine (``(256,)`` for SAM v1 families,
            ``(256, 64, 32)`` for SAM2). Layer ``i`` reads level ``i``; extra layers refine the last state.
        mask_prompt_size: side of the mask prompt SAM's prompt encoder expects (4 x the embedding grid).
        depth, num_heads, mlp_dim, attention_downsample_rate: two-way attention block sizes (SAM's decoder values).
        mask_head_channels, dropout: the convolutional mask-prompt head.
        embed_dim: SAM's prompt width (256).
    """

    def __init__(
        self,
        num_classes: int,
        num_tokens: int = 10,
        level_channels: tuple[int, ...] = (256,),
        mask_prompt_size: int = 256,
        depth: int = 3,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        mask_head_channels: int = 64,
        dropout: float = 0.1,
        embed_dim: int = 256,
        box_source: str = "mask",
    ) -> None:
        super().__init__()
        if box_source not in ("mask", "query"):
            raise ValueError(f"box_source must be 'mask' or 'query', got {box_source!r}")
        if num_tokens < 3:
            raise ValueError(f"num_tokens must be at least 3 (2 box tokens + 1 prompt token), got {num_tokens}")
        self.num_classes = num_classes
        self.num_tokens = num_tokens
        self.box_source = box_source
        self.mask_prompt_size = mask_prompt_size
        # N(0, 1) like SAM's own prompt embeddings: small queries would make the first self-attention nearly
        # uniform and wash out the difference between classes
        self.queries = nn.Parameter(torch.randn(num_classes, num_tokens, embed_dim))
        # SAM's image embeddings are small (per-position norm ~2) next to its positional encoding (~11) and the
        # queries (~16): without a norm, attention in a fresh PPN sees mostly position and every image looks alike
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, embed_dim, kernel_size=1), LayerNorm2d(embed_dim)) for c in level_channels
        )
        self.blocks = nn.ModuleList(
            TwoWayAttentionBlock(embed_dim, num_heads, mlp_dim=mlp_dim,
                                 attention_downsample_rate=attention_downsample_rate, skip_first_layer_pe=False)
            for i in range(depth)
        )
        self.box_head = MLP(2 * embed_dim, [embed_dim, 4]) if box_source == "query" else None
        self.objectness_head = MLP(embed_dim, [embed_dim, 1])
        self.mask_head = nn.Sequential(
            nn.Conv2d(embed_dim, mask_head_channels, 3, padding=1), nn.ReLU(inplace=True), nn.Dropout2d(dropout),
            nn.Conv2d(mask_head_channels, mask_head_channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Dropout2d(dropout), nn.Conv2d(mask_head_channels, 1, 1),
        )

    def forward(self, levels: list[Tensor], level_pe: list[Tensor], dense_init: Tensor,
                region_box: bool = True) -> PPNOutput:
        """Predict prompts for every (image, class) row.

        Args:
            levels: feature maps, coarse to fine, each (B, C_i, h_i, w_i).
            level_pe: positional encodings matching each level, each (1, 256, h_i, w_i).
            dense_init: (256,) starting value of the dense state (SAM's no-mask embedding).
            region_box: ``False`` leaves a mask-read box and its fit to the caller (``None``): connected components
                have no ONNX operator, so an exported graph stops at the mask prompt (:mod:`sam2rad_monai.runtime`).

        Returns:
            :class:`PPNOutput` with B x num_classes rows, row ``b * num_classes + c`` = image b, class c.
        """
        batch, classes = levels[0].shape[0], self.num_classes
        queries = self.queries.repeat(batch, 1, 1)  # (R, N, D), image-major rows
        query_pe = queries
        state = dense_init.reshape(1, -1, 1, 1).expand(batch * classes, -1, *levels[0].shape[-2:])
        for i, block in enumerate(self.blocks):
            if i < len(levels):
                feats = self.adapters[i](levels[i]).repeat_interleave(classes, dim=0)
                state = F.interpolate(state, size=feats.shape[-2:], mode="nearest") + feats
                pe = level_pe[i]
            h, w = state.shape[-2:]
            keys = state.flatten(2).transpose(1, 2)
            queries, keys = block(queries=queries, keys=keys, query_pe=query_pe,
                                  key_pe=pe.flatten(2).transpose(1, 2))
            state = keys.transpose(1, 2).reshape(-1, keys.shape[-1], h, w)

        mask_prompts = self.mask_head(state)
        if mask_prompts.shape[-1] != self.mask_prompt_size:
            mask_prompts = F.interpolate(mask_prompts, size=(self.mask_prompt_size,) * 2, mode="bilinear",
                                         align_corners=False)
        if self.box_head is not None:
            # (cx, cy, w, h) through a sigmoid keeps every box inside the image and x2 >= x1
            cx, cy, bw, bh = self.box_head(queries[:, :2].flatten(1)).sigmoid().unbind(-1)
            boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1).clamp(0.0, 1.0)
            box_fit = boxes
        elif region_box:
            box_fit = soft_extents(mask_prompts[:, 0].sigmoid())
            boxes = region_boxes(mask_prompts[:, 0].detach() > 0)
        else:
            boxes = box_fit = None
        objectness = self.objectness_head(queries.mean(dim=1)).squeeze(-1)
        return PPNOutput(tokens=queries[:, 2:], boxes=boxes, box_fit=box_fit, mask_prompts=mask_prompts,
                         objectness=objectness)


class DenseTrunk(nn.Module):
    """One trunk of a :class:`DensePromptPredictor`: a dilated-convolution stack from the per-pixel inputs to every
    class's mask logits, and the pooled objectness head.

    Args:
        embed: channels of the embedding (normalised here, :class:`LayerNorm2d`).
        extra: channels of the other per-pixel inputs (similarities and coordinates).
        num_classes, channels, dilations, dropout: as :class:`DensePromptPredictor`.
    """

    def __init__(self, embed: int, extra: int, num_classes: int, channels: int = 64,
                 dilations: tuple[int, ...] = (1, 2, 4, 8, 16), dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = LayerNorm2d(embed)
        self.stem = nn.Sequential(nn.Conv2d(embed + extra, channels, 1), nn.GroupNorm(8, channels), nn.GELU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=d, dilation=d), nn.GroupNorm(8, channels),
                          nn.GELU(), nn.Dropout2d(dropout))
            for d in dilations
        )
        self.head = nn.Conv2d(channels, num_classes, 1)
        # RetinaNet's prior (Lin et al. 2017): start every pixel at foreground probability 0.01, so the focal loss
        # is not swamped by the background at the first steps (without it, training depended on the init seed)
        nn.init.constant_(self.head.bias, -math.log(99.0))
        self.objectness_head = nn.Linear(2 * channels, num_classes)
        # the objectness also reads the trunk's features averaged under each class's own mask (masked average
        # pooling), so a presence call can rest on the candidate region itself; zero-initialised, so it starts as
        # (and older model files load as) the whole-grid head alone
        self.region_objectness = nn.Parameter(torch.zeros(num_classes, channels))

    def forward(self, embed: Tensor, extra: Tensor) -> tuple[Tensor, Tensor]:
        """Mask logits (B, C, h, w) and objectness logits (B, C) of embeddings (B, D, h, w) and inputs (B, E, h, w)."""
        x = self.stem(torch.cat([self.norm(embed), extra.to(embed.dtype)], dim=1))
        for block in self.blocks:
            x = x + block(x)
        logits = self.head(x)
        objectness = self.objectness_head(torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1))
        weights = logits.detach().sigmoid()  # the presence term reads the mask but does not train it
        region = torch.einsum("bkhw,bdhw->bkd", weights, x) / (weights.sum((2, 3))[..., None] + 1.0)
        return logits, objectness + (region * self.region_objectness).sum(-1)


class DensePromptPredictor(nn.Module):
    """A lean PPN for few labels: a dilated-convolution head on the frozen embedding predicts every class's mask
    prompt in one pass; the box is read off it, and a pooled head gives the objectness (from the trunk's features over
    the whole grid and, per class, averaged under that class's own predicted mask).

    Inputs per pixel: the (normalised) embedding, its cosine similarity to per-class and background prototypes of
    the labelled frames (PerSAM / SurgicalSAM's training-free prior, :meth:`set_prototypes`; zero until set), its
    mean similarity to its ``neighbours`` nearest labelled pixels of each class and of the background (a bank of
    the labelled frames' pixel embeddings: the dense matching of few-shot segmentation, which keeps the several
    looks of a class that one mean prototype averages away) and two coordinate channels. In training, a row never
    matches the pixels of its own frame (the maps are computed once per cached view, leaving that frame out:
    :class:`~sam2rad_monai.engine.handlers.SetPrototypes`), so the trunk learns how far a match to an unseen frame
    goes. It has no free prompt tokens, so it can be trained on cached embeddings alone with no
    decoder pass (the cheap step), and its prompts are what a box-prompted SAM expects: a box and a mask prompt.
    Only the coarsest feature level is read (SAM2's high-resolution levels serve the decoder).

    With several ``trunks`` it is an ensemble over one set of prototypes and one bank: in training each row goes
    through the trunk its ``member`` index names (each trunk learns from its own augmentation of the frames,
    :class:`~sam2rad_monai.engine.cache.CachedFeatureDataset`), at evaluation the trunks' mask logits and
    objectness are averaged (Lakshminarayanan et al. 2017: members that differ in what they were trained on err
    apart, and their mean errs less).

    Args:
        num_classes: foreground classes.
        level_channels: channels of the feature levels, coarse first (only the first is used).
        mask_prompt_size: side of the mask prompt SAM's prompt encoder expects (4 x the embedding grid).
        channels: width of the convolutional trunk.
        dilations: one residual 3 x 3 block per entry, with that dilation (the receptive field spans the grid).
        dropout: channel dropout in each block.
        neighbours: nearest bank pixels averaged per class; 0 leaves the bank out (model files before bundle 0.5).
        bank_size: most bank pixels kept per class and for the background (a seeded random subset).
        mirror: at evaluation, average with the prediction on the left-right mirrored embedding (nnU-Net's test-time
            mirroring; training sees such mirrored embeddings through ``feature_flip_prob``).
        trunks: ensemble members (:class:`DenseTrunk`), 1 for a single network.
        self_support: weight of :meth:`self_support_term`, added to each trunk's logits at evaluation (stored in
            the model file as the buffer ``self_support``; model files without it load with 0, no term).

    The buffer ``presence_offset`` (C,) is subtracted from the objectness logits at evaluation: a presence threshold
    per class chosen on held-out frames (:mod:`sam2rad_monai.engine.presence`), zero until calibrated, so every
    consumer of the objectness (predictor, network, exported graphs, validation) applies the same rule. The buffer
    ``presence_min_region`` (C,), chosen on the same frames, is the share of the mask grid that a class's largest
    connected region must cover for the class to be called (:meth:`~sam2rad_monai.model.Sam2Rad.present`; zero, no
    rule, until calibrated).
    """

    num_tokens = 2  # the box's two tokens only

    def __init__(self, num_classes: int, level_channels: tuple[int, ...] = (256,), mask_prompt_size: int = 256,
                 channels: int = 64, dilations: tuple[int, ...] = (1, 2, 4, 8, 16), dropout: float = 0.1,
                 neighbours: int = 20, bank_size: int = 2048, mirror: bool = True, trunks: int = 1,
                 self_support: float = 0.0) -> None:
        super().__init__()
        if trunks < 1:
            raise ValueError(f"trunks must be at least 1, got {trunks}")
        self.num_classes = num_classes
        self.mirror = mirror
        self.neighbours = neighbours
        self.bank_size = bank_size
        self.mask_prompt_size = mask_prompt_size
        embed = level_channels[0]
        self.register_buffer("prototypes", torch.zeros(num_classes + 1, embed))
        if neighbours:  # pixel embeddings (unit norm), their class (0 = background) and training image
            self.register_buffer("bank", torch.zeros(0, embed))
            self.register_buffer("bank_class", torch.zeros(0, dtype=torch.long))
            self.register_buffer("bank_source", torch.zeros(0, dtype=torch.long))
        similarities = (num_classes + 1) * (2 if neighbours else 1)
        self.trunks = nn.ModuleList(DenseTrunk(embed, similarities + 2, num_classes, channels, dilations, dropout)
                                    for _ in range(trunks))
        self.register_buffer("presence_offset", torch.zeros(num_classes))
        self.register_buffer("presence_min_region", torch.zeros(num_classes))
        self.register_buffer("self_support", torch.tensor(float(self_support)))

    @torch.no_grad()
    def set_prototypes(self, batches: Iterable[tuple[Tensor, Tensor]]) -> None:
        """Per-class and background prototypes (the mean unit-norm embedding under each class's masks) and the
        neighbour bank (the unit-norm embeddings of pixels mostly inside one class, or the background).

        Args:
            batches: pairs of frozen embeddings (N, D, h, w) of labelled frames and their binary class masks
                (N, C, H, W) (area-resized to h x w); the background is where no class is. Frames are numbered in
                the order they come (the training dataset's indices, which training rows give as ``source``).
        """
        sums, weight, pixels, classes, sources, count = 0.0, 0.0, [], [], [], 0
        for embeddings, masks in batches:
            weights = F.interpolate(masks.float(), size=embeddings.shape[-2:], mode="area")
            weights = torch.cat([(1.0 - weights.sum(1, keepdim=True)).clamp(min=0.0), weights], dim=1)
            unit = F.normalize(embeddings.float(), dim=1)
            sums = sums + torch.einsum("nkhw,ndhw->kd", weights, unit)
            weight = weight + weights.sum((0, 2, 3))
            n, k, y, x = torch.nonzero(weights > 0.5, as_tuple=True)
            pixels.append(unit[n, :, y, x])
            classes.append(k)
            sources.append(n + count)
            count += embeddings.shape[0]
        if isinstance(sums, float):
            raise ValueError("set_prototypes needs at least one labelled frame")
        self.prototypes.copy_(sums / weight[:, None].clamp(min=1e-6))
        if self.neighbours:
            pixels, classes, sources = torch.cat(pixels), torch.cat(classes), torch.cat(sources)
            generator = torch.Generator().manual_seed(0)  # the same frames give the same bank
            keep = torch.cat([idx[torch.randperm(len(idx), generator=generator)[:self.bank_size].sort().values]
                              for idx in (torch.nonzero(classes == k).flatten().cpu()
                                          for k in range(self.num_classes + 1))])
            self.bank = pixels[keep].to(self.prototypes)
            self.bank_class, self.bank_source = classes[keep].to(self.bank_class), sources[keep].to(self.bank_class)

    def neighbour_similarity(self, unit: Tensor, source: Tensor | None = None) -> Tensor:
        """Mean cosine similarity (B, C + 1, h, w) of unit-norm embeddings (B, D, h, w) to their ``neighbours``
        nearest bank pixels of the background and each class; ``source`` (B,) leaves out each row's own frame."""
        batch, _, h, w = unit.shape
        out = unit.new_zeros(batch, self.num_classes + 1, h, w)
        flat = unit.flatten(2).transpose(1, 2)  # (B, hw, D)
        for k in range(self.num_classes + 1):
            member = self.bank_class == k
            bank, bank_source = self.bank[member].to(unit.dtype), self.bank_source[member]
            if bank.shape[0] == 0:
                continue
            for b in range(batch):  # one image at a time bounds the (hw, bank) similarity matrix
                sims = flat[b] @ bank.T
                if source is not None:
                    sims = sims.masked_fill(bank_source == source[b], -1.0)
                top = sims.topk(min(self.neighbours, bank.shape[0]), dim=1).values.mean(1)
                out[b, k] = top.reshape(h, w)
        return out

    def similarities(self, embed: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """The trunks' inputs besides the embedding (B, (C + 1) x 2 + 2, h, w): prototype and neighbour
        similarities (``neighbours``, computed here when not given; none when ``neighbours`` is 0), coordinates."""
        batch, _, h, w = embed.shape
        unit = F.normalize(embed, dim=1)
        similarity = torch.einsum("bdhw,kd->bkhw", unit, F.normalize(self.prototypes, dim=1))
        if self.neighbours:
            if neighbours is None:
                with torch.no_grad():  # the frozen embedding and the bank carry no gradient
                    neighbours = self.neighbour_similarity(unit)
            similarity = torch.cat([similarity, neighbours.to(embed.dtype)], dim=1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=embed.device),
                                torch.linspace(-1, 1, w, device=embed.device), indexing="ij")
        coords = torch.stack([xs, ys]).to(embed.dtype).expand(batch, -1, -1, -1)
        return torch.cat([similarity.to(embed.dtype), coords], dim=1)

    def _predict(self, embed: Tensor, extra: Tensor, trunk: int = 0) -> tuple[Tensor, Tensor]:
        """One trunk's mask-prompt logits (B, C, h, w) and objectness logits (B, C) of embeddings (B, D, h, w) and
        their :meth:`similarities` ``extra``; at evaluation with the :meth:`self_support_term`."""
        logits, objectness = self.trunks[trunk](embed, extra)
        if not self.training:  # training rows fit their own frame, so their own-frame term would be too clean
            logits = logits + self.self_support_term(embed, logits)
        return logits, objectness

    def self_support_term(self, embed: Tensor, logits: Tensor) -> Tensor:
        """Self-support matching (Fan et al., ECCV 2022), training-free: ``self_support`` x (cosine similarity of
        each pixel to the frame's own prototype of the class minus that to its own background prototype), (B, C, h,
        w) for embeddings (B, D, h, w) and logits (B, C, h, w); the prototypes are the mean unit-norm embedding where
        ``logits > 0`` (background: no class), and a class with no such pixel gets no term. A structure looks more
        like the rest of itself in the same frame than like the few labelled frames, so a partly found structure
        grows over its own extent and the pixels that look like this frame's background recede."""
        unit = F.normalize(embed.float(), dim=1)
        found = (logits > 0).to(unit.dtype)
        background = (found.sum(1, keepdim=True) == 0).to(unit.dtype)

        def similarity(masks: Tensor) -> Tensor:  # (B, K, h, w) masks -> cosine to their prototypes (B, K, h, w)
            prototypes = torch.einsum("bkhw,bdhw->bkd", masks, unit) / (masks.sum((2, 3))[..., None] + 1e-6)
            return torch.einsum("bdhw,bkd->bkhw", unit, F.normalize(prototypes, dim=-1))

        any_found = (found.sum((2, 3)) > 0).to(unit.dtype)[..., None, None]
        term = self.self_support * any_found * (similarity(found) - similarity(background))
        return term.to(logits.dtype)

    def _route(self, embed: Tensor, extra: Tensor, member: Tensor | None) -> tuple[Tensor, Tensor]:
        """Training: each row (B,) through the trunk its ``member`` index names."""
        count = len(self.trunks)
        if member is None and count == 1:
            return self._predict(embed, extra)
        if member is None or not 0 <= int(member.min()) <= int(member.max()) < count:
            raise ValueError(f"a dense PPN of {count} trunks trains on rows that name their trunk (a member index "
                             f"in 0..{count - 1}, CachedFeatureDataset member_caches), "
                             f"got {None if member is None else sorted(set(member.tolist()))}")
        logits = embed.new_zeros(embed.shape[0], self.num_classes, *embed.shape[-2:])
        objectness = embed.new_zeros(embed.shape[0], self.num_classes)
        for trunk in range(count):
            rows = (member == trunk).nonzero().flatten()
            if rows.numel():
                row_logits, row_objectness = self._predict(embed[rows], extra[rows], trunk)
                logits = logits.index_put((rows,), row_logits)
                objectness = objectness.index_put((rows,), row_objectness)
        return logits, objectness

    def _evaluate(self, embed: Tensor, extra: Tensor, trunk: int) -> tuple[Tensor, Tensor]:
        """Evaluation: one trunk's mask logits (R, 1, h, w) and objectness (R,), mirror-averaged when ``mirror`` (the
        batch then holds the embeddings and their mirror images), presence offset and peak rule applied."""
        logits, objectness = self._predict(embed, extra, trunk)
        if self.mirror:
            plain, mirrored = logits.chunk(2)
            logits, objectness = (plain + mirrored.flip(-1)) / 2, objectness.reshape(2, -1, self.num_classes).mean(0)
        objectness = objectness - self.presence_offset
        logits, objectness = logits.flatten(0, 1)[:, None], objectness.flatten()  # (R, 1, h, w), image-major rows
        # a class called present keeps every pixel within PEAK_MARGIN of its peak (threshold min(0, peak - margin))
        peak = logits.flatten(1).amax(1)
        lift = torch.where(objectness > 0, (PEAK_MARGIN - peak).clamp(min=0.0), 0.0)
        return logits + lift.reshape(-1, 1, 1, 1), objectness

    def forward(self, levels: list[Tensor], level_pe: list[Tensor] | None = None,
                dense_init: Tensor | None = None, region_box: bool = True, neighbours: Tensor | None = None,
                member: Tensor | None = None) -> PPNOutput:
        """Predict prompts for every (image, class) row (same contract as :class:`PromptPredictor`).

        Args:
            levels: feature maps, coarse first; ``levels[0]`` is (B, D, h, w).
            level_pe, dense_init: unused (the trunk sees coordinates directly).
            region_box: ``False`` leaves ``boxes`` and ``box_fit`` to the caller (``None``), as for the other PPN.
            neighbours: (B, C + 1, h, w) precomputed :meth:`neighbour_similarity` maps (training rows, with their own
                frame left out); computed here when ``None``.
            member: (B,) the trunk of each training row (needed with several trunks; unused at evaluation).

        Returns:
            :class:`PPNOutput` with B x num_classes rows, no free tokens (``tokens`` is (R, 0, 256)).
        """
        embed = levels[0]
        if neighbours is None and self.neighbours:
            with torch.no_grad():
                neighbours = self.neighbour_similarity(F.normalize(embed, dim=1))
        if self.training:
            logits, objectness = self._route(embed, self.similarities(embed, neighbours), member)
            logits, objectness = logits.flatten(0, 1)[:, None], objectness.flatten()  # (R, 1, h, w), image-major
        else:
            if self.mirror:  # one pass per trunk over the embedding and its mirror image
                # the neighbour maps are per pixel, so the mirror's maps are the maps mirrored
                neighbours = torch.cat([neighbours, neighbours.flip(-1)]) if neighbours is not None else None
                embed = torch.cat([embed, embed.flip(-1)])
            extra = self.similarities(embed, neighbours)
            logits, objectness = (torch.stack(parts).mean(0) for parts in zip(
                *(self._evaluate(embed, extra, trunk) for trunk in range(len(self.trunks)))))
        mask_prompts = F.interpolate(logits, size=(self.mask_prompt_size,) * 2, mode="bilinear", align_corners=False)
        boxes = box_fit = None
        if region_box:
            boxes, box_fit = region_boxes(mask_prompts[:, 0].detach() > 0), soft_extents(mask_prompts[:, 0].sigmoid())
        return PPNOutput(tokens=logits.new_zeros(logits.shape[0], 0, 256), boxes=boxes, box_fit=box_fit,
                         mask_prompts=mask_prompts, objectness=objectness)


def soft_extents(probs: Tensor) -> Tensor:
    """Differentiable extents (R, 4) of probability maps (R, H, W), normalised xyxy.

    A column counts as covered by its highest probability; the left edge is the mass of "not yet covered" columns
    (one minus the running maximum), the right edge the mass of "still to come" ones. On a binary map these are
    exactly the pixel-edge extents, so the box loss pulls the map's outer border towards the true box and pushes
    stray responses down.
    """
    edges = []
    for profile in (probs.amax(dim=1), probs.amax(dim=2)):  # over rows -> x profile, over columns -> y profile
        size = profile.shape[-1]
        first = (1.0 - torch.cummax(profile, dim=-1).values).sum(-1) / size
        last = torch.cummax(profile.flip(-1), dim=-1).values.sum(-1) / size
        edges.append((torch.minimum(first, last), torch.maximum(first, last)))
    (x1, x2), (y1, y2) = edges
    return torch.stack([x1, y1, x2, y2], dim=-1)


def largest_region_fraction(masks: Tensor) -> Tensor:
    """Area of the largest 8-connected region of each binary map (R, H, W), as a fraction (R,) of H x W.

    Written in torch (every pixel takes the highest pixel index among its connected neighbours until nothing
    changes, then areas are counted per index) so that a traced ``network_def`` computes it too: scipy's and
    MONAI's connected-component labelling (scikit-image or cuCIM) leave the graph. At most H + W steps, so eager and
    traced give the same answer: exact for every region whose path length across is shorter (eagerly it stops
    early once nothing changes; a traced graph runs every step). Eagerly the steps run on the bounding box of all
    the maps' pixels only (nothing outside it is inside a region, so the areas are the same).
    """
    h, w = masks.shape[-2:]
    steps = h + w
    if not torch.jit.is_tracing():
        rows, cols = masks.any(2).any(0).nonzero().flatten(), masks.any(1).any(0).nonzero().flatten()
        if rows.numel() == 0:
            return torch.zeros(masks.shape[0], device=masks.device)
        masks = masks[:, int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1]
    inside = masks[:, None].float()
    ids = torch.arange(1, inside[0, 0].numel() + 1, dtype=torch.float32, device=masks.device
                       ).reshape(1, 1, *masks.shape[-2:]) * inside
    for _ in range(steps):
        grown = F.max_pool2d(ids, kernel_size=3, stride=1, padding=1) * inside
        if not torch.jit.is_tracing() and torch.equal(grown, ids):
            break
        ids = grown
    flat = ids.flatten(1).long()
    ones = torch.ones_like(flat, dtype=torch.float32)  # shaped by the input, so a traced graph takes any batch
    counts = torch.zeros_like(torch.cat([ones[:, :1], ones], dim=1)).scatter_add_(1, flat, ones)
    return counts[:, 1:].amax(dim=1) / (h * w)


def region_boxes(masks: Tensor, min_fraction: float = REGION_MIN_FRACTION) -> Tensor:
    """Extents (R, 4) of the substantial connected regions of each binary map (R, H, W), normalised xyxy in pixel edges.

    A region is substantial when its area is at least ``min_fraction`` of the largest region's: one stray speck
    would otherwise stretch the box that SAM's decoder, distilled from box-prompted MedSAM, follows closely, while a
    structure seen as two parts (a nerve split by a fascicle border) keeps both. An empty map gives the whole image.
    """
    rows, h, w = masks.shape
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=masks.device).repeat(rows, 1)
    found = masks.flatten(1).any(dim=1)
    if found.any():
        kept = []
        for m in masks[found].cpu().numpy():
            labels, count = ndimage.label(m)
            areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
            kept.append(np.isin(labels, 1 + np.flatnonzero(areas >= min_fraction * areas.max())))
        # masks_to_boxes gives inclusive pixel indices; + 1 on x2, y2 turns them into pixel edges
        regions = torch.as_tensor(np.stack(kept), device=masks.device)
        edges = masks_to_boxes(regions) + torch.tensor([0.0, 0.0, 1.0, 1.0], device=masks.device)
        boxes[found] = edges / torch.tensor([w, h, w, h], dtype=torch.float32, device=masks.device)
    return boxes
