"""Checkpoint files: read them safely, write them atomically, check their integrity.

Three concerns, each a section below (downloading the published files is releases.py):

- `read_state_file(path)` loads a PyTorch or safetensors file without ever running code from it.
  Pickled files go through torch's `weights_only` unpickler, which builds only tensors, plain
  containers and primitives; a short named allow-list adds the harmless dict/list subclasses
  that Lightning and sacred leave in `.ckpt` files (they come back as plain dicts and lists).
  Anything else is refused with an error naming the global and the file.
- `read_safetensors` / `write_safetensors`: the safetensors format by hand (8-byte header
  length, JSON header, raw little-endian bytes), validated as strictly as the reference reader.
- `atomic_save` / `atomic_write_bytes`: a crash or a full disk never leaves a half-written
  checkpoint in place of a good one.
- `integrity_problem(path)`: a zip-format torch file's CRCs or a safetensors header checked,
  so that a damaged download is caught before it is loaded.

Mapping checkpoint keys onto model parameters is not done here (see model.py); this file only
offers the key utilities `strip_prefix`, `add_prefix` and `select_prefix`.
"""
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
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

log = logging.getLogger("fiber.checkpoints")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, damaged, refused or could not be fetched."""


class UnsafeCheckpointError(CheckpointError):
    """The file asks the unpickler for a global (class/function) outside the allow-list."""

    def __init__(self, message: str, *, path: Path, global_names: list[str]):
        super().__init__(message)
        self.path = path
        self.global_names = global_names


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
    fsync_directory(path.parent)
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


def fsync_directory(directory: Path) -> None:
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
