"""SSDLite-MobileNetV2: shapes, TF structure/names, complexity targets, loss and post-processing wiring."""
from __future__ import annotations

import math

import pytest
import torch

from backbone.complexity import count_madds, count_params
from backbone.errors import ArgumentError, DataError
from backbone.padding import Conv2dSame
from mnv2det.ssdlite import SSDLite, build_ssdlite


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convs are far faster single-threaded on a shared CPU (no OpenMP spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model() -> SSDLite:
    torch.manual_seed(0)
    return SSDLite(num_classes=80).eval()


@pytest.mark.parametrize("size,maps,num_anchors", [(300, [19, 10, 5, 3, 2, 1], 1917),
                                                     (320, [20, 10, 5, 3, 2, 1], 2034)])
def test_shapes(model: SSDLite, size: int, maps: list[int], num_anchors: int) -> None:
    with torch.no_grad():
        feats = model.extract_features(torch.zeros(1, 3, size, size))
        out = model(torch.zeros(1, 3, size, size))
    assert [f.shape[-1] for f in feats] == maps
    assert [f.shape[1] for f in feats] == [576, 1280, 512, 256, 256, 128]
    assert out["cls_logits"].shape == (1, num_anchors, 81)
    assert out["bbox_regression"].shape == (1, num_anchors, 4)
    assert out["anchors"].shape == (num_anchors, 4)


def test_tf_structure_and_names(model: SSDLite) -> None:
    sd = model.state_dict()
    # extras: 1x1 reduce to depth / 2 (256/128/128/64), depthwise 3x3 s2, 1x1 to depth
    assert [b.reduce.out_channels for b in model.extras] == [256, 128, 128, 64]
    assert [b.pointwise.out_channels for b in model.extras] == [512, 256, 256, 128]
    assert all(b.depthwise[0].stride == (2, 2) and b.depthwise[0].groups == b.reduce.out_channels
               for b in model.extras)
    # head: BoxPredictor_i/{BoxEncodingPredictor,ClassPredictor}{_depthwise,}
    assert sd["head.box_head.0.depthwise.0.weight"].shape == (576, 1, 3, 3)
    assert "head.box_head.0.depthwise.1.running_var" in sd
    assert sd["head.box_head.0.pointwise.weight"].shape == (3 * 4, 576, 1, 1)
    assert sd["head.cls_head.1.pointwise.bias"].shape == (6 * 81,)
    assert sd["head.cls_head.5.depthwise.0.weight"].shape == (128, 1, 3, 3)
    assert "backbone.features.14.conv.0.0.weight" in sd  # layer_15 expansion (torchvision layout)
    # TF init: truncated normal std 0.03 cut at 2 std
    w = model.head.cls_head[1].pointwise.weight
    assert w.abs().max() <= 0.06 and 0.02 < w.std() < 0.035


def test_params_and_madds_targets(model: SSDLite) -> None:
    params = count_params(model)
    assert abs(params - 4.337e6) / 4.337e6 < 0.03  # TARGETS.md: 4.337M (paper: 4.3M)
    madds_300 = count_madds(model, (1, 3, 300, 300))
    assert 0.70e9 <= madds_300 <= 0.80e9  # TARGETS.md: 0.735B (paper: 0.8B)
    madds_320 = count_madds(model, (1, 3, 320, 320))
    assert abs(madds_320 - 0.789e9) / 0.789e9 < 0.03


def test_tf_padding_odd_sizes() -> None:
    m = SSDLite(num_classes=3, backbone={"padding": "tf", "bn_eps": 1e-3}).eval()
    assert isinstance(m.extras[0].depthwise[0], Conv2dSame)
    assert m.extras[0].depthwise[1].eps == 1e-3 and m.head.box_head[0].depthwise[1].eps == 1e-3
    with torch.no_grad():
        for h, w in [(301, 301), (157, 211)]:
            out = m(torch.randn(1, 3, h, w))
            sizes = [tuple(f.shape[-2:]) for f in m.extract_features(torch.randn(1, 3, h, w))]
            expected_first = (-(-h // 16), -(-w // 16))
            assert sizes[0] == expected_first
            n = sum(a * b * k for (a, b), k in zip(sizes, m.anchor_generator.num_anchors_per_location()))
            assert out["cls_logits"].shape == (1, n, 4) and out["anchors"].shape == (n, 4)


def test_num_classes_changes_only_class_head() -> None:
    a = SSDLite(num_classes=80).state_dict()
    b = SSDLite(num_classes=20).state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].shape != b[k].shape]
    assert differ and all(k.startswith("head.cls_head.") and ".pointwise." in k for k in differ)
    assert len(differ) == 12  # weight + bias of 6 class predictors


def _targets() -> dict[str, torch.Tensor]:
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.6], [0.6, 0.2, 0.9, 0.5], [0.0, 0.0, 0.0, 0.0]],
                          [[0.3, 0.3, 0.7, 0.9], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    return {"boxes": boxes, "labels": torch.tensor([[1, 2, 0], [3, 1, 0]]),
            "valid": torch.tensor([[True, True, False], [True, True, False]]),
            "crowd": torch.tensor([[False, False, False], [False, True, False]])}


@pytest.mark.parametrize("score_converter,cls_loss", [("softmax", "ce"), ("sigmoid", "ce"), ("sigmoid", "focal")])
def test_loss_backward_and_overfit(score_converter: str, cls_loss: str) -> None:
    torch.manual_seed(0)
    # narrow backbone + small images keep this fast on a busy CPU
    m = SSDLite(num_classes=3, backbone={"width_mult": 0.35}, score_converter=score_converter,
                loss={"cls_loss": cls_loss})
    images = torch.randn(2, 3, 64, 64)
    targets = _targets()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        out = m(images)
        ld = m.compute_loss(out, targets)
        opt.zero_grad()
        ld["loss"].backward()
        opt.step()
        losses.append(ld["loss"].item())
    assert ld["num_pos"].item() >= 2  # every non-crowd box is force-matched
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0]
    labels, box_targets, matched = m.assign_targets(out["anchors"], targets)
    assert not (matched == 1)[1].any()  # crowd box of image 1 never positive
    assert set(labels[0][matched[0] >= 0].tolist()) <= {1, 2}


def test_postprocess_format(model: SSDLite) -> None:
    with torch.no_grad():
        out = model(torch.randn(2, 3, 300, 300))
    dets = model.postprocess(out, torch.tensor([[480, 640], [300, 200]]))
    assert len(dets) == 2
    for d, (h, w) in zip(dets, [(480, 640), (300, 200)]):
        assert set(d) == {"boxes", "scores", "labels"}
        assert d["boxes"].shape[1] == 4 and len(d["boxes"]) <= 100
        assert d["labels"].min() >= 1 and d["labels"].max() <= 80
        assert (d["boxes"][:, 2] <= w).all() and (d["boxes"][:, 3] <= h).all()


def test_config_errors_and_normalize() -> None:
    m = build_ssdlite({"num_classes": 2, "normalize": {"mode": "tf"}, "image_size": 320})
    assert m.normalize_mean == (0.5, 0.5, 0.5) and m.normalize_std == (0.5, 0.5, 0.5)
    assert m.image_size == (320, 320)
    assert SSDLite(num_classes=2).normalize_mean == (0.485, 0.456, 0.406)
    with pytest.raises(ArgumentError, match="^anchor.foo "):
        SSDLite(num_classes=2, anchor={"foo": 1})
    with pytest.raises(ArgumentError, match="^bogus "):
        build_ssdlite({"num_classes": 2, "bogus": 1})
    with pytest.raises(ArgumentError, match="^num_classes "):
        SSDLite(num_classes=0)
    with pytest.raises(ArgumentError, match="^score_converter "):
        SSDLite(num_classes=2, score_converter="relu")
    with pytest.raises(ArgumentError, match="^postprocess.nms_iou ") as e:
        SSDLite(num_classes=2, postprocess={"nms_iou": 0.0})
    assert e.value.to_config_error("model").key == "model.postprocess.nms_iou"
    with pytest.raises(ArgumentError, match="^box_code_order "):
        SSDLite(num_classes=2, box_code_order="ab")
    with pytest.raises(ArgumentError, match="^backbone.width_mult "):
        SSDLite(num_classes=2, backbone={"width_mult": -1})
    bad = _targets()
    bad["labels"] = torch.tensor([[1, 5, 0], [3, 1, 0]])
    m = SSDLite(num_classes=3)
    with pytest.raises(DataError, match="1..3"):
        m.compute_loss(m(torch.randn(2, 3, 64, 64)), bad)


def test_focal_sets_class_bias_prior() -> None:
    m = SSDLite(num_classes=2, backbone={"width_mult": 0.35}, score_converter="sigmoid", loss={"cls_loss": "focal"})
    bias = m.head.cls_head[0].pointwise.bias.view(3, 3)  # (anchors, K + 1)
    prior = torch.sigmoid(bias)
    assert torch.allclose(prior[:, 1:], torch.full((3, 2), 0.01), atol=1e-6)
    assert torch.allclose(prior[:, 0], torch.full((3,), 0.99), atol=1e-6)
    assert (SSDLite(num_classes=2, backbone={"width_mult": 0.35}).head.cls_head[0].pointwise.bias == 0).all()
    # width 0.35: extras scale like TF's depth_fn (max(int(d * 0.35), 16))
    assert [b.reduce.out_channels for b in m.extras] == [89, 44, 44, 22]
    assert [b.pointwise.out_channels for b in m.extras] == [179, 89, 89, 44]


def _encode(box: list[float], anchor: list[float]) -> list[float]:
    """Faster R-CNN coding (weights 10, 10, 5, 5; order x, y, w, h), written out by hand."""
    bw, bh, aw, ah = box[2] - box[0], box[3] - box[1], anchor[2] - anchor[0], anchor[3] - anchor[1]
    bx, by, ax, ay = box[0] + bw / 2, box[1] + bh / 2, anchor[0] + aw / 2, anchor[1] + ah / 2
    return [10 * (bx - ax) / aw, 10 * (by - ay) / ah, 5 * math.log(bw / aw), 5 * math.log(bh / ah)]


def test_assign_targets_by_hand(model: SSDLite) -> None:
    B0, B1 = [0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9]
    anchors = [B0, B1, [0.0, 0.0, 0.05, 0.05], [0.12, 0.1, 0.3, 0.3], [0.55, 0.6, 0.9, 0.9], [0.3, 0.3, 0.6, 0.6]]
    # image 0: B0 (label 7), B1 (label 3); image 1: a crowd box at B0 (label 2) first, then B1 (label 5), padding
    targets = {"boxes": torch.tensor([[B0, B1, [0.0] * 4], [B0, B1, [0.0] * 4]]),
               "labels": torch.tensor([[7, 3, 0], [2, 5, 0]]),
               "valid": torch.tensor([[True, True, False], [True, True, False]]),
               "crowd": torch.tensor([[False, False, False], [True, False, False]])}
    labels, box_targets, matched = model.assign_targets(torch.tensor(anchors), targets)
    # anchors 0, 3 overlap B0 (IoU 1, 0.9), anchors 1, 4 overlap B1 (IoU 1, 0.86), anchors 2, 5 nothing;
    # in image 1 the crowd box makes anchors 0 and 3 ignored instead of positive
    assert matched.tolist() == [[0, 1, -1, 0, 1, -1], [-2, 1, -1, -2, 1, -1]]
    assert labels.tolist() == [[7, 3, 0, 7, 3, 0], [-1, 5, 0, -1, 5, 0]]
    gt = {0: [B0, B1], 1: [B0, B1]}
    expected = torch.zeros(2, 6, 4)
    for b in range(2):
        for a in range(6):
            if matched[b, a] >= 0:
                expected[b, a] = torch.tensor(_encode(gt[b][int(matched[b, a])], anchors[a]))
    torch.testing.assert_close(box_targets, expected, atol=1e-4, rtol=1e-4)


def test_compute_loss_gives_the_miner_the_decoded_boxes(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    seen = {}

    def spy_on(loss_fn):
        forward = loss_fn.forward

        def spy(*args, decoded_boxes=None, **kwargs):
            seen["boxes"] = decoded_boxes
            return forward(*args, decoded_boxes=decoded_boxes, **kwargs)

        monkeypatch.setattr(loss_fn, "forward", spy)

    m = SSDLite(num_classes=3, backbone={"width_mult": 0.35}, loss={"miner_nms_iou": 0.99, "num_hard_examples": 3000})
    spy_on(m.loss_fn)
    out = m(torch.randn(2, 3, 64, 64))
    ld = m.compute_loss(out, _targets())
    ld["loss"].backward()
    expected = m.box_coder.decode(out["bbox_regression"].detach(), out["anchors"])
    assert not seen["boxes"].requires_grad
    torch.testing.assert_close(seen["boxes"], expected)
    assert torch.isfinite(ld["loss"])
    plain = SSDLite(num_classes=3, backbone={"width_mult": 0.35})
    spy_on(plain.loss_fn)
    plain.compute_loss(plain(torch.randn(2, 3, 64, 64)), _targets())
    assert seen["boxes"] is None  # no decoding when the option is off
