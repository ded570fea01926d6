"""The fast paths stay equal to simple references (issue #11).

- grouped NMS (only within-group pairs, no loop over groups) == torchvision.ops.nms run on each
  group alone: same indices, same order (exact);
- PostProcessor on a batch == a per-image, per-class loop over torchvision.ops.nms (exact);
- batched matching / hard negative mining / loss == the same run image by image (exact for
  matching and mining; the loss to float rounding, rtol 1e-5, since sums are re-associated);
- channels_last == contiguous outputs for the same weights (atol 1e-4 on logits of magnitude ~1:
  oneDNN picks other conv kernels, whose sums round differently).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from mnv2det.box_coder import BoxCoder
from mnv2det.loss import SSDLoss, hard_negative_mask
from mnv2det.matcher import match
from mnv2det.postprocess import (
    PostProcessor,
    batched_nms_single_call,
    convert_scores,
    grouped_nms,
)


def _random_boxes(n: int, g: torch.Generator, scale: float = 100.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * scale
    wh = torch.rand(n, 2, generator=g) * scale * 0.4
    return torch.cat([xy, xy + wh], 1)


def _per_group_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou: float) -> torch.Tensor:
    keep = []
    for gid in groups.unique().tolist():
        idx = (groups == gid).nonzero().flatten()
        keep.append(idx[torchvision.ops.nms(boxes[idx], scores[idx], iou)])
    keep = torch.cat(keep) if keep else torch.empty(0, dtype=torch.long)
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


@pytest.mark.parametrize("iou", [0.3, 0.6, 0.99])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_nms_equals_per_group_torchvision(iou: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 600
    boxes = _random_boxes(n, g)
    boxes[:5, 2:] = boxes[:5, :2]  # degenerate boxes (IoU 0/0) are never suppressed, as in torchvision
    scores = torch.rand(n, generator=g)
    groups = torch.randint(0, 7, (n,), generator=g) * 3  # sparse group ids
    ref = _per_group_nms(boxes, scores, groups, iou)
    assert torch.equal(grouped_nms(boxes, scores, groups, iou), ref)
    assert torch.equal(batched_nms_single_call(boxes, scores, groups, iou), ref)
    # the fallback (one torchvision call over offset boxes) keeps the same set
    assert torch.equal(batched_nms_single_call(boxes, scores, groups, iou, max_pairs=0), ref)


def test_grouped_nms_long_suppression_chain() -> None:
    # a chain where each box only overlaps its neighbours: greedy NMS keeps every other box, which
    # needs the fixpoint loop to run the whole chain length
    n = 40
    x = torch.arange(n, dtype=torch.float32) * 6.0
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], 1)
    scores = torch.linspace(1, 0.1, n)
    groups = torch.zeros(n, dtype=torch.long)
    ref = torchvision.ops.nms(boxes, scores, 0.2)  # neighbours: IoU 40 / 160
    assert torch.equal(grouped_nms(boxes, scores, groups, 0.2), ref)
    assert torch.equal(ref, torch.arange(0, n, 2))


def test_grouped_nms_iou_equal_to_threshold_is_kept() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 6.0]])  # IoU 0.5, 0.6
    scores = torch.tensor([0.9, 0.8, 0.7])
    groups = torch.zeros(3, dtype=torch.long)
    ref = torchvision.ops.nms(boxes, scores, 0.5)  # suppresses only above the threshold
    assert torch.equal(ref, torch.tensor([0, 1]))
    assert torch.equal(grouped_nms(boxes, scores, groups, 0.5), ref)


def test_grouped_nms_empty() -> None:
    out = grouped_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert out.numel() == 0 and out.dtype == torch.long


def _reference_postprocess(pp: PostProcessor, cls_logits: torch.Tensor, reg: torch.Tensor, anchors: torch.Tensor,
                           sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Image by image, class by class, with torchvision.ops.nms (clip after NMS, as TF)."""
    out = []
    coder = pp.box_coder
    for i in range(cls_logits.shape[0]):
        scores = convert_scores(cls_logits[i:i + 1], pp.score_converter)[0]  # (A, K)
        K = scores.shape[1]
        h, w = sizes[i].float().tolist()
        scale = torch.tensor([w, h, w, h])
        boxes = coder.decode(reg[i:i + 1].float(), anchors.float())[0] * scale
        flat = scores.reshape(-1)
        k = min(pp.pre_nms_top_k or flat.numel(), flat.numel())
        top_s, top_i = flat.topk(k)
        ok = top_s >= pp.score_threshold
        top_s, top_i = top_s[ok], top_i[ok]
        a_idx, c_idx = top_i // K, top_i % K
        cand = boxes[a_idx]
        keep_all = []
        for c in c_idx.unique().tolist():
            idx = (c_idx == c).nonzero().flatten()
            keep_all.append(idx[torchvision.ops.nms(cand[idx], top_s[idx], pp.nms_iou)])
        keep = torch.cat(keep_all) if keep_all else torch.empty(0, dtype=torch.long)
        keep = keep[torch.sort(top_s[keep], descending=True, stable=True).indices]
        b = torch.minimum(cand[keep].clamp(min=0), scale)
        nonempty = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        keep, b = keep[nonempty][: pp.max_detections], b[nonempty][: pp.max_detections]
        out.append({"boxes": b, "scores": top_s[keep], "labels": c_idx[keep] + 1})
    return out


@pytest.mark.parametrize("converter", ["softmax", "sigmoid"])
def test_postprocess_equals_per_image_reference(converter: str) -> None:
    g = torch.Generator().manual_seed(3)
    B, A, K = 4, 500, 6
    cxcy = torch.rand(A, 2, generator=g)
    wh = torch.rand(A, 2, generator=g) * 0.3 + 0.02
    anchors = torch.cat([cxcy - wh / 2, cxcy + wh / 2], 1)
    cls_logits = torch.randn(B, A, K + 1, generator=g) * 2
    reg = torch.randn(B, A, 4, generator=g) * 0.5
    sizes = torch.tensor([[320, 320], [240, 400], [100, 80], [500, 333]])
    pp = PostProcessor(score_threshold=0.05, nms_iou=0.6, max_detections=50, pre_nms_top_k=400,
                       score_converter=converter, box_coder=BoxCoder())
    got = pp(cls_logits, reg, anchors, sizes)
    ref = _reference_postprocess(pp, cls_logits, reg, anchors, sizes)
    assert sum(len(r["scores"]) for r in ref) > 50  # the test exercises NMS and the top-k cut
    for a, b in zip(got, ref):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], b[key]), key


def _padded_targets(g: torch.Generator, B: int, M: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xy = torch.rand(B, M, 2, generator=g) * 0.7
    wh = torch.rand(B, M, 2, generator=g) * 0.3 + 0.02
    boxes = torch.cat([xy, xy + wh], -1)
    counts = torch.tensor([0, 1, M, M // 2])[:B]
    valid = torch.arange(M)[None] < counts[:, None]
    crowd = torch.zeros(B, M, dtype=torch.bool)
    crowd[2, 0] = True
    return boxes, valid, crowd


def _anchors(g: torch.Generator, A: int) -> torch.Tensor:
    cxcy = torch.rand(A, 2, generator=g)
    wh = torch.rand(A, 2, generator=g) * 0.3 + 0.05
    return torch.cat([cxcy - wh / 2, cxcy + wh / 2], 1)


def test_batched_matching_equals_per_image() -> None:
    g = torch.Generator().manual_seed(4)
    boxes, valid, crowd = _padded_targets(g, 4, 6)
    anchors = _anchors(g, 300)
    kw = {"iou_threshold": 0.5, "negative_threshold": 0.3}  # a band of ignored anchors too
    got = match(boxes, valid, crowd, anchors, **kw)
    for i in range(4):
        n = int(valid[i].sum())  # the image alone, without padding rows
        ref = match(boxes[i:i + 1, :n], valid[i:i + 1, :n], crowd[i:i + 1, :n], anchors, **kw)
        assert torch.equal(got[i], ref[0])
    assert (got >= 0).any() and (got == -2).any()


def test_batched_mining_and_loss_equal_per_image() -> None:
    g = torch.Generator().manual_seed(5)
    B, A, C = 4, 300, 5
    labels = torch.randint(0, C, (B, A), generator=g)
    labels[torch.rand(B, A, generator=g) < 0.8] = 0
    labels[torch.rand(B, A, generator=g) < 0.05] = -1
    labels[0] = 0  # an image without positives: min_negatives_per_image
    ce = torch.rand(B, A, generator=g)
    pos, neg = labels > 0, labels == 0
    got = hard_negative_mask(ce, pos, neg, 3.0, 3)
    for i in range(B):
        assert torch.equal(got[i], hard_negative_mask(ce[i:i + 1], pos[i:i + 1], neg[i:i + 1], 3.0, 3)[0])

    logits = torch.randn(B, A, C, generator=g)
    reg = torch.randn(B, A, 4, generator=g)
    tgt = torch.randn(B, A, 4, generator=g)
    loss = SSDLoss()
    batch = loss(logits, reg, labels, tgt)
    total_pos = max(1, int(pos.sum()))
    ref_cls = ref_box = 0.0
    for i in range(B):  # per-image losses are normalised by the image's positives: undo, renormalise
        one = loss(logits[i:i + 1], reg[i:i + 1], labels[i:i + 1], tgt[i:i + 1])
        n = max(1, int(pos[i].sum()))
        ref_cls += float(one["loss_cls"]) * n / total_pos
        ref_box += float(one["loss_box"]) * n / total_pos
    assert float(batch["loss_cls"]) == pytest.approx(ref_cls, rel=1e-5)
    assert float(batch["loss_box"]) == pytest.approx(ref_box, rel=1e-5)


def test_channels_last_outputs_equal_default() -> None:
    from mnv2det.ssdlite import SSDLite
    from mnv2seg.deeplabv3 import DeepLabV3

    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96)
    det_a = SSDLite(num_classes=3, backbone={"width_mult": 0.35}, memory_format="contiguous").eval()
    det_b = SSDLite(num_classes=3, backbone={"width_mult": 0.35}, memory_format="channels_last").eval()
    det_b.load_state_dict(det_a.state_dict())
    convs = [m for m in det_b.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)  # survived the load
    with torch.no_grad():
        a, b = det_a(x), det_b(x)
    for key in ("cls_logits", "bbox_regression", "anchors"):
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-4)

    seg_a = DeepLabV3(4, backbone={"width_mult": 0.35}, memory_format="contiguous").eval()
    seg_b = DeepLabV3(4, backbone={"width_mult": 0.35}, memory_format="channels_last").eval()
    seg_b.load_state_dict(seg_a.state_dict())
    with torch.no_grad():
        la, lb = seg_a(x), seg_b(x)
    assert lb.is_contiguous(memory_format=torch.channels_last)  # eval: the layout argmax reads fastest
    torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)


def test_channels_last_training_step_matches() -> None:
    from mnv2seg.deeplabv3 import DeepLabV3

    torch.manual_seed(1)
    x = torch.randn(2, 3, 65, 65)
    y = torch.randint(0, 3, (2, 65, 65))
    models = [DeepLabV3(3, backbone={"width_mult": 0.35}, memory_format=m) for m in ("contiguous", "channels_last")]
    models[1].load_state_dict(models[0].state_dict())
    grads = []
    for m in models:
        torch.nn.functional.cross_entropy(m(x), y).backward()
        grads.append(m.head.classifier.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-3)


def test_memory_format_is_checked() -> None:
    from backbone.errors import ArgumentError
    from mnv2det.ssdlite import SSDLite

    with pytest.raises(ArgumentError, match="memory_format"):
        SSDLite(num_classes=2, memory_format="nhwc")


def test_benchmark_tool_writes_json(tmp_path: Path, run_tool) -> None:
    out = tmp_path / "run"
    proc = run_tool("benchmark.py", ["task=det", "image_size=96", "model.backbone.width_mult=0.35",
                                     "batch_size=2", "threads=1", "warmup=1", "iters=1", "repeats=2",
                                     "latency_iters=2", "coco_eval_images=20", "coco_eval_dets_per_image=10",
                                     "onnx=false", "profile=true", "profile_rows=3"], tmp_path / "cache", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "benchmark.json").read_text())
    prof = result["profile"]["ours_ssdlite_mnv2"]
    assert set(prof) == {"train_step", "eval_call"} and len(prof["train_step"]["ops"]) == 3
    assert any(o["op"] == "aten::convolution_backward" for o in prof["train_step"]["ops"])
    assert prof["train_step"]["by_shape"] and all(o["shapes"] for o in prof["train_step"]["by_shape"])
    assert "profile tv_ssdlite320_mnv3 eval_call" in proc.stdout
    assert result["machine"]["cpu_allocator"] in ("tuned", "default")
    assert set(result["models"]) == {"ours_ssdlite_mnv2", "tv_ssdlite320_mnv3"}
    ours = result["models"]["ours_ssdlite_mnv2"]
    for key in ("params", "madds", "bn_activations", "train_img_s", "eval_img_s", "latency_ms_median", "latency_ms_p90",
                "forward_efficiency", "train_peak_mb"):
        assert key in ours and ours[key] == ours[key], key  # present and not NaN
    assert len(ours["train_img_s_runs"]) == 2  # one per interleaved round
    assert {r["metric"] for r in result["ratios"]} >= {"train_img_s", "eval_img_s", "latency_speedup"}
    assert result["machine"]["threads"] == 1 and result["machine"]["matmul_peak_gflops"] > 0
    assert "pycocotools_s" in result["coco_eval"]
    assert "ours / tv_ssdlite320_mnv3 train_img_s" in proc.stdout
    assert "ours forward efficiency:" in proc.stdout and "(target >= 35 %" in proc.stdout


def test_benchmark_tool_bad_device_is_one_line(tmp_path: Path, run_tool) -> None:
    proc = run_tool("benchmark.py", ["task=det", "device=tpu"], tmp_path / "cache", tmp_path / "run")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "'device'" in last and "Traceback" not in proc.stderr
