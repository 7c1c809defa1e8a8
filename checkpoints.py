"""Checkpoint files: read them safely, write them atomically, download them once.

Four concerns, each a section below:

- `read_state_file(path)` loads a PyTorch or safetensors file without ever running code from it.
  Pickled files go through torch's `weights_only` unpickler, which builds only tensors, plain
  containers and primitives; a short named allow-list adds the harmless dict/list subclasses
  that Lightning and sacred leave in `.ckpt` files (they come back as plain dicts and lists).
  Anything else is refused with an error naming the global and the file.
- `read_safetensors` / `write_safetensors`: the safetensors format by hand (8-byte header
  length, JSON header, raw little-endian bytes), validated as strictly as the reference reader.
- `atomic_save` / `atomic_write_bytes`: a crash or a full disk never leaves a half-written
  checkpoint in place of a good one.
- `RELEASES`, `download`, `resolve`: the published FIBER files, fetched into a cache
  (`$FIBER_CACHE`, default ~/.cache/fiber) with resume, size/sha256/CRC checks and an error
  that says where to put the file by hand.

Mapping checkpoint keys onto model parameters is not done here (see model.py); this file only
offers the key utilities `strip_prefix`, `add_prefix` and `select_prefix`.
"""
import functools
import hashlib
import http.client
import io
import json
import logging
import os
import pickle
import re
import secrets
import socket
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tqdm import tqdm

log = logging.getLogger("fiber.checkpoints")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, damaged, refused or could not be fetched."""


class UnsafeCheckpointError(CheckpointError):
    """The file asks the unpickler for a global (class/function) outside the allow-list."""

    def __init__(self, message: str, *, path: Path, global_names: list[str]):
        super().__init__(message)
        self.path = path
        self.global_names = global_names


class DownloadError(CheckpointError):
    """A release could not be downloaded or failed verification."""

    def __init__(self, message: str, *, url: str, cache_path: Path):
        super().__init__(message)
        self.url = url
        self.cache_path = cache_path


class CheckpointWriteError(OSError):
    """Writing failed; the file that was at the destination before (if any) is untouched."""


# ---------------------------------------------------------------------------------------------
# Safe reading of pickled (torch.save) files

# Globals that published checkpoints contain besides tensors, each replaced by a harmless
# stand-in while unpickling. torch's weights_only unpickler instantiates an allow-listed global
# with `cls.__new__(cls)` or calls it on its pickled arguments, so mapping a dict subclass to
# `dict` (or a list subclass to `list`) rebuilds its contents as a plain container.
_PLAIN_DICT_STAND_INS = (
    # Lightning's hyper-parameter container: `hyper_parameters` of a .ckpt, per Lightning version
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
    # sacred's read-only config (FIBER's coarse code passes its sacred config to the model)
    "sacred.config.custom_containers.ReadOnlyDict",
)
_PLAIN_LIST_STAND_INS = ("sacred.config.custom_containers.ReadOnlyList",)
# Lightning 1.3 (the version FIBER trained with) keys the `callbacks` section by the callback
# class itself. The class is only a dictionary key there, so its name (a str) stands in for it.
_CLASS_NAME_STAND_INS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
)
_STAND_INS = (
    [(dict, name) for name in _PLAIN_DICT_STAND_INS]
    + [(list, name) for name in _PLAIN_LIST_STAND_INS]
    + [(name, name) for name in _CLASS_NAME_STAND_INS]
)

_ZIP_MAGIC = b"PK\x03\x04"
_CHECKPOINT_SUFFIXES = {".ckpt", ".pth", ".pt", ".bin", ".safetensors"}


@dataclass
class StateFile:
    """What `read_state_file` found in a checkpoint file.

    tensors: the weights, name -> tensor (on CPU).
    format: "torch-zip" (torch.save since 1.6), "torch-legacy" (older torch.save) or
        "safetensors".
    container: where the weights sat: "lightning" (under "state_dict", a Lightning .ckpt),
        "model" (under "model": maskrcnn/GLIP-style .pth, the Swin release) or "plain" (the file
        is the mapping itself: torch.save(model.state_dict()), HF pytorch_model.bin,
        safetensors).
    extra: every other top-level entry (Lightning `hyper_parameters`, `epoch`, optimizer states,
        a fine-grained `model_ema`, ...); non-tensor values found among the weights go to
        extra["non_tensor_entries"]; safetensors metadata to extra["metadata"].
    """

    path: Path
    format: str
    container: str
    tensors: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


def read_state_file(path: str | os.PathLike, *, mmap: bool = True) -> StateFile:
    """Load a checkpoint file without executing anything stored in it.

    Handles torch.save files (plain state_dicts, Lightning .ckpt, .pth with a "model" key,
    HF pytorch_model.bin) and .safetensors. With `mmap` (zip-format torch files only) tensors
    are paged in from the file on first use, so optimizer states nobody reads cost no memory.

    Raises FileNotFoundError / IsADirectoryError, CheckpointError for empty, truncated or
    unrecognised files, and UnsafeCheckpointError when the pickle asks for a global outside the
    allow-list (nothing from the file has run at that point).
    """
    path = _existing_file(path)
    fmt = _sniff_format(path)
    if fmt == "safetensors":
        tensors, metadata = _read_safetensors(path)
        return StateFile(path, fmt, "plain", tensors, {"metadata": metadata})
    obj = _restricted_torch_load(path, mmap=mmap and fmt == "torch-zip")
    container, weights, extra = _split_weights(obj, path)
    tensors, non_tensors = {}, {}
    for key, value in weights.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach() if isinstance(value, torch.nn.Parameter) else value
        else:
            non_tensors[key] = value
    if non_tensors:
        extra["non_tensor_entries"] = non_tensors
    return StateFile(path, fmt, container, tensors, extra)


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES)
        hint = f" It holds: {', '.join(inside[:6])}." if inside else ""
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint file.{hint}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"{path} is empty (0 bytes), probably an interrupted download or copy; "
            "delete it and fetch it again"
        )
    return path


def _sniff_format(path: Path) -> str:
    """Tell the file format from its first bytes (the suffix is only a tie-breaker)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if path.suffix == ".safetensors" or _looks_like_safetensors(head, path.stat().st_size):
        return "safetensors"
    if head[:1] == b"\x80":  # pickle PROTO opcode: the pre-1.6 torch.save format
        return "torch-legacy"
    raise CheckpointError(
        f"{path} is neither a PyTorch checkpoint nor a safetensors file "
        f"(it starts with {head[:8]!r}); is it an HTML error page or a partial download?"
    )


def _looks_like_safetensors(head: bytes, file_size: int) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and header_len <= file_size - 8


def _restricted_torch_load(path: Path, *, mmap: bool) -> Any:
    """torch.load with weights_only=True plus our stand-ins, errors rephrased to name the file."""
    with torch.serialization.safe_globals(_STAND_INS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            raise _unpickling_failure(path, err) from None
        except Exception as err:  # torch reports damage as RuntimeError, EOFError, OSError, ...
            reason = str(err).split(". ")[0] or type(err).__name__
            raise CheckpointError(
                f"could not read {path}: the file looks damaged or truncated ({reason}). "
                "Delete it and download or copy it again."
            ) from err


def _unpickling_failure(path: Path, err: pickle.UnpicklingError) -> CheckpointError:
    """Turn torch's weights_only error into one that names the refused global and the file."""
    message = str(err)
    # torch shortens "builtins.exec" to "exec" in its message; put the module back
    names = [n if "." in n else f"builtins.{n}" for n in re.findall(r"GLOBAL ([\w.]+)", message)]
    if names:
        try:  # static scan, nothing executed: lists every refused global, with full names
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path) or names
        except Exception:  # the scan does not know every opcode; the first name will do
            pass
        return UnsafeCheckpointError(
            f"refusing to load {path}: it asks the unpickler for {', '.join(names)}, outside the "
            "allow-list (tensors, plain containers, primitives and a few harmless dict/list "
            "types), so loading it could run code stored in the file. If the file is genuine, "
            "convert it on a trusted machine to a plain state_dict or to safetensors.",
            path=path,
            global_names=names,
        )
    reason = message.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
    return CheckpointError(
        f"could not read {path} with the safe loader: {' '.join(reason.split())}. The file is "
        "damaged, or it uses pickle features that plain weights never need."
    )


def _split_weights(obj: Any, path: Path) -> tuple[str, Mapping, dict]:
    """Find the weights mapping inside a loaded checkpoint object."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a mapping of tensors (a state_dict)"
        )
    for key, container in (("state_dict", "lightning"), ("model", "model")):
        if isinstance(obj.get(key), Mapping):
            return container, obj[key], {k: v for k, v in obj.items() if k != key}
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return "plain", obj, {}
    raise CheckpointError(
        f"no weights found in {path}: expected a mapping of tensors, or one under 'state_dict' "
        f"or 'model'; the top-level keys are {sorted(map(str, obj))[:12]}"
    )


# ---------------------------------------------------------------------------------------------
# Key utilities (pure renaming; the mapping onto model names lives in model.py)

def strip_prefix(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Remove `prefix` from every key that starts with it ("module.", "roberta."); keep others."""
    out: dict[str, Any] = {}
    for key, value in sd.items():
        new = key[len(prefix):] if key.startswith(prefix) else key
        if new in out:
            raise KeyError(f"stripping {prefix!r} makes {key!r} collide with another key {new!r}")
        out[new] = value
    return out


def add_prefix(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Prepend `prefix` to every key."""
    return {prefix + key: value for key, value in sd.items()}


def select_prefix(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Keep only the keys under `prefix` ("vit_model."), with the prefix removed."""
    return {key[len(prefix):]: value for key, value in sd.items() if key.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# safetensors, by hand. Layout: u64 little-endian N | N bytes of JSON header | data buffer.
# Header: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
# "__metadata__": {str: str}}; offsets are relative to the data buffer, tensors are packed
# back to back in offset order and fill the buffer exactly.

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors file into CPU tensors (they share one buffer read from the file)."""
    return _read_safetensors(_existing_file(path))[0]


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The free-form `__metadata__` strings of a .safetensors file (the header only is read)."""
    path = _existing_file(path)
    with open(path, "rb") as f:
        return _read_safetensors_header(f, path)[2]


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with open(path, "rb") as f:
        entries, data_len, metadata = _read_safetensors_header(f, path)
        data = bytearray(data_len)
        if f.readinto(data) != data_len:
            raise CheckpointError(f"{path}: the data buffer ends early")
    buffer = torch.frombuffer(data, dtype=torch.uint8) if data_len else torch.empty(0, torch.uint8)
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        raw = buffer[begin:end]
        if begin % dtype.itemsize:  # misaligned for this dtype: view() needs an aligned copy
            raw = raw.clone()
        tensors[name] = _from_little_endian(raw.view(dtype)).reshape(shape)
    return tensors, metadata


def _read_safetensors_header(f: BinaryIO, path: Path) -> tuple[dict, int, dict[str, str]]:
    """Parse and validate the header; return its tensor entries, the data size and metadata."""
    file_size = os.fstat(f.fileno()).st_size
    first = f.read(8)
    if len(first) < 8:
        raise CheckpointError(f"{path}: too short for a safetensors file ({file_size} bytes)")
    (header_len,) = struct.unpack("<Q", first)
    if header_len > min(_MAX_HEADER_BYTES, file_size - 8):
        raise CheckpointError(
            f"{path}: safetensors header length {header_len} is impossible for a "
            f"{file_size}-byte file (truncated or not a safetensors file)"
        )
    try:
        header = json.loads(f.read(header_len), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    entries = {name: _header_entry(name, info, path) for name, info in header.items()}
    data_len = file_size - 8 - header_len
    _check_packing(entries, data_len, path)
    return entries, data_len, metadata


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _header_entry(name: str, info: Any, path: Path) -> tuple[torch.dtype, list[int], int, int]:
    """Validate one tensor entry: known dtype, sane shape, offsets that match the shape."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: needs exactly the fields dtype, shape, data_offsets")
    dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(
            f"{where}: dtype {info['dtype']!r} is not supported "
            f"(supported: {', '.join(SAFETENSORS_DTYPES)})"
        )
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(_is_uint(d) for d in shape)):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_uint, offsets))):
        raise CheckpointError(f"{where}: data_offsets must be two non-negative integers")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if end < begin or end - begin != numel * dtype.itemsize:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes but shape {shape} "
            f"of {info['dtype']} needs {numel * dtype.itemsize}"
        )
    return dtype, shape, begin, end


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_packing(entries: dict, data_len: int, path: Path) -> None:
    """Tensors must tile the data buffer: no gap, no overlap, nothing past its end."""
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise CheckpointError(f"{path}: tensor {name!r} at byte {begin} {problem}")
        position = end
    if position != data_len:
        raise CheckpointError(
            f"{path}: the tensors cover {position} bytes but the data buffer has {data_len} "
            "(truncated, or bytes appended after the last tensor)"
        )


def _from_little_endian(t: torch.Tensor) -> torch.Tensor:
    """safetensors stores little-endian bytes; reverse each element's bytes on big-endian hosts."""
    if sys.byteorder == "little" or t.element_size() == 1:
        return t
    return _swap_bytes(t)


def _swap_bytes(t: torch.Tensor) -> torch.Tensor:
    raw = t.contiguous().reshape(-1).view(torch.uint8).view(-1, t.element_size())
    return raw.flip(1).contiguous().view(t.dtype).reshape(t.shape)


def write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `tensors` as a .safetensors file (atomically), readable by any safetensors reader.

    Tensors are stored by decreasing element size, then name, which keeps every tensor aligned
    to its element size; the header is padded with spaces to a multiple of 8 bytes, as the
    reference writer does. Views and non-contiguous tensors are written by value.
    """
    prepared = _prepare_for_safetensors(tensors, metadata)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in prepared:
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    def write(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for _, t in prepared:
            if sys.byteorder == "big" and t.element_size() > 1:
                t = _swap_bytes(t)
            # a fresh buffer: a "contiguous" tensor can still carry a 0 stride on a size-1 dim
            flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1))
            f.write(flat.view(torch.uint8).numpy().data)

    return atomic_write(path, write)


def _prepare_for_safetensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> list[tuple[str, torch.Tensor]]:
    """Check names, dtypes and metadata; return dense CPU tensors in file order."""
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TypeError("safetensors metadata must map strings to strings")
    out = []
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r} for safetensors")
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise TypeError(f"{name!r}: safetensors stores dense tensors, got {type(t).__name__}")
        if t.dtype not in _SAFETENSORS_NAMES:
            raise TypeError(f"{name!r}: dtype {t.dtype} has no safetensors equivalent")
        out.append((name, t.detach().to("cpu").contiguous()))
    return sorted(out, key=lambda nt: (-nt[1].element_size(), nt[0]))


# ---------------------------------------------------------------------------------------------
# Atomic writes: temp file in the same directory, fsync, rename over the target, fsync the dir.

def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call `write(f)` on a temporary file, then move it over `path` in one step.

    Readers see either the old file or the complete new one. On failure the temporary file is
    removed, the previous file is left untouched, and the error says so (an OSError becomes a
    CheckpointWriteError with the same errno, e.g. ENOSPC, also when `write` hid it). Temporary
    files that killed writers left in its folder are removed first.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(path.parent)
    had_previous = path.exists()
    tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    _LIVE_TEMP_FILES.add(tmp.name)
    raw = None
    try:
        # 0o666 minus the umask, like a plain open(): mkstemp's 0o600 would surprise users
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        raw = _WriteErrorRecorder(fd, "wb")
        with io.BufferedWriter(raw) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        kept = (f"the previous file at {path} is kept unchanged" if had_previous
                else f"nothing was written to {path}")
        cause = err if isinstance(err, OSError) else getattr(raw, "write_error", None)
        if cause is not None:
            raise CheckpointWriteError(
                cause.errno, f"could not write {path} ({cause.strerror or cause}); {kept}"
            ) from err
        err.add_note(f"while writing {path}: {kept}")
        raise
    finally:
        _LIVE_TEMP_FILES.discard(tmp.name)
    _fsync_directory(path.parent)
    return path


class _WriteErrorRecorder(io.FileIO):
    """A file that remembers the first OSError of a write. torch.save reports a failed write
    (a full disk) as a RuntimeError about zip stream positions, which hides the cause."""

    write_error: OSError | None = None

    def write(self, data):
        try:
            return super().write(data)
        except OSError as err:
            self.write_error = self.write_error or err
            raise


_HOST = socket.gethostname().replace("/", "_")
_LIVE_TEMP_FILES: set[str] = set()  # temp files this process is writing right now


def _remove_stale_temp_files(folder: Path) -> None:
    """Delete the temp files (of any target in `folder`) whose writer was killed: SIGKILL, out
    of memory, preemption. Each is as large as a checkpoint, so a run restarted many times would
    otherwise fill its disk. Only this host's files whose process is gone are touched (a file
    with this process's id that it is not writing was left by an earlier process, e.g. a
    restarted container that got the same pid)."""
    for tmp in folder.glob(".*.tmp"):
        parts = tmp.name[: -len(".tmp")].rsplit(".", 2)  # .<target>.<host>, pid, random
        if len(parts) != 3 or not parts[0].endswith(f".{_HOST}") or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        gone = tmp.name not in _LIVE_TEMP_FILES if pid == os.getpid() else not _alive(pid)
        if gone:
            log.info("removing %s, left by a writer that was killed", tmp)
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable. Best effort: some systems cannot fsync a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save(obj) to `path` atomically: a failed save never clobbers the last checkpoint."""
    return atomic_write(path, lambda f: torch.save(obj, f))


# ---------------------------------------------------------------------------------------------
# Published checkpoints, the cache, and the downloader

@dataclass(frozen=True, kw_only=True)
class Release:
    """One published file. `url_path` is relative to the base URL (a mirror keeps the layout).

    sha256 and size are None where the publisher gave none; downloads are then checked against
    the server's announced size and, for zip-format torch files, every member's CRC.
    """

    filename: str
    url_path: str
    kind: str  # "coarse" (Lightning .ckpt, weights under state_dict) or "fine" (.pth/.pt)
    description: str
    sha256: str | None = None
    size: int | None = None


DEFAULT_BASE_URL = "https://datarelease.blob.core.windows.net/fiber"


def _coarse(name: str, description: str) -> Release:
    return Release(filename=f"{name}.ckpt", url_path=f"coarse_grained/{name}.ckpt",
                   kind="coarse", description=description)


def _fine(filename: str, url_path: str, description: str) -> Release:
    return Release(filename=filename, url_path=url_path, kind="fine", description=description)


RELEASES: dict[str, Release] = {
    "fiber_pretrain": _coarse("fiber_pretrain", "coarse pre-training on GCC+SBU+COCO+VG"),
    "fiber_coco_irtr_itc": _coarse("fiber_coco_irtr_itc", "COCO retrieval, ITC fine-tuning"),
    "fiber_coco_irtr_itm": _coarse("fiber_coco_irtr_itm", "COCO retrieval, ITM fine-tuning"),
    "fiber_f30k_irtr_itc": _coarse("fiber_f30k_irtr_itc", "Flickr30k retrieval, ITC"),
    "fiber_f30k_irtr_itm": _coarse("fiber_f30k_irtr_itm", "Flickr30k retrieval, ITM"),
    "fiber_vqa": _coarse("fiber_vqa", "VQAv2 fine-tuning"),
    "fiber_nlvr2": _coarse("fiber_nlvr2", "NLVR2 fine-tuning"),
    "fiber_coco_caption": _coarse("fiber_coco_caption", "COCO captioning fine-tuning"),
    "fiber_coarse_init": _fine(
        "fiber_coarse_init.pt", "coarse_grained/fiber_coarse_init.pt",
        "coarse pre-trained weights renamed for the fine-grained code (its initialisation)"),
    "fiber_coarse_init_for_refexp": _fine(
        "fiber_coarse_init_for_refexp.pt", "coarse_grained/fiber_coarse_init_for_refexp.pt",
        "the same, initialisation of the RefCOCO-clean fine-grained pre-training"),
    "fiber_coarse_then_fine": _fine(
        "fiber_coarse_then_fine.pth", "fine_grained/fiber_coarse_then_fine.pth",
        "fine-grained pre-training (Flickr30k, MixedNoCOCO, Objects365) after coarse"),
    "fiber_coarse_then_fine_for_refexp": _fine(
        "fiber_coarse_then_fine_for_refexp.pth",
        "fine_grained/fiber_coarse_then_fine_for_refexp.pth",
        "fine-grained pre-training on data cleaned of RefCOCO/+/g images"),
    "fiber_coco": _fine("fiber_coco.pth", "fine_grained/fiber_coco.pth",
                        "COCO detection fine-tuning (58.4 box AP)"),
    "fiber_lvis": _fine("fiber_lvis.pth", "fine_grained/fiber_lvis.pth",
                        "LVIS detection fine-tuning (56.9 AP)"),
    "fiber_refcoco": _fine("fiber_refcoco.pth", "fine_grained/fiber_refcoco.pth",
                           "RefCOCO referring expressions"),
    "fiber_refcocoplus": _fine("fiber_refcoco+.pth", "fine_grained/fiber_refcoco%2B.pth",
                               "RefCOCO+ referring expressions"),
    "fiber_refcocog": _fine("fiber_refcocog.pth", "fine_grained/fiber_refcocog.pth",
                            "RefCOCOg referring expressions"),
}


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """Where downloads go: `override`, else $FIBER_CACHE, else ~/.cache/fiber."""
    chosen = override or os.environ.get("FIBER_CACHE") or "~/.cache/fiber"
    return Path(chosen).expanduser()


def cache_path(name: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The exact local path a release (or URL) is stored at; put a manual download there."""
    if name in RELEASES:
        return cache_root(cache_dir) / RELEASES[name].filename
    if _is_url(name):
        return cache_root(cache_dir) / _url_filename(name)
    raise KeyError(f"unknown checkpoint {name!r}; known names: {', '.join(RELEASES)}")


def _url_filename(url: str) -> str:
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    if not name:
        raise ValueError(f"cannot derive a file name from the URL {url!r}")
    return name


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def download(
    name_or_url: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
) -> Path:
    """Return the cached path of a release (`RELEASES` name) or URL, downloading it if needed.

    The base URL for releases is `base_url`, else $FIBER_BASE_URL, else the original host (which
    has been reported to refuse public access; point the variable at a mirror). The file is
    streamed to `<file>.part`; a dropped connection is resumed with an HTTP Range request (up to
    `retries` times, and again on the next call). The result is checked (size, sha256 when
    known, CRC of every zip member) before it is moved into the cache; a bad file is deleted.
    On failure the error gives the exact path to place the file at for offline use.
    """
    target = cache_path(name_or_url, cache_dir=cache_dir)
    release = RELEASES.get(name_or_url)
    base = base_url or os.environ.get("FIBER_BASE_URL") or DEFAULT_BASE_URL
    url = f"{base.rstrip('/')}/{release.url_path}" if release else name_or_url
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        if not target.is_file():  # another process may have finished while we waited
            _download_to(url, target, release, progress=progress, retries=retries,
                         timeout=timeout)
    return target


def _download_to(url: str, target: Path, release: Release | None, **options: Any) -> None:
    """Fetch into `<target>.part`, verify, then rename into place (never a bad file in place)."""
    part = target.with_name(target.name + ".part")
    fail = functools.partial(_download_error, url=url, target=target, release=release)
    _tell(f"downloading {url}\n  to {target}", options["progress"])
    total = _fetch_with_retries(url, part, fail, **options)
    problem = _verify_download(part, total, release)
    if problem:
        part.unlink(missing_ok=True)
        raise fail(f"the downloaded file is corrupt ({problem}); it was deleted")
    os.replace(part, target)
    _fsync_directory(target.parent)
    _tell(f"saved {target} ({target.stat().st_size / 1e6:.1f} MB)", options["progress"])


def _tell(message: str, progress: bool) -> None:
    """Progress lines for a person at a terminal (stderr, beside the bar); else debug logs."""
    if progress:
        print(message, file=sys.stderr, flush=True)
    else:
        log.info(message)


def _download_error(reason: str, *, url: str, target: Path, release: Release | None):
    mirror = f"\nor set FIBER_BASE_URL to a mirror serving {release.url_path}" if release else ""
    return DownloadError(
        f"could not download {url}: {reason}.\n"
        f"To use it offline, get {target.name} another way and put it at:\n    {target}{mirror}",
        url=url, cache_path=target,
    )


# Errors after which the partial file is still good and a Range request can continue it.
_RESUMABLE = (ConnectionError, TimeoutError, http.client.HTTPException)


def _fetch_with_retries(url: str, part: Path, fail: Callable[[str], DownloadError], *,
                        progress: bool, retries: int, timeout: float) -> int | None:
    for attempt in range(retries + 1):
        try:
            return _fetch(url, part, progress=progress, timeout=timeout)
        except urllib.error.HTTPError as err:
            raise fail(f"HTTP {err.code} {err.reason}") from err
        except (urllib.error.URLError, *_RESUMABLE) as err:
            reason = getattr(err, "reason", None) or err
            have = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                kept = (f"; the {have} bytes received are kept in {part} and the next call "
                        "resumes from there" if have else "")
                raise fail(f"{reason}{kept}") from err
            log.warning("download of %s failed after %d bytes (%s); retrying", url, have, reason)
            time.sleep(attempt)
    raise AssertionError("unreachable")


def _fetch(url: str, part: Path, *, progress: bool, timeout: float) -> int | None:
    """Append the rest of `url` to `part`; return the full size if the server announced it."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "fiber-checkpoints", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()  # the error carries the open response
        if err.code != 416 or not have:
            raise
        # Range not satisfiable: the .part is already complete, or it is longer than the file
        if _content_range(err.headers.get("Content-Range", ""))[1] == have:
            return have
        part.unlink()
        return _fetch(url, part, progress=progress, timeout=timeout)
    with response:
        start, total = _response_span(response)
        if start not in (0, have):  # a range we did not ask for: drop the .part, retry afresh
            part.unlink()
            raise http.client.HTTPException(f"asked for bytes from {have}, got from {start}")
        if have and start == 0:
            log.info("the server ignored the Range request; downloading %s from the start", url)
        _stream(response, part, start=start, total=total, progress=progress)
    size = part.stat().st_size
    if total is not None and size < total:
        raise ConnectionError(f"connection closed after {size} of {total} bytes")
    return total


def _response_span(response: http.client.HTTPResponse) -> tuple[int | None, int | None]:
    """(offset the body starts at, total file size or None) for a 200 or 206 response."""
    if response.status == 206:
        return _content_range(response.headers.get("Content-Range", ""))
    length = response.headers.get("Content-Length")
    return 0, int(length) if length is not None else None


def _content_range(value: str) -> tuple[int | None, int | None]:
    """Parse "bytes 100-199/1000" or "bytes */1000" into (first byte, total size)."""
    match = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", value.strip())
    if not match:
        return None, None
    first, total = match.groups()
    return (int(first) if first else None), (int(total) if total != "*" else None)


def _stream(response: Any, part: Path, *, start: int, total: int | None, progress: bool) -> None:
    with open(part, "ab" if start else "wb") as f, tqdm(
        total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
        desc=part.name.removesuffix(".part"), disable=not progress,
    ) as bar:
        try:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
        finally:  # keep what arrived, durably, so a later Range request can continue it
            f.flush()
            os.fsync(f.fileno())


def _verify_download(part: Path, total: int | None, release: Release | None) -> str | None:
    """Return what is wrong with a finished download, or None if it checks out."""
    size = part.stat().st_size
    expected = release.size if release and release.size is not None else total
    if expected is not None and size != expected:
        return f"{size} bytes instead of {expected}"
    if release and release.sha256:
        with open(part, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != release.sha256:
            return f"sha256 {digest} instead of {release.sha256}"
    return integrity_problem(part)


def integrity_problem(path: str | os.PathLike) -> str | None:
    """Check a file's internal consistency; return a description of the damage or None.

    Zip-format torch files: every member's CRC32 (reads the whole file). safetensors: the
    header and the tensor layout. Legacy pickled files carry no checksum and always pass.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
        size = os.fstat(f.fileno()).st_size
        if path.suffix == ".safetensors" or _looks_like_safetensors(head, size):
            try:
                _read_safetensors_header(f, path)
            except CheckpointError as err:
                return str(err)
            return None
    if not head.startswith(_ZIP_MAGIC):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        return f"not a readable zip archive: {err}"
    return f"zip member {bad} fails its CRC check" if bad else None


@contextmanager
def _exclusive_lock(lock_path: Path):
    """Serialise downloads of one file across processes (e.g. DDP ranks) where fcntl exists."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks in the standard library
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve(
    name_or_path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    progress: bool = True,
) -> Path:
    """A local path for an existing file, a release name (cached or downloaded) or a URL."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    text = str(name_or_path)
    if text in RELEASES or _is_url(text):
        return download(text, cache_dir=cache_dir, base_url=base_url, progress=progress)
    raise FileNotFoundError(
        f"{text} is neither an existing file nor a known checkpoint name "
        f"(known: {', '.join(RELEASES)})"
    )


def load_weights(name_or_path: str | os.PathLike, **resolve_options: Any) -> StateFile:
    """`read_state_file(resolve(name_or_path))`: a release name, URL or path to its tensors."""
    return read_state_file(resolve(name_or_path, **resolve_options))
