"""The published FIBER checkpoints and a downloader that fetches each one once.

`RELEASES` names every released file; `download(name)` fetches it into a cache
(`$FIBER_CACHE`, default ~/.cache/fiber) with a progress bar, resumes a partial download with
an HTTP Range request, checks size, sha256 and (for zip-format torch files) every member's
CRC, and on failure says which file to put where to load it offline. The base URL can point
at a mirror (`base_url=` or `$FIBER_BASE_URL`): the original host has been reported to refuse
public access. `resolve` turns a path, a release name or a URL into a local file, and
`load_weights` reads it safely (checkpoints.read_state_file).
"""

import functools
import hashlib
import http.client
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from checkpoints import (CheckpointError, StateFile, fsync_directory, integrity_problem,
                         read_state_file)

log = logging.getLogger("fiber.releases")

class DownloadError(CheckpointError):
    """A release could not be downloaded or failed verification."""

    def __init__(self, message: str, *, url: str, cache_path: Path):
        super().__init__(message)
        self.url = url
        self.cache_path = cache_path


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
    fsync_directory(target.parent)
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
