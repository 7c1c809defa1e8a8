"""The coarse-grained FIBER model: the fused backbone plus its task heads.

    images ─ Swin (lower) ──┐                              ┌─ image_feats (B, Li, 768)
                            ├─ fused top ─ linear maps ─┤   pooled, joined: cls_feats (B, 1536)
    text   ─ RoBERTa (lower)┘   (fusion.py)                 └─ text_feats  (B, Lt, 768)

ITC uses the two backbones *without* fusion (image-only and text-only paths, their own linear
maps and poolers); ITM, MLM, VQA, NLVR2 and captioning read the fused features.

Parameter names follow the released checkpoints where they can (`cross_modal_*`,
`itm_score`, `mlm_score`, `vqa_classifier`, ...); loading.py maps the rest (`vit_model.` ->
`backbone.swin.`, the cross-attention modules). `python model.py export IN OUT.safetensors`
converts any checkpoint into a pickle-free file under this project's names.
"""
import argparse
import json
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fusion import FusedBackbone, FusionConfig, ImageState, TextState
from heads import ITMHead, MLMHead, Pooler, classifier
from roberta import RobertaConfig, causal_additive_mask
from loading import (convert_original, detect_kind, heads_in, image_size_in, load_partial,
                     load_strict, ours_to_original, resize_position_tables,
                     roberta_release_to_ours, swin_release_to_ours)
from swin import SwinConfig

HEADS = ("itc", "itm", "mlm", "vqa", "nlvr2", "caption")

# The original's optimiser rules match substrings of its parameter names (fiber_utils.py).
NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight",
            "norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight")
HEAD_NAMES = ("vqa_classifier", "nlvr2_classifier", "mlm_score", "itm_score")
CROSS_NAMES = ("cross_modal", "i2t", "t2i")


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
        """Text-only path: normalised contrastive feature (B, D) from <s>, token features."""
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

        Dropped on purpose (loading.DROPPED): the ITC queues, buffers derived from geometry
        and parameters the original never uses. Relative position bias tables of another
        window size are resized as the original's fine-tuning does (bicubic). Raises
        CheckpointMismatch naming every missing, unexpected and mis-shaped key.
        """
        load_strict(self, convert_original(state_dict, self), source, kind="fiber")
        return self

    def load_backbones(self, swin_state=None, roberta_state=None, source="backbones"):
        """Initialise new pre-training from the unimodal releases: the official Swin
        checkpoint and roberta-base (either Hugging Face layout). Returns the keys of the
        model left at their initial values (the fusion modules)."""
        missing = []
        if swin_state is not None:
            sd, _ = swin_release_to_ours(swin_state)
            sd = resize_position_tables(sd, self)
            missing += load_partial(self, sd, source, "swin", "backbone.swin.")
        if roberta_state is not None:
            sd, _ = roberta_release_to_ours(roberta_state)
            missing += load_partial(self, sd, source, "roberta", "backbone.text.")
        return missing

    def parameter_groups(self, lr, weight_decay=0.01, lr_mult_head=5.0, lr_mult_cross=5.0):
        """AdamW groups with the original's rules, applied to the original parameter names:
        no decay for biases and norms, heads at lr x lr_mult_head, cross-modal parts (fusion
        modules, cross_modal_* maps) at lr x lr_mult_cross."""
        groups = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            original = ours_to_original(name)
            decay = not any(k in original for k in NO_DECAY)
            head = any(k in original for k in HEAD_NAMES)
            cross = any(k in original for k in CROSS_NAMES)
            mult = lr_mult_head if head else lr_mult_cross if cross else 1.0
            group = groups.setdefault((decay, mult), dict(
                params=[], names=[], lr=lr * mult, lr_mult=mult,
                weight_decay=weight_decay if decay else 0.0))
            group["params"].append(p)
            group["names"].append(name)
        return list(groups.values())

    @classmethod
    def from_pretrained(cls, name_or_path, image_size=None, heads=None, **download_options):
        """A released FIBER checkpoint by name (downloaded once into the cache) or a path.

        Accepts the original `.ckpt` files, this project's exports and plain state_dicts.
        The heads present in the file decide which heads are built (or pass `heads`).
        `image_size` other than the file's resizes the position bias tables (e.g. 384 -> 576).
        """
        import releases
        state = releases.load_weights(name_or_path, **download_options)
        return cls.from_state_file(state, image_size=image_size, heads=heads)

    @classmethod
    def from_state_file(cls, state, image_size=None, heads=None):
        sd, source = state.tensors, str(state.path)
        kind = detect_kind(sd)
        if kind == "fiber-export":
            meta = json.loads(state.extra.get("metadata", {}).get("fiber_config", "null"))
            if meta is None:
                raise ValueError(f"{source}: a fiber export without its fiber_config metadata")
            return cls.built_from(FiberConfig(**meta), sd, source, kind)
        if kind != "fiber":
            hint = {"fiber-fine": "it is a fine-grained (detection) checkpoint",
                    "swin": "it holds only a Swin backbone: use Fiber.load_backbones",
                    "roberta": "it holds only RoBERTa: use Fiber.load_backbones"}
            raise ValueError(f"{source} is not a coarse FIBER checkpoint: "
                             f"{hint.get(kind, 'unrecognised key names')}")
        config = config_for_original(sd, state.extra, image_size, heads)
        return cls.built_from(config, sd, source, kind)

    @classmethod
    def built_from(cls, config, sd, source, kind):
        """Build on the meta device (no time spent on a random init) and adopt the weights."""
        with torch.device("meta"):
            model = cls(config)
        if kind == "fiber":
            sd = convert_original(sd, model)
        load_strict(model, sd, source, kind, assign=True)
        model.backbone.swin.rebuild_buffers()
        return model

    def export(self, path):
        """Write the weights under this project's names to a pickle-free safetensors file."""
        import checkpoints
        meta = {"fiber_config": json.dumps(self.config.to_dict()), "format": "fiber-export"}
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        return checkpoints.write_safetensors(tensors, path, metadata=meta)


def config_for_original(sd, extra, image_size=None, heads=None) -> FiberConfig:
    """The FiberConfig an original checkpoint needs, from its shapes and hyper-parameters."""
    saved = (extra.get("hyper_parameters") or {}).get("config") or {}
    trained_at = image_size_in(sd)
    heads = tuple(heads) if heads else heads_in(sd)
    max_len = saved.get("max_text_len", 40 if "mlm" in heads or "itc" in heads else 50)
    overrides = dict(heads=heads, max_text_len=int(max_len))
    if "vqa_classifier.3.weight" in sd:
        overrides["vqa_answers"] = sd["vqa_classifier.3.weight"].shape[0]
    return FiberConfig.base(image_size or trained_at, **overrides)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Model utilities. `export` converts a checkpoint (a release name, an "
                    "original .ckpt, or a fiber checkpoint) into a pickle-free safetensors "
                    "file under this project's parameter names, which loads back bit-exactly "
                    "with Fiber.from_pretrained.")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a checkpoint's weights as .safetensors")
    export.add_argument("source", help="release name (e.g. fiber_pretrain) or checkpoint path")
    export.add_argument("out", help="output path, e.g. fiber_pretrain.safetensors")
    export.add_argument("--image-size", type=int, default=None,
                        help="resolution to export at (bias tables resized); default: the file's")
    args = parser.parse_args(argv)

    model = Fiber.from_pretrained(args.source, image_size=args.image_size)
    path = model.export(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {path} ({n / 1e6:.1f}M parameters, heads {', '.join(model.config.heads)})")


if __name__ == "__main__":
    sys.exit(main())
