"""Sam2Rad: a frozen SAM-family backbone driven by the prompt predictor network, in three modes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor, nn

from .backbones import Backbone, Features
from .ppn import DensePromptPredictor, PromptPredictor, largest_region_fraction

MASK_PROMPT_LOGIT = 10.0  # logit magnitude a user mask, box or click writes into the mask prompt
# absent from older model files; zero then (a dense PPN's presence rule, region term and self-support weight)
OPTIONAL_PPN_KEYS = ("ppn.presence_offset", "ppn.presence_min_region", "ppn.trunks.0.region_objectness",
                     "ppn.self_support")
# a dense PPN's trunk tensors, which model files before bundle 0.12 hold at the PPN's top level (one trunk)
_TRUNK_PARTS = ("norm.", "stem.", "blocks.", "head.", "objectness_head.", "region_objectness")


def current_layout(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A model file's state dict with this version's key names: a dense PPN file written before bundle 0.12 holds
    its one trunk at the PPN's top level (``ppn.stem...``), read as ``ppn.trunks.0.stem...``; others unchanged."""
    if "ppn.prototypes" not in state or any(k.startswith("ppn.trunks.") for k in state):
        return state
    return {f"ppn.trunks.0.{k[4:]}" if k.startswith("ppn.") and k[4:].startswith(_TRUNK_PARTS) else k: v
            for k, v in state.items()}


class Mode(str, Enum):
    """How the decoder is prompted."""

    AUTONOMOUS = "autonomous"  # learned prompts only
    REFINE = "refine"  # learned prompts plus the user's boxes / points / mask
    MANUAL = "manual"  # the user's prompts only: plain SAM behaviour


@dataclass
class Prompts:
    """User prompts per (image, class), in model-input pixels (x = column, y = row) of the padded square input.

    Every field is optional; a ``*_valid`` flag marks which (image, class) pairs carry that prompt.
    """

    boxes: Tensor | None = None  # (B, C, 4) x1, y1, x2, y2
    box_valid: Tensor | None = None  # (B, C) bool; default all True
    points: Tensor | None = None  # (B, C, P, 2) x, y
    point_labels: Tensor | None = None  # (B, C, P) 1 positive, 0 negative, -1 padding
    masks: Tensor | None = None  # (B, C, m, m) mask-prompt logits (e.g. a previous prediction or a brush)
    mask_valid: Tensor | None = None  # (B, C) bool; default all True

    def is_empty(self) -> bool:
        return self.boxes is None and self.points is None and self.masks is None


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``B @ A`` (B starts at zero: no change at step 0).

    ``enabled = False`` bypasses the update, giving back the backbone's own layer (manual mode).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.base = base
        self.enabled = True
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = (alpha or rank) / rank

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.base(x)
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale


def add_lora(decoder: nn.Module, rank: int) -> list[nn.Parameter]:
    """Wrap q_proj and v_proj of every attention layer in the decoder's transformer with LoRA; return the new params."""
    params: list[nn.Parameter] = []
    for module in list(decoder.modules()):
        for name in ("q_proj", "v_proj"):
            layer = getattr(module, name, None)
            if isinstance(layer, nn.Linear):
                lora = LoRALinear(layer, rank).to(layer.weight.device)
                setattr(module, name, lora)
                params += [lora.lora_a, lora.lora_b]
    return params


class Sam2Rad(nn.Module):
    """Frozen backbone + prompt predictor (+ optional LoRA on the mask decoder), multi-class.

    ``forward`` takes either normalised, padded images (B, 3, S, S) or precomputed backbone features (a dict as
    returned by ``backbone.encode``), so training can run on cached features.

    Args:
        backbone: a frozen :class:`~sam2rad_monai.backbones.Backbone`.
        num_classes: foreground classes.
        num_tokens, depth, ...: prompt predictor sizes (see :class:`~sam2rad_monai.ppn.PromptPredictor`).
        lora_rank: LoRA rank on the mask decoder's attention q/v projections; 0 (default) keeps the decoder frozen.
            LoRA adapts the decoder to the learned prompts, so it is on in autonomous and refine modes and off in
            manual mode, which stays the backbone's own SAM (the zero-shot baseline).
        box_source: ``"mask"`` (default) reads the learned box off the mask prompt, ``"query"`` regresses it from
            the box tokens (see :class:`~sam2rad_monai.ppn.PromptPredictor`).
        fuse_mask_prompt: output the mean of the decoder's and the mask prompt's logits (two heads trained on the
            same target, each by its own loss term) instead of the decoder's alone (default on): on the usgra validation
            split the frozen decoder, prompted with a learned box, lost detail the mask prompt had. In refine mode the
            mask prompt carries the user's edits (see ``click_radius``), and a class the user boxed gets the
            decoder's output alone, which follows a true box better than the mean does. Manual mode is always the
            decoder's. Measurements: docs/BENCHMARKS.md.
        ppn: ``"attention"`` (default): the paper's PPN (learned queries, two-way attention, free prompt tokens);
            ``"dense"``: :class:`~sam2rad_monai.ppn.DensePromptPredictor`, a convolutional head that needs no
            decoder pass to train (``forward(..., decode=False)``), for few labels and CPU budgets.
        click_radius: radius of the disc a refine-mode click paints into the mask prompt, as a fraction of the input
            side (1/16 was the best of 1/32 to 1/8 in the click benchmark on the usgra validation split).
        trunks, self_support: a dense PPN's ensemble members and self-support weight
            (:class:`~sam2rad_monai.ppn.DensePromptPredictor`); a model file brings its own.
    """

    def __init__(self, backbone: Backbone, num_classes: int, num_tokens: int = 10, depth: int = 3,
                 num_heads: int = 8, mlp_dim: int = 2048, mask_head_channels: int = 64, dropout: float = 0.1,
                 lora_rank: int = 0, box_source: str = "mask", fuse_mask_prompt: bool = True,
                 click_radius: float = 1 / 16, ppn: str = "attention", trunks: int = 1,
                 self_support: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.fuse_mask_prompt = fuse_mask_prompt
        self.click_radius = click_radius
        self._ppn_kwargs = dict(num_tokens=num_tokens, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
                                mask_head_channels=mask_head_channels, dropout=dropout, box_source=box_source,
                                trunks=trunks, self_support=self_support)
        self.ppn: PromptPredictor | DensePromptPredictor
        self._build_ppn(ppn)
        self.lora_rank = lora_rank
        if lora_rank > 0:
            add_lora(backbone.mask_decoder, lora_rank)

    def _build_ppn(self, kind: str, bank: bool = True, trunks: int | None = None) -> None:
        if kind not in ("attention", "dense"):
            raise ValueError(f"ppn must be 'attention' or 'dense', got {kind!r}")
        bb, kw = self.backbone, self._ppn_kwargs
        if kind == "dense":  # bank=False: the layout of dense model files before bundle 0.5 (no neighbour maps)
            ppn = DensePromptPredictor(self.num_classes, bb.level_channels, bb.mask_prompt_size, dropout=kw["dropout"],
                                       trunks=trunks or kw["trunks"], self_support=kw["self_support"],
                                       **({} if bank else {"neighbours": 0}))
        else:
            ppn = PromptPredictor(self.num_classes, kw["num_tokens"], bb.level_channels, bb.mask_prompt_size,
                                  depth=kw["depth"], num_heads=kw["num_heads"], mlp_dim=kw["mlp_dim"],
                                  mask_head_channels=kw["mask_head_channels"], dropout=kw["dropout"],
                                  box_source=kw["box_source"])
        device = next(bb.parameters()).device
        self.ppn, self.ppn_kind = ppn.to(device).train(self.training), kind

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.backbone.named_parameters() if "lora_" in n]

    def trainable_parameter_groups(self, lr: float = 1e-4, decoder_lr: float = 1e-5, weight_decay: float = 0.1
                                   ) -> list[dict]:
        """AdamW groups (paper §4.3): PPN at ``lr``, LoRA at ``decoder_lr``; no decay on queries, norms and biases."""
        decay, no_decay = [], []
        for name, p in self.ppn.named_parameters():
            (no_decay if p.ndim < 2 or name == "queries" else decay).append(p)
        groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                  {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
        if self.lora_rank > 0:
            groups.append({"params": self.lora_parameters(), "lr": decoder_lr, "weight_decay": weight_decay})
        return groups

    def ppn_state_dict(self) -> dict[str, Tensor]:
        """What a trained Sam2Rad checkpoint holds: the PPN and any LoRA weights, never the frozen backbone."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.") or "lora_" in k}

    def load_ppn_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a checkpoint written by :meth:`ppn_state_dict`; every PPN / LoRA key must be present.

        A model takes the checkpoint's PPN kind (``ppn``), and a model built without LoRA its LoRA rank (both are
        part of the trained model, so configs need not repeat them); any other difference is an error.
        """
        kind = "dense" if "ppn.prototypes" in state else "attention"
        state = current_layout(state)
        previous = (self.ppn, self.ppn_kind)
        bank = "ppn.bank" in state
        trunks = len({k.split(".")[2] for k in state if k.startswith("ppn.trunks.")})
        if kind != self.ppn_kind or (kind == "dense" and (bool(self.ppn.neighbours) != bank
                                                          or len(self.ppn.trunks) != trunks)):
            self._build_ppn(kind, bank=bank, trunks=trunks or None)
        rank = next((v.shape[0] for k, v in state.items() if k.endswith("lora_a")), 0)
        # adopt the rank only for a checkpoint that otherwise matches, so a refused one leaves the model as it was
        expected = set(self.ppn_state_dict())
        if rank and self.lora_rank == 0 and {k for k in state if "lora_" not in k} | (
                expected & set(OPTIONAL_PPN_KEYS)) == expected:
            add_lora(self.backbone.mask_decoder, rank)
            self.lora_rank = rank
        own = self.ppn_state_dict()
        # model files written before an optional tensor existed load it at its neutral value, zero
        optional = {k for k in OPTIONAL_PPN_KEYS if k in own} - set(state)
        missing, unexpected = sorted(set(own) - set(state) - optional), sorted(set(state) - set(own))
        banks = {f"ppn.{name}" for name in ("bank", "bank_class", "bank_source")}  # sized by the labelled frames
        resized = sorted(k for k in set(own) & set(state) - banks if own[k].shape != state[k].shape)
        if missing or unexpected or resized:
            self.ppn, self.ppn_kind = previous
            raise KeyError(f"Sam2Rad checkpoint does not match this model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}, other shape {resized[:3]} "
                           "(check num_classes, num_tokens, lora_rank and box_source)")
        for key in banks & set(state):
            setattr(self.ppn, key[len("ppn."):], torch.empty_like(state[key], device=self.ppn.prototypes.device))
        self.load_state_dict(state, strict=False)
        for key in optional:  # a state dict's tensors share the model's storage
            own[key].zero_()

    def encode(self, images: Tensor) -> Features:
        return self.backbone.encode(images)

    def forward(self, inputs: Tensor | Features, prompts: Prompts | None = None,
                mode: Mode | str = Mode.AUTONOMOUS, decode: bool = True) -> dict[str, Tensor]:
        """Segment every class.

        Args:
            inputs: images (B, 3, S, S), normalised and padded, or features from ``backbone.encode``.
            prompts: user prompts (refine and manual modes).
            mode: ``autonomous``, ``refine`` or ``manual``.
            decode: ``False`` (autonomous mode only) skips the mask decoder: ``logits`` are the learned mask
                prompts and there is no ``decoder_logits`` / ``iou`` (the cheap training step of a dense PPN).

        Returns:
            dict with, per image and class: ``logits`` (B, C, m, m) mask logits at the decoder's resolution
            (m = 4 x embedding grid; fused with the mask prompt, see ``fuse_mask_prompt``; a dense PPN's mask prompt
            in autonomous mode, with no decoder pass; with a user box, whichever of the refined and the plain box
            output SAM rates higher), ``decoder_logits`` the decoder's own (what the loss trains), ``iou`` (B, C)
            SAM's IoU estimate (a dense PPN in autonomous mode: the presence probability); and, unless manual:
            ``boxes`` (B, C, 4) the learned normalised xyxy box, ``box_fit`` (B, C, 4) the differentiable box the
            loss trains, ``mask_prompts`` (B, C, m, m) the learned mask-prompt logits (before any user edit),
            ``objectness`` (B, C) logits.
        """
        mode = Mode(mode)
        if not decode and mode is not Mode.AUTONOMOUS:
            raise ValueError("decode=False is for autonomous mode only")
        prompts = prompts or Prompts()
        if mode is not Mode.AUTONOMOUS and prompts.is_empty():
            raise ValueError(f"{mode.value} mode needs user prompts (boxes, points or masks)")
        self._set_lora(mode is not Mode.MANUAL)
        features = inputs if isinstance(inputs, dict) else self.backbone.encode(inputs)
        # cached features are fp16; "neighbours" are a dense PPN's precomputed neighbour maps of training rows and
        # "member" their ensemble member (which trunk trains on them)
        neighbours, member = features.get("neighbours"), features.get("member")
        features = {k: v.float() for k, v in features.items() if k not in ("neighbours", "member")}
        batch, classes = features["embed"].shape[0], self.num_classes
        rows = batch * classes
        out: dict[str, Tensor] = {}

        if mode is Mode.MANUAL:
            sparse, dense = self._user_prompts(prompts, rows)
        else:
            learned = self._learned_prompts(features, neighbours=neighbours, member=member)
            tokens, mask_prompt = learned.pop("tokens"), learned["mask_prompts"]
            out.update({k: v.reshape(batch, classes, *v.shape[1:]) for k, v in learned.items()})
            if mode is Mode.AUTONOMOUS:
                if not decode or self.ppn_kind == "dense":
                    # a dense PPN's mask prompt is its output (it scored above the decoder it prompts on validation)
                    out["logits"] = out["mask_prompts"]
                    out["iou"] = out["objectness"].sigmoid()  # no decoder pass: the presence probability stands in
                    return out
                output, logits, iou = self.decode_learned(features, learned["boxes"], tokens, mask_prompt)
                out["decoder_logits"] = logits.reshape(batch, classes, *logits.shape[-2:])
                out["logits"] = output.reshape(batch, classes, *output.shape[-2:])
                out["iou"] = iou.reshape(batch, classes)
                return out
            sparse = self.learned_sparse(learned["boxes"], tokens)
            sparse, mask_prompt, boxed = self._edit_learned_prompts(prompts, rows, sparse, mask_prompt)
            dense = self.backbone.embed_masks(mask_prompt[:, None])

        row_features = {k: v.repeat_interleave(classes, dim=0) for k, v in features.items()}
        logits, iou = self.backbone.decode(row_features, sparse, dense)
        logits, iou = logits[:, 0], iou[:, 0]
        out["decoder_logits"] = logits.reshape(batch, classes, *logits.shape[-2:])
        output = logits
        if mode is Mode.REFINE:
            if self.fuse_mask_prompt:
                output = torch.where(boxed.reshape(-1, 1, 1), logits, (logits + mask_prompt) / 2)
            if self.ppn_kind == "dense":  # rows the user left alone keep the autonomous output
                untouched = ~(boxed | _user_rows(prompts, rows, mask_prompt.device))
                output = torch.where(untouched.reshape(-1, 1, 1), learned["mask_prompts"], output)
            if boxed.any() and not self.training:
                output, iou = self._defer_to_box(prompts, row_features, boxed, output, iou)
        out["logits"] = output.reshape(batch, classes, *output.shape[-2:])
        out["iou"] = iou.reshape(batch, classes)
        return out

    def present(self, logits: Tensor, objectness: Tensor, threshold: float = 0.0) -> Tensor:
        """Which classes the learned prompts call present: (B, C) bool from output ``logits`` (B, C, m, m) and
        ``objectness`` (B, C) logits.

        A class is present when its objectness is at least ``threshold`` and, for a dense PPN with a calibrated
        ``presence_min_region``, when the largest 8-connected region of its mask (logits > 0) covers at least that
        share of the m x m grid: a call made of specks is not a structure.
        """
        keep = objectness >= threshold
        minimum = getattr(self.ppn, "presence_min_region", None)
        # a model file's constants: which classes have a rule is fixed for a traced graph too
        ruled = [] if minimum is None else [k for k, v in enumerate(minimum.tolist()) if v > 0]
        if not ruled:
            return keep
        regions = largest_region_fraction((logits[:, ruled] > 0).flatten(0, 1)).reshape(-1, len(ruled))
        keep = keep.clone()
        keep[:, ruled] &= (regions.to(minimum.device) >= minimum[ruled]).to(keep.device)
        return keep

    def _defer_to_box(self, prompts: Prompts, row_features: Features, boxed: Tensor, output: Tensor, iou: Tensor
                      ) -> tuple[Tensor, Tensor]:
        """Refine rows with a user box: keep the refined output only where SAM's own IoU estimate rates it above the
        plain box-prompted decoder's (manual mode on the same box), so learned prompts never override a good box."""
        rows = boxed.nonzero().flatten()
        enabled = [m.enabled for m in self.backbone.mask_decoder.modules() if isinstance(m, LoRALinear)]
        self._set_lora(False)
        try:
            sparse = self.backbone.embed_boxes(prompts.boxes.reshape(-1, 4).float()[rows])
            plain, plain_iou = self.backbone.decode({k: v[rows] for k, v in row_features.items()}, sparse,
                                                    self.backbone.no_mask_dense(len(rows)))
        finally:
            self._set_lora(bool(enabled) and enabled[0])
        better = plain_iou[:, 0] > iou[rows]
        output, iou = output.clone(), iou.clone()
        output[rows] = torch.where(better.reshape(-1, 1, 1), plain[:, 0].to(output.dtype), output[rows])
        iou[rows] = torch.where(better, plain_iou[:, 0].to(iou.dtype), iou[rows])
        return output, iou

    def _set_lora(self, enabled: bool) -> None:
        for module in self.backbone.mask_decoder.modules():
            if isinstance(module, LoRALinear):
                module.enabled = enabled

    def _learned_prompts(self, features: Features, region_box: bool = True, neighbours: Tensor | None = None,
                         member: Tensor | None = None) -> dict[str, Tensor]:
        """The PPN's prompts per row: ``tokens``, ``boxes``, ``box_fit``, ``mask_prompts`` (R, m, m), ``objectness``
        (``region_box=False``: no mask-read box, see :class:`~sam2rad_monai.ppn.PromptPredictor`; ``neighbours``,
        ``member``: a dense PPN's precomputed neighbour maps and trunk index of training rows,
        :meth:`~sam2rad_monai.ppn.DensePromptPredictor.forward`)."""
        bb = self.backbone
        levels = bb.levels(features)
        level_pe = [bb.dense_pe()] + [bb.grid_pe(tuple(level.shape[-2:])) for level in levels[1:]]
        # only a dense PPN's training rows have them
        extra = {k: v for k, v in (("neighbours", neighbours), ("member", member)) if v is not None}
        pred = self.ppn(levels, level_pe, bb.prompt_encoder.no_mask_embed.weight[0], region_box=region_box, **extra)
        learned = {"tokens": pred.tokens, "boxes": pred.boxes, "box_fit": pred.box_fit,
                   "mask_prompts": pred.mask_prompts[:, 0], "objectness": pred.objectness}
        return {k: v for k, v in learned.items() if v is not None}

    def learned_sparse(self, boxes: Tensor, tokens: Tensor) -> Tensor:
        """Sparse prompt (R, 2 + T, 256) of normalised boxes (R, 4) and free tokens (R, T, 256): the box's tokens first."""
        return torch.cat([self.backbone.embed_boxes(boxes * self.backbone.image_size), tokens], dim=1)

    def decode_learned(self, features: Features, boxes: Tensor, tokens: Tensor, mask_prompts: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """Autonomous mode's decoder pass on learned prompts.

        Args:
            features: image features (B rows each); the prompts have B x num_classes rows, image-major.
            boxes: (R, 4) normalised xyxy; tokens: (R, T, 256); mask_prompts: (R, m, m) logits.

        Returns:
            the output logits (R, m, m) (fused with the mask prompt, see ``fuse_mask_prompt``), the decoder's own
            logits (R, m, m) and SAM's IoU estimate (R,).
        """
        row_features = {k: v.repeat_interleave(self.num_classes, dim=0) for k, v in features.items()}
        dense = self.backbone.embed_masks(mask_prompts[:, None])
        logits, iou = self.backbone.decode(row_features, self.learned_sparse(boxes, tokens), dense)
        logits, iou = logits[:, 0], iou[:, 0]
        output = (logits + mask_prompts) / 2 if self.fuse_mask_prompt else logits
        return output, logits, iou

    def _edit_learned_prompts(self, prompts: Prompts, rows: int, sparse: Tensor, mask_prompt: Tensor
                              ) -> tuple[Tensor, Tensor, Tensor]:
        """Refine mode: the user's prompts edit the learned ones, row by row.

        A user mask replaces the learned mask prompt. A user box replaces the learned box (SAM reads one box; the
        learned one's tokens become padding and the user's take a slot after the learned tokens, padding in rows
        without a box) and clears the mask prompt outside it. Each click joins the sparse tokens as a point and
        paints a disc of radius ``click_radius`` (positive or negative, later clicks over earlier ones) into the mask
        prompt, which the frozen decoder follows far more than a point token. Returns the sparse tokens, the mask
        prompt and which rows hold a user box.
        """
        bb = self.backbone
        m, device = mask_prompt.shape[-1], mask_prompt.device
        # geometry in float32 whatever the autocast dtype (bf16 cannot tell 129.5 from 130): input-pixel coordinates
        # of the mask-prompt cells' centres
        centres = (torch.arange(m, device=device, dtype=torch.float32) + 0.5) * bb.image_size / m
        if prompts.masks is not None:
            valid = _row_flags(prompts.mask_valid, rows, device)
            user = prompts.masks.reshape(rows, m, m).to(mask_prompt.dtype)
            mask_prompt = torch.where(valid.reshape(-1, 1, 1), user, mask_prompt)
        # every refine row has a user-box slot (padding where there is no box), so a row's tokens do not depend on
        # the other rows of its batch and match the prompt mix of training, which always passes boxes
        if prompts.boxes is None:
            boxed, boxes = torch.zeros(rows, dtype=torch.bool, device=device), torch.zeros(rows, 4, device=device)
        else:
            boxed, boxes = _row_flags(prompts.box_valid, rows, device), prompts.boxes.reshape(rows, 4).float()
        pad = bb.not_a_point().expand(rows, 2, -1)
        learned_box = torch.where(boxed.reshape(-1, 1, 1), pad, sparse[:, :2])
        user_box = torch.where(boxed.reshape(-1, 1, 1), bb.embed_boxes(boxes), pad)
        sparse = torch.cat([learned_box, sparse[:, 2:], user_box], dim=1)
        # inclusive corner indices: the box covers pixel edges x1 .. x2 + 1
        inside_x = (centres >= boxes[:, 0:1]) & (centres <= boxes[:, 2:3] + 1)
        inside_y = (centres >= boxes[:, 1:2]) & (centres <= boxes[:, 3:4] + 1)
        outside = ~(inside_y[:, :, None] & inside_x[:, None, :])
        mask_prompt = torch.where(boxed.reshape(-1, 1, 1) & outside, -MASK_PROMPT_LOGIT, mask_prompt)
        if prompts.points is not None:
            coords = prompts.points.reshape(rows, -1, 2).float()
            labels = prompts.point_labels.reshape(rows, -1)
            sparse = torch.cat([sparse, bb.embed_points(coords, labels, pad=False)], dim=1)
            radius = self.click_radius * bb.image_size
            centre = coords + 0.5  # a click is a pixel index; the disc is centred on that pixel's centre
            for j in range(coords.shape[1]):
                dx = centres[None, None, :] - centre[:, j, 0, None, None]
                dy = centres[None, :, None] - centre[:, j, 1, None, None]
                disc = (dx ** 2 + dy ** 2 <= radius ** 2) & (labels[:, j] >= 0).reshape(-1, 1, 1)
                value = torch.where(labels[:, j] == 1, MASK_PROMPT_LOGIT, -MASK_PROMPT_LOGIT).to(mask_prompt.dtype)
                mask_prompt = torch.where(disc, value.reshape(-1, 1, 1), mask_prompt)
        return sparse, mask_prompt, boxed

    def _user_prompts(self, prompts: Prompts, rows: int) -> tuple[Tensor, Tensor]:
        """Manual mode: embed the user's prompts as SAM's prompt encoder does (points, then box tokens; mask as the
        dense prompt)."""
        bb = self.backbone
        parts: list[Tensor] = []
        if prompts.points is not None:
            coords = prompts.points.reshape(rows, -1, 2).float()
            labels = prompts.point_labels.reshape(rows, -1)
            parts.append(bb.embed_points(coords, labels, pad=prompts.boxes is None))
        if prompts.boxes is not None:
            tokens = bb.embed_boxes(prompts.boxes.reshape(rows, 4).float())
            # rows without a box get SAM's padding token, so every row has the same token count
            keep = _row_flags(prompts.box_valid, rows, tokens.device).reshape(rows, 1, 1)
            parts.append(torch.where(keep, tokens, bb.not_a_point().expand_as(tokens)))
        sparse = torch.cat(parts, dim=1) if parts else bb.embed_boxes(torch.zeros(rows, 4))[:, :0]

        dense = bb.no_mask_dense(rows)
        if prompts.masks is not None:
            user = bb.embed_masks(prompts.masks.reshape(rows, 1, *prompts.masks.shape[-2:]).float())
            dense = torch.where(_row_flags(prompts.mask_valid, rows, user.device).reshape(rows, 1, 1, 1), user, dense)
        return sparse, dense


def _user_rows(prompts: Prompts, rows: int, device: torch.device) -> Tensor:
    """Rows (R,) that carry a user click or mask (boxes are tracked by the refine edit itself)."""
    flags = torch.zeros(rows, dtype=torch.bool, device=device)
    if prompts.points is not None:
        flags |= (prompts.point_labels.reshape(rows, -1) >= 0).any(dim=1).to(device)
    if prompts.masks is not None:
        flags |= _row_flags(prompts.mask_valid, rows, device)
    return flags


def _row_flags(valid: Tensor | None, rows: int, device: torch.device) -> Tensor:
    """A prompt's ``*_valid`` flags as one bool per row (all True when not given)."""
    if valid is None:
        return torch.ones(rows, dtype=torch.bool, device=device)
    return valid.reshape(rows).to(device=device, dtype=torch.bool)
