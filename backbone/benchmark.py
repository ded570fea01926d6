"""Speed benchmark of our models against torchvision's mobile peers, in ONE process.

``python tools/benchmark.py task=det|seg [model.*=...] [device=cpu|cuda] [threads=N] [batch_size=B]
[variants=true]`` (config ``conf/benchmark.yaml``).

Every model gets the same inputs and settings (device, threads, precision, optimizer):

- det: SSDLite-MobileNetV2 (``conf/model/ssdlite_mnv2.yaml`` + overrides) vs torchvision
  ``ssdlite320_mobilenet_v3_large``; seg: Mobile DeepLabv3 (``conf/model/deeplabv3_mnv2.yaml``) vs
  ``deeplabv3_mobilenet_v3_large`` and ``lraspp_mobilenet_v3_large``. All random init
  (``weights=None, weights_backbone=None``); det uses ``num_classes`` object classes + background on
  both sides.
- train step: forward + loss + backward + optimizer step (AdamW) on realistic targets (det: 1..
  ``boxes_per_image`` random boxes per image, COCO averages ~7; seg: random masks with 255 borders).
- eval: det forward + decode + NMS (ours: ``SSDLite.postprocess``; torchvision: its eval forward,
  which includes its transform and post-processing); seg forward + upsample + argmax.
- batch-1 latency of the whole eval call (median and p90), forward-only img/s and its efficiency
  (MAdds x 2 / time / the machine's torch.mm 2048^2 GFLOP/s on the same threads).
- peak memory of one train step: CPU peak RSS growth (``VmHWM``, reset through
  ``/proc/self/clear_refs``) or CUDA max allocated.

Timings are interleaved (ours, peer, ours, peer, ... ``repeats`` rounds) and medians taken, so
machine noise hits every model alike. Ratios ours / peer are printed with the project's targets.

Also: ONNX Runtime batch-1 latency of our exported model (``backbone.export``, when onnxruntime is
importable), COCO scoring time pycocotools vs faster-coco-eval (det), the train loader alone
(``loader=true``), ``precision=bf16-mixed`` / ``compile=true`` / ``model.memory_format=...`` to compare
levers, and a README table of variants (``variants=true``).
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backbone.complexity import count_madds, count_params
from backbone.errors import ConfigError

log = logging.getLogger("mnv2.benchmark")

# ours / peer targets (issue #11): (metric, peer, minimum ratio)
TARGETS: dict[str, list[tuple[str, str, float]]] = {
    "det": [("train_img_s", "tv_ssdlite320_mnv3", 1.3), ("eval_img_s", "tv_ssdlite320_mnv3", 3.0)],
    "seg": [("train_img_s", "tv_deeplabv3_mnv3", 1.5), ("eval_img_s", "tv_deeplabv3_mnv3", 1.5),
            ("train_img_s", "tv_lraspp_mnv3", 1.2), ("eval_img_s", "tv_lraspp_mnv3", 1.2)],
}
IGNORE_INDEX = 255


# ----------------------------------------------------------------------------- machine
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(device: torch.device, n: int = 2048, iters: int = 5) -> float:
    """Best-of-``iters`` torch.mm n x n fp32 GFLOP/s on the current threads (the machine's practical peak)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    sync(device)
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Yields a dict that gets ``peak_mb``: the peak memory growth over the block (CUDA: max allocated)."""
    out: dict[str, float] = {}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        sync(device)
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        return
    reset = _reset_hwm()
    base = _rss_kb("VmRSS")
    yield out
    out["peak_mb"] = (_rss_kb("VmHWM") - base) / 1024 if reset and base >= 0 else float("nan")


def _rss_kb(key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def _reset_hwm() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0); False where that is not possible."""
    with contextlib.suppress(OSError, AttributeError):  # hand freed heap back first, so the growth is real
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- models under test
@dataclass
class Candidate:
    """One model under test: its network and the three calls that are timed.

    train_step(): one forward + loss + backward + optimizer step on the shared batch.
    eval_call(images): the whole eval call (forward + post-processing) -> anything.
    forward(images): the network alone (no post-processing), for the efficiency figure.
    """

    name: str
    model: nn.Module
    train_step: Callable[[], Any]
    eval_call: Callable[[torch.Tensor], Any]
    forward: Callable[[torch.Tensor], Any]
    ours: bool = False
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


def build_our_network(model_cfg: Any) -> nn.Module:
    """The network inside the configured LightningModule (random init: the caller sets pretrained=none)."""
    from backbone.training.runner import build

    module = build(model_cfg, "model")
    net = getattr(module, "model", module)
    net.lightning_module = [module]  # (in a list: not a submodule) for the exporter
    return net


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
    ours = build_our_network(model_cfg).to(device)
    net = torch.compile(ours) if cfg.get("compile") else ours  # compile=true: the network (not NMS) compiled
    sizes = torch.full((B, 2), size, device=device)
    opt = _optimizer(ours, lr)

    def our_loss() -> torch.Tensor:
        return ours.compute_loss(net(images), targets)["loss"]

    def our_eval(x: torch.Tensor) -> Any:
        return ours.postprocess(net(x), sizes[: x.shape[0]])

    cands = [Candidate("ours_ssdlite_mnv2", ours, _step(ours, opt, our_loss, device, precision),
                       _eval_wrap(ours, our_eval, device, precision),
                       _eval_wrap(ours, lambda x: net(x), device, precision), ours=True)]
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

    def add(name: str, net: nn.Module, fwd: Callable[[torch.Tensor], torch.Tensor], ours: bool = False) -> None:
        opt = _optimizer(net, lr)

        def loss() -> torch.Tensor:
            return F.cross_entropy(fwd(images).float(), masks, ignore_index=IGNORE_INDEX)

        cands.append(Candidate(name, net, _step(net, opt, loss, device, precision),
                               _eval_wrap(net, lambda x: fwd(x).argmax(1), device, precision),
                               _eval_wrap(net, fwd, device, precision), ours=ours))

    ours = build_our_network(model_cfg).to(device)
    add("ours_deeplabv3_mnv2", ours, torch.compile(ours) if cfg.get("compile") else ours, ours=True)
    if not peers:
        return cands, images
    seg = torchvision.models.segmentation
    dl = seg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=K).to(device)
    add("tv_deeplabv3_mnv3", dl, lambda x: dl(x)["out"])
    lr_ = seg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=K).to(device)
    add("tv_lraspp_mnv3", lr_, lambda x: lr_(x)["out"])
    return cands, images


# ----------------------------------------------------------------------------- timing
def _time(fn: Callable[[], Any], iters: int, device: torch.device) -> float:
    """Seconds per call, averaged over ``iters`` calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def _latencies(fn: Callable[[], Any], iters: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def p90(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]


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
            train[c.name].append(B / _time(c.train_step, iters, device))
        for c in cands:
            evals[c.name].append(B / _time(lambda c=c: c.eval_call(images), iters, device))
        for c in cands:
            fwd[c.name].append(B / _time(lambda c=c: c.forward(images), iters, device))
        for c in cands:
            lat[c.name].extend(_latencies(lambda c=c: c.eval_call(one), lat_iters, device))
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


def _count_fn_madds(fn: Callable[[torch.Tensor], Any], model: nn.Module, size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(p.device)
    counter = FlopCounterMode(display=False)
    with counter:
        fn(x)
    return int(counter.get_total_flops()) // 2


# ----------------------------------------------------------------------------- exported runtime
def onnx_latency(task: str, module: Any, size: int, iters: int, tmp: Path) -> dict[str, Any]:
    """Batch-1 latency of our whole model (det: with its NMS) through ONNX Runtime, exported by
    ``backbone.export.onnx`` (the same graph ``tools/export.py`` writes); a reason when skipped."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {"skipped": "onnxruntime is not installed (pip install onnxruntime)"}
    try:
        from backbone.export.onnx import OnnxModel, export
        if task == "det":
            from mnv2det.export import build_export as build_det
        else:
            from mnv2seg.export import build_export as build_seg
    except ImportError as e:
        return {"skipped": f"backbone.export is not available ({e})"}
    import numpy as np

    path = tmp / f"ours_{task}.onnx"
    try:
        module = module.cpu().eval()
        wrapper, example, meta = (build_det(module, {}, nms=True) if task == "det" else
                                  build_seg(module, {}, {}, argmax=True, input_size=size))
        export(wrapper, example, meta, path)
        runner = OnnxModel(path, threads=torch.get_num_threads())
    except Exception as e:  # noqa: BLE001 -- report, do not abort the benchmark over an exporter gap
        return {"skipped": f"export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    H, W = runner.metadata["input_size"]
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, H, W)).astype(np.float32)
    for _ in range(3):
        runner(x)
    lat = _latencies(lambda: runner(x), iters, torch.device("cpu"))
    return {"latency_ms_median": 1e3 * statistics.median(lat), "latency_ms_p90": 1e3 * p90(lat),
            "what": "det: network + decode + NMS graph" if task == "det" else "seg: network + argmax graph"}


# ----------------------------------------------------------------------------- COCO evaluation speed
def coco_eval_speed(num_images: int, dets_per_image: int, num_classes: int = 80, seed: int = 0) -> dict[str, Any]:
    """Seconds to score ``num_images`` images' worth of detections: pycocotools vs faster-coco-eval
    (same synthetic ground truth and detections, bbox AP; stats compared)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    aid = 1
    for i in range(1, num_images + 1):
        images.append({"id": i, "width": 640, "height": 480})
        n = int(rng.integers(1, 15))
        xy = rng.uniform(0, 400, (n, 2))
        wh = rng.uniform(8, 240, (n, 2))
        cats = rng.integers(1, num_classes + 1, n)
        for b in range(n):
            anns.append({"id": aid, "image_id": i, "category_id": int(cats[b]), "iscrowd": 0,
                         "bbox": [*map(float, xy[b]), *map(float, wh[b])], "area": float(wh[b].prod())})
            aid += 1
        # detections: jittered copies of the GT plus random boxes, dets_per_image in all
        j = rng.integers(0, n, dets_per_image)
        bx = np.concatenate([xy[j], wh[j]], 1) + rng.normal(0, 12, (dets_per_image, 4))
        bx[:, 2:] = np.abs(bx[:, 2:]) + 1
        sc = rng.uniform(0, 1, dets_per_image)
        dc = np.where(rng.uniform(size=dets_per_image) < 0.7, cats[j], rng.integers(1, num_classes + 1, dets_per_image))
        dets.extend({"image_id": i, "category_id": int(dc[k]), "bbox": [float(v) for v in bx[k]],
                     "score": float(sc[k])} for k in range(dets_per_image))
    gt = {"images": images, "annotations": anns, "categories": [{"id": k, "name": str(k)} for k in range(1, num_classes + 1)]}
    out: dict[str, Any] = {"num_images": num_images, "num_detections": len(dets)}
    impls: list[tuple[str, Any, Any]] = []
    with contextlib.suppress(ImportError):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        impls.append(("pycocotools", COCO, COCOeval))
    with contextlib.suppress(ImportError):
        from faster_coco_eval import COCO as FCOCO
        from faster_coco_eval import COCOeval_faster
        impls.append(("faster_coco_eval", FCOCO, COCOeval_faster))
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
    stats = {}
    for name, coco_cls, eval_cls in impls:
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            t0 = time.perf_counter()
            coco = coco_cls()
            coco.dataset = json.loads(json.dumps(gt))
            coco.createIndex()
            res = coco.loadRes([dict(d) for d in dets])
            ev = eval_cls(coco, res, "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out[f"{name}_s"] = time.perf_counter() - t0
        stats[name] = [float(s) for s in ev.stats[:12]]
    if len(stats) == 2:
        a, b = stats.values()
        out["max_abs_stat_diff"] = max(abs(x - y) for x, y in zip(a, b))
    if "faster_coco_eval" not in stats:
        out["faster_coco_eval"] = "not installed (pip install faster-coco-eval)"
    return out


# ----------------------------------------------------------------------------- data loader
def loader_speed(data_cfg: Any, batches: int) -> dict[str, Any]:
    """Images/s of the configured train loader alone (default workers), after its first batch."""
    from backbone.training.runner import build

    dm = build(data_cfg, "data")
    dm.prepare_data()
    dm.resolve_classes()
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    first = next(it)  # worker start-up is not throughput
    n = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        n += int(batch["images"].shape[0])
    dt = time.perf_counter() - t0
    del it
    return {"img_s": n / dt if dt > 0 else float("nan"), "images": n, "num_workers": int(dm.num_workers),
            "batch_size": int(first["images"].shape[0])}


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
    head = (f"{'model':<22} {'params':>7} {'MAdds':>7} {'train':>8} {'eval':>8} {'fwd':>8} {'eff':>6} "
            f"{'lat med':>8} {'lat p90':>8} {'peak MB':>8}")
    lines = [head, f"{'':<22} {'M':>7} {'G':>7} {'img/s':>8} {'img/s':>8} {'img/s':>8} {'%':>6} {'ms':>8} {'ms':>8}"]
    for c in cands:
        r = c.results
        lines.append(f"{c.name:<22} {r['params'] / 1e6:>7.2f} {r['madds'] / 1e9:>7.2f} {r['train_img_s']:>8.2f} "
                     f"{r['eval_img_s']:>8.2f} {r['forward_img_s']:>8.2f} {100 * r['forward_efficiency']:>6.1f} "
                     f"{r['latency_ms_median']:>8.1f} {r['latency_ms_p90']:>8.1f} {r['train_peak_mb']:>8.0f}")
    lines.append(f"(matmul peak {peak:.1f} GFLOP/s; eff = MAdds x 2 x fwd img/s / peak)")
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
        train = images.shape[0] / _time(ours.train_step, max(1, int(cfg.variant_iters)), device)
        one = images[:1].contiguous()
        ours.eval_call(one)
        lat = _latencies(lambda c=ours, x=one: c.eval_call(x), max(3, int(cfg.variant_iters) * 2), device)
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
               "batch_size": int(cfg.batch_size), "input": size}
    print(f"benchmark task={task}: {machine['device_name']} ({device}), {machine['threads']} threads, torch "
          f"{torch.__version__}, torchvision {torchvision.__version__}, precision {cfg.precision}, "
          f"batch {cfg.batch_size}, input {size}", flush=True)
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

    result: dict[str, Any] = {"task": task, "machine": machine,
                              "settings": {k: cfg[k] for k in ("warmup", "iters", "repeats", "latency_iters", "lr")},
                              "model": OmegaConf.to_container(model_cfg, resolve=True),
                              "models": {c.name: c.results for c in cands}, "ratios": rat}
    ours = next(c for c in cands if c.ours)
    if cfg.onnx and device.type == "cpu":
        with tempfile.TemporaryDirectory() as tmp:
            result["onnxruntime_batch1"] = onnx_latency(task, ours.model.lightning_module[0], size,
                                                        int(cfg.latency_iters), Path(tmp))
        o = result["onnxruntime_batch1"]
        print(f"ONNX Runtime batch-1: skipped: {o['skipped']}" if "skipped" in o else
              f"ONNX Runtime batch-1 {ours.name}: median {o['latency_ms_median']:.1f} ms, p90 "
              f"{o['latency_ms_p90']:.1f} ms (eager {ours.results['latency_ms_median']:.1f} ms)")
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
              f"= {ld['loader_over_train']:.1f}x our train step")
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
