"""A checkpoint is data, not code: a file with a pickled object whose loading would run a command is
refused, through every entry point that reads checkpoints, and the command never runs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from backbone.errors import DataError
from backbone.training.checkpoint import load_checkpoint


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what an attacker plants: unpickling calls os.system
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "mnv2": {"task": "det", "config": {"model": {"_target_": "x"}},
                                            "meta": {"class_names": [_Payload(marker)]}}}, path)
    return path, marker


def test_load_checkpoint_refuses_code_and_runs_nothing(tmp_path: Path) -> None:
    path, marker = _evil_checkpoint(tmp_path)
    with pytest.raises(DataError, match="refused.*could run code.*system"):
        load_checkpoint(path)
    assert not marker.exists()


def test_evaluate_refuses_with_one_error_line(run_tool, tmp_path: Path) -> None:
    path, marker = _evil_checkpoint(tmp_path)
    r = run_tool("evaluate.py", ["task=det", f"ckpt_path={path}"], tmp_path / "cache", tmp_path / "eval")
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "refused" in errors[0] and "Traceback" not in r.stderr
    assert not marker.exists()


def test_results_tool_reads_versions_as_data(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_tool", Path(__file__).parents[1] / "tools" / "results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    path, marker = _evil_checkpoint(tmp_path)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    path.rename(tmp_path / "run" / "checkpoints" / "last.ckpt")
    results.run_versions(tmp_path / "run")  # falls back to the installed versions
    assert not marker.exists()


def test_our_checkpoints_load_as_data(tmp_path: Path) -> None:
    """What tools/import_tf.py and tools/train.py write passes the safe loader (run_info + Lightning state)."""
    from backbone.training.checkpoint import run_info

    ckpt = {"state_dict": {"model.w": torch.ones(2)}, "epoch": 1, "loops": {"fit_loop": {"x": [1, 2]}},
            "mnv2": run_info("det", {"model": {"_target_": "x", "num_classes": 2}}, {"class_names": ["a", "b"]})}
    torch.save(ckpt, tmp_path / "ok.ckpt")
    assert load_checkpoint(tmp_path / "ok.ckpt")["mnv2"]["meta"]["class_names"] == ["a", "b"]
