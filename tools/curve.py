#!/usr/bin/env python
"""Print a run's validation curve (metric against wall-clock minutes) from its CSV log.

    python tools/curve.py outputs/det/runs/DATE [--metric val/map]
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read_curve(run_dir: Path, metric: str) -> list[tuple[int, float, float]]:
    """[(epoch, minutes, value)] for every validation epoch logged in RUN_DIR/csv/metrics.csv."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        print(f"error: {path} not found -- fix: pass the run dir of tools/train.py (logger=default)", file=sys.stderr)
        sys.exit(2)
    rows = list(csv.DictReader(path.open()))
    out = []
    for r in rows:
        if r.get(metric) and r.get("time/elapsed_min"):
            out.append((int(float(r.get("epoch") or 0)), float(r["time/elapsed_min"]), float(r[metric])))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--metric", default=None, help="default: val/map if logged, else val/miou")
    args = p.parse_args()
    metric = args.metric
    if metric is None:
        header = (args.run_dir / "csv" / "metrics.csv").open().readline() if (args.run_dir / "csv" / "metrics.csv").is_file() else ""
        metric = "val/map" if "val/map" in header else "val/miou"
    curve = read_curve(args.run_dir, metric)
    print(f"| epoch | minutes | {metric} |\n|---:|---:|---:|")
    for epoch, minutes, value in curve:
        print(f"| {epoch} | {minutes:.2f} | {value:.4f} |")


if __name__ == "__main__":
    main()
