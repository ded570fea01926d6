"""tools/download.py coco|voc|sbd: download (resume, md5), safe extraction, layout, idempotence.

Every archive is a tiny one built here in the dataset's layout and served by a loopback HTTP
server (Range support, optional connection cut); the tool is pointed at it with --mirror.
The md5s of these archives are injected by monkeypatching `downloads.DATASETS`; the one
subprocess test keeps the official md5s, which the test archive cannot match.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import ClassVar

import pytest

# tests/ has no __init__.py: pytest puts it on sys.path, so the sibling module imports as is
from test_assets import _Handler as _OneFileHandler

from backbone.errors import DataError
from backbone.training import downloads

REPO = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("mnv2_download_tool", REPO / "tools" / "download.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


download_tool = _load_tool()


# ----------------------------------------------------------------------------- archives
def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar(files: dict[str, bytes], mode: str = "w", links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


BLOB = bytes(range(256)) * 2000  # incompressible enough that archives span several reads
COCO_JSON = json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}).encode()
COCO = {
    "annotations_trainval2017.zip": _zip({"annotations/instances_train2017.json": COCO_JSON,
                                          "annotations/instances_val2017.json": COCO_JSON}),
    "val2017.zip": _zip({"val2017/000000000139.jpg": BLOB}),
    "train2017.zip": _zip({"train2017/000000000009.jpg": BLOB, "train2017/000000000025.jpg": BLOB[::-1]}),
}
_V = "VOCdevkit/VOC2012"
VOC = {"VOCtrainval_11-May-2012.tar": _tar({
    f"{_V}/JPEGImages/2007_000032.jpg": BLOB, f"{_V}/SegmentationClass/2007_000032.png": b"png",
    f"{_V}/ImageSets/Segmentation/train.txt": b"2007_000032\n", f"{_V}/ImageSets/Segmentation/val.txt": b"2007_000032\n",
    f"{_V}/Annotations/2007_000032.xml": b"<annotation/>"})}
_S = "benchmark_RELEASE/dataset"
SBD = {"benchmark.tgz": _tar({f"{_S}/cls/2008_000002.mat": b"mat", f"{_S}/img/2008_000002.jpg": BLOB,
                              f"{_S}/train.txt": b"2008_000002\n", f"{_S}/val.txt": b"2008_000002\n"}, mode="w:gz")}


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _use_md5s(monkeypatch, name: str, files: dict[str, bytes]) -> None:
    """Make DATASETS[name] expect the md5s of the test archives `files`."""
    dataset = downloads.DATASETS[name]
    archives = tuple(dataclasses.replace(a, md5=_md5(files[a.filename])) for a in dataset.archives)
    monkeypatch.setitem(downloads.DATASETS, name, dataclasses.replace(dataset, archives=archives))


# ----------------------------------------------------------------------------- loopback server
class _Handler(_OneFileHandler):
    """tests/test_assets.py's server (Range, `cut_once` cuts, request log) serving `files` by base
    name (the last part of the URL path); 404 for any other name."""

    files: ClassVar[dict[str, bytes]] = {}

    @property
    def data(self) -> bytes:  # type: ignore[override]
        return self.files[_basename(self.path)]

    def do_GET(self) -> None:
        if _basename(self.path) in self.files:
            return super().do_GET()
        type(self).log.append({"path": self.path, "range": self.headers.get("Range")})
        self.send_error(404)


def _basename(url_path: str) -> str:
    return url_path.rsplit("/", 1)[-1]


def _names(handler: type[_Handler]) -> list[str]:
    """The file names requested so far, in order."""
    return [_basename(e["path"]) for e in handler.log]


@pytest.fixture()
def server():
    """(mirror URL prefix, handler class); set handler.files before use."""
    handler = type("H", (_Handler,), {"log": [], "cut_once": 0, "ignore_range": False, "files": {}})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:  # server_close on exit
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{httpd.server_address[1]}/mirror/", handler
        httpd.shutdown()  # pytest resumes the fixture also when the test failed


def _error(stderr: str) -> str:
    """The one `error:` line of stderr (the rest is tqdm's progress bar), and it comes last."""
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and stderr.strip().splitlines()[-1] == lines[0], stderr
    return lines[0]


def _run(name: str, root: Path, mirror: str, *extra: str) -> int:
    return download_tool.main([name, "--root", str(root), "--mirror", mirror, "--timeout", "10", *extra])


# ----------------------------------------------------------------------------- tests
def test_coco_layout_then_second_run_fetches_nothing(server, tmp_path, monkeypatch, capsys):
    mirror, handler = server
    handler.files = COCO
    _use_md5s(monkeypatch, "coco", COCO)
    root = tmp_path / "coco"
    assert _run("coco", root, mirror) == 0
    # conf/data/coco.yaml with data.root=ROOT: DetDataModule reads {train,val}2017/ and annotations/instances_*.json
    for split in ("train2017", "val2017"):
        assert (root / split).is_dir() and any((root / split).glob("*.jpg"))
        assert json.loads((root / "annotations" / f"instances_{split}.json").read_bytes()) == json.loads(COCO_JSON)
    assert (root / "train2017" / "000000000025.jpg").read_bytes() == BLOB[::-1]
    assert not list(root.glob("*.zip")) and not list(root.glob("*.part"))  # archives deleted by default
    assert not list(root.glob(".*.extracting"))
    assert sorted(_names(handler)) == sorted(COCO)
    assert "data.root=" in capsys.readouterr().out

    assert _run("coco", root, mirror) == 0
    assert len(handler.log) == len(COCO)  # nothing requested
    assert "already present" in capsys.readouterr().out


def test_voc_keep_archives_and_idempotent_without_reextracting(server, tmp_path, monkeypatch, capsys):
    mirror, handler = server
    handler.files = VOC
    _use_md5s(monkeypatch, "voc", VOC)
    root = tmp_path / "voc"
    assert _run("voc", root, mirror, "--keep-archives") == 0
    voc = root / "VOCdevkit" / "VOC2012"  # data.root for SegDataModule
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        assert (voc / sub).is_dir()
    assert (voc / "ImageSets" / "Segmentation" / "train.txt").read_text() == "2007_000032\n"
    assert (root / "VOCtrainval_11-May-2012.tar").read_bytes() == VOC["VOCtrainval_11-May-2012.tar"]
    assert f"data.root={voc}" in capsys.readouterr().out
    # a user's edit survives a second run: no re-extraction, no request
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("edited\n")
    assert _run("voc", root, mirror, "--keep-archives") == 0
    assert len(handler.log) == 1
    assert (voc / "ImageSets" / "Segmentation" / "train.txt").read_text() == "edited\n"
    assert "already present" in capsys.readouterr().out


def test_sbd_interrupted_transfer_resumes(server, tmp_path, monkeypatch, capsys):
    mirror, handler = server
    handler.files, handler.cut_once = SBD, 1
    _use_md5s(monkeypatch, "sbd", SBD)
    root = tmp_path / "sbd"
    data = SBD["benchmark.tgz"]
    assert _run("sbd", root, mirror) == 2
    assert "resume" in _error(capsys.readouterr().err)
    part = root / "benchmark.tgz.part"
    assert part.stat().st_size == len(data) // 2 and not (root / "benchmark_RELEASE").exists()

    assert _run("sbd", root, mirror) == 0
    assert handler.log[-1]["range"] == f"bytes={len(data) // 2}-"
    sbd = root / "benchmark_RELEASE"  # data.sbd_root
    for sub in ("dataset/cls", "dataset/img"):
        assert (sbd / sub).is_dir()
    assert (sbd / "dataset" / "train.txt").read_text() == "2008_000002\n" and (sbd / "dataset" / "val.txt").is_file()
    assert not part.exists() and not (root / "benchmark.tgz").exists()


def test_cli_wrong_checksum_is_refused_and_deleted(server, tmp_path):
    """End to end through `python tools/download.py`: the official md5 cannot match the test tar."""
    mirror, handler = server
    handler.files = VOC
    root = tmp_path / "voc"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "download.py"), "voc", "--root", str(root),
                             "--mirror", mirror], capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert result.returncode == 2, result.stderr
    err = _error(result.stderr)
    assert "md5 mismatch" in err and downloads.DATASETS["voc"].archives[0].md5 in err
    assert "deleted" in err and "fix:" in err
    assert list(root.iterdir()) == []  # no archive, no .part, nothing extracted
    assert len(handler.log) == 1


def test_checksum_mismatch_after_partial_coco_keeps_done_archives(server, tmp_path, monkeypatch, capsys):
    """The first archive is extracted and marked; the bad second one stops the run; a rerun with the
    right file fetches only what is missing."""
    mirror, handler = server
    handler.files = COCO
    _use_md5s(monkeypatch, "coco", COCO)
    good = downloads.DATASETS["coco"]
    bad = dataclasses.replace(good, archives=(good.archives[0], dataclasses.replace(good.archives[1], md5="0" * 32),
                                              good.archives[2]))
    monkeypatch.setitem(downloads.DATASETS, "coco", bad)
    root = tmp_path / "coco"
    assert _run("coco", root, mirror) == 2
    assert "md5 mismatch" in capsys.readouterr().err
    assert (root / "annotations").is_dir() and not (root / "val2017").exists()
    assert not (root / "val2017.zip").exists() and not (root / "val2017.zip.part").exists()
    monkeypatch.setitem(downloads.DATASETS, "coco", good)
    assert _run("coco", root, mirror) == 0
    assert _names(handler) == ["annotations_trainval2017.zip", "val2017.zip", "val2017.zip",
                                                "train2017.zip"]


@pytest.mark.parametrize("evil", [
    {"../evil.txt": b"x"},
    {"/tmp/mnv2-evil-absolute.txt": b"x"},
    {f"{_S}/../../../evil.txt": b"x"},
])
def test_path_traversal_in_tar_is_refused(server, tmp_path, monkeypatch, capsys, evil):
    mirror, handler = server
    files = {"benchmark.tgz": _tar({f"{_S}/train.txt": b"ok\n", **evil}, mode="w:gz")}
    handler.files = files
    _use_md5s(monkeypatch, "sbd", files)
    root = tmp_path / "sbd"
    assert _run("sbd", root, mirror) == 2
    assert "path traversal" in _error(capsys.readouterr().err)
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/mnv2-evil-absolute.txt").exists()
    assert not (root / "benchmark_RELEASE").exists()  # nothing extracted at all
    assert not list(root.glob(".*.extracted"))


def test_path_traversal_in_zip_and_tar_links_refused(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    evil_zip = tmp_path / "evil.zip"
    evil_zip.write_bytes(_zip({"val2017/a.jpg": b"a", "../../evil.txt": b"x"}))
    with pytest.raises(DataError, match="path traversal"):
        downloads.safe_extract(evil_zip, dest)
    win_zip = tmp_path / "win.zip"
    win_zip.write_bytes(_zip({"C:\\evil.txt": b"x"}))
    with pytest.raises(DataError, match="path traversal"):
        downloads.safe_extract(win_zip, dest)
    link_tar = tmp_path / "link.tar"
    link_tar.write_bytes(_tar({"a/ok.txt": b"ok"}, links={"a/escape": "../../outside"}))
    with pytest.raises(DataError, match="path traversal"):
        downloads.safe_extract(link_tar, dest)
    assert list(dest.iterdir()) == []
    # a link that stays inside is fine
    ok_tar = tmp_path / "ok.tar"
    ok_tar.write_bytes(_tar({"a/ok.txt": b"ok"}, links={"a/b/up": "../ok.txt"}))
    downloads.safe_extract(ok_tar, dest)
    assert (dest / "a" / "b" / "up").read_bytes() == b"ok"


def test_archive_missing_expected_layout_is_an_error(server, tmp_path, monkeypatch, capsys):
    mirror, handler = server
    files = {"VOCtrainval_11-May-2012.tar": _tar({"VOC2012/JPEGImages/x.jpg": b"x"})}  # no VOCdevkit/
    handler.files = files
    _use_md5s(monkeypatch, "voc", files)
    assert _run("voc", tmp_path / "voc", mirror) == 2
    err = _error(capsys.readouterr().err)
    assert "did not create" in err and "VOCdevkit/VOC2012/JPEGImages" in err


def test_http_error_is_one_error_line(server, tmp_path, capsys):
    mirror, _ = server  # serves nothing: 404
    assert _run("sbd", tmp_path / "sbd", mirror) == 2
    err = _error(capsys.readouterr().err)
    assert "404" in err and "benchmark.tgz" in err


def test_download_url_md5_and_sha256_share_one_path(server, tmp_path):
    mirror, handler = server
    handler.files = {"blob": BLOB}
    dest = tmp_path / "blob"
    downloads.download_url(mirror + "blob", dest, md5=_md5(BLOB), progress=False, log=lambda _: None)
    assert dest.read_bytes() == BLOB
    messages: list[str] = []
    downloads.download_url(mirror + "blob", dest, hashlib.sha256(BLOB).hexdigest(), progress=False,
                           log=messages.append)
    assert len(handler.log) == 1 and "already present, sha256 ok" in messages[-1]
    with pytest.raises(DataError, match="md5 mismatch.*deleted"):
        downloads.download_url(mirror + "blob", tmp_path / "other", md5="0" * 32, progress=False, log=lambda _: None)
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.part").exists()
    with pytest.raises(ValueError, match="exactly one"):
        downloads.download_url(mirror + "blob", dest, progress=False)
