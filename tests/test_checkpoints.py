"""Checkpoint file machinery: safe unpickling, safetensors, atomic writes, integrity checks
(downloading is tests/test_releases.py)."""
import errno
import json
import os
import pickle
import struct

import pytest
import torch

import checkpoints as ck
from ckpt_fakes import (
    ExecPayload,
    ShellPayload,
    harmless_but_unlisted_class,
    lightning_classes,
)


def sample_state_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "vit_model.patch_embed.proj.weight": torch.randn(8, 3, 4, 4, generator=g),
        "text_transformer.embeddings.word_embeddings.weight": torch.randn(11, 8, generator=g),
        "itm_score.fc.bias": torch.randn(2, generator=g).to(torch.bfloat16),
        "vit_model.layers.0.blocks.0.attn.relative_position_index": torch.arange(9).view(3, 3),
        "queue_ptr": torch.zeros(1, dtype=torch.long),
    }


def assert_same_tensors(got, want):
    assert list(got) == list(want)
    for key in want:
        assert type(got[key]) is torch.Tensor, key
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert torch.equal(got[key], want[key]), key


def bits(t):
    """Raw bytes of a tensor, so NaNs and -0.0 compare exactly."""
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


# ---------------------------------------------------------------------------------------------
# Safe reading of torch.save files

@pytest.mark.parametrize("mmap", [True, False])
def test_plain_state_dict(tmp_path, mmap):
    sd = sample_state_dict()
    saved = dict(sd, **{"head.weight": torch.nn.Parameter(torch.ones(2, 2))})
    torch.save(saved, tmp_path / "plain.pt")
    got = ck.read_state_file(tmp_path / "plain.pt", mmap=mmap)
    assert (got.format, got.container, got.extra) == ("torch-zip", "plain", {})
    assert_same_tensors(got.tensors, {**sd, "head.weight": torch.ones(2, 2)})


def test_legacy_torch_format(tmp_path):
    sd = sample_state_dict()
    torch.save(sd, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    got = ck.read_state_file(tmp_path / "old.bin")
    assert (got.format, got.container) == ("torch-legacy", "plain")
    assert_same_tensors(got.tensors, sd)


@pytest.mark.parametrize("legacy", [False, True])
def test_checkpoint_saved_on_gpu_loads_on_cpu(tmp_path, monkeypatch, legacy):
    # Released checkpoints were saved from CUDA tensors: their storages are tagged "cuda:0".
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save({"state_dict": sample_state_dict()}, tmp_path / "gpu.ckpt",
               _use_new_zipfile_serialization=not legacy)
    monkeypatch.undo()
    got = ck.read_state_file(tmp_path / "gpu.ckpt")
    assert_same_tensors(got.tensors, sample_state_dict())
    assert all(t.device.type == "cpu" for t in got.tensors.values())


def test_lightning_ckpt_with_allow_listed_classes(tmp_path, monkeypatch):
    pl = lightning_classes(monkeypatch)
    config = pl.ReadOnlyDict(
        image_size=384, datasets=pl.ReadOnlyList(["coco", "vg"]),
        loss_names=pl.ReadOnlyDict(itm=1, mlm=1),
    )
    sd = sample_state_dict()
    torch.save({
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "1.3.2",
        "state_dict": sd,
        "hyper_parameters": pl.AttributeDict(config=config),
        "callbacks": {pl.ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}},
        "optimizer_states": [{"state": {0: {"step": 3}}, "param_groups": [{"lr": 1e-5}]}],
    }, tmp_path / "fiber.ckpt")

    got = ck.read_state_file(tmp_path / "fiber.ckpt")

    assert got.container == "lightning"
    assert_same_tensors(got.tensors, sd)
    assert got.extra["epoch"] == 3 and got.extra["global_step"] == 1200
    hparams = got.extra["hyper_parameters"]
    assert type(hparams) is dict and type(hparams["config"]) is dict
    assert hparams["config"] == {"image_size": 384, "datasets": ["coco", "vg"],
                                 "loss_names": {"itm": 1, "mlm": 1}}
    assert type(hparams["config"]["datasets"]) is list
    key = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert got.extra["callbacks"][key]["best_model_score"].item() == 0.5
    assert got.extra["optimizer_states"][0]["param_groups"][0]["lr"] == 1e-5


def test_lightning_ckpt_with_unlisted_class_is_refused(tmp_path, monkeypatch):
    pl = lightning_classes(monkeypatch)
    Config = harmless_but_unlisted_class(monkeypatch)
    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": sample_state_dict(),
                "hyper_parameters": pl.AttributeDict(config=Config(lr=1e-5))}, path)
    with pytest.raises(ck.UnsafeCheckpointError) as info:
        ck.read_state_file(path)
    assert info.value.global_names == ["some_trainer.config.Config"]
    assert "some_trainer.config.Config" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("payload, global_name", [
    (ShellPayload, "posix.system"),
    (ExecPayload, "builtins.exec"),
])
@pytest.mark.parametrize("legacy", [False, True])
def test_code_in_pickle_is_refused_and_never_runs(tmp_path, monkeypatch, payload, global_name,
                                                  legacy):
    # torch's switch that turns weights_only off where a caller did not ask for it explicitly
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "extra": payload(marker)}, path,
               _use_new_zipfile_serialization=not legacy)

    with pytest.raises(ck.UnsafeCheckpointError) as info:
        ck.read_state_file(path)

    assert not marker.exists()
    assert global_name in info.value.global_names
    assert global_name in str(info.value) and str(path) in str(info.value)
    # Control: the payload is live; an unrestricted unpickler does run it.
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(payload(control)))
    assert control.exists()


def test_fine_grained_pth_with_model_key(tmp_path):
    sd = {f"module.{k}": v for k, v in sample_state_dict().items()}
    ema = {k: v.clone() for k, v in sd.items()}
    torch.save({"model": sd, "model_ema": ema, "iteration": 10,
                "optimizer": {"state": {}, "param_groups": []},
                "scheduler": {"milestones": [5, 8], "warmup_method": "linear"}},
               tmp_path / "fiber_coco.pth")
    got = ck.read_state_file(tmp_path / "fiber_coco.pth")
    assert got.container == "model"
    assert_same_tensors(ck.strip_prefix(got.tensors, "module."), sample_state_dict())
    assert got.extra["iteration"] == 10
    assert set(got.extra) == {"model_ema", "iteration", "optimizer", "scheduler"}


def test_hf_roberta_layout_and_prefix_utilities(tmp_path):
    hf = {"roberta.embeddings.word_embeddings.weight": torch.randn(5, 4),
          "roberta.encoder.layer.0.attention.self.query.weight": torch.randn(4, 4),
          "lm_head.dense.weight": torch.randn(4, 4)}
    torch.save(hf, tmp_path / "pytorch_model.bin")
    got = ck.read_state_file(tmp_path / "pytorch_model.bin")
    assert got.container == "plain"

    bare = ck.strip_prefix(got.tensors, "roberta.")
    assert list(bare) == ["embeddings.word_embeddings.weight",
                          "encoder.layer.0.attention.self.query.weight", "lm_head.dense.weight"]
    assert list(ck.select_prefix(got.tensors, "roberta.")) == list(bare)[:2]
    assert ck.add_prefix(ck.select_prefix(got.tensors, "roberta."), "roberta.").keys() == {
        k for k in hf if k.startswith("roberta.")}
    with pytest.raises(KeyError, match="collide"):
        ck.strip_prefix({"module.a": 1, "a": 2}, "module.")


def test_non_tensor_values_among_weights_are_set_aside(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2), "version": 2}}, tmp_path / "m.ckpt")
    got = ck.read_state_file(tmp_path / "m.ckpt")
    assert list(got.tensors) == ["w"] and got.extra["non_tensor_entries"] == {"version": 2}


def _damage(kind, path):
    """Write a damaged checkpoint of the given kind to `path`."""
    if kind == "list":  # a valid file that holds no mapping of tensors
        torch.save([torch.ones(2)], path)
        return
    if kind.startswith("truncated"):
        torch.save(sample_state_dict(), path,
                   _use_new_zipfile_serialization=kind != "truncated_legacy")
        good = path.read_bytes()
        cut = {"truncated_head": 30, "truncated_half": len(good) // 2,
               "truncated_tail": len(good) - 60, "truncated_legacy": len(good) - 100}[kind]
        path.write_bytes(good[:cut])
        return
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1))
    path.write_bytes({
        "empty": b"",
        "random": bytes(noise.tolist()),
        "random_pickle_start": b"\x80\x02" + bytes(range(256)) * 4,
        "html": b"<html><body>403 Forbidden: public access is not permitted</body></html>",
    }[kind])


@pytest.mark.parametrize("kind", ["empty", "truncated_head", "truncated_half", "truncated_tail",
                                  "truncated_legacy", "random", "random_pickle_start", "html",
                                  "list"])
def test_damaged_files_give_clear_errors(tmp_path, kind):
    path = tmp_path / f"{kind}.ckpt"
    _damage(kind, path)
    with pytest.raises(ck.CheckpointError) as info:
        ck.read_state_file(path)
    assert str(path) in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.ckpt")):
        ck.read_state_file(tmp_path / "nope.ckpt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    with pytest.raises(IsADirectoryError) as info:
        ck.read_state_file(tmp_path / "hf")
    assert str(tmp_path / "hf") in str(info.value) and "model.safetensors" in str(info.value)


# ---------------------------------------------------------------------------------------------
# safetensors

def all_dtype_tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g) * 100
    out = {f"t_{name}": base.to(dtype) for name, dtype in ck.SAFETENSORS_DTYPES.items()
           if dtype.is_floating_point}
    for name in ("I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64"):
        out[f"t_{name}"] = torch.arange(-7, 8).view(3, 5).abs().to(ck.SAFETENSORS_DTYPES[name])
    out["t_BOOL"] = base > 0
    out["nan_and_neg_zero"] = torch.tensor([float("nan"), -0.0, float("inf")])
    return out


def test_safetensors_round_trip_is_bit_identical(tmp_path):
    big = torch.randn(6, 4)
    tensors = {
        **all_dtype_tensors(),
        "transposed": big.t(),  # non-contiguous
        "strided": big[::2, 1:3],
        "scalar": torch.tensor(3.5, dtype=torch.bfloat16),
        "empty": torch.empty(0, dtype=torch.float16),
        "empty_2d": torch.empty(2, 0, 3),
        "weird name/with.dots": torch.ones(1, dtype=torch.int8),
    }
    path = ck.write_safetensors(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    back = ck.read_safetensors(path)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert bits(back[name]) == bits(t), name
    assert ck.safetensors_metadata(path) == {"format": "pt"}
    got = ck.read_state_file(path)
    assert (got.format, got.container, got.extra) == ("safetensors", "plain",
                                                      {"metadata": {"format": "pt"}})


def test_safetensors_layout_matches_the_reference_writer(tmp_path):
    tensors = {"b": torch.ones(3, dtype=torch.uint8), "a": torch.ones(2),
               "c": torch.ones(1, dtype=torch.float64)}
    path = ck.write_safetensors(tensors, tmp_path / "x.safetensors")
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header_text = raw[8:8 + n]
    assert n % 8 == 0 and header_text.rstrip(b" ").endswith(b"}")  # padded with spaces
    header = json.loads(header_text)
    assert "__metadata__" not in header  # only written when given
    # largest element size first, so every tensor is aligned to its element size
    assert [header[k]["data_offsets"] for k in ("c", "a", "b")] == [[0, 8], [8, 16], [16, 19]]
    assert len(raw) == 8 + n + 19


def handmade_safetensors(path, entries, data, header_extra=None, pad=b""):
    """Write a safetensors file from a hand-written header (no use of the code under test)."""
    header = json.dumps({**(header_extra or {}), **entries}).encode() + pad
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_reads_hand_built_file_with_unaligned_tensor(tmp_path):
    u8 = bytes([1, 2, 3])
    f32 = struct.pack("<3f", 1.5, -2.0, 1e-3)
    bf16 = struct.pack("<2H", 0x3F80, 0xC000)  # 1.0, -2.0 in bfloat16
    i64 = struct.pack("<2q", -5, 2**40)
    entries = {
        "u8": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "f32": {"dtype": "F32", "shape": [3, 1], "data_offsets": [3, 15]},  # unaligned
        "bf16": {"dtype": "BF16", "shape": [2], "data_offsets": [15, 19]},
        "i64": {"dtype": "I64", "shape": [2], "data_offsets": [19, 35]},
        "flag": {"dtype": "BOOL", "shape": [], "data_offsets": [35, 36]},
    }
    path = handmade_safetensors(tmp_path / "hand.safetensors", entries,
                                u8 + f32 + bf16 + i64 + b"\x01",
                                header_extra={"__metadata__": {"source": "hand"}}, pad=b"   ")
    got = ck.read_safetensors(path)
    assert got["u8"].tolist() == [1, 2, 3]
    assert got["f32"].shape == (3, 1) and got["f32"].flatten().tolist() == list(
        struct.unpack("<3f", f32))
    assert got["bf16"].dtype == torch.bfloat16 and got["bf16"].tolist() == [1.0, -2.0]
    assert got["i64"].tolist() == [-5, 2**40]
    assert got["flag"].shape == () and got["flag"].item() is True
    assert ck.safetensors_metadata(path) == {"source": "hand"}


def _f32(offsets, shape=(2,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("entries, data, expected", [
    ({"a": _f32([0, 8]), "b": _f32([4, 12])}, bytes(12), "overlaps"),
    ({"a": _f32([0, 8]), "b": _f32([12, 20])}, bytes(20), "gap"),
    ({"a": _f32([0, 8])}, bytes(4), "impossible|cover|data_offsets"),
    ({"a": _f32([0, 12])}, bytes(12), "needs 8"),
    ({"a": _f32([0, 8])}, bytes(16), "appended"),
    ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8), "not supported"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "shape"),
    ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "exactly the fields"),
    ({"a": _f32([8, 0])}, bytes(8), "needs 8"),
])
def test_invalid_safetensors_are_rejected(tmp_path, entries, data, expected):
    path = handmade_safetensors(tmp_path / "bad.safetensors", entries, data)
    with pytest.raises(ck.CheckpointError, match=expected) as info:
        ck.read_safetensors(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("raw, expected", [
    (struct.pack("<Q", 10**12) + b"{}", "impossible"),
    (struct.pack("<Q", 4) + b"{no}", "not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    (struct.pack("<Q", 24) + b'{"__metadata__":{"a":1}}', "strings to strings"),
    (struct.pack("<Q", 21) + b'{"__metadata__":[1]} ', "strings to strings"),
    (b"\x05\x00", "too short"),
])
def test_broken_safetensors_headers(tmp_path, raw, expected):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(ck.CheckpointError, match=expected):
        ck.read_safetensors(path)


def test_duplicate_header_keys_are_rejected(tmp_path):
    header = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},' \
             b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00")
    with pytest.raises(ck.CheckpointError, match="duplicate"):
        ck.read_safetensors(path)


def test_write_safetensors_rejects_what_it_cannot_store(tmp_path):
    with pytest.raises(TypeError, match="complex64"):
        ck.write_safetensors({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.st")
    with pytest.raises(TypeError, match="metadata"):
        ck.write_safetensors({"a": torch.zeros(1)}, tmp_path / "z.st", metadata={"epoch": 3})
    assert not (tmp_path / "z.st").exists()


def test_byte_swap_helper_reverses_each_element():
    t = torch.tensor([1.0, -2.5], dtype=torch.float32)
    swapped = ck._swap_bytes(t)
    assert bits(swapped) == b"".join(struct.pack(">f", v) for v in (1.0, -2.5))
    assert torch.equal(ck._swap_bytes(swapped), t)


# ---------------------------------------------------------------------------------------------
# Atomic writes

def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_save_writes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "last.ckpt"
    ck.atomic_save({"w": torch.ones(2)}, path)
    ck.atomic_save({"w": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(3))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert leftovers(path.parent) == []


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    ck.atomic_save({"step": 1}, path)
    before = path.read_bytes()

    def full_disk_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(ck.CheckpointWriteError) as info:
        ck.atomic_save({"step": 2}, path)
    assert info.value.errno == errno.ENOSPC
    assert "previous file" in str(info.value) and str(path) in str(info.value)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_failed_fsync_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "data.bin"
    ck.atomic_write_bytes(b"old", path)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(ck.CheckpointWriteError, match="kept unchanged"):
        ck.atomic_write_bytes(b"new", path)
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_non_os_errors_keep_their_type_and_clean_up(tmp_path):
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)) as info:
        ck.atomic_save({"f": lambda: 0}, tmp_path / "new.ckpt")
    assert any("nothing was written" in note for note in info.value.__notes__)
    assert list(tmp_path.iterdir()) == []


def test_integrity_check_of_local_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(100)}, good)
    assert ck.integrity_problem(good) is None
    bad = tmp_path / "bad.pt"
    raw = bytearray(good.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    bad.write_bytes(bytes(raw))
    assert "CRC" in ck.integrity_problem(bad)
