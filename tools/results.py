#!/usr/bin/env python
"""The README's "Results" section, made from run dirs of tools/train.py (so it cannot drift from them).

    python tools/results.py RUN_DIR [RUN_DIR ...]                     # print the markdown
    python tools/results.py RUN_DIR [RUN_DIR ...] --write README.md   # replace the block between the markers
    python tools/results.py RUN_DIR [RUN_DIR ...] --check README.md   # exit 2 if the README's block differs

Per run: the command that made it (`python tools/train.py` + RUN_DIR/.hydra/overrides.yaml, else
`task=<task_name>` from RUN_DIR/config.yaml), its date and torch / Lightning versions, the final
evaluation (RUN_DIR/metrics.json) and the validation curve: epoch, minutes since the start of fit
(`time/elapsed_min`, validation included) and the task's metric (`val/map` for det, `val/miou` for
seg) from RUN_DIR/csv/metrics.csv. Above the runs: this machine's CPU and core count (runs do not
record it: generate the block on the machine that made them).

The block lives between `<!-- results:begin -->` and `<!-- results:end -->` in the README.
User errors print one `error:` line on stderr and exit with code 2.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from backbone.errors import DataError
from backbone.training.runner import run_cli

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
TASK_METRIC = {"det": "val/map", "seg": "val/miou"}
TRAIN_FIX = "pass the run dir of tools/train.py (with logger=default and callbacks=default)"


# ---------------------------------------------------------------------------------------- reading
def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise DataError(path, "not found", TRAIN_FIX)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(path, f"not valid YAML ({str(e).splitlines()[0]})", "restore the file the run wrote") from None


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/metrics.json: the final evaluation of the best checkpoint."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise DataError(path, "not found", TRAIN_FIX + "; a run written with evaluate_after_fit=false has none")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e})", "restore the file the run wrote") from None
    if not isinstance(doc, dict):
        raise DataError(path, "holds no JSON object of metrics", "restore the file the run wrote")
    return doc


def read_task(run_dir: Path) -> str:
    """`task_name` of RUN_DIR/config.yaml (the resolved config tools/train.py wrote)."""
    path = run_dir / "config.yaml"
    cfg = _read_yaml(path)
    task = cfg.get("task_name") if isinstance(cfg, dict) else None
    if not isinstance(task, str) or not task:
        raise DataError(path, "has no task_name", "restore the file the run wrote")
    return task


def read_overrides(run_dir: Path) -> list[str] | None:
    """The command-line overrides Hydra recorded (RUN_DIR/.hydra/overrides.yaml), None if absent."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    doc = _read_yaml(path)
    if doc is None:
        return []
    if not isinstance(doc, list) or not all(isinstance(o, str) for o in doc):
        raise DataError(path, "is not a list of overrides", "restore the file Hydra wrote")
    return doc


def command(task: str, overrides: list[str] | None) -> str:
    """The command that made the run."""
    args = overrides if overrides is not None else [f"task={task}"]
    return " ".join(["python tools/train.py", *(shlex.quote(a) for a in args)])


def read_curve(run_dir: Path, metric: str) -> list[tuple[int, float, float]]:
    """[(epoch, minutes, value)] for every validation epoch of fit logged in RUN_DIR/csv/metrics.csv.

    Rows without `time/elapsed_min` (training steps, the evaluation after fit) are not curve points.
    """
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        raise DataError(path, "not found", TRAIN_FIX)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    try:
        for r in rows:
            if r.get(metric) and r.get("time/elapsed_min"):
                out.append((int(float(r.get("epoch") or 0)), float(r["time/elapsed_min"]), float(r[metric])))
    except ValueError as e:
        raise DataError(path, f"holds a value that is not a number ({e})", "restore the file the run wrote") from None
    if not out:
        raise DataError(path, f"has no validation epoch with both time/elapsed_min and {metric}",
                        "pass --metric NAME for another logged metric, or a run made with callbacks=default")
    return out


def run_date(run_dir: Path) -> str:
    """The day the run started: the first timestamp of its Hydra log (RUN_DIR/train.log), else the
    day metrics.json was written."""
    log_file = run_dir / "train.log"
    if log_file.is_file():
        with log_file.open(errors="replace") as f:
            for line in f:
                m = re.match(r"\[(\d{4}-\d{2}-\d{2})[ T]", line)
                if m:
                    return m.group(1)
    return dt.date.fromtimestamp((run_dir / "metrics.json").stat().st_mtime).isoformat()


def installed_version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


def run_versions(run_dir: Path) -> dict[str, str]:
    """torch and Lightning versions the run recorded in its checkpoint (RUN_DIR/checkpoints/last.ckpt,
    `checkpoint["mnv2"]["versions"]`), else the installed ones."""
    out = {"torch": installed_version("torch"), "lightning": installed_version("lightning")}
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        import torch

        try:
            recorded = torch.load(ckpt, map_location="cpu", weights_only=True).get("mnv2", {}).get("versions", {})
        except Exception:  # noqa: BLE001 -- an unreadable checkpoint only loses the recorded versions
            recorded = {}
        out.update({k: str(recorded[k]) for k in out if k in recorded})
    return out


def machine() -> str:
    """CPU model (from /proc/cpuinfo where there is one) and logical core count of this machine."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                model = value.strip()
                break
    return f"{model or platform.processor() or platform.machine() or 'unknown CPU'}, {os.cpu_count() or '?'} cores"


# ---------------------------------------------------------------------------------------- writing
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def metrics_tables(metrics: dict[str, Any]) -> list[str]:
    """Scalar metrics as `| metric | value |`; per-class dicts (seg: iou_per_class, acc_per_class)
    as one `| class | ... |` table. Other entries (settings such as `inference`) are left out."""
    lines = ["| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if _is_number(v) and v is not None]
    per_class = {k: v for k, v in metrics.items()
                 if isinstance(v, dict) and v and all(_is_number(x) for x in v.values())}
    if per_class:
        names = list(dict.fromkeys(n for d in per_class.values() for n in d))
        lines += ["", "| class | " + " | ".join(per_class) + " |", "|---|" + "---:|" * len(per_class)]
        lines += [f"| {n} | " + " | ".join(_fmt(d.get(n)) for d in per_class.values()) + " |" for n in names]
    return lines


def run_block(run_dir: Path, metric: str | None = None) -> str:
    """The markdown block of one run."""
    if not run_dir.is_dir():
        raise DataError(run_dir, "is not a directory", TRAIN_FIX)
    task = read_task(run_dir)
    metrics = read_metrics(run_dir)
    metric = metric or TASK_METRIC.get(task, "val/map")
    curve = read_curve(run_dir, metric)
    v = run_versions(run_dir)
    lines = [
        f"### {task}: `{command(task, read_overrides(run_dir))}`",
        "",
        f"Run {run_date(run_dir)}, torch {v['torch']}, Lightning {v['lightning']}; "
        f"fit to the last validation: {curve[-1][1]:.2f} min.",
        "",
        "Final evaluation of the best checkpoint (`metrics.json`):",
        "",
        *metrics_tables(metrics),
        "",
        "Validation curve (`csv/metrics.csv`; minutes since the start of fit, validation included):",
        "",
        f"| epoch | minutes | {metric} |",
        "|---:|---:|---:|",
        *(f"| {e} | {m:.2f} | {x:.4f} |" for e, m, x in curve),
    ]
    return "\n".join(lines)


def results(run_dirs: list[Path], metric: str | None = None) -> str:
    """The whole block: a header line (this machine, how to regenerate) and one block per run."""
    head = [
        "<!-- made by tools/results.py from run dirs of tools/train.py: regenerate with --write, do not edit -->",
        f"Machine: {machine()}.",
    ]
    return "\n\n".join(["\n".join(head), *(run_block(d, metric) for d in run_dirs)])


# ------------------------------------------------------------------------------ README block
def split_readme(path: Path) -> tuple[str, str, str]:
    """(text up to and including the begin marker, the block, text from the end marker on)."""
    if not path.is_file():
        raise DataError(path, "not found", "pass the README to --write / --check")
    text = path.read_text()
    fix = f"put one '{BEGIN}' line and, below it, one '{END}' line where the results go"
    for marker in (BEGIN, END):
        n = text.count(marker)
        if n != 1:
            raise DataError(path, f"has {n} '{marker}' markers, needs exactly 1", fix)
    i, j = text.index(BEGIN) + len(BEGIN), text.index(END)
    if j < i:
        raise DataError(path, f"'{END}' comes before '{BEGIN}'", fix)
    return text[:i], text[i:j], text[j:]


def write_readme(path: Path, block: str) -> None:
    head, _, tail = split_readme(path)
    path.write_text(f"{head}\n{block.strip()}\n{tail}")


def check_readme(path: Path, block: str, run_dirs: list[Path]) -> None:
    _, old, _ = split_readme(path)
    have, want = old.strip().splitlines(), block.strip().splitlines()
    if have == want:
        return
    n = next((k for k, (a, b) in enumerate(zip(have, want)) if a != b), min(len(have), len(want)))
    got = have[n] if n < len(have) else "(end of block)"
    exp = want[n] if n < len(want) else "(end of block)"
    regen = " ".join(["python tools/results.py", *(shlex.quote(str(d)) for d in run_dirs),
                      "--write", shlex.quote(str(path))])
    raise DataError(path, f"results block differs from the runs at its line {n + 1}: README has {got[:80]!r}, "
                    f"the runs give {exp[:80]!r}", f"regenerate it with {regen}")


# -------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one `error:` line and exit 2, like every tool
        print(f"error: {message} -- fix: see python tools/results.py --help", file=sys.stderr)
        sys.exit(2)


def _main(argv: list[str] | None) -> None:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    p.add_argument("--metric", default=None, help="curve metric (default: val/map for det, val/miou for seg)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", type=Path, metavar="README", help="replace the block between the markers")
    mode.add_argument("--check", type=Path, metavar="README", help="exit 2 if the block differs from the runs")
    args = p.parse_args(argv)
    block = results(args.run_dirs, args.metric)
    if args.write:
        write_readme(args.write, block)
        print(f"{args.write}: results block written from {len(args.run_dirs)} run(s)")
    elif args.check:
        check_readme(args.check, block, args.run_dirs)
        print(f"{args.check}: results block matches {len(args.run_dirs)} run(s)")
    else:
        print(block)


def main(argv: list[str] | None = None) -> None:
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
