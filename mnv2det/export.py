"""End-to-end SSDLite for export: 0..255 images in, detections (or raw head outputs) out.

:class:`DetectionExport` normalises inside, runs the detector and, with ``nms``, reproduces
:class:`mnv2det.postprocess.PostProcessor` with fixed-size outputs::

    boxes (B, D, 4) xyxy in input pixels, scores (B, D), labels (B, D) int64 1..K (padding 0),
    num_detections (B,) int64                                     D = postprocess.max_detections

Decode, score conversion and the clip are plain tensor ops; the pre-NMS top-k cap, the class-wise
NMS, the clip/drop of empty boxes after it and the per-image top D are one custom op,
``torch.ops.mnv2.multiclass_nms``. Its eager kernel is the PostProcessor's own code (the reference);
:func:`multiclass_nms_onnx` lowers it to ONNX ``NonMaxSuppression`` (per image, per class, exact
greedy) + TopK, so torch.export sees fixed output shapes and no data-dependent sizes. Why a custom op:
the dynamo exporter (torch 2.14 default) has no lowering of ``torchvision::nms`` and the TorchScript
one's maps it to a single-class NMS whose dynamic number of survivors would still need the per-image
top-D and padding written around it; one op with fixed outputs keeps both simple.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from backbone.errors import ArgumentError
from backbone.export.layout import MOBILE_DET_OUTPUTS, check_layout, example_input, images_to_nchw
from mnv2det.postprocess import batched_nms_single_call, convert_scores
from mnv2det.ssdlite import SSDLite

NMS_OUTPUTS = ("boxes", "scores", "labels", "num_detections")
RAW_OUTPUTS = ("cls_logits", "bbox_regression", "anchors")
DECODED_OUTPUTS = ("boxes", "scores")


@torch.library.custom_op("mnv2::multiclass_nms", mutates_args=())
def multiclass_nms(boxes: torch.Tensor, scores: torch.Tensor, width: float, height: float, iou_threshold: float,
                   score_threshold: float, max_detections: int, pre_nms_top_k: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-NMS top-k, class-wise greedy NMS per image, then clip, drop empty boxes, keep the top ``max_detections``.

    boxes: (B, N, 4) xyxy (unclipped), scores: (B, K, N): a candidate needs score >= score_threshold and,
    with ``pre_nms_top_k`` > 0, a place among the image's top ``pre_nms_top_k`` (anchor, class) scores.
    Returns boxes (B, D, 4) clipped to [0, width] x [0, height], scores (B, D), labels (B, D) int64
    1..K, num_detections (B,) int64; rows past num_detections are 0, kept rows sorted by score.
    """
    B, K, N = scores.shape
    D = int(max_detections)
    scores = cap_candidates(scores, pre_nms_top_k)
    b, k, n = (scores >= score_threshold).nonzero(as_tuple=True)
    cand_boxes, cand_scores = boxes[b, n].float(), scores[b, k, n].float()
    kept = batched_nms_single_call(cand_boxes, cand_scores, b * K + k, iou_threshold)
    bound = cand_boxes.new_tensor([width, height, width, height])
    kb = torch.minimum(cand_boxes[kept].clamp(min=0), bound)
    nonempty = (kb[:, 2] > kb[:, 0]) & (kb[:, 3] > kb[:, 1])
    kept, kb = kept[nonempty], kb[nonempty]
    img = b[kept]
    order = torch.sort(img, stable=True).indices  # kept is by score: a stable sort by image keeps that
    kept, kb, img = kept[order], kb[order], img[order]
    counts = torch.bincount(img, minlength=B)
    rank = torch.arange(img.numel()) - (torch.cumsum(counts, 0) - counts)[img]
    sel = rank < D
    img, rank = img[sel], rank[sel]
    out_boxes = boxes.new_zeros(B, D, 4)
    out_scores = scores.new_zeros(B, D)
    out_labels = torch.zeros(B, D, dtype=torch.int64)
    out_boxes[img, rank] = kb[sel].to(boxes.dtype)
    out_scores[img, rank] = cand_scores[kept[sel]].to(scores.dtype)
    out_labels[img, rank] = k[kept[sel]] + 1
    return out_boxes, out_scores, out_labels, counts.clamp(max=D)


def cap_candidates(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """scores (B, K, N) with every entry outside the image's top ``top_k`` (ranked anchor-major, as the
    PostProcessor ranks them) set to -1, never kept; ``top_k`` <= 0 or >= K * N: unchanged."""
    B, K, N = scores.shape
    if top_k <= 0 or top_k >= K * N:
        return scores
    flat = scores.transpose(1, 2).reshape(B, N * K)
    top, idx = flat.topk(int(top_k), dim=1)
    return torch.full_like(flat, -1.0).scatter(1, idx, top).reshape(B, N, K).transpose(1, 2)


@multiclass_nms.register_fake
def _(boxes, scores, width, height, iou_threshold, score_threshold, max_detections, pre_nms_top_k):
    B, D = boxes.shape[0], int(max_detections)
    return (boxes.new_empty(B, D, 4), scores.new_empty(B, D), boxes.new_empty(B, D, dtype=torch.int64),
            boxes.new_empty(B, dtype=torch.int64))


def multiclass_nms_onnx(boxes: Any, scores: Any, width: float, height: float, iou_threshold: float,
                        score_threshold: float, max_detections: int, pre_nms_top_k: int) -> tuple[Any, Any, Any, Any]:
    """ONNX lowering of ``mnv2::multiclass_nms`` (onnxscript, opset 18).

    The cap is :func:`cap_candidates` as TopK + ScatterElements. NonMaxSuppression keeps ``score > threshold`` where the eager op keeps ``>=``: it gets the float32
    just below the threshold. Its per-class cap is N (every box), so no survivor is lost before the
    clip; the per-image top D is a TopK over a (B, M + D) matrix (-inf off the image, D -inf pads
    so that K = D always fits).
    """
    from onnxscript import opset18 as op

    D = int(max_detections)
    if pre_nms_top_k > 0:
        flat = op.Reshape(op.Transpose(scores, perm=[0, 2, 1]), op.Constant(value_ints=[0, -1]))  # (B, N * K)
        k = op.Min(op.Constant(value_ints=[int(pre_nms_top_k)]), op.Shape(flat, start=1, end=2))
        top, idx = op.TopK(flat, k, axis=1, largest=1, sorted=1)
        capped = op.ScatterElements(op.Expand(op.Constant(value_float=-1.0), op.Shape(flat)), idx, top, axis=1)
        bnk = op.Concat(op.Shape(scores, start=0, end=1), op.Shape(scores, start=2, end=3),
                        op.Shape(scores, start=1, end=2), axis=0)
        scores = op.Transpose(op.Reshape(capped, bnk), perm=[0, 2, 1])  # (B, K, N) again
    n_boxes = op.Shape(boxes, start=1, end=2)
    thr = float(np.nextafter(np.float32(score_threshold), np.float32(-np.inf)))
    sel = op.NonMaxSuppression(boxes, scores, n_boxes, op.Constant(value_floats=[float(iou_threshold)]),
                               op.Constant(value_floats=[thr]))  # (M, 3): image, class, box
    i0, i1, i2 = op.Constant(value_ints=[0]), op.Constant(value_ints=[1]), op.Constant(value_ints=[2])
    img = op.Squeeze(op.Gather(sel, i0, axis=1), i1)  # (M,)
    cls = op.Squeeze(op.Gather(sel, i1, axis=1), i1)
    sel_scores = op.GatherND(scores, sel)  # (M,)
    sel_boxes = op.GatherND(boxes, op.Concat(op.Gather(sel, i0, axis=1), op.Gather(sel, i2, axis=1), axis=1))
    bound = op.Constant(value_floats=[float(width), float(height), float(width), float(height)])
    clipped = op.Min(op.Max(sel_boxes, op.Constant(value_float=0.0)), bound)  # (M, 4)
    x1, y1, x2, y2 = (op.Squeeze(op.Gather(clipped, op.Constant(value_ints=[j]), axis=1), i1) for j in range(4))
    nonempty = op.And(op.Greater(x2, x1), op.Greater(y2, y1))
    neg = op.Constant(value_float=float("-inf"))
    s = op.Where(nonempty, sel_scores, neg)
    B = op.Shape(boxes, start=0, end=1)
    images = op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Squeeze(B, i0), op.Constant(value_int=1)), i1)
    mat = op.Where(op.Equal(images, op.Unsqueeze(img, i0)), op.Unsqueeze(s, i0), neg)  # (B, M)
    pad = op.Expand(neg, op.Concat(B, op.Constant(value_ints=[D]), axis=0))
    vals, idx = op.TopK(op.Concat(mat, pad, axis=1), op.Constant(value_ints=[D]), axis=1, largest=1, sorted=1)
    valid = op.Greater(vals, neg)  # (B, D)
    zero_boxes = op.Expand(op.Constant(value_float=0.0), op.Constant(value_ints=[D, 4]))
    all_boxes = op.Concat(clipped, zero_boxes, axis=0)  # (M + D, 4)
    all_labels = op.Concat(op.Add(cls, op.Constant(value_int=1)),
                           op.Expand(op.Constant(value_int=0), op.Constant(value_ints=[D])), axis=0)
    out_boxes = op.Where(op.Unsqueeze(valid, op.Constant(value_ints=[2])), op.Gather(all_boxes, idx, axis=0),
                         op.Constant(value_float=0.0))
    out_scores = op.Where(valid, vals, op.Constant(value_float=0.0))
    out_labels = op.Where(valid, op.Gather(all_labels, idx, axis=0), op.Constant(value_int=0))
    num = op.ReduceSum(op.Cast(valid, to=7), i1, keepdims=0)  # 7: int64
    return out_boxes, out_scores, out_labels, num


class DetectionExport(nn.Module):
    """SSDLite + normalisation (+ post-processing) for export.

    images: (B, 3, H, W) float32 RGB 0..255 at the model's input size (``layout="mobile"``: (B, H, W, 3),
    float32 or uint8, :mod:`backbone.export.layout`) ->
        nms=True: boxes (B, D, 4) xyxy input px, scores (B, D), labels (B, D) int64, num_detections (B,) int64
        (mobile: locations (B, D, 4) normalised yxyx, classes (B, D) float 0-based, scores (B, D), count (B,) float);
        nms=False, decoded=True: boxes (B, A, 4) xyxy input px and scores (B, A, K), what the PostProcessor
        ranks (clipped, and -1 for boxes left empty, with clip_before_nms): NMS left to the client (OpenCV's
        cv2.dnn.NMSBoxesBatched), no TopK / NMS op in the graph;
        nms=False, decoded=False: cls_logits (B, A, K+1), bbox_regression (B, A, 4) (codes in box_code_order),
        anchors (A, 4) normalised xyxy.
    ``pre_nms_top_k``: the candidate cap before NMS (None: the model's postprocess.pre_nms_top_k).
    """

    def __init__(self, model: SSDLite, nms: bool = True, layout: str = "nchw", input_dtype: str = "float32",
                 pre_nms_top_k: int | None = None, decoded: bool = True) -> None:
        super().__init__()
        self.model = model.eval()
        self.nms = bool(nms)
        self.decoded = bool(decoded) and not self.nms
        self.layout, self.input_dtype = check_layout(layout, input_dtype)
        top_k = model.postprocessor.pre_nms_top_k if pre_nms_top_k is None else pre_nms_top_k
        if top_k is not None and int(top_k) < 1:
            raise ArgumentError("pre_nms_top_k", f"must be >= 1 or null, got {top_k}", "e.g. pre_nms_top_k=1000")
        self.pre_nms_top_k = 0 if top_k is None else int(top_k)  # 0: every candidate
        self.input_size = tuple(model.image_size)
        self.register_buffer("mean", torch.tensor(model.normalize_mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(model.normalize_std).view(1, 3, 1, 1) * 255)
        with torch.no_grad():  # anchors depend only on the input size: a constant of the graph
            anchors = model(torch.zeros(1, 3, *self.input_size))["anchors"]
        self.register_buffer("anchors", anchors)
        mobile = self.layout == "mobile"
        self.output_names = ((MOBILE_DET_OUTPUTS if mobile else NMS_OUTPUTS) if self.nms
                             else DECODED_OUTPUTS if self.decoded else RAW_OUTPUTS)

    def tflite_postprocess_op(self) -> dict[str, Any] | None:
        """See :func:`postprocess_op_spec` (what :mod:`backbone.export.tflite` asks a wrapper)."""
        return postprocess_op_spec(self)

    def onnx_translations(self) -> dict[Any, Any]:
        return {torch.ops.mnv2.multiclass_nms.default: multiclass_nms_onnx}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (images_to_nchw(images, self.layout) - self.mean) / self.std
        cls_logits, bbox_regression = self.model.head(self.model.extract_features(x))
        if not self.nms and not self.decoded:
            return cls_logits, bbox_regression, self.anchors.clone()
        pp = self.model.postprocessor
        h, w = self.input_size
        scores = convert_scores(cls_logits, pp.score_converter)  # (B, A, K)
        boxes = pp.box_coder.decode(bbox_regression.float(), self.anchors) * torch.tensor(
            [w, h, w, h], dtype=torch.float32)
        if pp.clip_before_nms:
            bound = torch.tensor([w, h, w, h], dtype=torch.float32)
            boxes = torch.minimum(boxes.clamp(min=0), bound)
            nonempty = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
            scores = scores.masked_fill(~nonempty[..., None], -1.0)
        if self.decoded:
            return boxes, scores
        # the pre-NMS cap is inside the op: a static NMS takes its own top-k, a scatter here would cost
        # LiteRT a STABLEHLO_SCATTER (a second subgraph; TFLite >= 2.15 only)
        out = torch.ops.mnv2.multiclass_nms(boxes, scores.transpose(1, 2).contiguous(), float(w), float(h),
                                            pp.nms_iou, max(pp.score_threshold, 0.0), pp.max_detections,
                                            self.pre_nms_top_k)
        if self.layout != "mobile":
            return out
        det_boxes, det_scores, labels, num = out
        x1, y1, x2, y2 = det_boxes.unbind(-1)
        locations = torch.stack([y1 / h, x1 / w, y2 / h, x2 / w], dim=-1)
        classes = (labels - 1).clamp(min=0).to(torch.float32)
        return locations, classes, det_scores, num.to(torch.float32)


class PostprocessOpInputs(nn.Module):
    """A mobile detection wrapper up to the inputs of TFLite's ``TFLite_Detection_PostProcess``, one op per
    class (:mod:`backbone.export.tflite_postprocess`): ``codes (1, A, 4)`` (ty, tx, th, tw), then each class's
    converted scores ``(1, A, 1)``, every candidate outside the image's top ``pre_nms_top_k`` at -1 (the ops'
    score threshold is >= 0, so they never keep one: the cap of ``mnv2::multiclass_nms`` as a threshold at
    the k-th score, no scatter)."""

    def __init__(self, wrapper: DetectionExport) -> None:
        super().__init__()
        self.wrapper = wrapper

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w = self.wrapper
        x = (images_to_nchw(images, w.layout) - w.mean) / w.std
        cls_logits, codes = w.model.head(w.model.extract_features(x))
        pp = w.model.postprocessor
        scores = convert_scores(cls_logits, pp.score_converter)  # (B, A, K)
        B, A, K = scores.shape
        if 0 < w.pre_nms_top_k < A * K:
            flat = scores.reshape(B, A * K)
            # the k-th value read through the indices: a top-k whose indices go unused lowers to a
            # STABLEHLO_SORT (a second subgraph) instead of TOPK_V2
            kth = torch.gather(flat, 1, flat.topk(w.pre_nms_top_k, dim=1).indices[:, -1:])
            scores = torch.where(scores >= kth.unsqueeze(-1), scores, torch.full_like(scores, -1.0))
        codes = codes.float()
        if pp.box_coder.order == "xy":
            tx, ty, tw, th = codes.unbind(-1)
            codes = torch.stack([ty, tx, th, tw], dim=-1)
        # slices, not split(): litert-torch 0.10 fails on split_with_sizes([1]) (a one-class model)
        return (codes, *(scores[..., c:c + 1] for c in range(K)))


class PostprocessOpTail(nn.Module):
    """The per-class ops' results -> the mobile outputs: clip to the image, drop boxes the clip empties,
    the top D by score. Inputs: K boxes (1, D + E, 4) (ymin, xmin, ymax, xmax normalised, unclipped), K
    scores (1, D + E), K counts (1,) (floats, as the op writes them); outputs: locations (1, D, 4),
    classes (1, D) 0-based, scores (1, D), count (1,); rows past count 0."""

    def __init__(self, num_classes: int, max_detections: int) -> None:
        super().__init__()
        self.K, self.D = int(num_classes), int(max_detections)

    def forward(self, *per_class: torch.Tensor) -> tuple[torch.Tensor, ...]:
        K, D = self.K, self.D
        boxes = torch.cat(per_class[:K], 1)  # (1, K * M, 4), class-major
        scores = torch.cat(per_class[K:2 * K], 1)  # (1, K * M)
        M = boxes.shape[1] // K
        counts = torch.cat(per_class[2 * K:], 0).reshape(1, K, 1)
        kept = (torch.arange(M, dtype=torch.float32).reshape(1, 1, M) < counts).reshape(1, K * M)
        y1, x1, y2, x2 = boxes.clamp(0, 1).unbind(-1)
        kept = kept & (y2 > y1) & (x2 > x1)
        top, idx = torch.where(kept, scores, torch.full_like(scores, -1.0)).topk(D, dim=1)
        valid = top >= 0
        picked = torch.gather(torch.stack([y1, x1, y2, x2], -1), 1, idx.unsqueeze(-1).expand(1, D, 4))
        locations = picked * valid.unsqueeze(-1).to(picked.dtype)
        classes = torch.where(valid, torch.div(idx, M, rounding_mode="floor"), torch.zeros_like(idx)).to(torch.float32)
        return locations, classes, torch.where(valid, top, torch.zeros_like(top)), valid.to(torch.float32).sum(1)


def postprocess_op_spec(wrapper: DetectionExport) -> dict[str, Any] | None:
    """What :mod:`backbone.export.tflite` needs to end a mobile-layout detection wrapper with NMS inside in
    TFLite's native op: ``network`` (:class:`PostprocessOpInputs`), ``tail`` (:class:`PostprocessOpTail`) and
    ``tail_example`` (its inputs), ``anchors`` (A, 4) (ycenter, xcenter, h, w) and the per-class op's
    ``options``; None where the op cannot reproduce the post-processing (not the mobile layout, or
    ``clip_before_nms``: the op clips nothing): the exporter then uses the static NMS."""
    from backbone.export.static_nms import EMPTY_MARGIN
    from backbone.export.tflite_postprocess import op_options

    pp = wrapper.model.postprocessor
    if not wrapper.nms or wrapper.layout != "mobile" or pp.clip_before_nms:
        return None
    a = wrapper.anchors.double()
    wh = a[:, 2:] - a[:, :2]
    centre = a[:, :2] + 0.5 * wh  # as BoxCoder.decode computes them
    anchors = torch.stack([centre[:, 1], centre[:, 0], wh[:, 1], wh[:, 0]], 1).float().numpy()
    w = pp.box_coder.weights  # in the codes' order; the op's are (y, x, h, w)
    scales = w if pp.box_coder.order == "yx" else (w[1], w[0], w[3], w[2])
    K, D = wrapper.model.num_classes, pp.max_detections
    M = D + EMPTY_MARGIN
    options = op_options(max_detections=M, iou_threshold=pp.nms_iou, score_threshold=max(pp.score_threshold, 0.0),
                         scales=scales)
    # distinct tensors: torch.export takes one tensor passed twice for one input
    tail_example = tuple([torch.rand(1, M, 4) for _ in range(K)] + [torch.rand(1, M) for _ in range(K)]
                         + [torch.full((1,), float(M)) for _ in range(K)])
    return {"network": PostprocessOpInputs(wrapper).eval(), "tail": PostprocessOpTail(K, D).eval(),
            "tail_example": tail_example, "anchors": anchors, "options": options}


def build_export(module: nn.Module, meta: dict[str, Any], nms: bool = True, layout: str = "nchw",
                 input_dtype: str = "float32", pre_nms_top_k: int | None = None, decoded: bool = True
                 ) -> tuple[DetectionExport, torch.Tensor, dict[str, Any]]:
    """(wrapper, example input, metadata) of an SSDLiteModule loaded from a checkpoint."""
    from backbone.export.metadata import make_metadata

    model: SSDLite = module.model
    wrapper = DetectionExport(model, nms=nms, layout=layout, input_dtype=input_dtype,
                              pre_nms_top_k=pre_nms_top_k, decoded=decoded).eval()
    pp = model.postprocessor
    K = model.num_classes
    names = list(meta.get("class_names") or [f"class_{i}" for i in range(1, K + 1)])
    metadata = make_metadata(
        "det", wrapper.input_size, getattr(module, "resize", "cv2_linear"), model.normalize_mean, model.normalize_std,
        names, wrapper.output_names, nms=nms, category_ids=meta.get("category_ids"),
        postprocess={"score_threshold": pp.score_threshold, "nms_iou": pp.nms_iou, "max_detections": pp.max_detections,
                     "pre_nms_top_k": wrapper.pre_nms_top_k or None, "score_converter": pp.score_converter,
                     "clip_before_nms": pp.clip_before_nms, "box_coder_weights": list(pp.box_coder.weights),
                     "box_code_order": pp.box_coder.order},
        anchors_output=not nms and not wrapper.decoded, decoded=wrapper.decoded, num_classes=K, layout=layout, input_dtype=input_dtype)
    example = example_input(1, wrapper.input_size, layout, input_dtype)
    return wrapper, example, metadata
