"""Fault injection, data side: the bad images, captions and annotation files a pre-training run
meets, through the real dataset, collator, objective and training script.

test_data.py checks each reader on its own (load_image per file kind, the tokenizer, the
annotation parsers). These tests check what a *run* does with them: which samples are skipped,
what the warnings say, how skips are counted and reported, and when a run stops. Every bad
file is made here, in tmp_path.
"""
import io
import json
import logging
import os
import random
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import images
import train_coarse as tc
import training as T
from conftest import REPO
from data import AnnotationError, PretrainCollator, build_pretrain_dataset, load_tokenizer
from images import ImageLoadError, load_image
from heads import PretrainObjective
from model import Fiber, FiberConfig

S = 16  # output side of the eval transform in the in-process tests
# A short run of the tiny model: 32 px images, 4 samples per step, 16-token captions.
RUN = ["--image-size", "32", "--batch-size", "4", "--max-text-len", "16", "--queue-size", "8",
       "--log-every", "1", "--no-eval", "--save-every", "0", "--image-warmup-steps", "0"]


# One torch thread, as the subprocesses get (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_checkpoints_left(tmp_path):
    yield
    for path in tmp_path.rglob("*.pt"):  # 200 MB each: the disk is shared
        path.unlink()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


# ---------------------------------------------------------------------------------------------
# The image zoo: every odd or broken kind of file, made by hand


def png_header_only(path, width, height):
    """A PNG that declares width x height but holds almost no pixel data (a 'bomb' header)."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def noise(w, h, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), np.uint8))


def truncated(path, image, fmt):
    whole = io.BytesIO()
    image.save(whole, fmt)
    path.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])


def half_transparent(mode, opaque, clear):
    """16x8: the left half `clear` (fully transparent), the right half `opaque`."""
    im = Image.new(mode, (16, 8), opaque)
    im.paste(clear, (0, 0, 8, 8))
    return im


def palette_with_transparency():
    im = Image.new("P", (16, 8), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # 0: black (transparent), 1: red
    im.paste(0, (0, 0, 8, 8))
    return im


def exif_rotated():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))  # stored: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": red on top, blue below
    return im, {"exif": exif.tobytes(), "quality": 95}


WHITE, RED, BLUE, BLACK, CYAN = (255,) * 3, (255, 0, 0), (0, 0, 255), (0, 0, 0), (0, 255, 255)
LEFT, RIGHT, TOP, BOTTOM, MIDDLE = (0.15, 0.5), (0.85, 0.5), (0.5, 0.15), (0.5, 0.85), (0.5, 0.5)

# name -> (writer(path), what the eval-transformed tensor shows: {probe (x, y): RGB})
GOOD = {
    "grey.png": (lambda p: Image.new("L", (9, 7), 77).save(p), {MIDDLE: (77, 77, 77)}),
    "la.png": (lambda p: half_transparent("LA", (0, 255), (0, 0)).save(p),
               {LEFT: WHITE, RIGHT: BLACK}),
    "palette.png": (lambda p: palette_with_transparency().save(p, transparency=0),
                    {LEFT: WHITE, RIGHT: RED}),
    "cmyk.jpg": (lambda p: Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(p, quality=95),
                 {MIDDLE: CYAN}),
    "rgba.png": (lambda p: half_transparent("RGBA", (0, 0, 255, 255), (255, 0, 0, 0)).save(p),
                 {LEFT: WHITE, RIGHT: BLUE}),  # transparent red shows white, not red or black
    "deep.png": (lambda p: Image.fromarray(np.full((6, 6), 32768, np.uint16)).save(p),
                 {MIDDLE: (128, 128, 128)}),  # 16-bit scaled to 8, not clipped to white
    "one.png": (lambda p: Image.new("RGB", (1, 1), (1, 2, 3)).save(p), {MIDDLE: (1, 2, 3)}),
    "pano.png": (lambda p: Image.new("RGB", (20000, 20), (9, 9, 9)).save(p), {MIDDLE: (9, 9, 9)}),
    "phone.jpg": (lambda p: exif_rotated()[0].save(p, **exif_rotated()[1]),
                  {TOP: RED, BOTTOM: BLUE}),
    "anim.gif": (lambda p: Image.new("RGB", (8, 8), RED).save(
        p, save_all=True, append_images=[Image.new("RGB", (8, 8), BLUE)]), {MIDDLE: RED}),
}
# name -> (writer(path) or None for a missing file, words the skip warning must contain)
BAD = {
    "zero.jpg": (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    "cut.jpg": (lambda p: truncated(p, noise(64, 64), "JPEG"), "truncated"),
    "cut.png": (lambda p: truncated(p, noise(64, 64), "PNG"), "truncated"),
    "notes.jpg": (lambda p: p.write_text("these are not pixels\n"), "not an image"),
    "bomb.png": (lambda p: png_header_only(p, 10_000, 10_000), "decompression-bomb guard"),
    "missing.jpg": (None, "file not found"),
}


def make_zoo(folder):
    """Write every GOOD and BAD file into `folder`; return the image names, good then bad."""
    folder.mkdir(exist_ok=True)
    for name, (writer, _) in {**GOOD, **BAD}.items():
        if writer is not None:
            writer(folder / name)
    return [*GOOD, *BAD]


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines),
                    encoding="utf-8")
    return path


def pixel(image, probe):
    """RGB 0..255 of a (3,S,S) normalised tensor at a relative (x, y) position."""
    mean, std = torch.tensor(images.IMAGENET_MEAN), torch.tensor(images.IMAGENET_STD)
    x, y = (int(probe[0] * (S - 1)), int(probe[1] * (S - 1)))
    return (image[:, y, x] * std + mean) * 255


# ---------------------------------------------------------------------------------------------
# Images through the dataset, the loader and the collator


def test_every_odd_image_is_converted_or_skipped_by_name(tmp_path, tok, caplog, monkeypatch):
    names = make_zoo(tmp_path / "img")
    jsonl = write_jsonl(tmp_path / "zoo.jsonl",
                        [{"image": f"img/{n}", "caption": f"a picture called {n}"} for n in names])
    decoded = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(os.path.basename(self.filename or ""))
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    dataset = build_pretrain_dataset(jsonl, image_size=S, train=False)
    loader = T.make_loader(dataset, T.ResumableBatchSampler(len(names), len(names), shuffle=False),
                           collate_fn=PretrainCollator(tok, max_len=16))
    with caplog.at_level(logging.WARNING, logger="fiber.data"):
        (batch,) = list(loader)

    assert batch["num_samples"] == len(names) and batch["num_skipped"] == len(BAD)
    assert batch["index"].tolist() == list(range(len(GOOD)))  # every good one kept, in order
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == len(BAD) and all("\n" not in line for line in lines)
    for line, (name, (_, reason)) in zip(lines, BAD.items()):
        assert str(tmp_path / "img" / name) in line and reason in line, line
    assert "bomb.png" not in decoded  # refused from its header, never decoded
    for image, (name, (_, probes)) in zip(batch["images"], GOOD.items()):
        for probe, rgb in probes.items():
            # 12/255: JPEG blocks and bicubic ringing next to the colour edges
            assert (pixel(image, probe) - torch.tensor(rgb)).abs().max() <= 12, (name, probe)


@pytest.mark.filterwarnings("error")  # no Python warning may escape load_image
def test_mutated_image_files_either_load_or_are_refused(tmp_path, caplog):
    # Random byte damage and cuts in five formats: a days-long run must never meet an error
    # other than ImageLoadError (skipped) from the loader; 60 seeded mutants per format.
    # Pillow's warnings about damaged metadata become log lines naming the file.
    rng = random.Random(0)
    base = noise(24, 16)
    exif = Image.Exif()
    exif[0x0112] = 3
    counts = {"ok": 0, "refused": 0}
    for fmt, extra in [("JPEG", {"exif": exif.tobytes()}), ("PNG", {}), ("GIF", {}),
                       ("WEBP", {}), ("TIFF", {})]:
        clean = io.BytesIO()
        base.save(clean, fmt, **extra)
        for k in range(60):
            blob = bytearray(clean.getvalue())
            for _ in range(rng.randint(1, 6)):
                blob[rng.randrange(len(blob))] = rng.randrange(256)
            if rng.random() < 0.3:
                blob = blob[: rng.randrange(1, len(blob))]
            path = tmp_path / f"m{k}.{fmt.lower()}"
            path.write_bytes(bytes(blob))
            try:
                image = load_image(path)
            except ImageLoadError as err:
                assert str(path) in str(err)
                counts["refused"] += 1
            else:
                assert image.mode == "RGB" and min(image.size) >= 1
                counts["ok"] += 1
    assert counts["ok"] > 50 and counts["refused"] > 50  # both paths were exercised
    pillow_lines = [r.getMessage() for r in caplog.records if r.name == "fiber.data"]
    assert pillow_lines and all(line.startswith(str(tmp_path / "m")) for line in pillow_lines)


# ---------------------------------------------------------------------------------------------
# Stand-ins for bad samples (what DDP needs: every rank keeps its full micro-batch)


@pytest.fixture
def one_bad(tmp_path):
    """Eight pairs over real files; pair 5 points at an empty file."""
    for k in range(8):
        noise(12, 12, seed=k).save(tmp_path / f"g{k}.png")
    (tmp_path / "g5.png").write_bytes(b"")
    return write_jsonl(tmp_path / "pairs.jsonl",
                       [{"image": f"g{k}.png", "caption": f"noise number {k}"} for k in range(8)])


def test_stand_in_keeps_the_batch_full_and_is_counted(one_bad, tok, caplog):
    dataset = build_pretrain_dataset(one_bad, image_size=S, train=True, replace_bad=True, seed=4)
    collate = PretrainCollator(tok, max_len=16)
    with caplog.at_level(logging.WARNING, logger="fiber.data"):
        batch = collate([dataset[i] for i in range(8)])
    assert batch["images"].shape == (8, 3, S, S) and batch["num_skipped"] == 1
    stand_in = batch["index"][5].item()
    assert stand_in != 5 and batch["captions"][5] == f"noise number {stand_in}"
    (line,) = [r.getMessage() for r in caplog.records]
    assert "g5.png: empty file" in line and f"sample {stand_in} takes its place" in line
    # The stand-in is a function of (seed, epoch, index): a resumed run draws the same one,
    # and DataLoader workers agree with the main process.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[list(range(8))], num_workers=1,
                                         collate_fn=collate)
    assert torch.equal(next(iter(loader))["index"], batch["index"])
    assert build_pretrain_dataset(one_bad, image_size=S, replace_bad=True, seed=4)[5]["index"] \
        == stand_in


def test_image_gone_since_it_was_queued_is_replaced_not_fatal(one_bad, caplog):
    # The ITM queue re-reads images by index several steps after they were loaded; a file
    # deleted or unreachable by then must not end the run in the middle of a step.
    dataset = build_pretrain_dataset(one_bad, image_size=S, train=False)
    (one_bad.parent / "g3.png").unlink()
    with caplog.at_level(logging.WARNING, logger="fiber.data"):
        images = dataset.load_images([2, 3, 4])
    assert images.shape == (3, 3, S, S) and torch.isfinite(images).all()
    assert torch.equal(images[0], dataset.load_image_tensor(2))
    assert "g3.png: file not found" in caplog.text


# ---------------------------------------------------------------------------------------------
# Text


ODD_CAPTIONS = ["", "   \t ", "un chat 🐱 猫 кошка قطة", "tab\there\x00nul\x07bell\x1b[31m",
                "word " * 3000]


def test_odd_captions_make_well_formed_batches(tok):
    items = [{"image": torch.zeros(3, S, S), "caption": c, "index": i, "epoch": 0}
             for i, c in enumerate(ODD_CAPTIONS)]
    batch = PretrainCollator(tok, max_len=16, mlm_prob=0.5)(items)
    ids, mask, labels = batch["text_ids"], batch["text_mask"], batch["mlm_labels"]
    assert ids.shape == mask.shape == labels.shape == (5, 16)
    assert ((ids >= 0) & (ids < tok.vocab_size)).all()
    lengths = mask.sum(1)
    assert (ids[:, 0] == tok.bos_id).all()
    assert (ids[torch.arange(5), lengths - 1] == tok.eos_id).all()
    assert lengths.tolist()[0] == 2 and lengths.tolist()[-1] == 16  # empty; cut to max_len
    special = (ids == tok.bos_id) | (ids == tok.eos_id) | (mask == 0)
    assert (labels[special] == -100).all()  # <s>, </s> and padding are never MLM targets
    assert tok.decode(ids[2]) == ODD_CAPTIONS[2][: len(tok.decode(ids[2]))]


def test_batch_where_masking_picks_nothing_has_a_finite_loss(tok):
    torch.manual_seed(0)
    model = Fiber(FiberConfig.tiny(image_size=32, max_text_len=16))
    loss_module = PretrainObjective(model, queue_size=8).train()
    items = [{"image": torch.randn(3, 32, 32), "caption": c, "index": i, "epoch": 0}
             for i, c in enumerate(["a red circle", "", "two blue squares", "   "])]
    batch = PretrainCollator(tok, max_len=16, mlm_prob=0.0)(items)
    assert (batch["mlm_labels"] == -100).all()
    out = loss_module(batch, lambda idx: torch.randn(len(idx), 3, 32, 32))
    assert out["mlm_loss"].item() == 0.0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------
# Annotation files, as the training script reads them


def script_args(tmp_path, source, *flags):
    return tc.parse_args([*RUN, "--data", str(source), "--out", str(tmp_path / "out"), *flags])


def build_script_data(args, tok):
    return tc.build_data(args, T.DistEnv(), tok)


@pytest.mark.parametrize("content, message", [
    ('{"image": "a.png", "caption": "ok"}\n{"image": "a.png", "caption": "ok",}\n',
     r"bad\.jsonl: invalid JSON at line 2, column 36"),
    ('{"image": "a.png", "caption": "ok"}\n{"caption": "no image"}\n',
     r"bad\.jsonl: line 2: missing field 'image'"),
    ('{"image": "a.png", "caption": 42}\n', r"bad\.jsonl: line 1: field 'caption' must be str"),
    ('{"image": "../../etc/passwd", "caption": "x"}\n',
     r"bad\.jsonl: line 1: image path '../../etc/passwd' leaves the image root"),
    ('{"image": "/etc/passwd", "caption": "x"}\n',
     r"bad\.jsonl: line 1: absolute image path '/etc/passwd' refused"),
    ('{"image": "a.png", "caption": "  "}\n\n', r"bad\.jsonl: no image-caption pairs"),
    (b'\xff\xfe{\x00}\x00', r"bad\.jsonl: not UTF-8 text"),
])
def test_bad_annotation_files_are_refused_by_the_script(tmp_path, tok, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    args = script_args(tmp_path, path, "--image-root", str(tmp_path / "root"))
    with pytest.raises(AnnotationError, match=message):
        build_script_data(args, tok)


def test_annotation_files_from_other_tools_are_read(tmp_path, tok):
    # A byte-order mark (Windows editors) and unescaped U+2028 / U+0085 inside a caption
    # (web text; valid JSON) are neither errors nor line breaks.
    noise(8, 8).save(tmp_path / "a.png")
    captions = ["first\u2028line", "second\x85one", "third"]
    text = "".join(json.dumps({"image": "a.png", "caption": c}, ensure_ascii=False) + "\n"
                   for c in captions)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    coco = {"images": [{"id": 1, "file_name": "a.png"}],
            "annotations": [{"image_id": 1, "caption": c} for c in captions]}
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(coco).encode())
    for name in ("bom.jsonl", "bom.json"):
        args = script_args(tmp_path, tmp_path / name, "--batch-size", "3")
        dataset, _ = build_script_data(args, tok)
        assert dataset.captions == captions, name


def test_a_flag_allows_images_outside_the_root(tmp_path, tok):
    noise(8, 8).save(tmp_path / "a.png")
    (tmp_path / "root").mkdir()
    path = write_jsonl(tmp_path / "up.jsonl", [{"image": "../a.png", "caption": "x"}] * 4)
    args = script_args(tmp_path, path, "--image-root", str(tmp_path / "root"),
                       "--allow-outside-root")
    dataset, _ = build_script_data(args, tok)
    assert dataset[0]["image"].shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------
# Whole runs of train_coarse.py


def script_env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


TEXT_CASES = ["un chat 🐱 猫 кошка قطة", "tab\there\x00nul\x07bell\x1b[31m", "word " * 3000,
              "a <mask> and a </s> typed as text"]


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory):
    """One epoch of train_coarse.py over the image zoo plus odd captions: 20 pairs, 6 bad."""
    folder = tmp_path_factory.mktemp("zoo")
    names = make_zoo(folder / "img")
    lines = [{"image": f"img/{n}", "caption": f"a picture called {n}"} for n in names]
    lines += [{"image": "img/grey.png", "caption": c} for c in TEXT_CASES]
    lines += [{"image": "img/one.png", "caption": c} for c in ("", " \t ")]
    jsonl = write_jsonl(folder / "zoo.jsonl", lines)
    out = folder / "out"
    cmd = [sys.executable, str(REPO / "train_coarse.py"), *RUN, "--data", str(jsonl),
           "--steps", "5", "--max-skip-fraction", "0.5", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=script_env(), cwd=REPO,
                          timeout=300)
    for path in out.glob("*.pt"):  # 200 MB each, nobody reads them; the disk is shared
        path.unlink()
    return done, folder


@pytest.mark.slow
def test_run_over_bad_images_and_captions_skips_and_counts(zoo_run):
    done, folder = zoo_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data " + str(folder / "zoo.jsonl") + ": 20 samples" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if line.startswith("skipping sample")]
    assert len(warnings) == len(BAD)  # one line per bad file, each seen once in the epoch
    for name, (_, reason) in BAD.items():
        assert any(str(folder / "img" / name) in w and reason in w for w in warnings), name
    assert "skipped 2 empty caption(s)" in done.stderr
    assert "skipped: 6 unreadable samples, 0 non-finite steps" in done.stdout
    assert "non-finite" not in done.stdout.replace("0 non-finite steps", "")


@pytest.mark.slow
def test_run_reports_skips_at_the_end_of_each_epoch(zoo_run):
    done, _ = zoo_run
    assert "epoch 0: skipped 6 of 20 samples" in done.stdout


def test_too_many_bad_samples_stop_the_run_at_the_end_of_the_epoch(one_bad, capsys):
    for k in (1, 2, 6):  # 4 of the 8 pairs unreadable: 50%, above the allowed 25%
        (one_bad.parent / f"g{k}.png").write_bytes(b"GIF89a")
    out = one_bad.parent / "out"
    rc = tc.main([*RUN, "--data", str(one_bad), "--steps", "3", "--max-skip-fraction", "0.25",
                  "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "4 of 8 samples (50.0%) could not be read this epoch, above the allowed 25.0%" \
        in captured.err
    assert "step 3/3" not in captured.out  # stopped at the end of epoch 0 (2 steps)
