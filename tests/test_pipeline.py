"""The Hydra + Lightning skeleton: config composition, start-up errors, and the train -> evaluate CLI
round trip on a tiny synthetic set (self-describing checkpoints, metrics.json in the run dir)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from backbone.errors import ArgumentError, DataError
from backbone.training.checkpoint import load_checkpoint
from backbone.training.optim import WarmupConstantLR, WarmupCosineLR, WarmupExponentialLR, WarmupPolyLR

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A tiny synthetic set and 1 short epoch: this checks plumbing, not learning (see test_*_train.py).
TINY = ["synthetic.num_train=12", "synthetic.num_val=6", "synthetic.size=96", "trainer.max_epochs=1",
        "trainer.accelerator=cpu", "data.num_workers=0", "model.backbone.pretrained=none"]
TASK_TINY = {
    "det": ["model.image_size=96", "data.batch_size=4", "data.val_batch_size=6"],
    "seg": ["data.crop_size=65", "data.batch_size=4", "data.val_batch_size=2"],
}


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=False)


@pytest.mark.parametrize("task,target,metric", [
    ("det", "mnv2det.lightning_module.SSDLiteModule", "val/map"),
    ("seg", "mnv2seg.lightning_module.DeepLabModule", "val/miou"),
])
def test_task_selects_model_data_and_monitor(task: str, target: str, metric: str) -> None:
    cfg = _compose("train", [f"task={task}", "paths.output_dir=/tmp/x"])
    assert cfg.model._target_ == target
    assert cfg.monitor.metric == metric
    assert cfg.callbacks.model_checkpoint.monitor == metric
    assert cfg.data.synthetic is not None  # the embedded default
    OmegaConf.resolve(cfg)  # every interpolation resolves (no missing keys in the default)


def test_experiments_compose() -> None:
    det = _compose("train", ["experiment=ssdlite_mnv2_coco", "data.root=/coco", "paths.output_dir=/tmp/x"])
    assert det.task_name == "det" and det.data.root == "/coco" and det.data.synthetic is None
    assert det.model.image_size == 300 and det.model.num_classes == 80
    seg = _compose("train", ["experiment=deeplabv3_mnv2_voc", "data.root=/voc", "paths.output_dir=/tmp/x"])
    assert seg.task_name == "seg" and seg.data.num_classes == "auto" and seg.data.crop_size == 513  # VOC's 21
    assert seg.model.optimizer.lr == pytest.approx(0.007) and seg.model.scheduler._target_.endswith(".WarmupPolyLR")


@pytest.mark.parametrize("experiment,lr,scheduler", [
    ("ssdlite_mnv2_coco", 0.05, "WarmupCosineLR"),
    ("deeplabv3_mnv2_voc", 0.007, "WarmupPolyLR"),
])
def test_experiment_replaces_the_optimizer_node(experiment: str, lr: float, scheduler: str) -> None:
    from hydra.utils import instantiate

    default = _compose("train", ["task=" + ("det" if experiment.startswith("ssd") else "seg"), "paths.output_dir=/tmp/x"])
    assert default.model.optimizer._target_ == "torch.optim.AdamW" and "betas" in default.model.optimizer
    cfg = _compose("train", [f"experiment={experiment}", "data.root=/d", "paths.output_dir=/tmp/x"])
    opt = OmegaConf.to_container(cfg.model.optimizer)
    # SGD's own node, not AdamW's keys with SGD's merged in
    assert opt == {"_target_": "torch.optim.SGD", "_partial_": True, "lr": pytest.approx(lr), "momentum": 0.9,
                   "nesterov": False, "weight_decay": pytest.approx(4e-5)}
    assert cfg.model.scheduler._target_ == f"backbone.training.optim.{scheduler}"
    factory = instantiate(cfg.model.optimizer, _convert_="all")
    built = factory([torch.nn.Parameter(torch.zeros(1))])
    assert type(built) is torch.optim.SGD and built.defaults["lr"] == pytest.approx(lr)


@pytest.mark.parametrize("overrides,target,lr", [
    (["model.optimizer.lr=0.01"], "torch.optim.AdamW", 0.01),
    (["experiment=ssdlite_mnv2_coco", "data.root=/coco", "model.optimizer.lr=0.2"], "torch.optim.SGD", 0.2),
    (["model/optimizer=rmsprop", "model.optimizer.lr=0.045"], "torch.optim.RMSprop", 0.045),
])
def test_optimizer_keys_override_from_the_command_line(overrides: list[str], target: str, lr: float) -> None:
    cfg = _compose("train", [*overrides, "paths.output_dir=/tmp/x"])
    assert cfg.model.optimizer._target_ == target and cfg.model.optimizer.lr == pytest.approx(lr)
    assert cfg.model.optimizer._partial_ is True
    if target == "torch.optim.RMSprop":  # TF-style settings
        assert (cfg.model.optimizer.alpha, cfg.model.optimizer.momentum, cfg.model.optimizer.eps) == (0.9, 0.9, 1.0)


def test_synthetic_dir_depends_on_generator_args() -> None:
    a = _compose("train", ["paths.output_dir=/tmp/x"])
    b = _compose("train", ["paths.output_dir=/tmp/x", "synthetic.num_train=7"])
    assert a.synthetic.root != b.synthetic.root  # never clobber the default set
    d = _compose("train", ["task=seg", "paths.output_dir=/tmp/x"])
    assert d.synthetic.root == a.synthetic.root  # det and seg share one generated set


def _factors(schedule: type, steps: int, **kw) -> list[float]:
    """The LR multiplier at steps 0..steps-1, read from a real optimizer (base LR 2.0)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = schedule(opt, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"] / 2.0)
        opt.step()
        sched.step()
    return out


def test_cosine_schedule() -> None:
    f = _factors(WarmupCosineLR, 101, total_steps=100, warmup_steps=10, warmup_factor=0.1)
    assert f[0] == pytest.approx(0.1)
    assert f[5] == pytest.approx(0.1 + 0.9 * 5 / 10)  # linear warmup
    assert f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5)  # half way through the 90 decay steps: cos(pi/2)
    assert f[100] == pytest.approx(0.0, abs=1e-9)
    f = _factors(WarmupCosineLR, 101, total_steps=100, min_factor=0.2)  # no warmup
    assert f[0] == pytest.approx(1.0) and f[50] == pytest.approx(0.2 + 0.8 * 0.5) and f[100] == pytest.approx(0.2)
    f = _factors(WarmupCosineLR, 11, total_steps=200, warmup_fraction=0.05, warmup_factor=0.0)  # 10 warmup steps
    assert f[4] == pytest.approx(0.4) and f[10] == pytest.approx(1.0)
    # warmup_steps wins over warmup_fraction (as experiment=ssdlite_mnv2_coco relies on)
    f = _factors(WarmupCosineLR, 5, total_steps=200, warmup_steps=4, warmup_fraction=0.5, warmup_factor=0.0)
    assert f[2] == pytest.approx(0.5) and f[4] == pytest.approx(1.0)


def test_poly_schedule() -> None:
    f = _factors(WarmupPolyLR, 101, total_steps=100, power=0.9)
    assert f[0] == pytest.approx(1.0)
    assert f[50] == pytest.approx(0.5 ** 0.9)
    assert f[75] == pytest.approx(0.25 ** 0.9)
    assert f[100] == pytest.approx(0.0, abs=1e-9)
    f = _factors(WarmupPolyLR, 56, total_steps=100, warmup_steps=10, warmup_factor=0.001, power=2.0)
    assert f[0] == pytest.approx(0.001) and f[55] == pytest.approx((1 - 45 / 90) ** 2)


def test_exponential_schedule() -> None:
    f = _factors(WarmupExponentialLR, 251, total_steps=1000, decay_rate=0.5, decay_steps=100)
    assert f[99] == pytest.approx(1.0) and f[100] == pytest.approx(0.5)  # staircase
    assert f[250] == pytest.approx(0.25)
    f = _factors(WarmupExponentialLR, 251, total_steps=1000, warmup_steps=50, warmup_factor=0.0, decay_rate=0.5,
                 decay_steps=100)
    assert f[25] == pytest.approx(0.5) and f[50] == pytest.approx(1.0)
    assert f[149] == pytest.approx(1.0) and f[150] == pytest.approx(0.5) and f[250] == pytest.approx(0.25)


def test_constant_schedule() -> None:
    f = _factors(WarmupConstantLR, 20, total_steps=10, warmup_steps=4, warmup_factor=0.2)
    assert f[2] == pytest.approx(0.2 + 0.8 * 2 / 4)
    assert f[4:] == pytest.approx([1.0] * 16)  # past total_steps too


def test_unknown_schedule_is_refused() -> None:
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="(?s)model/scheduler/nope.*cosine.*poly"):  # lists the options
        _compose("train", ["model/scheduler=nope", "paths.output_dir=/tmp/x"])


@pytest.mark.parametrize("schedule,kw,arg", [
    (WarmupCosineLR, {"total_steps": 0}, "total_steps"),
    (WarmupCosineLR, {"total_steps": 10, "warmup_fraction": 1.5}, "warmup_fraction"),
    (WarmupCosineLR, {"total_steps": 10, "min_factor": -0.1}, "min_factor"),
    (WarmupPolyLR, {"total_steps": 10, "power": 0}, "power"),
    (WarmupPolyLR, {"total_steps": 10, "warmup_steps": -1}, "warmup_steps"),
    (WarmupExponentialLR, {"total_steps": 10, "decay_steps": 0}, "decay_steps"),
    (WarmupExponentialLR, {"total_steps": 10, "decay_rate": 1.5}, "decay_rate"),
    (WarmupConstantLR, {"total_steps": 10, "warmup_factor": 2.0}, "warmup_factor"),
])
def test_schedule_arguments_are_checked(schedule: type, kw: dict, arg: str) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ArgumentError, match=f"^{arg} must be"):
        schedule(opt, **kw)


@pytest.mark.parametrize("args,needle", [
    (["model.backbone.width_mult=-1"], "model.backbone.width_mult"),
    (["model.backbone.output_stride=12"], "model.backbone.output_stride"),
    (["data=coco", "data.root=/nonexistent/coco"], "/nonexistent/coco"),
    (["model.backbone.pretrained=/nonexistent/weights.pth"], "/nonexistent/weights.pth"),
    (["trainer=ddp", "trainer.devices=2"], "trainer.sync_batchnorm"),  # + trainer.accelerator=cpu below
    (["model.scheduler.warmup_fraction=2"], "model.scheduler.warmup_fraction"),
    (["model/optimizer=sgd"], "model.optimizer.lr"),  # lr: ??? (Hydra would drop it from the partial)
])
def test_bad_input_fails_at_startup_with_one_line(run_tool, tmp_path: Path, args: list[str], needle: str) -> None:
    r = run_tool("train.py", [*args, "trainer.accelerator=cpu"], tmp_path / "cache", tmp_path / "run")
    assert r.returncode == 2, r.stderr[-2000:]
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and needle in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "cache" / "synthetic").exists()  # failed before any data was generated/read


def test_unknown_key_is_refused(run_tool, tmp_path: Path) -> None:
    r = run_tool("train.py", ["model.backbone.widht_mult=1.0"], tmp_path / "cache", tmp_path / "run")
    assert r.returncode != 0 and "widht_mult" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("task", ["det", "seg"])
def test_train_then_evaluate_round_trip(run_tool, tmp_path: Path, task: str) -> None:
    cache, run = tmp_path / "cache", tmp_path / "train"
    r = run_tool("train.py", [f"task={task}", *TINY, *TASK_TINY[task]], cache, run)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metric = "map" if task == "det" else "miou"
    trained = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= trained[metric] <= 1.0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "csv" / "metrics.csv").is_file() and any((run / "tensorboard").iterdir())
    assert (run / "config.yaml").is_file()

    best = sorted((run / "checkpoints").glob("best-*.ckpt"))  # what the training run evaluated at its end
    assert len(best) == 1, best
    ckpt = load_checkpoint(best[0])
    info = ckpt["mnv2"]
    assert info["task"] == task and info["config"]["model"]["_target_"].endswith("Module")
    num_classes = 6 if task == "det" else 7  # data.num_classes: auto, resolved from the data
    assert len(info["meta"]["class_names"]) == num_classes
    assert info["config"]["data"]["num_classes"] == info["config"]["model"]["num_classes"] == num_classes

    # evaluate needs only the checkpoint (+ the data, here the same tiny synthetic set)
    ev = tmp_path / "eval"
    r = run_tool("evaluate.py", [f"task={task}", f"ckpt_path={best[0]}", "save_predictions=true",
                             *[a for a in TINY if not a.startswith(("trainer.max", "model."))],
                             *[a for a in TASK_TINY[task] if not a.startswith("model.")]], cache, ev)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    evaluated = json.loads((ev / "metrics.json").read_text())
    # the same checkpoint on the same val data: exactly the training run's final evaluation (an evaluate
    # that does not load the checkpoint's weights, or reads the data differently, fails here)
    assert evaluated == trained
    if task == "det":  # mAP alone can tie (both ~0 after one tiny epoch): the detections themselves match
        assert (ev / "detections.json").read_text() == (run / "detections.json").read_text()
    # one picture (det: JPEG with boxes) or palette mask (seg: PNG) per val image, at its own size
    pictures = sorted((ev / "predictions").iterdir())
    assert len(pictures) == 6 and {p.suffix for p in pictures} == {".jpg" if task == "det" else ".png"}
    if task == "det":
        assert (ev / "detections.json").is_file()
        assert "Average Precision" in r.stdout
        from PIL import Image

        images = {p.stem: p for p in (cache / "synthetic").rglob("val2017/*.jpg")}
        for p in pictures:
            assert Image.open(p).size == Image.open(images[p.stem]).size

    # the wrong task is refused with the fix
    r = run_tool("evaluate.py", ["task=" + ("seg" if task == "det" else "det"),
                             f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"], cache, tmp_path / "bad")
    assert r.returncode == 2 and f"task={task}" in r.stderr


def test_load_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_checkpoint(tmp_path / "missing.ckpt")
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(DataError, match="no mnv2 run config"):
        load_checkpoint(plain)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a readable"):
        load_checkpoint(junk)
