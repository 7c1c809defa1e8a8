"""Images for the model: robust reading and the original's train and eval transforms.

`load_image` turns any file Pillow can read into an RGB picture (grey, palette, CMYK, 16-bit
and transparent images converted, EXIF rotation applied, animated images' first frame), or
raises ImageLoadError naming the file and the reason; images over Pillow's decompression-bomb
limit are refused from the header alone, never decoded. `ImageTransform` is the original's
pipeline: a resize of the shorter side (eval), or a random resized crop, horizontal flip and
RandAugment (train), then ImageNet normalisation.

Every random choice comes from a torch.Generator seeded from (seed, epoch, sample index,
stream) by `sample_generator`, never from global RNG state, so batches do not depend on the
number of DataLoader workers or on a resume.
"""
import logging
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

log = logging.getLogger("fiber.data")  # part of the data layer: one logger to filter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BadSample(Exception):
    """One sample cannot be used (broken image, ...). The loader skips it; training goes on."""


class ImageLoadError(BadSample):
    """An image file could not be turned into an RGB picture; says which file and why."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


# ----------------------------------------------------------------------------- images

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _to_rgb(im):
    """Any Pillow mode -> RGB. Transparency is composited onto white (plain .convert('RGB')
    would expose whatever colour hides under transparent pixels, often black)."""
    if im.mode in SIXTEEN_BIT_MODES:
        # Scale 0..65535 to 0..255; Pillow's own convert clips everything above 255 to white.
        # 32-bit "I" images are assumed to hold 16-bit data (what PNG and TIFF decoders give).
        grey = np.asarray(im).astype(np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path, *, max_pixels=None):
    """Read an image file as PIL RGB, or raise ImageLoadError naming the file and the reason.

    Grey, palette, CMYK and 16-bit images are converted; alpha goes onto white; the EXIF
    orientation is applied; animated files give their first frame. Images with more pixels
    than `max_pixels` (default: PIL.Image.MAX_IMAGE_PIXELS) are refused from the header alone.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(path, "file not found" if not path.exists() else "not a file")
    if path.stat().st_size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we refuse instead
            with Image.open(path) as im:
                w, h = im.size
                if limit and w * h > limit:
                    raise ImageLoadError(path, f"{w}x{h} = {w * h} pixels is over the limit of "
                                         f"{limit} (decompression-bomb guard); not decoded")
                im.load()
                return _to_rgb(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, f"over Pillow's decompression-bomb limit; not decoded ({e})")
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image Pillow can read (unknown or wrong format)")
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(path, f"corrupt or truncated image data ({e})")
    finally:
        for w in caught:  # Pillow's complaints about damaged metadata, told with the file name
            log.warning(f"{path}: {' '.join(str(w.message).split())}")


# ----------------------------------------------------------------------------- transforms

def sample_generator(seed, epoch, index, stream):
    """A torch.Generator for one sample: `stream` keeps augmentation and masking independent."""
    state = np.random.SeedSequence([seed, epoch, index, stream]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


AUGMENT_STREAM, MLM_STREAM, STAND_IN_STREAM = 0, 1, 2


def to_normalized_tensor(image):
    """PIL RGB (H,W) -> float32 tensor (3,H,W) in [0,1], then ImageNet mean/std."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std  # (3, H, W)


def swap_left_right(text):
    """Mirror the spatial words of a caption ('left' <-> 'right', also in 'leftmost')."""
    def swap(m):
        word = "right" if m.group(0).lower() == "left" else "left"
        return word.capitalize() if m.group(0)[0].isupper() else word
    return re.sub(r"\b(left|right)(?=most\b|\b)", swap, text, flags=re.IGNORECASE)


def _uniform(g, low, high):
    return low + (high - low) * torch.rand((), generator=g).item()


def _randint(g, high):
    return int(torch.randint(high, (), generator=g))


def random_resized_crop_box(width, height, scale, g, ratio=(3 / 4, 4 / 3)):
    """Pick a crop box (left, top, right, bottom) covering `scale` of the area, the
    RandomResizedCrop recipe: 10 tries at a random area and aspect, else a centre crop."""
    area = width * height
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = _randint(g, width - w + 1), _randint(g, height - h + 1)
            return left, top, left + w, top + h
    # Fallback: the largest centred crop whose aspect lies within `ratio`.
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


GREY = (128, 128, 128)  # fill for pixels that geometric ops move in from outside


def _affine(image, coeffs):
    return image.transform(image.size, Image.AFFINE, coeffs, Image.BILINEAR, fillcolor=GREY)


# RandAugment as in the original's ALBEF-style list: each op gets the level m = magnitude/10
# and a random sign s (+1/-1) for the geometric ones. Shear up to 0.3, rotation up to 30
# degrees, translation up to 10 pixels (absolute, as the original), enhance factor 1.8m + 0.1.
RANDAUG_OPS = {
    "Identity": lambda im, m, s: im,
    "AutoContrast": lambda im, m, s: ImageOps.autocontrast(im),
    "Equalize": lambda im, m, s: ImageOps.equalize(im),
    "Brightness": lambda im, m, s: ImageEnhance.Brightness(im).enhance(1.8 * m + 0.1),
    "Sharpness": lambda im, m, s: ImageEnhance.Sharpness(im).enhance(1.8 * m + 0.1),
    "ShearX": lambda im, m, s: _affine(im, (1, s * 0.3 * m, 0, 0, 1, 0)),
    "ShearY": lambda im, m, s: _affine(im, (1, 0, 0, s * 0.3 * m, 1, 0)),
    "TranslateX": lambda im, m, s: _affine(im, (1, 0, s * 10 * m, 0, 1, 0)),
    "TranslateY": lambda im, m, s: _affine(im, (1, 0, 0, 0, 1, s * 10 * m)),
    "Rotate": lambda im, m, s: im.rotate(s * 30 * m, Image.BILINEAR, fillcolor=GREY),
}


def rand_augment(image, g, num_ops=2, magnitude=7):
    """Draw `num_ops` ops (with replacement); each is applied with probability 1/2."""
    names = list(RANDAUG_OPS)
    for _ in range(num_ops):
        name = names[_randint(g, len(names))]
        apply, sign = _uniform(g, 0, 1) < 0.5, 1 if _uniform(g, 0, 1) < 0.5 else -1
        if apply:
            image = RANDAUG_OPS[name](image, magnitude / 10, sign)
    return image


@dataclass
class ImageTransform:
    """PIL RGB + caption -> (tensor (3,S,S), caption). Eval: squash-resize to S x S, bicubic,
    no crop. Train adds RandomResizedCrop, a flip that mirrors the caption, RandAugment."""
    size: int = 384  # output side S in pixels
    train: bool = False  # False: the deterministic eval transform, the rest is ignored
    crop_scale: tuple | None = (0.5, 1.0)  # area fraction of the random crop; None: no crop
    flip_prob: float = 0.5  # horizontal flip, which also swaps left/right in the caption
    randaug_ops: int = 2  # RandAugment ops per image; 0 disables it
    randaug_magnitude: int = 7  # RandAugment level out of 10

    def __call__(self, image, caption="", generator=None):
        if not self.train:
            image = image.resize((self.size, self.size), Image.BICUBIC)
            return to_normalized_tensor(image), caption
        if generator is None:
            raise ValueError("the train transform needs a torch.Generator (see sample_generator)")
        box = (0, 0, *image.size)
        if self.crop_scale is not None:
            box = random_resized_crop_box(*image.size, self.crop_scale, generator)
        image = image.crop(box).resize((self.size, self.size), Image.BICUBIC)
        if _uniform(generator, 0, 1) < self.flip_prob:
            image, caption = image.transpose(Image.FLIP_LEFT_RIGHT), swap_left_right(caption)
        if self.randaug_ops:
            image = rand_augment(image, generator, self.randaug_ops, self.randaug_magnitude)
        return to_normalized_tensor(image), caption
