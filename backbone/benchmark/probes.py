"""Side measurements of a benchmark run: batch-1 latency through ONNX Runtime, COCO scoring time
(pycocotools vs faster-coco-eval), the train loader alone."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from backbone.benchmark.machine import latencies, p90


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
    lat = latencies(lambda: runner(x), iters, torch.device("cpu"))
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


