"""Every released coarse checkpoint kind loads strictly, from every container format.

Fake files are built from the key lists of the original checkpoints (`keys_*.json`): their
names, shapes and dtypes are the real ones. Key accounting is checked on a model built on the
meta device (shapes only, no memory); one test loads real recipe values end to end and
compares with the golden outputs of the original code.
"""
import json
import subprocess
import sys

import pytest
import torch

import checkpoints
from conftest import FIXTURES, REPO, load_golden, need_shared
from loading import CheckpointMismatch, detect_kind, heads_in, image_size_in
from model import Fiber, FiberConfig, config_for_original

pytestmark = pytest.mark.filterwarnings("ignore:.*meta parameter")

KINDS = {  # fixture key list -> (image size it was trained at, heads its file carries)
    "pretrain384": (384, ("itc", "itm", "mlm")),
    "vqa576": (576, ("vqa",)),
    "nlvr2_384": (384, ("nlvr2",)),
    "caption576": (576, ("caption",)),
}


def fake_original(name, fill=0.0):
    """The original checkpoint's tensors with the real names/shapes/dtypes; values constant.

    Expanded views keep the 7 GB raw-image queue of pre-training files at a few bytes."""
    need_shared()
    entries = json.load(open(FIXTURES / f"keys_{name}.json"))
    sd = {}
    for key, shape, dtype in entries:
        scalar = torch.tensor(fill if "float" in dtype else 0, dtype=getattr(torch, dtype))
        sd[key] = scalar.expand(shape) if shape else scalar.clone()
    return sd


def lightning_file(tmp_path, sd, name="fake.ckpt"):
    path = tmp_path / name
    hparams = {"config": {"image_size": 384, "max_text_len": 40, "exp_name": "fake"}}
    torch.save({"state_dict": sd, "hyper_parameters": hparams, "epoch": 3,
                "pytorch-lightning_version": "1.3.2"}, path)
    return path


def meta_model(config):
    with torch.device("meta"):
        return Fiber(config)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_released_kind_is_accounted_for(tmp_path, name):
    size, heads = KINDS[name]
    path = lightning_file(tmp_path, fake_original(name))
    state = checkpoints.read_state_file(path)
    assert state.container == "lightning"
    assert detect_kind(state.tensors) == "fiber"
    assert heads_in(state.tensors) == heads
    assert image_size_in(state.tensors) == size
    config = config_for_original(state.tensors, state.extra)
    model = meta_model(config)
    # strict: raises CheckpointMismatch naming keys if anything is left over or missing
    model.load_original_state_dict(state.tensors, source=str(path))


@pytest.mark.parametrize("container", ["pth", "bin", "safetensors"])
def test_other_containers(tmp_path, container):
    sd = fake_original("nlvr2_384")
    if container == "pth":
        path = tmp_path / "model.pth"
        torch.save({"model": sd, "iteration": 10}, path)
    elif container == "bin":
        path = tmp_path / "pytorch_model.bin"
        torch.save(sd, path)
    else:
        path = tmp_path / "model.safetensors"
        checkpoints.write_safetensors({k: v.contiguous() for k, v in sd.items()
                                       if "queue" not in k}, path)
    state = checkpoints.read_state_file(path)
    model = meta_model(config_for_original(state.tensors, state.extra))
    model.load_original_state_dict(state.tensors, source=str(path))


def test_load_at_another_resolution_resizes_tables(tmp_path):
    state = checkpoints.read_state_file(lightning_file(tmp_path, fake_original("pretrain384")))
    config = config_for_original(state.tensors, state.extra, image_size=576)
    model = meta_model(config)
    model.load_original_state_dict(state.tensors)
    assert config.image_size == 576 and config.swin.window_size == 18


def test_wrong_shape_and_other_model_give_named_errors(tmp_path):
    sd = fake_original("pretrain384")
    sd["itm_score.fc.weight"] = torch.zeros(3, 1536)
    model = meta_model(config_for_original(sd, {}))
    with pytest.raises(CheckpointMismatch, match=r"(?s)bad\.ckpt .*itm_score\.fc\.weight: file"):
        model.load_original_state_dict(sd, source="bad.ckpt")

    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="resnet.pth is not a coarse FIBER checkpoint"):
        Fiber.from_pretrained(other)


def test_truncated_empty_and_code_running_files_are_refused(tmp_path):
    good = lightning_file(tmp_path, {"temp": torch.tensor(0.07)})
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:200])
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    for path in (truncated, empty):
        with pytest.raises(Exception, match=path.name):
            Fiber.from_pretrained(path)

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"temp": torch.tensor(0.07)}, "hyper_parameters": Exploit()},
               evil)
    with pytest.raises(checkpoints.UnsafeCheckpointError, match="exec"):
        Fiber.from_pretrained(evil)
    assert not marker.exists(), "unpickling ran code from the file"


def test_export_loads_back_bit_identically(tmp_path):
    model = Fiber(FiberConfig.tiny(heads=("itc", "itm", "mlm", "vqa")))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = tmp_path / "tiny.pt"
    from loading import ours_to_original
    torch.save({"state_dict": {ours_to_original(k): v for k, v in original.items()}}, ckpt)
    out = tmp_path / "tiny.safetensors"
    model.export(out)
    back = Fiber.from_pretrained(out)
    assert back.config == model.config
    for key, value in back.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_export_command_line(tmp_path):
    model = Fiber(FiberConfig.tiny())
    src = tmp_path / "tiny.safetensors"
    model.export(src)
    out = tmp_path / "again.safetensors"
    run = subprocess.run([sys.executable, str(REPO / "model.py"), "export", str(src), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and out.exists()
    again = Fiber.from_pretrained(out)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def unimodal_releases(model):
    """A Swin release (classifier head included) and HF roberta-base files from a model."""
    sd = model.state_dict()
    swin = {k[len("backbone.swin."):]: v.clone() for k, v in sd.items()
            if k.startswith("backbone.swin.") and ".i2t." not in k}
    swin["head.weight"] = torch.zeros(10, swin["norm.weight"].shape[0])
    swin["head.bias"] = torch.zeros(10)
    swin["layers.0.blocks.1.attn_mask"] = torch.zeros(1)
    text = {"roberta." + k[len("backbone.text."):]: v.clone() for k, v in sd.items()
            if k.startswith("backbone.text.") and ".t2i." not in k}
    text["roberta.pooler.dense.weight"] = torch.zeros(1)
    text["lm_head.bias"] = torch.zeros(1)
    text["roberta.embeddings.position_ids"] = torch.arange(5)[None]
    return swin, text


@pytest.mark.parametrize("layout", ["bin", "safetensors", "bare"])
def test_backbone_initialisation_from_swin_and_roberta(tmp_path, layout):
    source = Fiber(FiberConfig.tiny())
    swin, text = unimodal_releases(source)
    if layout == "bare":
        text = {k[len("roberta."):] if k.startswith("roberta.") else k: v for k, v in text.items()}
    swin_path = tmp_path / "swin.pth"
    torch.save({"model": swin}, swin_path)
    text_path = tmp_path / ("model.safetensors" if layout == "safetensors" else "model.bin")
    if layout == "safetensors":
        checkpoints.write_safetensors({k: v.contiguous() for k, v in text.items()}, text_path)
    else:
        torch.save(text, text_path)

    target = Fiber(FiberConfig.tiny())
    swin_state = checkpoints.read_state_file(swin_path).tensors
    text_state = checkpoints.read_state_file(text_path).tensors
    assert detect_kind(swin_state) == "swin" and detect_kind(text_state) == "roberta"
    left = target.load_backbones(swin_state, text_state)
    assert left and all(".i2t." in k or ".t2i." in k for k in left)
    for name, value in target.state_dict().items():
        if name.startswith("backbone.") and ".i2t." not in name and ".t2i." not in name:
            assert torch.equal(value, source.state_dict()[name]), name


@pytest.mark.slow
@torch.no_grad()
def test_released_pretrain_file_reproduces_golden(tmp_path):
    """End to end: a Lightning .ckpt with the recipe weights, loaded by name-agnostic
    from_pretrained, gives the original code's ITM logits (tolerance as in the parity tests)."""
    from make_weights import recipe_state_dict
    golden = load_golden("pretrain384")
    sd = fake_original("pretrain384")
    sd.update(recipe_state_dict(str(FIXTURES / "keys_pretrain384.json")))
    model = Fiber.from_pretrained(lightning_file(tmp_path, sd)).eval()
    inp = golden["inputs"]
    logits = model.itm_score(model(inp["image"], inp["text_ids"], inp["text_masks"])["cls_feats"])
    assert (logits - golden["outputs"]["itm_logits"]).abs().max() < 1e-4
