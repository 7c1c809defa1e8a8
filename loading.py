"""Which checkpoint a file holds, and how its keys map onto this project's modules.

Four kinds of file reach the coarse model:

| kind           | looks like                               | becomes                          |
|----------------|------------------------------------------|----------------------------------|
| `fiber`        | `vit_model.*`, `text_transformer.*`, ... | the whole model (original names) |
| `fiber-export` | `backbone.swin.*`, `backbone.text.*`     | the whole model (this project's) |
| `swin`         | `patch_embed.*`, `layers.0.blocks.0.*`   | the image backbone (new run)     |
| `roberta`      | `[roberta.]embeddings.*`, `encoder.*`    | the text backbone (new run)      |

Every key of a file is loaded, or deliberately dropped for a reason listed in `DROPPED`, or
reported in one error that groups missing, unexpected and mis-shaped keys. Nothing here reads
files: checkpoints.py does that safely.
"""
import re

import torch
import torch.nn as nn

from swin import resize_bias_table


class CheckpointMismatch(RuntimeError):
    """A checkpoint's keys do not fit the model; the message names every problem key."""


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
_REVERSE = [
    (r"^backbone\.swin\.", "vit_model."),
    (r"^backbone\.text\.", "text_transformer."),
    (r"\.i2t\.norm\.", ".attn.norm_i2t_i."),
    (r"\.i2t\.query\.", ".attn.qkv_i2t."),
    (r"\.i2t\.key_value\.", ".attn.qkv_text_i2t."),
    (r"\.i2t\.proj\.", ".attn.proj_i2t."),
    (r"\.i2t\.gate$", ".attn.alpha_i2t"),
    (r"\.t2i\.proj\.", ".crossattention_t2i.output.dense."),
    (r"\.t2i\.gate$", ".alpha_t2i"),
    (r"\.t2i\.", ".crossattention_t2i.self."),
]


def original_to_ours(name: str) -> str:
    for pattern, replacement in _RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def ours_to_original(name: str) -> str:
    for pattern, replacement in _REVERSE:
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


def detect_kind(keys) -> str:
    keys = list(keys)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("module.") or has("fusion_backbone.") or has("rpn."):
        return "fiber-fine"
    if has("vit_model.") or has("text_transformer."):
        return "fiber"
    if has("backbone.swin.") or has("backbone.text."):
        return "fiber-export"
    if has("patch_embed.") and has("layers.0.blocks.0."):
        return "swin"
    if has("roberta.embeddings.") or has("embeddings.word_embeddings."):
        return "roberta"
    return "unknown"


def heads_in(keys) -> tuple:
    """The task heads a coarse checkpoint carries, in this project's head names."""
    keys = set(keys)
    found = []
    for head, marker in (("itc", "temp"), ("itm", "itm_score.fc.weight"),
                         ("mlm", "mlm_score.decoder.weight"),
                         ("vqa", "vqa_classifier.0.weight"),
                         ("nlvr2", "nlvr2_classifier.0.weight"),
                         ("caption", "cross_modal_att_layers.0.weight")):
        if marker in keys:
            found.append(head)
    if "caption" in found and "mlm" in found:
        found.remove("mlm")  # captioning brings the vocabulary head along
    return tuple(found)


def image_size_in(sd: dict, prefix: str = "vit_model.") -> int:
    """The resolution a coarse checkpoint was trained at: window = image_size / 32, and the
    first block's bias table holds (2 * window - 1)^2 offsets."""
    table = sd[f"{prefix}layers.0.blocks.0.attn.relative_position_bias_table"]
    window = (int(round(table.shape[0] ** 0.5)) + 1) // 2
    return 32 * window


def convert_original(state_dict: dict, model: nn.Module) -> dict:
    """Original FIBER names -> this model's names, applying the original's load-time quirks."""
    sd = dict(state_dict)
    if "rank_output.weight" in sd and "itm_score.fc.weight" in sd:
        # the original's rank_output shares storage with row 1 of itm_score.fc and is loaded
        # after it, so row 1 ends up holding rank_output's values
        w, b = sd["itm_score.fc.weight"].clone(), sd["itm_score.fc.bias"].clone()
        w[1:], b[1:] = sd["rank_output.weight"], sd["rank_output.bias"]
        sd["itm_score.fc.weight"], sd["itm_score.fc.bias"] = w, b
    own = model.state_dict()
    ours = {}
    for key, value in sd.items():
        if dropped_reason(key):
            continue
        name = original_to_ours(key)
        if name.endswith(".t2i.gate") and name not in own:
            continue  # the original has a gate in every text layer; unfused ones never use it
        ours[name] = value
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


def swin_release_to_ours(sd: dict) -> tuple:
    """The official Swin release (ImageNet) -> backbone.swin.*; its classifier is dropped."""
    ours, dropped = {}, []
    for key, value in sd.items():
        if key.startswith("head.") or dropped_reason(key):
            dropped.append(key)
            continue
        ours["backbone.swin." + key] = value
    return ours, dropped


def roberta_release_to_ours(sd: dict) -> tuple:
    """Hugging Face roberta-base (with or without the `roberta.` prefix) -> backbone.text.*.

    Dropped: the pooler and the masked-LM head (FIBER trains its own MLM head from scratch).
    """
    ours, dropped = {}, []
    for key, value in sd.items():
        bare = key[len("roberta."):] if key.startswith("roberta.") else key
        if bare.startswith(("pooler.", "lm_head.")) or dropped_reason(bare):
            dropped.append(key)
            continue
        ours["backbone.text." + bare] = value
    return ours, dropped


def mismatch_report(model: nn.Module, sd: dict, source: str, kind: str,
                    allow_missing=lambda k: False):
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd and not allow_missing(k))
    unexpected = sorted(k for k in sd if k not in own)
    misshaped = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in sd if k in own and sd[k].shape != own[k].shape)
    if not (missing or unexpected or misshaped):
        return None
    lines = [f"{source} ({kind} checkpoint) does not match this model: "
             f"{len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(misshaped)} mis-shaped keys."]
    for title, keys in (("missing", missing), ("unexpected", unexpected),
                        ("mis-shaped", misshaped)):
        if keys:
            shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
            lines.append(f"  {title}:" + "".join(f"\n    {k}" for k in shown))
    return "\n".join(lines)


def load_strict(model: nn.Module, sd: dict, source: str, kind: str = "fiber",
                assign: bool = False):
    """load_state_dict(strict) with one error that names every problem key by group.

    assign=True adopts the file's tensors instead of copying into existing ones (for a model
    built on the meta device); floating tensors are converted to float32 first.
    """
    problem = mismatch_report(model, sd, source, kind)
    if problem:
        raise CheckpointMismatch(problem)
    if assign:
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=assign)


def load_partial(model: nn.Module, sd: dict, source: str, kind: str, prefix: str):
    """Load a backbone's keys: every file key must land; only keys under `prefix` may be
    missing beyond the fusion modules (which a unimodal checkpoint cannot have)."""
    def allowed(k):
        return not k.startswith(prefix) or ".i2t." in k or ".t2i." in k

    problem = mismatch_report(model, sd, source, kind, allow_missing=allowed)
    if problem:
        raise CheckpointMismatch(problem)
    missing = [k for k in model.state_dict() if k.startswith(prefix) and k not in sd]
    model.load_state_dict(sd, strict=False)
    return missing


@torch.no_grad()
def describe(sd: dict) -> str:
    """One line about a state dict, for error messages: its kind and a few keys."""
    keys = list(sd)
    return f"{detect_kind(keys)} checkpoint with {len(keys)} tensors (e.g. {keys[:3]})"
