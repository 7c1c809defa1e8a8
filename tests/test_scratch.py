"""Training from scratch (scratch.py): warm-up labels, learning, determinism, when it runs."""
import pytest
import torch

import train_coarse as tc
import train_fine as tf
from swin import SwinConfig, SwinTransformer
from scratch import LABELS, scene_labels, warm_up_image_backbone
from synthetic import SyntheticWorld

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scene_labels_name_what_the_caption_names():
    scene = SyntheticWorld(seed=0).scene(0)
    caption = "a small purple square and a large orange circle on a gray background"
    assert scene.captions[0] == caption  # the hand-checked scene
    on = {name for name, v in zip(LABELS, scene_labels(scene).tolist()) if v == 1.0}
    assert on == {"small", "purple", "square", "large", "orange", "circle", "bg gray",
                  "2 objects"}


def tiny_swin(seed):
    torch.manual_seed(seed)
    return SwinTransformer(SwinConfig(image_size=32, embed_dim=16, depths=(1, 1, 1, 1),
                                      num_heads=(1, 1, 2, 2), window_size=2))


def test_warm_up_learns_and_every_rank_gets_the_same_weights():
    a, b = tiny_swin(0), tiny_swin(0)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    logs = []
    first = warm_up_image_backbone(a, steps=60, image_size=32, batch_size=8, seed=5,
                                   log=logs.append)
    warm_up_image_backbone(b, steps=60, image_size=32, batch_size=8, seed=5, log=logs.append)
    # From random weights the multi-label loss starts near ln 2 and must fall.
    assert first["first_loss"] > 0.6 and first["last_loss"] < first["first_loss"] - 0.15, first
    assert "60 steps of scene-label classification" in logs[0]
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k  # same seed, same weights (DDP ranks)
    assert not torch.equal(a.patch_embed.proj.weight, before["patch_embed.proj.weight"])


SMALL = ["--batch-size", "2", "--max-text-len", "24", "--image-size", "32", "--log-every", "1",
         "--no-eval", "--image-warmup-steps", "3", "--steps", "2", "--save-every", "1"]


def test_train_coarse_warms_up_from_scratch_only(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert tc.main([*SMALL, "--out", out]) == 0
    assert "image backbone warm-up: 3 steps" in capsys.readouterr().out

    # on resume the weights come from the checkpoint: no second warm-up
    assert tc.main([*SMALL, "--out", out, "--resume", f"{out}/step_0000001.pt"]) == 0
    assert "warm-up" not in capsys.readouterr().out

    assert tc.main([*SMALL, "--out", str(tmp_path / "b"), "--init", f"{out}/last.pt"]) == 0
    assert "image warm-up skipped: the weights come from --init" in capsys.readouterr().out


def test_train_fine_warms_up_its_swin_and_restarts_the_ema_from_it(tmp_path, capsys):
    out = tmp_path / "fine"
    flags = ["--batch-size", "2", "--train-sizes", "64", "--min-size", "64", "--max-size", "64",
             "--synthetic-scenes", "16", "--no-eval", "--steps", "1", "--ema", "0.5",
             "--image-warmup-steps", "3", "--out", str(out)]
    assert tf.main(flags) == 0
    assert "image backbone warm-up: 3 steps" in capsys.readouterr().out
    state = torch.load(out / "last.pt", weights_only=True)
    # After one step with decay 0.5 the average lies halfway between the warmed-up weights and
    # the trained ones, so within one small step of the latter. Had the average kept the
    # weights from before the warm-up (normal(0, 0.02), re-drawn at fan-in scale, 0.18 here),
    # it would differ from them by about half of that.
    key = "backbone.swin.layers.0.blocks.0.attn.qkv.weight"
    trained, averaged = state["model"][key], state["ema"][key]
    assert trained.std() > 0.1 and (averaged - trained).abs().max() < 0.02
