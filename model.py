"""The coarse-grained FIBER model: the fused backbone plus its task heads.

    images ─ Swin (lower) ─┐                                  ┌─ image_feats (B, Li, 768)
                           ├─ fused top (fusion.py) ─ linear ─┤                 ─ cls_feats
    text   ─ RoBERTa (lower)┘                                  └─ text_feats  (B, Lt, 768)  (B, 1536)

ITC uses the two backbones *without* fusion (image-only and text-only paths, their own linear
maps and poolers); ITM, MLM, VQA, NLVR2 and captioning read the fused features.

Parameter names follow the released checkpoints where they can (`cross_modal_*`,
`itm_score`, `mlm_score`, `vqa_classifier`, ...); `original_to_ours` is the one place that maps
the rest (`vit_model.` -> `backbone.swin.`, the cross-attention modules).
"""
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fusion import FusedBackbone, FusionConfig, ImageState, TextState
from heads import ITMHead, MLMHead, Pooler, classifier
from roberta import RobertaConfig, causal_additive_mask
from swin import SwinConfig, resize_bias_table

HEADS = ("itc", "itm", "mlm", "vqa", "nlvr2", "caption")


@dataclass
class FiberConfig:
    image_size: int = 384
    max_text_len: int = 40  # pre-training; the fine-tuning tasks use 50
    swin: SwinConfig = field(default_factory=SwinConfig)
    text: RobertaConfig = field(default_factory=RobertaConfig)
    num_fused: int = 6  # fused blocks per side (Swin: last 4 of stage 3 + 2 of stage 4)
    hidden_size: int = 768  # width of the cross-modal features every head reads
    vqa_answers: int = 3129  # size of the VQAv2 answer vocabulary
    heads: tuple = ("itc", "itm", "mlm")

    def __post_init__(self):
        if isinstance(self.swin, dict):  # rebuilt from a checkpoint's saved config
            self.swin = SwinConfig(**self.swin)
        if isinstance(self.text, dict):
            self.text = RobertaConfig(**self.text)
        self.heads = tuple(self.heads)
        unknown = set(self.heads) - set(HEADS)
        assert not unknown, f"unknown heads {sorted(unknown)}; choose from {HEADS}"
        assert self.swin.image_size == self.image_size, "swin.image_size must equal image_size"

    @classmethod
    def base(cls, image_size: int = 384, **overrides):
        """FIBER-B as released: Swin-B (ImageNet-22k, window = image_size / 32) + roberta-base."""
        swin = SwinConfig(image_size=image_size, embed_dim=128, depths=(2, 2, 18, 2),
                          num_heads=(4, 8, 16, 32))
        return cls(image_size=image_size, swin=swin, text=RobertaConfig(), **overrides)

    @classmethod
    def tiny(cls, image_size: int = 64, **overrides):
        """A few-million-parameter model with the same wiring, for CPU runs and tests."""
        swin = SwinConfig(image_size=image_size, embed_dim=32, depths=(1, 1, 2, 2),
                          num_heads=(1, 2, 4, 8), window_size=4, drop_path_rate=0.0)
        text = RobertaConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                             max_positions=130)
        return cls(image_size=image_size, swin=swin, text=text, num_fused=3, hidden_size=128,
                   **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


class Fiber(nn.Module):
    """Coarse FIBER: `forward(images, text_ids, text_mask)` gives the fused features."""

    def __init__(self, config: FiberConfig):
        super().__init__()
        self.config = config
        self.backbone = FusedBackbone(FusionConfig(swin=config.swin, text=config.text,
                                                   num_fused=config.num_fused))
        D, Ct = config.hidden_size, config.text.hidden_size
        Ci = config.swin.stage_dim(len(config.swin.depths) - 1)
        self.cross_modal_text_transform = nn.Linear(Ct, D)
        self.cross_modal_image_transform = nn.Linear(Ci, D)
        self.cross_modal_text_pooler = Pooler(D)
        self.cross_modal_image_pooler = Pooler(D)
        self.build_heads(D, Ct, Ci)
        self.init_head_weights()

    def build_heads(self, D, Ct, Ci):
        heads = self.config.heads
        # separate maps and poolers for the unimodal (contrastive) paths; every released
        # checkpoint has them, so they are always built
        self.cross_modal_text_transform_itc = nn.Linear(Ct, D)
        self.cross_modal_image_transform_itc = nn.Linear(Ci, D)
        self.cross_modal_text_pooler_itc = Pooler(D)
        self.cross_modal_image_pooler_itc = Pooler(D)
        if "itc" in heads:  # the learned temperature of the contrastive loss
            self.temp = nn.Parameter(torch.tensor(0.07))
        if "itm" in heads:
            self.itm_score = ITMHead(2 * D)
        if "mlm" in heads or "caption" in heads:
            self.mlm_score = MLMHead(D, self.config.text.vocab_size)
        if "vqa" in heads:
            self.vqa_classifier = classifier(2 * D, 2 * D, self.config.vqa_answers)
        if "nlvr2" in heads:
            self.nlvr2_classifier = classifier(4 * D, 2 * D, 2)
        if "caption" in heads:
            self.build_caption_adapters(Ci)

    def build_caption_adapters(self, Ci):
        """Captioning feeds the final image tokens to every fused text layer; layers that
        expect a narrower image get a linear map (indexed by text layer; lower ones unused)."""
        fb = self.backbone
        maps = []
        for layer in range(self.config.text.num_layers - 2):
            t2i = fb.text.encoder.layer[layer].t2i
            width = t2i.key.in_features if t2i is not None else Ci // 2
            maps.append(nn.Linear(Ci, width))
        self.cross_modal_att_layers = nn.ModuleList(maps)

    def init_head_weights(self):
        for name, module in self.named_modules():
            if name.startswith("backbone"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------- forward paths
    def fused(self, image: ImageState, text: TextState) -> dict:
        """Fused top + linear maps + poolers, from lower states (see fusion.py)."""
        x, h, _ = self.backbone.fuse(image, text)
        text_feats = self.cross_modal_text_transform(h)  # (B, Lt, D)
        image_feats = self.cross_modal_image_transform(x)  # (B, Li, D)
        cls_text = self.cross_modal_text_pooler(text_feats)
        cls_image = self.cross_modal_image_pooler(image_feats.mean(1, keepdim=True))
        return dict(text_feats=text_feats, image_feats=image_feats,
                    cls_feats=torch.cat([cls_text, cls_image], dim=-1))  # (B, 2D)

    def forward(self, images, text_ids, text_mask) -> dict:
        """images (B,3,S,S), text_ids/text_mask (B,Lt) -> text_feats (B,Lt,D),
        image_feats (B,Li,D), cls_feats (B,2D)."""
        fb = self.backbone
        return self.fused(fb.image_lower(images), fb.text_lower(text_ids, text_mask))

    def itc_image(self, image: ImageState):
        """Image-only path: normalised contrastive feature (B, D) and token features."""
        tokens = self.cross_modal_image_transform_itc(self.backbone.image_upper_alone(image))
        cls = self.cross_modal_image_pooler_itc(tokens.mean(1, keepdim=True))
        return F.normalize(cls, dim=-1), tokens

    def itc_text(self, text: TextState):
        tokens = self.cross_modal_text_transform_itc(self.backbone.text_upper_alone(text))
        return F.normalize(self.cross_modal_text_pooler_itc(tokens), dim=-1), tokens

    def encode_image(self, images):
        """L2-normalised ITC image features (B, D)."""
        return self.itc_image(self.backbone.image_lower(images))[0]

    def encode_text(self, text_ids, text_mask):
        """L2-normalised ITC text features (B, D)."""
        return self.itc_text(self.backbone.text_lower(text_ids, text_mask))[0]

    def vqa_logits(self, images, text_ids, text_mask):
        return self.vqa_classifier(self(images, text_ids, text_mask)["cls_feats"])

    def nlvr2_logits(self, images_left, images_right, text_ids, text_mask):
        """The statement is fused with each image separately; both cls features are joined."""
        fb = self.backbone
        text = fb.text_lower(text_ids, text_mask)
        left = self.fused(fb.image_lower(images_left), text)["cls_feats"]
        right = self.fused(fb.image_lower(images_right), text)["cls_feats"]
        return self.nlvr2_classifier(torch.cat([left, right], dim=-1))  # (B, 2)

    def caption_image_tokens(self, images):
        """Captioning's image side: the whole Swin without fusion and without final norm."""
        return self.backbone.swin(images, final_norm=False)  # (B, Li, C_last)

    def caption_forward(self, image_tokens, text_ids, text_mask):
        """Causal RoBERTa cross-attending to the image tokens -> (text_feats, cls_feats).

        Every LayerNorm is applied here (also the top layer's), unlike the fused forward.
        """
        text = self.backbone.text
        h = text.embeddings(text_ids)
        mask = causal_additive_mask(text_mask, h.dtype)  # (B, 1, Lt, Lt)
        n = self.config.text.num_layers
        for i in range(n):
            image = None
            if text.encoder.layer[i].t2i is not None:
                image = image_tokens if i >= n - 2 else self.cross_modal_att_layers[i](image_tokens)
            h = text.run_layer(i, h, mask, image=image)
        text_feats = self.cross_modal_text_transform(h)
        return text_feats, self.cross_modal_text_pooler(text_feats)

    # ---------------------------------------------------------------- loading
    def load_original_state_dict(self, state_dict: dict, source: str = "state_dict"):
        """Load weights saved under the original FIBER key names, strictly.

        Dropped on purpose (see `DROPPED`): the ITC queues, buffers derived from geometry, and
        parameters the original never uses. Relative position bias tables of another window
        size are resized as the original's fine-tuning does. Raises with every missing,
        unexpected and mis-shaped key named.
        """
        ours = convert_original(state_dict, self)
        load_strict(self, ours, source)
        return self

    def parameter_groups(self, lr, weight_decay=0.01, lr_mult_head=5.0, lr_mult_cross=5.0):
        """AdamW groups with the original's rules, applied to the original parameter names."""
        groups = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            original = ours_to_original(name)
            decay = not any(k in original for k in NO_DECAY)
            head = any(k in original for k in HEAD_NAMES)
            cross = any(k in original for k in CROSS_NAMES)
            mult = lr_mult_head if head else lr_mult_cross if cross else 1.0
            key = (decay, mult)
            groups.setdefault(key, dict(params=[], names=[], lr=lr * mult,
                                        weight_decay=weight_decay if decay else 0.0,
                                        lr_mult=mult))
            groups[key]["params"].append(p)
            groups[key]["names"].append(name)
        return list(groups.values())


# The original's optimiser rules match substrings of its parameter names (fiber_utils.py).
NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight",
            "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight")
HEAD_NAMES = ("vqa_classifier", "nlvr2_classifier", "mlm_score", "itm_score")
CROSS_NAMES = ("cross_modal", "i2t", "t2i")

# original name piece -> ours. Order matters: the longer, more specific patterns first.
_RENAMES = [
    (r"^vit_model\.", "backbone.swin."),
    (r"^text_transformer\.", "backbone.text."),
    (r"\.attn\.norm_i2t_i\.", ".i2t.norm."),
    (r"\.attn\.qkv_i2t\.", ".i2t.query."),
    (r"\.attn\.qkv_text_i2t\.", ".i2t.key_value."),
    (r"\.attn\.proj_i2t\.", ".i2t.proj."),
    (r"\.attn\.alpha_i2t$", ".i2t.gate"),
    (r"\.crossattention_t2i\.self\.", ".t2i."),
    (r"\.crossattention_t2i\.output\.dense\.", ".t2i.proj."),
    (r"\.alpha_t2i$", ".t2i.gate"),
]


def original_to_ours(name: str) -> str:
    for pattern, replacement in _RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def ours_to_original(name: str) -> str:
    swaps = [(r"^backbone\.swin\.", "vit_model."), (r"^backbone\.text\.", "text_transformer."),
             (r"\.i2t\.norm\.", ".attn.norm_i2t_i."), (r"\.i2t\.query\.", ".attn.qkv_i2t."),
             (r"\.i2t\.key_value\.", ".attn.qkv_text_i2t."), (r"\.i2t\.proj\.", ".attn.proj_i2t."),
             (r"\.i2t\.gate$", ".attn.alpha_i2t"), (r"\.t2i\.proj\.", ".crossattention_t2i.output.dense."),
             (r"\.t2i\.gate$", ".alpha_t2i"), (r"\.t2i\.", ".crossattention_t2i.self.")]
    for pattern, replacement in swaps:
        name = re.sub(pattern, replacement, name)
    return name


# Keys of released checkpoints that are deliberately not loaded, with the reason.
DROPPED = {
    r"^(image_queue|text_queue|image_input_queue|text_input_queue|text_input_mask_queue"
    r"|queue_ptr|queue_total)$": "ITC queue state of the training run",
    r"relative_position_index$": "derived from the window size; rebuilt",
    r"attn_mask$": "shifted-window mask, derived from the grid; rebuilt",
    r"position_ids$": "derived position ids; rebuilt",
    r"^text_transformer\.pooler\.": "RoBERTa's pooler, never used by FIBER",
    r"crossattention_t2i\.output\.LayerNorm\.": "exists in the original but is never applied",
    r"^rank_output\.": "a view of row 1 of itm_score.fc; folded into it on load",
}


def dropped_reason(key: str):
    for pattern, reason in DROPPED.items():
        if re.search(pattern, key):
            return reason
    return None


def convert_original(state_dict: dict, model: Fiber) -> dict:
    """Original FIBER names -> this model's names, applying the original's load-time quirks."""
    sd = dict(state_dict)
    if "rank_output.weight" in sd and "itm_score.fc.weight" in sd:
        # the original's rank_output shares storage with row 1 of itm_score.fc and is loaded
        # after it, so row 1 ends up holding rank_output's values
        w, b = sd["itm_score.fc.weight"].clone(), sd["itm_score.fc.bias"].clone()
        w[1:], b[1:] = sd["rank_output.weight"], sd["rank_output.bias"]
        sd["itm_score.fc.weight"], sd["itm_score.fc.bias"] = w, b
    unused_alpha = [k for k in sd if re.search(r"encoder\.layer\.(\d+)\.alpha_t2i$", k)
                    and model.backbone.text.encoder.layer[int(k.split(".")[3])].t2i is None]
    ours = {}
    for key, value in sd.items():
        if dropped_reason(key) or key in unused_alpha:  # gates of unfused layers are unused
            continue
        ours[original_to_ours(key)] = value
    return resize_position_tables(ours, model)


def resize_position_tables(sd: dict, model: nn.Module) -> dict:
    """Resize relative position bias tables saved for another window size (bicubic)."""
    own = model.state_dict()
    for key, value in sd.items():
        if key.endswith("relative_position_bias_table") and key in own:
            if value.shape != own[key].shape:
                window = (int(round(own[key].shape[0] ** 0.5)) + 1) // 2
                sd[key] = resize_bias_table(value.float(), window)
    return sd


class CheckpointMismatch(RuntimeError):
    pass


def load_strict(model: nn.Module, sd: dict, source: str):
    """load_state_dict(strict) with one error that names every problem key by group."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    misshaped = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in sd if k in own and sd[k].shape != own[k].shape)
    if missing or unexpected or misshaped:
        lines = [f"{source} does not match this model "
                 f"({len(missing)} missing, {len(unexpected)} unexpected, "
                 f"{len(misshaped)} mis-shaped keys)."]
        for title, keys in (("missing", missing), ("unexpected", unexpected),
                            ("mis-shaped", misshaped)):
            if keys:
                shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
                lines.append(f"  {title}: " + "\n    ".join([""] + shown))
        raise CheckpointMismatch("\n".join(lines))
    model.load_state_dict(sd, strict=True)
