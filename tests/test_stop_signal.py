"""SIGTERM (SLURM, spot instances) and SIGINT (Ctrl-C) to tools/train.py: a mid-run last.ckpt, one log line
with the resume command, exit 128 + signal without a traceback; resuming from it (``ckpt_path=last``) ends
with the uninterrupted run's weights.

The three tools/train.py runs of the SIGTERM case (stopped, resumed, uninterrupted) are the point; the SIGINT
case shares the uninterrupted run and only checks the stop (the checkpoint is written by the same code).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["task=det", "synthetic.num_train=8", "synthetic.num_val=2", "synthetic.size=64", "model.image_size=64",
        "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=0", "trainer.accelerator=cpu",
        "model.backbone.pretrained=none", "model.backbone.width_mult=0.35", "trainer.max_epochs=2",
        "trainer.deterministic=true", "logger=none", "~callbacks.progress_bar", "~callbacks.val_images",
        "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0", "trainer.limit_val_batches=0",
        "evaluate_after_fit=false", "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=0"]
STEPS = 8  # 8 images / batch 2 x 2 epochs


@pytest.fixture(scope="module")
def tool(tmp_path_factory):
    """Runs tools/train.py ARGS with one shared cache (the synthetic set is made once) and LOG_DIR."""
    base = tmp_path_factory.mktemp("stop_signal")
    env = {**os.environ, "MNV2_CACHE_DIR": str(base / "cache"), "PYTHONUNBUFFERED": "1"}
    logs = base / "outputs"  # paths.log_dir: ckpt_path=last looks in outputs/det/runs/*/checkpoints
    # only the stopped and the resumed run under it: the newest last.ckpt there is the stopped run's
    dirs = {"stopped": logs / "det" / "runs" / "stopped", "resumed": logs / "det" / "runs" / "resumed"}

    def cmd(run: str, *extra: str) -> list[str]:
        return [sys.executable, str(ROOT / "tools" / "train.py"), *ARGS, *extra, f"paths.log_dir={logs}",
                f"hydra.run.dir={dirs.get(run, base / run)}"]

    def run(name: str, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
        r = subprocess.run(cmd(name, *extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                           check=False)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r, dirs.get(name, base / name)

    def stop(name: str, sig: signal.Signals) -> tuple[int, str, Path]:
        """Start a run, send ``sig`` once training has started; (exit code, output, run dir)."""
        proc = subprocess.Popen(cmd(name), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        lines = []
        for line in proc.stdout:  # wait for the handler to be in place (logged at train start), not blindly
            lines.append(line)
            if "SIGTERM or Ctrl-C stops" in line:
                proc.send_signal(sig)
                break
        out = "".join(lines) + proc.stdout.read()
        return proc.wait(timeout=300), out, dirs.get(name, base / name)

    run.stop = stop
    return run


@pytest.fixture(scope="module")
def uninterrupted(tool) -> dict[str, torch.Tensor]:
    _, run_dir = tool("full")
    return _weights(run_dir)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def _check_stopped(code: int, out: str, run_dir: Path, sig: signal.Signals) -> Path:
    """Exit 128 + sig, no traceback, the log line with the step and the resume command; the checkpoint's step."""
    assert code == 128 + sig, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    m = re.search(rf"stopped by {sig.name} at global step (\d+)", out)
    assert m and 0 < int(m.group(1)) < STEPS, out[-3000:]
    assert re.search(r"resume with: python tools/train.py .*ckpt_path=\S+last\.ckpt", out), out[-3000:]
    saved = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(saved, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == int(m.group(1)) and "mnv2_rng" in ckpt
    return saved


@pytest.mark.slow  # three tools/train.py runs
def test_sigterm_saves_and_resumes_exactly(tool, uninterrupted) -> None:
    code, out, run_dir = tool.stop("stopped", signal.SIGTERM)
    saved = _check_stopped(code, out, run_dir, signal.SIGTERM)
    r, resumed = tool("resumed", "ckpt_path=last")  # the newest last.ckpt of a det run: the one just stopped
    assert f"ckpt_path=last: resuming from {saved}" in r.stdout + r.stderr
    a = _weights(resumed)
    assert all(torch.equal(v, uninterrupted[k]) for k, v in a.items()), "resumed after SIGTERM != uninterrupted"


@pytest.mark.slow  # one more tools/train.py run
def test_sigint_saves_a_resumable_checkpoint(tool) -> None:
    """Ctrl-C: the same stop as SIGTERM (Lightning alone would raise KeyboardInterrupt and save nothing)."""
    code, out, run_dir = tool.stop("interrupted", signal.SIGINT)
    _check_stopped(code, out, run_dir, signal.SIGINT)
