"""Real two-process DDP on the CPU (gloo) through tools/train.py.

The evaluation after fit runs on both ranks; what it reports must be exactly what one process
reports for the same checkpoint: every val image counted once (an odd val count makes Lightning's
default sampler repeat one), detections gathered from both ranks, confusion matrices summed, and
(seg) each val image padded to data.eval_size, so that neither the split between the ranks nor the
val batch size (1 per rank there, 4 in the single process) changes its prediction.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = ["synthetic.num_train=12", "synthetic.num_val=5", "synthetic.size=96", "data.num_workers=0",
        "trainer.accelerator=cpu"]
TASK = {
    "det": ["model.image_size=96", "data.batch_size=4", "data.val_batch_size=2"],
    # every val image padded to one eval_size (sides <= round(96 * 4/3) = 128 -> 16*8+1), so the scores
    # depend neither on the DDP split nor on the val batch size: see SEG_VAL_BATCH
    "seg": ["data.crop_size=65", "data.batch_size=4", "data.eval_size=129"],
}
# seg: the DDP run validates 1 image per batch and rank, the single process 4 per batch (4 + 1). (After
# one epoch from random init the model predicts background nearly everywhere, so this run alone would
# not see padding effects; tests/test_seg_train.py::test_scores_do_not_depend_on_the_val_batch_size does.)
SEG_VAL_BATCH = {"ddp": ["data.val_batch_size=1"], "single": ["data.val_batch_size=4"]}
DDP = ["trainer=ddp", "trainer.devices=2", "trainer.precision=32", "trainer.sync_batchnorm=false"]


@pytest.mark.parametrize("task", ["det", "seg"])
def test_ddp_evaluation_equals_single_process(run_tool, tmp_path: Path, task: str) -> None:
    cache, run = tmp_path / "cache", tmp_path / "ddp"
    val_batch = SEG_VAL_BATCH if task == "seg" else {"ddp": [], "single": []}
    r = run_tool("train.py", [f"task={task}", *DATA, *TASK[task], *val_batch["ddp"], *DDP, "trainer.max_epochs=1",
                          "model.backbone.pretrained=none"], cache, run)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("evaluation written") <= 1  # only rank 0 reports
    assert (run / "train_ddp_process_1.log").is_file()  # a second rank really ran
    ckpt = next((run / "checkpoints").glob("best-*.ckpt"))

    single = tmp_path / "single"
    r = run_tool("evaluate.py", [f"task={task}", f"ckpt_path={ckpt}", *DATA, *TASK[task], *val_batch["single"]],
                 cache, single)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    ddp_metrics = json.loads((run / "metrics.json").read_text())
    one_metrics = json.loads((single / "metrics.json").read_text())
    if task == "det":
        ddp_dets = json.loads((run / "detections.json").read_text())
        one_dets = json.loads((single / "detections.json").read_text())
        assert len({d["image_id"] for d in one_dets}) == 5
        assert sorted((d["image_id"], d["category_id"]) for d in ddp_dets) == \
            sorted((d["image_id"], d["category_id"]) for d in one_dets)
        for key in ("map", "map_50", "map_75"):
            assert ddp_metrics[key] == pytest.approx(one_metrics[key], abs=1e-6)
    else:
        assert ddp_metrics["num_pixels"] == one_metrics["num_pixels"] > 0
        assert ddp_metrics["miou"] == pytest.approx(one_metrics["miou"], abs=1e-9)
        assert ddp_metrics["iou_per_class"] == pytest.approx(one_metrics["iou_per_class"], abs=1e-9)


# Resume under DDP: 8 images, batch 2 per rank -> 2 steps per epoch and rank, 2 epochs. Seg: its dropout
# draws from each rank's global RNG, so the per-rank RNG states in the checkpoint matter too.
RESUME = ["task=seg", "synthetic.num_train=8", "synthetic.num_val=2", "synthetic.size=64", "data.crop_size=33",
          "data.eval_size=97", "data.batch_size=2", "data.num_workers=0", "trainer.accelerator=cpu", *DDP,
          "trainer.max_epochs=2", "trainer.deterministic=true", "model.backbone.pretrained=none",
          "model.backbone.width_mult=0.35", "logger=none", "~callbacks.progress_bar", "~callbacks.val_images",
          "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0", "trainer.limit_val_batches=0",
          "evaluate_after_fit=false", "callbacks.model_checkpoint.monitor=null",
          "callbacks.model_checkpoint.save_top_k=0"]


@pytest.mark.slow  # three 2-process runs (~1 min on the shared 2-core CPU)
def test_ddp_resume_mid_epoch_is_exact(run_tool, tmp_path: Path) -> None:
    """Stopped after global step 1 (batch 1 of 2 of epoch 0, via GracefulStop's stop_at_step: what SIGTERM
    does), resumed from its last.ckpt: the weights equal the uninterrupted 2-process run's, bit for bit."""
    import torch

    cache = tmp_path / "cache"
    runs = {name: tmp_path / name for name in ("stopped", "resumed", "full")}
    r = run_tool("train.py", [*RESUME, "callbacks.graceful_stop.stop_at_step=1"], cache, runs["stopped"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "stopped by stop_at_step=1 at global step 1 (epoch 0, batch 1 of 2)" in out, out[-3000:]
    saved = runs["stopped"] / "checkpoints" / "last.ckpt"
    ckpt = torch.load(saved, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1 and sorted(ckpt["mnv2_rng"]) == ["0", "1"]  # both ranks' RNG states

    for name, extra in (("resumed", [f"ckpt_path={saved}"]), ("full", [])):
        r = run_tool("train.py", [*RESUME, *extra], cache, runs[name])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed, full = (torch.load(runs[n] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
                     for n in ("resumed", "full"))
    assert resumed["global_step"] == full["global_step"] == 4
    differ = [k for k, v in full["state_dict"].items() if not torch.equal(v, resumed["state_dict"][k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
