"""FIBER's fine-grained model: the fused backbone in multi-scale mode, an FPN and the VL DyHead.

    images (B,3,H,W) ─ Swin, top 6 blocks fused ─ C2..C5 ─ per-stage LN ─ FPN ─ P3..P7 ─┐
    text ids (B,Lt)  ─ RoBERTa, top 6 layers fused ───────── text hidden (B,Lt,768) ─────┴─
      VL DyHead ─> box deltas, centerness, token logits (B, H*W, Lt) per level ─> boxes

Phrase grounding, referring expressions and detection are one task here: the text is a caption,
an expression or the category names joined by ". ", and a "label" is a set of its tokens (the
positive map). The model scores every anchor against every token; a label's score is the mean
over its tokens.

The detection backbone differs from the coarse one (fusion.py) in a few settings, all in
`FiberDetectorConfig`: window 12 everywhere with the grid padded to whole windows (no clamping),
stochastic depth 0.4, the last text layer keeps its LayerNorm, and the image query of the
cross-attention has a LayerNorm only in the "v3" release (RefCOCO) and none in "v2" (COCO, LVIS,
the fine-grained pre-training). Swin's final norm is replaced by LayerNorms on the C3..C5
outputs (`stage_norms`; C2 is passed through, as the original's RetinaNet layout does).

Weights: `FiberDetector.from_pretrained` reads every released fine-grained file (original key
names, `module.` prefix, optional EMA weights) and this project's own checkpoints;
`init_from_coarse` starts detection training from a coarse FIBER checkpoint. Every key of a
file is loaded or dropped for a stated reason; anything else is one error naming the keys.

Shape letters: B batch, Lt text tokens, D text width, C channels, H/W grid height/width.
"""
import math
import re
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from detection import DetectionHead, DetectionHeadConfig, FPN
from fusion import FusedBackbone, FusionConfig
from loading import original_to_ours, ours_to_original, resize_bias_table
from roberta import RobertaConfig
from swin import SwinConfig

VERSIONS = ("v2", "v3")


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------

@dataclass
class FiberDetectorConfig:
    """The detector's sizes and settings (defaults: the released Swin-B / RoBERTa-base model)."""
    version: str = "v2"  # "v3": LayerNorm on the image query of i2t attention (RefCOCO release)
    swin: SwinConfig = field(default_factory=lambda: detection_swin())
    text: RobertaConfig = field(default_factory=RobertaConfig)
    num_fused: int = 6  # fused blocks per side: Swin's last 4 + 2, RoBERTa's last 6
    head: DetectionHeadConfig = field(default_factory=DetectionHeadConfig)
    max_query_len: int = 256  # text is padded (and truncated) to this many tokens
    min_size: int = 800  # test-time shorter image side ...
    max_size: int = 1333  # ... unless the longer side would exceed this
    train_min_sizes: tuple = (480, 560, 640, 720, 800)  # train-time shorter side, one at random
    size_divisibility: int = 32  # batches are zero-padded to a multiple of the largest stride

    def __post_init__(self):
        if isinstance(self.swin, dict):  # rebuilt from a saved config
            self.swin = SwinConfig(**self.swin)
        if isinstance(self.text, dict):
            self.text = RobertaConfig(**self.text)
        if isinstance(self.head, dict):
            self.head = DetectionHeadConfig(**self.head)
        self.train_min_sizes = tuple(self.train_min_sizes)
        if self.version not in VERSIONS:
            raise ValueError(f"FiberDetectorConfig.version={self.version!r}: choose from "
                             f"{VERSIONS}")
        widths = tuple(self.swin.stage_dim(s) for s in range(1, len(self.swin.depths)))
        assert self.head.in_channels == widths, f"head.in_channels must be C3..C5 widths {widths}"
        assert self.head.lang_dim == self.text.hidden_size, "head.lang_dim must be the text width"
        # RoBERTa positions start at pad_id + 1, so the text may use max_positions - 2 slots
        assert self.max_query_len <= self.text.max_positions - 2, "max_query_len too long"

    @classmethod
    def base(cls, version: str = "v2", **overrides):
        """FIBER-B as released: Swin-B + RoBERTa-base + DyHead; v2 (COCO/LVIS) or v3 (RefCOCO)."""
        head = DetectionHeadConfig.refexp() if version == "v3" else DetectionHeadConfig()
        return cls(**{"version": version, "head": head, **overrides})

    @classmethod
    def tiny(cls, version: str = "v2", **overrides):
        """A CPU-sized detector wired like the base one (the coarse tiny model's backbone)."""
        # no stochastic depth and no DropBlock: regularisers for long runs that only slow
        # down a few hundred steps from scratch
        swin = detection_swin(embed_dim=32, depths=(1, 1, 2, 2), num_heads=(1, 2, 4, 8),
                              window_size=4, drop_path_rate=0.0)
        text = RobertaConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                             max_positions=130)
        # anchors 4x the stride (instead of 8x) suit the small objects of 128 px images
        head = DetectionHeadConfig.tiny(in_channels=(64, 128, 256), channels=64, lang_dim=128,
                                        anchor_sizes=(32, 64, 128, 256, 512), fpn_drop_prob=0.0)
        small = dict(version=version, swin=swin, text=text, num_fused=3, head=head,
                     max_query_len=64, min_size=128, max_size=213,
                     # a batch is padded to its largest image: sizes above 128 would make
                     # every step cost as much as the largest
                     train_min_sizes=(96, 112, 128))
        return cls(**{**small, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    def fusion_config(self) -> FusionConfig:
        return FusionConfig(swin=self.swin, text=self.text, num_fused=self.num_fused,
                            i2t_query_norm=self.version == "v3", skip_last_text_norm=False)


def detection_swin(**overrides) -> SwinConfig:
    """Swin settings of the detection backbone (Swin-B unless overridden)."""
    settings = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                    window_size=12, drop_path_rate=0.4,
                    clamp_window_to_grid=False)  # pad small grids up to one window, keep shifts
    return SwinConfig(**{**settings, **overrides})


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

class FiberDetector(nn.Module):
    """Fused Swin + RoBERTa backbone, FPN and VL DyHead (the original's GeneralizedVLRCNN)."""

    def __init__(self, config: FiberDetectorConfig):
        super().__init__()
        self.config = config
        self.backbone = FusedBackbone(config.fusion_config())
        # the detection backbone has no final Swin norm: norms sit on each output stage instead
        self.backbone.swin.norm = nn.Identity()
        widths = [config.swin.stage_dim(s) for s in range(len(config.swin.depths))]
        self.stage_norms = nn.ModuleList([nn.Identity()] + [nn.LayerNorm(c) for c in widths[1:]])
        self.fpn = FPN(config.head)
        self.rpn = DetectionHead(config.head)

    # ---------------------------------------------------------------- forward
    def stage_grids(self, height: int, width: int) -> list:
        """(H, W) token grid of each Swin stage for an input of height x width pixels."""
        p = self.config.swin.patch_size
        grids = [(math.ceil(height / p), math.ceil(width / p))]
        for _ in range(len(self.config.swin.depths) - 1):
            h, w = grids[-1]
            grids.append(((h + 1) // 2, (w + 1) // 2))  # patch merging pads odd grids
        return grids

    def encode(self, images, text_ids, text_mask):
        """The fused backbone: C2..C5 maps [(B, C_s, H_s, W_s)] and the text dict.

        Text dict (the original's names): hidden (B, Lt, D), embedded = hidden with pads zeroed,
        masks (B, Lt), aggregate = mean over real tokens (B, D).
        """
        fb = self.backbone
        image, text = fb.image_lower(images), fb.text_lower(text_ids, text_mask)
        _, hidden, stage_tokens = fb.fuse(image, text)
        maps = []
        for norm, tokens, (H, W) in zip(self.stage_norms, stage_tokens,
                                        self.stage_grids(*images.shape[-2:])):
            B, _, C = tokens.shape
            maps.append(norm(tokens).transpose(1, 2).reshape(B, C, H, W))  # (B, C, H, W)
        mask = text_mask.to(hidden.dtype).unsqueeze(-1)  # (B, Lt, 1)
        embedded = hidden * mask
        text = {"hidden": hidden, "embedded": embedded, "masks": text_mask,
                "aggregate": embedded.sum(1) / mask.sum(1).clamp(min=1)}
        return maps, text

    def forward(self, images, image_sizes, text_ids, text_mask):
        """Head outputs for a padded batch.

        Args:
            images: (B, 3, H, W) normalised, zero-padded batch (H, W multiples of 32).
            image_sizes: per image (height, width) of its valid, unpadded part (used by loss
                and predict; kept here so the three calls read alike).
            text_ids, text_mask: (B, Lt) long token ids and 1/0 mask.
        Returns:
            dict of per-level lists (see detection.VLDyHead.forward): bbox_reg, centerness,
            dot_product_logits (B, H*W, Lt), cls_logits, tower, anchors; plus "C" (C2..C5),
            "P" (P3..P7) and "text" (the text dict of `encode`).
        """
        assert len(image_sizes) == images.shape[0], "one (height, width) per image"
        maps, text = self.encode(images, text_ids, text_mask)
        pyramid = self.fpn(maps[1:])  # C2 is not used by the FPN
        out = self.rpn(pyramid, text["hidden"], text_mask)
        out.update(C=maps, P=pyramid, text=text)
        return out

    def loss(self, images, image_sizes, text_ids, text_mask, targets, reduce_mean=None):
        """Training losses; targets: per image {"boxes": (G, 4) xyxy in input pixels,
        "positive_map": (G, Lt) tokens of each box's phrase}. Returns the head's losses and
        their weighted sum under "loss" (token focal + 2 x GIoU + centerness, as the original)."""
        out = self(images, image_sizes, text_ids, text_mask)
        losses = self.rpn.loss(out, targets, text_mask, image_sizes, reduce_mean=reduce_mean)
        losses["loss"] = (losses["loss_dot_product_token"] + losses["loss_reg"]
                          + losses["loss_centerness"] + losses["loss_cls"])
        return losses

    @torch.no_grad()
    def predict(self, images, image_sizes, text_ids, text_mask, label_to_tokens, **settings):
        """Boxes per image: dicts boxes (N, 4) xyxy in input pixels, scores (N,), labels (N,).

        label_to_tokens: {label (1, 2, ...): [token indices]} shared by the batch (e.g. from
        prompts.label_to_tokens(positive_map)), or a list of such maps, one per image (each
        image has its own caption). `settings` override the head config's post-processing
        (threshold, pre_nms_top_n, nms_threshold, detections_per_image, num_classes;
        num_classes defaults to max(largest label, cls channels)).
        """
        out = self(images, image_sizes, text_ids, text_mask)
        maps = label_to_tokens if isinstance(label_to_tokens, (list, tuple)) else None
        if maps is None:
            return self.rpn.postprocess(out, label_to_tokens, image_sizes,
                                        **self._settings(label_to_tokens, settings))
        assert len(maps) == images.shape[0], "one label map per image"
        results = []
        for b, label_map in enumerate(maps):  # post-process image by image
            one = {k: [t[b:b + 1] for t in out[k]]
                   for k in ("bbox_reg", "centerness", "dot_product_logits")}
            one["anchors"] = out["anchors"]
            results += self.rpn.postprocess(one, label_map, [image_sizes[b]],
                                            **self._settings(label_map, settings))
        return results

    def _settings(self, label_map, settings):
        labels = [int(k) for k in label_map]
        return {"num_classes": max([self.config.head.num_cls_channels] + labels), **settings}

    # ---------------------------------------------------------------- optimisation
    def parameter_groups(self, lr, *, lang_lr=None, weight_decay=1e-4, bias_lr_factor=2.0,
                         weight_decay_bias=0.0):
        """AdamW groups with the original's rules (matched on the original names): text
        backbone (its fusion modules included) at `lang_lr`; every name containing "bias"
        (also relative_position_bias_table, bias_lang, bias0) at lr x bias_lr_factor without
        weight decay."""
        lang_lr = lr if lang_lr is None else lang_lr
        groups = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            original = original_name(name)
            group_lr = lang_lr if "language_backbone" in original else lr
            decay = weight_decay
            if "bias" in original:
                group_lr, decay = group_lr * bias_lr_factor, weight_decay_bias
            group = groups.setdefault((group_lr, decay), dict(params=[], names=[], lr=group_lr,
                                                              weight_decay=decay))
            group["params"].append(p)
            group["names"].append(name)
        return list(groups.values())

    # ---------------------------------------------------------------- loading
    def load_original_state_dict(self, state_dict: dict, source: str = "state_dict"):
        """Load a released fine-grained state_dict (original names, `module.` optional), strictly.

        Derived buffers (relative position indices, position ids) are rebuilt, anchors kept when
        absent. Raises CheckpointMismatch naming missing/unexpected/mis-shaped keys and, when
        the file's fusion version differs from this model's, saying so.
        """
        sd = strip_module(state_dict)
        kind = f"fine-grained FIBER {fine_version_in(sd)}"
        ours = {}
        for key, value in sd.items():
            if dropped_reason_fine(key) is None:
                ours[fine_to_ours(key)] = value
        check_and_load(self, ours, source, kind, optional=("rpn.anchor_generator.",))
        return self

    def load_own_state_dict(self, state_dict: dict, source: str = "state_dict"):
        """Load this project's names (train_fine.py checkpoints), strictly."""
        check_and_load(self, strip_module(state_dict), source, "fiber detector",
                       optional=("rpn.anchor_generator.",))
        return self

    def init_from_coarse(self, state_dict: dict, source: str = "coarse checkpoint") -> list:
        """Initialise the fused backbone from coarse FIBER weights; returns the new keys.

        Accepts the original coarse names (`vit_model.*`, `text_transformer.*`; Lightning
        files, fiber_coarse_init), the same with those prefixes stripped, the fine-grained
        names of a backbone-only file (`fusion_backbone.*`) and this project's
        (`backbone.swin.*`, `backbone.text.*`). Every backbone key must be found; the per-stage
        norms, FPN and head start from their initialisation (as in the original). File keys
        that the detector has no use for (coarse heads, queues, Swin's final norm, ...) are
        dropped for a stated reason; any other leftover is an error.
        """
        sd = coarse_to_ours(strip_module(state_dict))
        own = self.state_dict()
        used, leftovers = {}, []
        for key, value in sd.items():
            reason = coarse_dropped_reason(key, own)
            if reason is None and key in own:
                used[key] = value
            elif reason is None:
                leftovers.append(key)
        used = resize_tables(used, own, source)
        new = [k for k in own if not k.startswith("backbone.")]
        problem = mismatch_report(own, used, source, "coarse FIBER",
                                  allow_missing=lambda k: not k.startswith("backbone."),
                                  unexpected=leftovers)
        if problem:
            raise CheckpointMismatch(problem)
        self.load_state_dict(used, strict=False)
        return new

    @classmethod
    def from_pretrained(cls, name_or_path, *, ema=False, version=None, head=None,
                        **download_options):
        """A released fine-grained checkpoint by name (see releases.RELEASES) or a path.

        Reads original `.pth` files (weights under "model", DDP `module.` prefix) and this
        project's train_fine.py checkpoints. `ema=True` takes the EMA weights ("model_ema" or
        "ema") when the file has them, with a warning otherwise. The fusion version and the
        class-channel count come from the file; the RefCOCO releases get the refexp
        post-processing (threshold 0, 3000 candidates). `head`: DetectionHeadConfig overrides.
        """
        import releases
        state = releases.load_weights(name_or_path, **download_options)
        return cls.from_state_file(state, name=str(name_or_path), ema=ema, version=version,
                                   head=head)

    @classmethod
    def from_state_file(cls, state, *, name="", ema=False, version=None, head=None):
        source = str(state.path)
        sd = pick_weights(state, ema)
        kind = detector_kind(sd)
        if kind == "fiber-detector":
            saved = state.extra.get("config")
            if not isinstance(saved, dict):
                raise ValueError(f"{source}: a fiber detector checkpoint without its 'config'")
            config = FiberDetectorConfig(**saved)
            return cls(config).load_own_state_dict(sd, source)
        if kind != "fiber-fine":
            hint = ("it is a coarse FIBER checkpoint: start detection training from it with "
                    "`train_fine.py --init` (FiberDetector.init_from_coarse)"
                    if kind.startswith("coarse") else "unrecognised key names")
            raise ValueError(f"{source} is not a fine-grained FIBER checkpoint: {hint}")
        config = config_for_release(sd, name, version, head)
        return cls(config).load_original_state_dict(sd, source)

    def export_original_state_dict(self) -> dict:
        """This model's weights under the original key names (what released files hold)."""
        return {original_name(k): v for k, v in self.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# Key names: original fine-grained <-> ours
# ------------------------------------------------------------------------------------------------

class CheckpointMismatch(RuntimeError):
    """A checkpoint's keys do not fit the model; the message names them."""


# original prefix -> ours, most specific first (the per-stage norms live in the Swin "body")
_FINE_PREFIXES = [
    (r"^fusion_backbone\.backbone\.body\.norm(\d)\.", r"stage_norms.\1."),
    (r"^fusion_backbone\.backbone\.body\.", "backbone.swin."),
    (r"^fusion_backbone\.language_backbone\.body\.model\.", "backbone.text."),
    (r"^fusion_backbone\.backbone\.fpn\.", "fpn."),
]
_OUR_PREFIXES = [
    (r"^stage_norms\.(\d)\.", r"fusion_backbone.backbone.body.norm\1."),
    (r"^backbone\.swin\.", "fusion_backbone.backbone.body."),
    (r"^backbone\.text\.", "fusion_backbone.language_backbone.body.model."),
    (r"^fpn\.", "fusion_backbone.backbone.fpn."),
]

FINE_DROPPED = {
    r"relative_position_index$": "derived from the window size; rebuilt",
    r"attn_mask$": "shifted-window mask, derived from the grid; rebuilt",
    r"position_ids$": "derived position ids; rebuilt",
}


def strip_module(sd: dict) -> dict:
    """Remove the DDP `module.` prefix (released files and EMA copies carry it)."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def dropped_reason_fine(key: str):
    for pattern, reason in FINE_DROPPED.items():
        if re.search(pattern, key):
            return reason
    return None


def fine_to_ours(key: str) -> str:
    """Original fine-grained name (no `module.`) -> this project's."""
    for pattern, replacement in _FINE_PREFIXES:
        new = re.sub(pattern, replacement, key)
        if new != key:
            return original_to_ours(new)  # the i2t / t2i module renames
    return key  # fpn-less names (rpn.*) are identical


def original_name(name: str) -> str:
    """This project's parameter name -> the original fine-grained one."""
    for pattern, replacement in _OUR_PREFIXES:
        match = re.match(pattern, name)
        if match:
            rest = ours_to_original(name[match.end():])  # inner renames only
            return re.sub(pattern, replacement, name[:match.end()]) + rest
    return name


def fine_version_in(sd: dict) -> str:
    """"v3" when the file has the image-query LayerNorms of the i2t attention, else "v2"."""
    return "v3" if any("norm_i2t_i" in k for k in sd) else "v2"


def detector_kind(sd: dict) -> str:
    keys = list(sd)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("fusion_backbone."):
        return "fiber-fine"
    if has("stage_norms.") or (has("backbone.swin.") and has("rpn.")):
        return "fiber-detector"
    if has("vit_model.") or has("text_transformer."):
        return "coarse (original names)"
    if has("backbone.swin.") or has("backbone.text."):
        return "coarse (this project's names)"
    if has("layers.0.blocks.0.") and has("encoder.layer.0."):
        return "coarse (stripped names)"
    return "unknown"


def pick_weights(state, ema: bool) -> dict:
    """The state's model weights, or its EMA weights when asked and present."""
    sd = state.tensors
    if ema:
        for key in ("model_ema", "ema"):
            if isinstance(state.extra.get(key), dict):
                return strip_module(state.extra[key])
        warnings.warn(f"{state.path}: no EMA weights in the file (keys 'model_ema', 'ema'); "
                      "using the model weights")
    return strip_module(sd)


def config_for_release(sd, name="", version=None, head=None) -> FiberDetectorConfig:
    """The config an original file needs: the fusion version and class count from its keys;
    refexp post-processing for the RefCOCO releases."""
    found = fine_version_in(sd)
    if version is not None and version != found:
        raise CheckpointMismatch(f"{name}: asked for fusion version {version}, but the file "
                                 f"holds a {found} backbone (v3 has attn.norm_i2t_i keys)")
    settings = dict(head or {})
    cls_key = "rpn.head.cls_logits.weight"
    if cls_key in sd:
        settings.setdefault("num_cls_channels", sd[cls_key].shape[0])
    refexp = "refcoco" in str(name).lower()
    head_config = (DetectionHeadConfig.refexp if refexp else DetectionHeadConfig)(**settings)
    return FiberDetectorConfig.base(found, head=head_config)


# ------------------------------------------------------------------------------------------------
# Coarse -> fine
# ------------------------------------------------------------------------------------------------

# Keys of a coarse file the detector does not use, with the reason (matched on our names).
COARSE_DROPPED = {
    r"^(cross_modal_|itm_score\.|mlm_score\.|vqa_classifier\.|nlvr2_classifier\.|rank_output\."
    r"|temp$)": "a coarse-stage head; the detector has its own",
    r"^(image_queue|text_queue|image_input_queue|text_input_queue|text_input_mask_queue"
    r"|queue_ptr|queue_total)$": "ITC queue state of the coarse training run",
    r"^backbone\.swin\.norm\.": "Swin's final norm; the detector normalises each stage instead",
    r"^backbone\.text\.pooler\.": "RoBERTa's pooler, never used by FIBER",
    r"crossattention_t2i\.output\.LayerNorm\.": "exists in the original but is never applied",
    r"relative_position_index$|attn_mask$|position_ids$": "derived from geometry; rebuilt",
}


def coarse_to_ours(sd: dict) -> dict:
    """Any coarse layout -> this project's backbone names (backbone.swin.*, backbone.text.*)."""
    out = {}
    for key, value in sd.items():
        if key.startswith("fusion_backbone."):  # already renamed for the fine-grained code
            key = fine_to_ours(key)
        elif key.startswith(("vit_model.", "text_transformer.")):
            key = original_to_ours(key)
        elif key.startswith(("patch_embed.", "layers.")) or key == "norm.weight" or \
                key == "norm.bias":
            key = original_to_ours("vit_model." + key)  # fiber_coarse_init-style stripped names
        elif key.startswith(("embeddings.", "encoder.", "pooler.")):
            key = original_to_ours("text_transformer." + key)
        out[key] = value
    return out


def coarse_dropped_reason(key: str, own: dict):
    for pattern, reason in COARSE_DROPPED.items():
        if re.search(pattern, key):
            return reason
    if key.endswith(".t2i.gate") and key not in own:
        return "gate of a text layer that is not fused (the original keeps one per layer)"
    if ".i2t.norm." in key and key not in own:
        return "image-query LayerNorm; this v2 detector has none"
    return None


def resize_tables(sd: dict, own: dict, source: str) -> dict:
    """Bias tables of another window size (a 576 px coarse model) are resized bicubically.

    The original instead skips them (random init); resizing keeps what the model learned.
    """
    for key, value in sd.items():
        if key.endswith("relative_position_bias_table") and key in own \
                and value.shape != own[key].shape:
            window = (int(round(own[key].shape[0] ** 0.5)) + 1) // 2
            warnings.warn(f"{source}: {key} resized {tuple(value.shape)} -> window {window}")
            sd[key] = resize_bias_table(value.float(), window)
    return sd


# ------------------------------------------------------------------------------------------------
# Strict accounting
# ------------------------------------------------------------------------------------------------

def mismatch_report(own: dict, sd: dict, source: str, kind: str, allow_missing=lambda k: False,
                    unexpected=()):
    """One message listing every missing, unexpected and mis-shaped key, or None."""
    missing = sorted(k for k in own if k not in sd and not allow_missing(k))
    unexpected = sorted(set(unexpected) | {k for k in sd if k not in own})
    misshaped = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in sd if k in own and sd[k].shape != own[k].shape)
    if not (missing or unexpected or misshaped):
        return None
    lines = [f"{source} ({kind} checkpoint) does not fit this FiberDetector: {len(missing)} "
             f"missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped keys."]
    if any("i2t.norm" in k for k in missing + unexpected):
        lines.append("  The image-query LayerNorms (attn.norm_i2t_i) differ: the file and the "
                     "model have different fusion versions (v3 has them, v2 not).")
    for title, keys in (("missing", missing), ("unexpected", unexpected),
                        ("mis-shaped", misshaped)):
        if keys:
            shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
            lines.append(f"  {title}:" + "".join(f"\n    {k}" for k in shown))
    return "\n".join(lines)


def check_and_load(model: nn.Module, sd: dict, source: str, kind: str, optional=()):
    """Strict load; keys under the `optional` prefixes may be absent (the model keeps its own)."""
    own = model.state_dict()
    problem = mismatch_report(own, sd, source, kind, allow_missing=lambda k: k.startswith(optional))
    if problem:
        raise CheckpointMismatch(problem)
    model.load_state_dict({**own, **sd}, strict=True)
