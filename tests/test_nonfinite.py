"""A NaN / Inf training loss stops the run with one error line naming the step and the batch's images,
and never reaches a checkpoint (the last good one stays byte for byte)."""
from __future__ import annotations

import hashlib
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch

BAD_STEP = 2


def _run(tmp_path: Path, mode: str, capsys) -> tuple[str, bytes, bytes]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from backbone.training.checkpoint import AtomicCheckpointIO
    from backbone.training.runner import run_cli
    from backbone.training.synthetic import ensure_synthetic
    from mnv2det.datamodule import DetDataModule
    from mnv2det.lightning_module import SSDLiteModule

    class Poisoned(SSDLiteModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.trainer.global_step == BAD_STEP else loss

    pl.seed_everything(0, verbose=False)
    out = ensure_synthetic(tmp_path / "syn", num_train=8, num_val=2, size=64, seed=3, progress=False)
    module = Poisoned(num_classes=6, image_size=64, backbone={"pretrained": "none", "width_mult": 0.35},
                      optimizer=partial(torch.optim.SGD, lr=0.01))
    module.nonfinite_check = mode
    data = DetDataModule(str(out / "coco"), image_size=64, batch_size=2, num_workers=0, num_classes=6)
    ckpt_dir = tmp_path / "ckpt"
    snapshots: list[bytes] = []

    class Snapshot(pl.Callback):  # the bytes of last.ckpt after each step
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            last = ckpt_dir / "last.ckpt"
            snapshots.append(last.read_bytes() if last.is_file() else b"")

    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         log_every_n_steps=4, default_root_dir=str(tmp_path), plugins=[AtomicCheckpointIO()],
                         callbacks=[Snapshot(), ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=1,
                                                                save_last=True, save_top_k=0)])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_info:
        warnings.simplefilter("ignore")
        run_cli(lambda: trainer.fit(module, datamodule=data))
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # Lightning logs too
    assert len(err) == 1, err
    print(err[0])
    # the checkpoint of the last good step (BAD_STEP: its start) is what is left
    return err[0], snapshots[BAD_STEP], (ckpt_dir / "last.ckpt").read_bytes()


@pytest.mark.parametrize("mode", ["step", "deferred"])
def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path: Path, mode: str, capsys) -> None:
    """step: checked before backward (CPU default). deferred: the GPU way, a device flag read every
    log_every_n_steps (4) steps and before every save: the save after the bad step is refused."""
    line, good, final = _run(tmp_path, mode, capsys)
    assert f"global step {BAD_STEP}" in line and "nan" in line.lower()
    assert "batch images: [" in line and "batch images: []" not in line
    assert hashlib.sha1(final).hexdigest() == hashlib.sha1(good).hexdigest() and good


def test_failed_save_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    """AtomicCheckpointIO: a save that dies mid-write (here: torch.save raising after writing some bytes)."""
    from backbone.training import checkpoint as ckpt_mod
    from backbone.training.checkpoint import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp file left either
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
