"""Ours vs the peers: models under test, timing, the report, the variants table, the flow."""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backbone.benchmark.machine import (
    cpu_model,
    format_top_ops,
    latencies,
    matmul_peak_gflops,
    p90,
    peak_memory,
    time_calls,
    top_ops,
)
from backbone.benchmark.probes import coco_eval_speed, loader_speed, onnx_latency
from backbone.complexity import count_madds, count_params
from backbone.errors import ConfigError
from backbone.runtime import applied
from backbone.training.voc_format import IGNORE_INDEX

log = logging.getLogger("mnv2.benchmark")

# ours / peer targets (issue #11): (metric, peer, minimum ratio)
TARGETS: dict[str, list[tuple[str, str, float]]] = {
    "det": [("train_img_s", "tv_ssdlite320_mnv3", 1.3), ("eval_img_s", "tv_ssdlite320_mnv3", 3.0)],
    "seg": [("train_img_s", "tv_deeplabv3_mnv3", 1.5), ("eval_img_s", "tv_deeplabv3_mnv3", 1.5),
            ("train_img_s", "tv_lraspp_mnv3", 1.2), ("eval_img_s", "tv_lraspp_mnv3", 1.2)],
}
MIN_EFFICIENCY = 0.35          # our forward: MAdds x 2 / time / matmul peak
MAX_EXPORTED_LATENCY = 0.25    # det: ONNX Runtime batch-1 / torchvision's eager batch-1 call
MIN_LOADER_OVER_TRAIN = 3.0    # the train loader alone / our train step, img/s


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


# ----------------------------------------------------------------------------- models under test
@dataclass
class Candidate:
    """One model under test: its network and the three calls that are timed.

    train_step(): one forward + loss + backward + optimizer step on the shared batch.
    eval_call(images): the whole eval call (forward + post-processing) -> anything.
    forward(images): the network alone (no post-processing), for the efficiency figure.
    module: ours: the LightningModule (for the ONNX export); None for the peers.
    """

    name: str
    model: nn.Module
    train_step: Callable[[], Any]
    eval_call: Callable[[torch.Tensor], Any]
    forward: Callable[[torch.Tensor], Any]
    ours: bool = False
    module: Any = None
    results: dict[str, Any] = field(default_factory=dict)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision in ("bf16-mixed", "bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision in ("16-mixed", "16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def det_batch(batch_size: int, size: int, boxes_per_image: int, num_classes: int, seed: int = 0
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images (B, 3, S, S) and padded targets: boxes (B, M, 4) normalised xyxy, labels (B, M) 1..K,
    valid (B, M) bool; image i has 1 + (i % boxes_per_image) boxes... at most boxes_per_image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, size, size, generator=g)
    M = max(1, boxes_per_image)
    wh = 0.05 + 0.55 * torch.rand(batch_size, M, 2, generator=g)
    xy = torch.rand(batch_size, M, 2, generator=g) * (1 - wh)
    boxes = torch.cat([xy, xy + wh], dim=-1)
    labels = torch.randint(1, num_classes + 1, (batch_size, M), generator=g)
    counts = torch.randint(max(1, M // 2), M + 1, (batch_size,), generator=g)
    valid = torch.arange(M)[None] < counts[:, None]
    return images, {"boxes": boxes, "labels": labels, "valid": valid}


def seg_batch(batch_size: int, size: int, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, S, S) and masks (B, S, S) long of blocky classes with an ignored (255) border."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, size, size, generator=g)
    coarse = torch.randint(0, num_classes, (batch_size, 1, max(1, size // 32), max(1, size // 32)), generator=g)
    masks = F.interpolate(coarse.float(), size=(size, size), mode="nearest")[:, 0].long()
    masks[:, :4] = IGNORE_INDEX
    masks[:, :, :4] = IGNORE_INDEX
    return images, masks


def _optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=4e-5)


def _step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor],
          device: torch.device, precision: str) -> Callable[[], Any]:
    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            loss = loss_fn()
        loss.backward()
        opt.step()
    return step


def _eval_wrap(model: nn.Module, fn: Callable[[torch.Tensor], Any], device: torch.device,
               precision: str) -> Callable[[torch.Tensor], Any]:
    @torch.inference_mode()
    def call(images: torch.Tensor) -> Any:
        model.eval()
        with _autocast(device, precision):
            return fn(images)
    return call


def build_our_module(model_cfg: Any, device: torch.device) -> Any:
    """The configured LightningModule on ``device`` (random init: the caller sets pretrained=none).
    Its ``model`` trains; its ``inference_model()`` (BatchNorm folded, backbone.fuse) evaluates, as in
    validation, tools/evaluate.py and tools/predict.py."""
    from backbone.training.runner import build

    return build(model_cfg, "model").to(device)


def _compiled(net: nn.Module, cfg: Any) -> Callable[..., Any]:
    return torch.compile(net) if cfg.get("compile") else net


def det_candidates(model_cfg: Any, cfg: Any, device: torch.device, peers: bool = True
                   ) -> tuple[list[Candidate], torch.Tensor]:
    """Ours (+ torchvision SSDLite320-MobileNetV3 with ``peers``) on the same batch."""
    import torchvision

    size = int(model_cfg.image_size)
    K = int(cfg.num_classes)
    B = int(cfg.batch_size)
    images, targets = det_batch(B, size, int(cfg.boxes_per_image), K)
    images = images.to(device)
    targets = {k: v.to(device) for k, v in targets.items()}
    precision = str(cfg.precision)
    lr = float(cfg.lr)
    module = build_our_module(model_cfg, device)
    ours = module.model
    net = _compiled(ours, cfg)  # compile=true: the network (not NMS) compiled
    infer = module.inference_model()  # weights frozen between the timed calls: built once
    infer_net = _compiled(infer, cfg)
    sizes = torch.full((B, 2), size, device=device)
    opt = _optimizer(ours, lr)

    def our_loss() -> torch.Tensor:
        return ours.compute_loss(net(images), targets)["loss"]

    def our_eval(x: torch.Tensor) -> Any:
        return infer.postprocess(infer_net(x), sizes[: x.shape[0]])

    cands = [Candidate("ours_ssdlite_mnv2", ours, _step(ours, opt, our_loss, device, precision),
                       _eval_wrap(infer, our_eval, device, precision),
                       _eval_wrap(infer, lambda x: infer_net(x), device, precision), ours=True, module=module)]
    if not peers:
        return cands, images

    peer = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=K + 1).to(device)
    peer.transform.fixed_size = (size, size)  # its transform resizes to 320 whatever the input: same size as ours
    scale = torch.tensor([size, size, size, size], dtype=torch.float32, device=device)
    tv_targets = [{"boxes": targets["boxes"][i][targets["valid"][i]] * scale,
                   "labels": targets["labels"][i][targets["valid"][i]]} for i in range(B)]
    peer_opt = _optimizer(peer, lr)

    def peer_loss() -> torch.Tensor:
        return sum(peer(list(images), tv_targets).values())

    def peer_forward(x: torch.Tensor) -> Any:  # transform + backbone + head, no post-processing
        imgs, _ = peer.transform(list(x))
        feats = list(peer.backbone(imgs.tensors).values())
        return peer.head(feats)

    cands.append(Candidate("tv_ssdlite320_mnv3", peer, _step(peer, peer_opt, peer_loss, device, precision),
                           _eval_wrap(peer, lambda x: peer(list(x)), device, precision),
                           _eval_wrap(peer, peer_forward, device, precision)))
    return cands, images


def seg_candidates(model_cfg: Any, cfg: Any, device: torch.device, peers: bool = True
                   ) -> tuple[list[Candidate], torch.Tensor]:
    """Ours (+ torchvision DeepLabv3- and LR-ASPP-MobileNetV3 with ``peers``) on the same batch."""
    import torchvision

    K = int(model_cfg.num_classes)
    B = int(cfg.batch_size)
    size = int(cfg.image_size)
    images, masks = seg_batch(B, size, K)
    images, masks = images.to(device), masks.to(device)
    precision = str(cfg.precision)
    lr = float(cfg.lr)
    cands = []

    def add(name: str, net: nn.Module, fwd: Callable[[torch.Tensor], torch.Tensor], ours: bool = False,
            module: Any = None, infer: nn.Module | None = None,
            infer_fwd: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        opt = _optimizer(net, lr)
        infer, infer_fwd = infer or net, infer_fwd or fwd

        def loss() -> torch.Tensor:
            return F.cross_entropy(fwd(images).float(), masks, ignore_index=IGNORE_INDEX)

        cands.append(Candidate(name, net, _step(net, opt, loss, device, precision),
                               _eval_wrap(infer, lambda x: infer_fwd(x).argmax(1), device, precision),
                               _eval_wrap(infer, infer_fwd, device, precision), ours=ours, module=module))

    module = build_our_module(model_cfg, device)
    infer = module.inference_model()
    add("ours_deeplabv3_mnv2", module.model, _compiled(module.model, cfg), ours=True, module=module, infer=infer,
        infer_fwd=_compiled(infer, cfg))
    if not peers:
        return cands, images
    seg = torchvision.models.segmentation
    dl = seg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=K).to(device)
    add("tv_deeplabv3_mnv3", dl, lambda x: dl(x)["out"])
    lr_ = seg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=K).to(device)
    add("tv_lraspp_mnv3", lr_, lambda x: lr_(x)["out"])
    return cands, images


def measure(cands: list[Candidate], images: torch.Tensor, cfg: Any, device: torch.device) -> None:
    """Fill each candidate's results; the rounds interleave the candidates (ABAB...) and medians are kept."""
    B = images.shape[0]
    one = images[:1].contiguous()
    warmup, iters, repeats, lat_iters = (int(cfg.warmup), int(cfg.iters), int(cfg.repeats), int(cfg.latency_iters))
    for c in cands:  # warm up every path once (allocator, oneDNN primitive caches, lazy inits)
        for _ in range(warmup):
            c.train_step()
            c.eval_call(images)
            c.forward(images)
            c.eval_call(one)
    train: dict[str, list[float]] = {c.name: [] for c in cands}
    evals: dict[str, list[float]] = {c.name: [] for c in cands}
    fwd: dict[str, list[float]] = {c.name: [] for c in cands}
    lat: dict[str, list[float]] = {c.name: [] for c in cands}
    for r in range(repeats):
        for c in cands:
            train[c.name].append(B / time_calls(c.train_step, iters, device))
        for c in cands:
            evals[c.name].append(B / time_calls(lambda c=c: c.eval_call(images), iters, device))
        for c in cands:
            fwd[c.name].append(B / time_calls(lambda c=c: c.forward(images), iters, device))
        for c in cands:
            lat[c.name].extend(latencies(lambda c=c: c.eval_call(one), lat_iters, device))
        log.info("round %d/%d done", r + 1, repeats)
    for c in cands:
        with peak_memory(device) as mem:
            c.train_step()
        c.results.update(train_img_s=statistics.median(train[c.name]), eval_img_s=statistics.median(evals[c.name]),
                         forward_img_s=statistics.median(fwd[c.name]),
                         latency_ms_median=1e3 * statistics.median(lat[c.name]),
                         latency_ms_p90=1e3 * p90(lat[c.name]), train_peak_mb=mem["peak_mb"],
                         train_img_s_runs=train[c.name], eval_img_s_runs=evals[c.name])


def complexity(c: Candidate, size: int) -> None:
    model = c.model
    c.results["params"] = count_params(model)
    if c.ours:
        c.results["madds"] = count_madds(model, (1, 3, size, size))
    else:  # torchvision detection models take a list: count their network like ours (transform excluded)
        c.results["madds"] = _count_fn_madds(lambda x: c.forward(x), model, size)
    # ours' eval network has no BatchNorm left (folded): count on the training network
    c.results["bn_activations"] = _count_bn_outputs(model, c.model if c.ours else c.forward, size)


def _count_bn_outputs(model: nn.Module, fn: Callable[[torch.Tensor], Any], size: int) -> int:
    """Elements written by the BatchNorm layers for one image: what each train step's BatchNorm and
    activation passes (forward and backward) read and write, the memory-bound part of training."""
    total = [0]

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        total[0] += out.numel()

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_hook(hook) for m in norms]
    was_training = model.training
    p = next(model.parameters())
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(p.device)
    try:
        model.eval()
        with torch.no_grad():
            fn(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total[0]


def _count_fn_madds(fn: Callable[[torch.Tensor], Any], model: nn.Module, size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(p.device)
    counter = FlopCounterMode(display=False)
    with counter:
        fn(x)
    return int(counter.get_total_flops()) // 2


def profile_candidates(cands: list[Candidate], images: torch.Tensor, rows: int, device: torch.device
                       ) -> dict[str, dict[str, Any]]:
    """Top ops by self time of every model's train step and eval call (2 calls each), printed."""
    out: dict[str, dict[str, Any]] = {}
    for c in cands:
        out[c.name] = {"train_step": top_ops(c.train_step, 2, rows, device),
                       "eval_call": top_ops(lambda c=c: c.eval_call(images), 2, rows, device)}
        for phase, prof in out[c.name].items():
            print(format_top_ops(f"profile {c.name} {phase} (batch {images.shape[0]})", prof), flush=True)
    return out


# ----------------------------------------------------------------------------- report
def ratios(task: str, cands: list[Candidate]) -> list[dict[str, Any]]:
    res = {c.name: c.results for c in cands}
    ours = next(c for c in cands if c.ours).results
    out = []
    for metric, peer, target in TARGETS[task]:
        if peer in res:
            r = ours[metric] / res[peer][metric]
            out.append({"metric": metric, "peer": peer, "ratio": r, "target": target, "met": r >= target})
    for c in cands:
        if not c.ours:
            out.append({"metric": "latency_speedup", "peer": c.name,
                        "ratio": c.results["latency_ms_median"] / ours["latency_ms_median"], "target": None,
                        "met": None})
    return out


def format_table(cands: list[Candidate], peak: float) -> str:
    head = (f"{'model':<22} {'params':>7} {'MAdds':>7} {'BN act':>7} {'train':>8} {'eval':>8} {'fwd':>8} {'eff':>6} "
            f"{'lat med':>8} {'lat p90':>8} {'peak MB':>8}")
    lines = [head, f"{'':<22} {'M':>7} {'G':>7} {'M':>7} {'img/s':>8} {'img/s':>8} {'img/s':>8} {'%':>6} {'ms':>8} "
                   f"{'ms':>8}"]
    for c in cands:
        r = c.results
        lines.append(f"{c.name:<22} {r['params'] / 1e6:>7.2f} {r['madds'] / 1e9:>7.2f} "
                     f"{r['bn_activations'] / 1e6:>7.2f} {r['train_img_s']:>8.2f} "
                     f"{r['eval_img_s']:>8.2f} {r['forward_img_s']:>8.2f} {100 * r['forward_efficiency']:>6.1f} "
                     f"{r['latency_ms_median']:>8.1f} {r['latency_ms_p90']:>8.1f} {r['train_peak_mb']:>8.0f}")
    lines.append(f"(matmul peak {peak:.1f} GFLOP/s; eff = MAdds x 2 x fwd img/s / peak; BN act = elements the "
                 "BatchNorm layers write per image)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- variants
def det_variant_overrides() -> list[tuple[str, list[str], int]]:
    return [(f"SSDLite w{w} {s}", [f"model.backbone.width_mult={w}", f"model.image_size={s}"], s)
            for w in (0.35, 0.5, 0.75, 1.0, 1.4) for s in (300, 320)]


def seg_variant_overrides() -> list[tuple[str, list[str], int]]:
    return [(f"DeepLabv3 w{w} {h} OS{os_}", [f"model.backbone.width_mult={w}", f"model.head={h}",
                                                f"model.backbone.output_stride={os_}"], 0)
            for w in (0.35, 0.5, 0.75, 1.0, 1.4) for h in ("lite", "aspp") for os_ in (16, 8)]


def _variant_rows(task: str, model_cfg: Any, cfg: Any, device: torch.device) -> list[dict[str, Any]]:
    """Params, MAdds, batch-1 latency and train img/s of the standard variants (short measurements)."""
    from omegaconf import OmegaConf

    rows = []
    specs = det_variant_overrides() if task == "det" else seg_variant_overrides()
    for name, overrides, size in specs:
        vcfg = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True))
        for o in overrides:
            key, value = o.split("=", 1)
            OmegaConf.update(vcfg, key.removeprefix("model."), _parse(value), force_add=True)
        cands, images = (det_candidates if task == "det" else seg_candidates)(vcfg, cfg, device, peers=False)
        ours = cands[0]
        size = size or int(cfg.image_size)
        ours.train_step()
        train = images.shape[0] / time_calls(ours.train_step, max(1, int(cfg.variant_iters)), device)
        one = images[:1].contiguous()
        ours.eval_call(one)
        lat = latencies(lambda c=ours, x=one: c.eval_call(x), max(3, int(cfg.variant_iters) * 2), device)
        rows.append({"variant": name, "input": size, "params": count_params(ours.model),
                     "madds": count_madds(ours.model, (1, 3, size, size)),
                     "latency_ms": 1e3 * statistics.median(lat), "train_img_s": train})
        del cands
        gc.collect()
    return rows


def _parse(value: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.create(f"v: {value}")["v"]


def variants_markdown(rows: list[dict[str, Any]], device_note: str) -> str:
    lines = ["| variant | input | params | MAdds | batch-1 latency | train img/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['input']} | {r['params'] / 1e6:.2f}M | {r['madds'] / 1e9:.2f}B | "
                     f"{r['latency_ms']:.1f} ms | {r['train_img_s']:.2f} |")
    lines.append(f"\n({device_note}; `python tools/benchmark.py task=... variants=true`)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the flow
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError("device", f"must be cpu, cuda or auto, got {name!r}", "device=cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "is cuda but no CUDA device is available", "device=cpu")
    return torch.device(name)


def benchmark(cfg: Any, out_dir: Path) -> dict[str, Any]:
    """Run the benchmark configured by ``conf/benchmark.yaml``; print the table; write ``benchmark.json``."""
    import torchvision
    from omegaconf import OmegaConf, open_dict

    task = str(cfg.task_name)
    if task not in TARGETS:
        raise ConfigError("task", f"must be det or seg, got {task!r}", "task=det or task=seg")
    device = resolve_device(str(cfg.device))
    if cfg.threads is not None:
        if int(cfg.threads) < 1:
            raise ConfigError("threads", f"must be >= 1, got {cfg.threads}", "e.g. threads=4")
        torch.set_num_threads(int(cfg.threads))
    for key in ("warmup", "iters", "repeats", "latency_iters"):
        if int(cfg[key]) < (0 if key == "warmup" else 1):
            raise ConfigError(key, f"must be >= {0 if key == 'warmup' else 1}, got {cfg[key]}")
    if str(cfg.precision) not in ("32", "bf16-mixed", "16-mixed"):
        raise ConfigError("precision", f"must be 32, bf16-mixed or 16-mixed, got {cfg.precision}", "precision=32")
    with open_dict(cfg):
        if cfg.batch_size is None:
            cfg.batch_size = 8 if task == "det" else 4
        if int(cfg.batch_size) < 2:
            raise ConfigError("batch_size", f"must be >= 2 (train-mode BatchNorm on the 1x1 maps), got {cfg.batch_size}",
                              "batch_size=2 or more; batch-1 latency is measured anyway")
        num_classes = cfg.num_classes if cfg.num_classes is not None else (80 if task == "det" else 21)
        cfg.num_classes = int(num_classes)
        cfg.model.num_classes = int(num_classes)
        if cfg.image_size is None:
            cfg.image_size = 320 if task == "det" else 513
        if task == "det":
            cfg.model.image_size = int(cfg.image_size)
        cfg.model.backbone.pretrained = "none"
    torch.manual_seed(int(cfg.seed))
    model_cfg = cfg.model
    size = int(cfg.image_size)
    machine = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
               else cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "torchvision": torchvision.__version__, "precision": str(cfg.precision),
               "batch_size": int(cfg.batch_size), "input": size,
               "cpu_allocator": applied()["cpu_allocator"]}
    print(f"benchmark task={task}: {machine['device_name']} ({device}), {machine['threads']} threads, torch "
          f"{torch.__version__}, torchvision {torchvision.__version__}, precision {cfg.precision}, "
          f"batch {cfg.batch_size}, input {size}, cpu_allocator {machine['cpu_allocator']}", flush=True)
    peak = matmul_peak_gflops(device)
    machine["matmul_peak_gflops"] = peak

    cands, images = (det_candidates if task == "det" else seg_candidates)(model_cfg, cfg, device)
    for c in cands:
        complexity(c, size)
    measure(cands, images, cfg, device)
    peak = max(peak, matmul_peak_gflops(device))  # again after the runs: the best of both is the peak
    machine["matmul_peak_gflops"] = peak
    for c in cands:
        c.results["forward_efficiency"] = c.results["madds"] * 2 * c.results["forward_img_s"] / (peak * 1e9)
    table = format_table(cands, peak)
    print(table)
    rat = ratios(task, cands)
    for r in rat:
        tgt = f" (target >= {r['target']}: {'met' if r['met'] else 'NOT met'})" if r["target"] else ""
        print(f"ours / {r['peer']} {r['metric']}: {r['ratio']:.2f}x{tgt}")
    eff = next(c for c in cands if c.ours).results["forward_efficiency"]
    print(f"ours forward efficiency: {100 * eff:.1f} % of the matmul peak (target >= {100 * MIN_EFFICIENCY:.0f} %: "
          f"{_met(eff >= MIN_EFFICIENCY)})")

    result: dict[str, Any] = {"task": task, "machine": machine,
                              "settings": {k: cfg[k] for k in ("warmup", "iters", "repeats", "latency_iters", "lr")},
                              "model": OmegaConf.to_container(model_cfg, resolve=True),
                              "models": {c.name: c.results for c in cands}, "ratios": rat}
    ours = next(c for c in cands if c.ours)
    peer_latency = {c.name: c.results["latency_ms_median"] for c in cands if not c.ours}
    if cfg.get("profile"):
        result["profile"] = profile_candidates(cands, images, int(cfg.profile_rows), device)
    if cfg.onnx and device.type == "cpu":
        with tempfile.TemporaryDirectory() as tmp:
            result["onnxruntime_batch1"] = onnx_latency(task, ours.module, size,
                                                        int(cfg.latency_iters), Path(tmp))
        o = result["onnxruntime_batch1"]
        print(f"ONNX Runtime batch-1: skipped: {o['skipped']}" if "skipped" in o else
              f"ONNX Runtime batch-1 {ours.name}: median {o['latency_ms_median']:.1f} ms, p90 "
              f"{o['latency_ms_p90']:.1f} ms (eager {ours.results['latency_ms_median']:.1f} ms)")
        if "skipped" not in o:
            for name, ms in peer_latency.items():
                o[f"over_{name}_eager"] = r = o["latency_ms_median"] / ms
                ok = r <= MAX_EXPORTED_LATENCY
                target = f" (target <= {MAX_EXPORTED_LATENCY}: {_met(ok)})" if task == "det" else ""
                print(f"ONNX Runtime batch-1 ours / {name} eager batch-1: {r:.2f}x{target}")
    del cands, images
    gc.collect()
    if task == "det" and int(cfg.coco_eval_images) > 0:
        ce = coco_eval_speed(int(cfg.coco_eval_images), int(cfg.coco_eval_dets_per_image))
        result["coco_eval"] = ce
        print(f"COCO eval of {ce['num_images']} images ({ce['num_detections']} detections): " + ", ".join(
            f"{k[:-2]} {v:.1f} s" for k, v in ce.items() if k.endswith("_s")) +
            (f", max |stat diff| {ce['max_abs_stat_diff']:.2e}" if "max_abs_stat_diff" in ce else
             f" (faster_coco_eval: {ce.get('faster_coco_eval')})"))
    if cfg.loader:
        ld = loader_speed(cfg.data, int(cfg.loader_batches))
        ld["train_img_s"] = ours.results["train_img_s"]
        ld["loader_over_train"] = ld["img_s"] / ours.results["train_img_s"]
        result["loader"] = ld
        print(f"train loader alone ({ld['num_workers']} workers, batch {ld['batch_size']}): {ld['img_s']:.1f} img/s "
              f"= {ld['loader_over_train']:.1f}x our train step (target >= {MIN_LOADER_OVER_TRAIN}: "
              f"{_met(ld['loader_over_train'] >= MIN_LOADER_OVER_TRAIN)})")
    if cfg.variants:
        rows = _variant_rows(task, model_cfg, cfg, device)
        result["variants"] = rows
        md = variants_markdown(rows, f"{machine['device_name']}, {machine['threads']} threads, batch "
                                     f"{cfg.batch_size} train, torch {torch.__version__}")
        result["variants_markdown"] = md
        print(md)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "benchmark.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    print(f"written {path}")
    return result

