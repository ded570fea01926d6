"""tools/results.py: the README's results block from run dirs, --write / --check, one-line errors."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "results.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("results_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


results_tool = _load_tool()


def make_run(root: Path) -> Path:
    """A run dir as tools/train.py task=seg writes it: 3 epochs in the CSV log, final metrics, config."""
    run = root / "run"
    (run / "csv").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / "config.yaml").write_text("seed: 42\ntask_name: seg\nmodel:\n  _target_: mnv2seg.lightning_module.X\n")
    (run / ".hydra" / "overrides.yaml").write_text("- task=seg\n- trainer.max_epochs=3\n- data.class_names=[a,b]\n")
    (run / "metrics.json").write_text(json.dumps({
        "miou": 0.8230, "pixel_acc": 0.9636, "num_pixels": 1234,
        "iou_per_class": {"background": 0.9648, "disc": None}, "inference": "single"}))
    (run / "csv" / "metrics.csv").write_text(
        "epoch,step,time/elapsed_min,train/loss,val/miou\n"
        "0,9,,1.5,\n"
        "0,9,0.52,,0.5902\n"
        "1,19,1.05,,0.6881\n"
        "2,29,1.65,,0.7622\n"
        "3,29,,,0.7622\n")  # the evaluation after fit: no elapsed time, not a curve point
    (run / "train.log").write_text("[2025-11-27 16:16:05,123][mnv2][INFO] seed 42\n")
    return run


def run_tool(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        results_tool.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_block_has_the_runs_numbers(tmp_path, capsys):
    run = make_run(tmp_path)
    code, out, err = run_tool(capsys, run)
    assert code == 0, err
    assert "### seg: `python tools/train.py task=seg trainer.max_epochs=3 'data.class_names=[a,b]'`" in out
    assert "Run 2025-11-27, torch " in out and "fit to the last validation: 1.65 min." in out
    assert "Machine: " in out and " cores." in out
    for row in ("| miou | 0.8230 |", "| pixel_acc | 0.9636 |", "| num_pixels | 1234 |",
                "| class | iou_per_class |", "| background | 0.9648 |", "| disc | - |"):
        assert row in out
    assert "inference" not in out
    curve = [line for line in out.splitlines() if line.startswith("| ") and line.count("|") == 4
             and line.split("|")[1].strip().isdigit()]
    assert curve == ["| 0 | 0.52 | 0.5902 |", "| 1 | 1.05 | 0.6881 |", "| 2 | 1.65 | 0.7622 |"]
    assert "| epoch | minutes | val/miou |" in out


def test_command_without_recorded_overrides(tmp_path, capsys):
    run = make_run(tmp_path)
    (run / ".hydra" / "overrides.yaml").unlink()
    code, out, _ = run_tool(capsys, run)
    assert code == 0 and "### seg: `python tools/train.py task=seg`" in out


def test_write_then_check_and_drift(tmp_path, capsys):
    run = make_run(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n\n<!-- results:begin -->\nold numbers\n<!-- results:end -->\n\n## After\n")
    code, _, err = run_tool(capsys, run, "--check", readme)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1

    code, _, err = run_tool(capsys, run, "--write", readme)
    assert code == 0, err
    text = readme.read_text()
    assert text.startswith("# x\n\n## Results\n\n<!-- results:begin -->\n")
    assert text.endswith("<!-- results:end -->\n\n## After\n")
    assert "| 2 | 1.65 | 0.7622 |" in text and "old numbers" not in text
    code, out, err = run_tool(capsys, run, "--check", readme)
    assert code == 0 and err == "" and "matches 1 run" in out
    run_tool(capsys, run, "--write", readme)  # writing twice changes nothing
    assert readme.read_text() == text

    readme.write_text(text.replace("| 2 | 1.65 | 0.7622 |", "| 2 | 1.65 | 0.7700 |"))
    code, _, err = run_tool(capsys, run, "--check", readme)
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "0.7700" in err and "0.7622" in err and "--write" in err


def test_readme_without_markers(tmp_path, capsys):
    run = make_run(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    code, _, err = run_tool(capsys, run, "--write", readme)
    assert code == 2 and err.startswith("error: ") and "results:begin" in err
    assert readme.read_text() == "# no markers\n"


def test_missing_csv_is_one_error_line_naming_the_file(tmp_path):
    run = make_run(tmp_path)
    (run / "csv" / "metrics.csv").unlink()
    proc = subprocess.run([sys.executable, str(TOOL), str(run)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(run / "csv" / "metrics.csv") in lines[0]


@pytest.mark.parametrize("missing", ["metrics.json", "config.yaml"])
def test_missing_run_file(tmp_path, capsys, missing):
    run = make_run(tmp_path)
    (run / missing).unlink()
    code, out, err = run_tool(capsys, run)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and str(run / missing) in err and len(err.strip().splitlines()) == 1


def test_versions_come_from_the_runs_checkpoint(tmp_path, capsys):
    import torch

    run = make_run(tmp_path)
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": {}, "mnv2": {"versions": {"torch": "9.9.9", "lightning": "8.8.8"}}},
               run / "checkpoints" / "last.ckpt")
    code, out, err = run_tool(capsys, run)
    assert code == 0, err
    assert "Run 2025-11-27, torch 9.9.9, Lightning 8.8.8;" in out
