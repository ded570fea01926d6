"""Write the synthetic shapes dataset in both COCO 2017 and VOC 2012 layouts.

    python tools/make_synthetic.py --out data/synthetic [--num-train N --num-val M --size S --seed K]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from backbone.errors import Mnv2Error
from backbone.training.synthetic import CLASS_NAMES, DEFAULTS, coco_root, generate, voc_root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--num-train", type=int, default=DEFAULTS["num_train"], help="train images (%(default)s)")
    p.add_argument("--num-val", type=int, default=DEFAULTS["num_val"], help="val images (%(default)s)")
    p.add_argument("--size", type=int, default=DEFAULTS["size"], help="largest short side in px (%(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="random seed (%(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    start = time.perf_counter()
    try:
        out = generate(a.out, num_train=a.num_train, num_val=a.num_val, size=a.size, seed=a.seed,
                       overwrite=a.overwrite, progress=not a.no_progress)
    except Mnv2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.num_train} train + {a.num_val} val images ({len(CLASS_NAMES)} classes) "
          f"in {time.perf_counter() - start:.1f}s\n  COCO: {coco_root(out)}\n  VOC:  {voc_root(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
